"""Build the default job's model: a small Qwen2-architecture model made here, no hub.

A byte-level BPE tokenizer (digits split one per token) is trained on the task's text, a
4-layer, 128-wide Qwen2 model (head_dim 64: vLLM's CPU attention rejects 16) is
initialised, and a brief supervised warm start teaches it the task's arithmetic and,
depending on the question type, the `\\boxed{}` answer format (see demo/arithmetic.py).
The result is saved with `save_pretrained` and loaded by path like any checkpoint. It is
cached under a folder named by a hash of everything that shapes it, written to a temporary
name and renamed into place, so a half-built model is never reused.

    python -m demo.tiny_model [CACHE_DIR]   # build (or find) it and print its path
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import sys
import time
from pathlib import Path

from demo import arithmetic

log = logging.getLogger(__name__)

TEMPLATE = "Question: {prompt}\nAnswer:"
SHAPE = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=256)
SFT = dict(steps=800, batch_size=32, lr=2e-3, warmup=50, examples=20000, seed=0)


def cache_root(cache_dir: str = "") -> Path:
    return Path(cache_dir or os.environ.get("RL_LORA_CACHE", "~/.cache/rl-lora")).expanduser()


def model_key() -> str:
    """A hash of the code that makes the model and its data: any change builds a new one."""
    blob = Path(__file__).read_bytes() + Path(arithmetic.__file__).read_bytes()
    return hashlib.sha256(blob).hexdigest()[:12]


def build_tiny_model(cache_dir: str = "") -> str:
    """Return the path of the cached tiny model, building it first if needed."""
    path = cache_root(cache_dir) / f"tiny-qwen2-{model_key()}"
    if (path / "config.json").exists():
        return str(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    start = time.time()
    _build(tmp)
    try:
        tmp.rename(path)
    except OSError:  # another process finished first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the tiny model in %.0f s: %s", time.time() - start, path)
    return str(path)


def _train_tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=448, special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")


def _build(out: Path):
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(SFT["seed"])
    rng = random.Random(SFT["seed"])
    train = arithmetic.problems("train", SFT["examples"], seed=10_000 + SFT["seed"])
    pairs = [(TEMPLATE.format(prompt=p["prompt"]), arithmetic.sft_target(p, rng)) for p in train]
    tokenizer = _train_tokenizer([p + c for p, c in pairs])
    eos = tokenizer.eos_token_id
    config = Qwen2Config(
        vocab_size=512, bos_token_id=eos, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, rope_theta=10000.0, torch_dtype="float32", **SHAPE,
    )
    model = Qwen2ForCausalLM(config)

    # Encode once; the loss sees only completion tokens (prompt positions get label -100).
    encoded = []
    for prompt, completion in pairs:
        p_ids = tokenizer(prompt)["input_ids"]
        c_ids = tokenizer(completion)["input_ids"] + [eos]
        encoded.append((p_ids + c_ids, [-100] * len(p_ids) + c_ids))
    opt = torch.optim.AdamW(model.parameters(), lr=SFT["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / SFT["warmup"]) * max(0.05, 1 - s / SFT["steps"])
    )
    model.train()
    for step in range(SFT["steps"]):
        batch = rng.sample(encoded, SFT["batch_size"])
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([i + [eos] * (width - len(i)) for i, _ in batch])
        labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in batch])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(i) for i, _ in batch])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == SFT["steps"] - 1:
            log.info("warm start step %d/%d loss %.4f", step, SFT["steps"], loss.item())
    model.eval()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(eos_token_id=eos, pad_token_id=tokenizer.pad_token_id, bos_token_id=eos).save_pretrained(out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    print(build_tiny_model(sys.argv[1] if len(sys.argv) > 1 else ""))
