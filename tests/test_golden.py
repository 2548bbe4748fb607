"""Golden numbers of the real learner: a fixed model and batch, its first three steps pinned.

The model is a small Qwen2 built from a seed (torch's CPU generator gives the same weights on
every machine), the batch fixed token ids with fixed advantages and sampler log-probs; the
project's `Learner` (DeepSpeed, PEFT rank-1 LoRA on the 7 projections, AdamW lr 1e-2) takes
three steps in this process. Its losses and gradient norms are pinned to the values below, so a
change in what the learner computes (the loss, its normalisation, the log-probs, the adapter's
initialisation, the optimiser) fails here even if it is consistent everywhere else.

Tolerance: 1e-4 relative. The numbers are float32 sums over at most 2 x 64 x 40 terms per
output, whose rounding depends on the summation order (thread count, CPU instruction set):
about sqrt(n) x 6e-8 ~ 1e-6 relative per value, and three Adam steps pass such a perturbation on
without amplifying it beyond ~1e-5 (each step moves a weight by at most lr, whatever the
gradient's rounding). A real change moves them by far more: the sequences normaliser instead of
tokens scales the loss by 12.5 (75 tokens over 6 completions); one step of lr 1e-2 moves the gradient
norm by 2% (steps 2 and 3 below).
"""

import pytest

pytestmark = pytest.mark.integration

torch = pytest.importorskip("torch")

# (loss, grad_norm) of steps 1..3, measured on this project's CPU stack (2026-12-02).
GOLDEN = [(0.13543744198977947, 1.2706574201583862), (0.046625759452581406, 1.5523043870925903),
          (0.09923968650400639, 1.5159226655960083)]
RTOL = 1e-4


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1234)
    config = Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True, dtype="float32")
    path = tmp_path_factory.mktemp("golden-model")
    Qwen2ForCausalLM(config).save_pretrained(path)
    return str(path)


def fixed_batch() -> list:
    from common.records import Datum

    g = torch.Generator().manual_seed(7)
    batch = []
    for i in range(6):
        n = 5 + 3 * i  # 5..20 completion tokens after 8 prompt tokens
        prompt_ids = torch.randint(0, 96, (8,), generator=g).tolist()
        tokens = torch.randint(0, 96, (n,), generator=g).tolist()
        sampler_logprobs = (-4.6 + 0.1 * torch.randn(n, generator=g)).tolist()  # ~log(1/96)
        batch.append(Datum(prompt_ids, tokens, sampler_logprobs, [1.0, -0.5, 0.25, -1.0, 0.5, -0.25][i]))
    return batch


def test_the_learner_takes_its_golden_steps(model_path):
    from learner.learner import Learner
    from rl.config import load_config
    from rl.fleet import learner_spec

    cfg = load_config(None, ["learner.lr=1e-2", "rollout.prompts_per_step=3", "rollout.group_size=2",
                             "learner.micro_batch_size=4", "learner.max_tokens_per_micro=64",
                             "learner.logprob_chunk=16", "loss.normalizer=tokens", "run.seed=3"])
    learner = Learner(learner_spec(cfg, model_path), b"k" * 32)
    try:
        steps = [learner.train_step(fixed_batch())[""] for _ in range(3)]
    finally:
        learner.close()
    got = [(s["learner/loss"], s["learner/grad_norm"]) for s in steps]
    for (loss, norm), (want_loss, want_norm) in zip(got, GOLDEN):
        assert loss == pytest.approx(want_loss, rel=RTOL)
        assert norm == pytest.approx(want_norm, rel=RTOL)
