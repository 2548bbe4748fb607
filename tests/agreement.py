"""How closely the sampler's log-probs must match the learner's, shared by the stack tests."""


# Sampler (vLLM's kernels) and learner (transformers + PEFT) compute the same float32
# function with sums in other orders. A row passes ~40 matmuls through the tiny model and its
# adapter (4 layers x 7 projections and 2 attention products, LoRA, the head) with dot products
# of length <= 512; each adds a relative error of about sqrt(512) x 6e-8 = 1.4e-6 of its
# operands' scale (the usual sqrt(n) u estimate), so a logit is off by up to ~40 x 1.4e-6 =
# 5.4e-5 of the logits' scale, and a log-prob, a logit minus a logsumexp, by twice that. The
# errors are relative to the logits' scale, not to the log-prob: seen, 2.7e-4 at a log-prob of
# -0.83 with logits up to 10.2 (2.7e-5 of the scale, after two steps at lr 0.02), while the
# median token is off by 5e-7. Allowed: 1.1e-4 x max|logit|; a stale or wrongly scaled adapter
# is off by 1e-2 and more at these scales.
LOGPROB_TOL = 2 * 40 * 512**0.5 * 6e-8


def logit_scale(model, seqs) -> float:
    """The largest |logit| of `model` over these sequences: the scale the float32 errors follow."""
    import torch

    from learner.logprobs import _batch

    input_ids, attention = _batch(seqs)
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention).logits
    return float(logits[attention.bool()].abs().max())


def logprob_gap(learner_lp, sampler_lp, scale: float) -> float:
    """The largest |learner - sampler| over matching tokens, over the logits' scale."""
    assert [len(x) for x in learner_lp] == [len(x) for x in sampler_lp]
    return max(abs(a - b) for ls, ss in zip(learner_lp, sampler_lp) for a, b in zip(ls, ss)) / scale
