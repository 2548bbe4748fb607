"""The learner at real shapes: memory and speed of one step, today's path against the new one.

    python benchmarks/learner.py [--completions 4] [--prompt 128] [--tokens 512] [--skip-decode]

A model with the shapes of Qwen2.5-0.5B (random weights, float32, vocabulary 151,936, as
benchmarks/sync.py builds it) and the project's `Learner` (DeepSpeed, PEFT rank-1 LoRA on the
7 projections) take one step on `--completions` completions of `--tokens` tokens after
`--prompt`-token prompts, in a fresh process per variant:

* naive: the learner's behaviour before this benchmark: full float32 logits at every
  position, no gradient checkpointing, micro-batches by count, one torch thread (what Ray's
  OMP_NUM_THREADS=1 gave a 1-CPU learner actor);
* chunked: the LM head only where completion tokens are predicted, in blocks of
  learner.logprob_chunk tokens, without gradient checkpointing, one thread per core;
* default: the config's defaults (learner.logprob_chunk, learner.gradient_checkpointing,
  learner.max_tokens_per_micro) and one torch thread per core.

Memory: the step's peak above the loaded learner, read as the process's resident high-water
mark (VmHWM, reset through /proc/self/clear_refs once the learner is loaded and has scored
the batch once). glibc keeps freed blocks below its mmap threshold resident, which it raises
up to 32 MB as tensors come and go: the high-water mark would count memory no tensor holds
(seen: 2.5 GB instead of 0.8 GB for the default step). So memory is measured in a pass of its
own with MALLOC_MMAP_THRESHOLD_=65536, where every tensor of 64 KB or more is mapped and
unmapped with its lifetime and the resident size follows the live tensors, as a GPU caching
allocator's max_memory_allocated does; speed in another pass with the allocator's defaults.
Bytes per token are the same on a GPU, so this predicts what a step needs there. The
variants' log-probs of the same completions are compared. Then one vLLM engine serving the
same model times decoding with a rank-1 adapter against the same engine serving the base
model. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/ (Ray hands it to workers), where this file would shadow the package

VARIANTS = {
    "naive": ["learner.logprob_chunk=0", "learner.gradient_checkpointing=false", "learner.max_tokens_per_micro=0",
              "learner.cpu_cores=0"],
    "chunked": ["learner.gradient_checkpointing=false"],
    "default": [],
}
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # see the module doc


def rss_gb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 2**20
    raise KeyError(field)


def batch(completions: int, prompt: int, tokens: int, vocab: int) -> list:
    import torch

    g = torch.Generator().manual_seed(0)
    from common.records import Datum

    return [Datum(torch.randint(0, vocab, (prompt,), generator=g).tolist(),
                  torch.randint(0, vocab, (tokens,), generator=g).tolist(),
                  [-11.9] * tokens,  # about log(1/vocab): the random model is near uniform
                  1.0 if i % 2 else -1.0) for i in range(completions)]


def run_variant(model_path: str, name: str, args, out: Path):
    """In a fresh process: load the learner, score the completions, take one step."""
    from transformers import AutoConfig

    from learner.learner import Learner
    from rl.config import load_config
    from rl.fleet import learner_spec

    cfg = load_config(None, [f"rollout.prompts_per_step={args.completions}", "rollout.group_size=2",
                             f"model.max_model_len={args.prompt + args.tokens}", *VARIANTS[name]])
    seqs = batch(args.completions, args.prompt, args.tokens, AutoConfig.from_pretrained(model_path).vocab_size)
    learner = Learner(learner_spec(cfg, model_path), b"k" * 32)
    import torch

    logprobs = learner.logprobs(seqs)
    loaded = rss_gb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
    start = time.perf_counter()
    metrics = learner.train_step(seqs)[""]
    seconds = time.perf_counter() - start
    tokens = sum(len(s.prompt_ids) + len(s.tokens) for s in seqs)
    out.write_text(json.dumps({"variant": name, "threads": torch.get_num_threads(), "loaded_gb": round(loaded, 3),
                               "peak_gb": round(rss_gb("VmHWM") - loaded, 3), "seconds": round(seconds, 2),
                               "tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
                               "pad_frac": metrics["learner/pad_frac"], "loss": metrics["learner/loss"],
                               "logprobs": logprobs}))


def decode_overhead(model_path: str, prompts: int = 8, tokens: int = 64) -> dict:
    """Time per generated token with a rank-1 adapter (nonzero, on the 7 projections) over the
    same engine serving the base model, greedy, the same prompts and lengths (EOS ignored)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapter = Path(tempfile.mkdtemp(prefix="lora-decode-"))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                           LoraConfig(r=1, lora_alpha=32, init_lora_weights=False, task_type="CAUSAL_LM",
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"]))
    model.save_pretrained(adapter)
    del model
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, sorted(os.sched_getaffinity(0))))
    # The sampler's LoRA path: vLLM's worker imports rollout/vllm_ext.py, which gives vLLM-CPU
    # rollout/cpu_lora.py's LoRA ops (as every Sampler's engine does).
    llm = LLM(model=model_path, dtype="float32", max_model_len=512, enable_lora=True, max_lora_rank=1, max_loras=1,
              kv_cache_memory_bytes=2**30, enforce_eager=True, seed=0,
              worker_extension_cls="rollout.vllm_ext.InMemoryAdapters")
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    g = torch.Generator().manual_seed(1)
    inputs = [{"prompt_token_ids": torch.randint(0, 151936, (32,), generator=g).tolist()} for _ in range(prompts)]
    lora = LoRARequest("bench", 1, str(adapter))
    timing = {"base": [], "lora": []}
    for _ in range(3):  # the first round warms up; base and adapter alternate
        for key, request in (("base", None), ("lora", lora)):
            start = time.perf_counter()
            outs = llm.generate(inputs, params, lora_request=request, use_tqdm=False)
            timing[key].append((time.perf_counter() - start) / sum(len(o.outputs[0].token_ids) for o in outs))
    llm.llm_engine.engine_core.shutdown()
    base, with_lora = min(timing["base"][1:]), min(timing["lora"][1:])
    return {"base_ms_per_token": round(1e3 * base, 3), "lora_ms_per_token": round(1e3 * with_lora, 3),
            "lora_decode_overhead": round(with_lora / base - 1, 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--completions", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--skip-decode", action="store_true", help="leave out the LoRA decoding comparison")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant in this process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return run_variant(args.model, args.variant, args, Path(args.out))

    from benchmarks.sync import build_model

    tmp = Path(tempfile.mkdtemp(prefix="learner-bench-"))
    model_path = build_model(tmp / "qwen2.5-0.5b-shaped")
    memory, speed = {}, {}
    for name, env, runs in [(n, MEMORY_ENV, memory) for n in VARIANTS] + [(n, {}, speed) for n in ("naive", "default")]:
        out = tmp / "variant.json"
        subprocess.run([sys.executable, __file__, "--variant", name, "--model", model_path, "--out", str(out),
                        f"--completions={args.completions}", f"--prompt={args.prompt}", f"--tokens={args.tokens}"],
                       check=True, env={**os.environ, **env})
        runs[name] = json.loads(out.read_text())
        print("memory" if env else "speed", {k: v for k, v in runs[name].items() if k != "logprobs"}, flush=True)
    logprobs = [run["logprobs"] for run in memory.values()]
    diff = max(abs(a - b) for other in logprobs[1:] for x, y in zip(logprobs[0], other) for a, b in zip(x, y))
    tokens = memory["default"]["tokens"]
    result = {
        "tokens": tokens,
        "naive_peak_gb": memory["naive"]["peak_gb"],
        "chunked_peak_gb": memory["chunked"]["peak_gb"],
        "peak_gb": memory["default"]["peak_gb"],
        "memory_ratio": round(memory["naive"]["peak_gb"] / memory["default"]["peak_gb"], 2),
        "naive_tokens_per_s": speed["naive"]["tokens_per_s"],
        "tokens_per_s": speed["default"]["tokens_per_s"],
        "speedup": round(speed["default"]["tokens_per_s"] / speed["naive"]["tokens_per_s"], 2),
        "mb_per_token": {name: round(1024 * run["peak_gb"] / tokens, 3) for name, run in memory.items()},
        "max_logprob_diff": diff,
        "lora_decode_overhead": None,
    }
    if not args.skip_decode:
        decode = decode_overhead(model_path)
        print(decode, flush=True)
        result.update(decode)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
