"""Pure advantage and loss functions.

The objective (docs/objective.md) is the importance-corrected policy gradient

    maximise  sum_t  (p_learner(t) / p_sampler(t)) * A_t,     A = r - mean(r of its group)

whose gradient is sum_t ratio_t * A_t * grad log p_learner(t). With ratio 1 (sampler and
learner on the same weights) it is REINFORCE with the group mean as baseline. The ratio
corrects both the sampler/learner numeric mismatch and the lag of stale samples.

Every option below changes only each token's coefficient w_t (a constant) in the gradient
-sum_t w_t * A_t * grad log p_learner(t) / denominator, and the objective's value, which is
what `learner/loss` reports. Each is off by default and each combines with the others
(docs/objective.md names the paper each follows and how ours departs):

* `ratio_level` sequence (GSPO, Zheng et al. 2025): every token of a completion takes its
  sequence's length-normalised ratio s = exp(mean_t log ratio_t) instead of its own, for the
  coefficient and for every decision below. Aggregated by `normalizer` (GSPO's own is
  sequence_mean).
* `ratio_cap` C: truncated importance sampling (TIS; Ionides 2008, Yao et al. 2025): the
  coefficient is min(ratio, C).
* `clip_low` / `clip_high` (PPO, Schulman et al. 2017; separate epsilons: DAPO's
  clip-higher, Yu et al. 2025): a token with A > 0 and ratio > 1 + clip_high, or A < 0 and
  ratio < 1 - clip_low, is clipped: coefficient 0, value clip(ratio) * A.
* `dual_clip` c > 1 (Ye et al. 2020): a token with A < 0 and ratio > c gets coefficient 0
  and value c * A (PPO alone lets a negative advantage's weight grow without bound).
* `ratio_mask` C (masked importance sampling, MIS; Liu, Li et al. 2025): a token whose
  ratio leaves [1/C, C] is left out (coefficient and value 0), instead of capped; with
  `mask_level` sequence, a whole completion whose length-normalised ratio leaves it.
  Masked tokens stay in the token count of `normalizer` tokens.

Precedence, per token: masked, else dual-clipped, else clipped, else capped; the ratio used
is the token's own or, with ratio_level sequence, its sequence's. Without options the
coefficient is the ratio itself.

Normalisers (what the token sum is divided by): "sequences" (the number of completions, the
default: a per-completion sum, so long answers are not diluted; Dr. GRPO), "tokens" (the
number of tokens; DAPO), "sequence_mean" (each completion's tokens averaged, then divided by
the number of completions; GRPO and GSPO) or "none".
"""

from __future__ import annotations

import torch

from common.specs import Objective

STAT_KEYS = ("ratio_sum", "ratio_sq_sum", "kl_sum", "ratio_max", "tokens", "capped", "clipped_low", "clipped_high",
             "dual_clipped", "masked_low", "masked_high")


def group_advantages(rewards_P_G: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6,
                     graded_P_G: torch.Tensor | None = None) -> torch.Tensor:
    """A = r - mean over the group; with std_normalize, / (the group's population std + eps)
    (GRPO's; eps keeps an all-equal group at 0). graded_P_G (bool): which completions have a
    grade; the others (their grading timed out) take no part in their group's mean or std and
    get A = 0 (the caller leaves them out of the loss). Groups whose graded rewards are all equal get 0."""
    graded = torch.ones_like(rewards_P_G, dtype=torch.bool) if graded_P_G is None else graded_P_G.bool()
    weight = graded.to(rewards_P_G.dtype)
    count = weight.sum(dim=1, keepdim=True).clamp(min=1)
    rewards = torch.where(graded, rewards_P_G, torch.zeros_like(rewards_P_G))
    mean = rewards.sum(dim=1, keepdim=True) / count
    centred = (rewards - mean) * weight
    if std_normalize:
        std = ((centred ** 2).sum(dim=1, keepdim=True) / count).sqrt()
        centred = centred / (std + eps)
    return centred


def k3(log_ratio: torch.Tensor) -> torch.Tensor:
    """exp(x) - 1 - x of each log-ratio x: the k3 estimate of a KL per token, >= 0. Computed
    as expm1(x) - x, clamped at 0, its true lower bound: exp(x) - 1 - x cancels against 1 in
    float32 and came out at -5e-9 for a batch within rounding of on-policy."""
    return (torch.expm1(log_ratio) - log_ratio).clamp_min(0)


def policy_gradient_loss(
    logprobs_B_T: torch.Tensor,
    sampler_logprobs_B_T: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_B_T: torch.Tensor,
    denominator: float,
    objective: Objective = Objective(),
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (to minimise) summed over the masked tokens of B completions, / denominator.

    logprobs are the learner's (with grad) and the sampler's (constants) for each completion
    token; mask is 1 on completion tokens. Returns the loss, whose value is -(objective) and
    whose gradient is -sum_t w_t A_t grad log p_t / denominator (module doc), and sums over the
    masked tokens for metrics: the token ratios' sum, sum of squares and max; the k3 estimate
    of KL(sampler || learner), sum of ratio - 1 - log ratio (>= 0, unbiased for tokens drawn by
    the sampler); and the tokens capped, clipped (low: A < 0, high: A > 0), dual-clipped and
    masked (low: ratio < 1/C, high: ratio > C).
    """
    o = objective
    mask = mask_B_T.to(logprobs_B_T.dtype)
    real = mask > 0
    adv = advantages_B[:, None].to(logprobs_B_T.dtype).expand_as(mask)
    lp = logprobs_B_T
    log_ratio = ((lp - sampler_logprobs_B_T) * mask).detach()  # 0 on padding: exp gives 1, masked below
    lengths_B = mask.sum(dim=1).clamp(min=1)
    seq_log_ratio_B = log_ratio.sum(dim=1) / lengths_B  # the length-normalised (geometric mean) ratio, in logs
    ratio = torch.exp(log_ratio)  # each token's own
    seq_ratio = torch.exp(seq_log_ratio_B)[:, None].expand_as(mask)
    used = seq_ratio if o.ratio_level == "sequence" else ratio
    masking = seq_ratio if o.mask_level == "sequence" else ratio
    no = torch.zeros_like(real)
    masked_low = (masking < 1 / o.ratio_mask) & real if o.ratio_mask else no
    masked_high = (masking > o.ratio_mask) & real if o.ratio_mask else no
    masked = masked_low | masked_high
    dual = (adv < 0) & (used > o.dual_clip) & real & ~masked if o.dual_clip else no
    low = (adv < 0) & (used < 1 - o.clip_low) & real & ~masked if o.clip_low is not None else no
    high = (adv > 0) & (used > 1 + o.clip_high) & real & ~masked if o.clip_high is not None else no
    capped = (used > o.ratio_cap) & real & ~(masked | dual | low | high) if o.ratio_cap else no
    weight = torch.clamp(used, max=o.ratio_cap) if o.ratio_cap else used  # the coefficient where it flows
    value = weight * adv  # the objective per token
    if o.clip_low is not None:
        value = torch.where(low, (1 - o.clip_low) * adv, value)
    if o.clip_high is not None:
        value = torch.where(high, (1 + o.clip_high) * adv, value)
    if o.dual_clip:
        value = torch.where(dual, o.dual_clip * adv, value)
    stopped = masked | dual | low | high
    weight = torch.where(stopped, torch.zeros_like(weight), weight)
    value = torch.where(masked, torch.zeros_like(value), value)
    # The value is the objective's; the gradient is w * A * grad log p (the second term is 0 in value).
    per_token = -(value + weight * adv * (lp - lp.detach()))
    if o.normalizer == "sequence_mean":
        per_token = per_token / lengths_B[:, None]
    loss = (per_token * mask).sum() / denominator
    stats = {
        "ratio_sum": (ratio * mask).sum(),
        "ratio_sq_sum": (ratio * ratio * mask).sum(),
        "kl_sum": (k3(log_ratio) * mask).sum(),
        "ratio_max": (ratio * mask).max() if real.any() else torch.tensor(1.0),
        "tokens": mask.sum(),
        "capped": capped.sum(), "clipped_low": low.sum(), "clipped_high": high.sum(), "dual_clipped": dual.sum(),
        "masked_low": masked_low.sum(), "masked_high": masked_high.sum(),
    }
    return loss, stats


def denominator(normalizer: str, num_sequences: int, num_tokens: int) -> float:
    """The divisor of the token sum for the whole step (see the module doc)."""
    return {"sequences": num_sequences, "sequence_mean": num_sequences, "tokens": num_tokens,
            "none": 1}[normalizer] or 1
