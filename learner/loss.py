"""Pure advantage and loss functions.

The objective (DESIGN.md) is the importance-corrected policy gradient

    maximise  sum_t  (p_learner(t) / p_sampler(t)) * A_t,     A = r - mean(r of its group)

whose gradient is sum_t ratio_t * A_t * grad log p_learner(t). With ratio 1 (sampler and
learner on the same weights) it is REINFORCE with the group mean as baseline. The ratio
corrects both the sampler/learner numeric mismatch and the lag of stale samples.

Options, all off by default:
* `ratio_cap` C: truncated importance sampling, the coefficient min(ratio, C) is held
  constant (gradient C * A * grad log p where the ratio exceeds C).
* `clip_eps`: PPO's clipped surrogate min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A).
* `std_normalize`: divide advantages by the group's reward std (GRPO); off by default, as
  it up-weights groups that are nearly all right or all wrong.
* `normalizer`: what the token sum is divided by: the number of completions
  ("sequences", the default: a per-completion sum, so long answers are not diluted),
  the number of tokens ("tokens"), or nothing ("none").
"""

from __future__ import annotations

import torch


def group_advantages(rewards_P_G: torch.Tensor, std_normalize: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """A = r - mean over the group (and / std if asked). Groups whose rewards are all equal get 0."""
    centred = rewards_P_G - rewards_P_G.mean(dim=1, keepdim=True)
    if std_normalize:
        centred = centred / (rewards_P_G.std(dim=1, keepdim=True, unbiased=False) + eps)
    return centred


def policy_gradient_loss(
    logprobs_B_T: torch.Tensor,
    sampler_logprobs_B_T: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_B_T: torch.Tensor,
    denominator: float,
    ratio_cap: float | None = None,
    clip_eps: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss (to minimise) summed over the masked tokens of B completions, / denominator.

    logprobs are the learner's (with grad) and the sampler's (constants) for each
    completion token; mask is 1 on completion tokens. Returns the loss and sums over the
    masked tokens for metrics: ratio sum, sum of squares and max, tokens truncated or clipped,
    and the k3 estimate of KL(sampler || learner), sum of ratio - 1 - log ratio (>= 0, unbiased
    for tokens drawn by the sampler).
    """
    mask = mask_B_T.to(logprobs_B_T.dtype)
    adv = advantages_B[:, None].to(logprobs_B_T.dtype)
    log_ratio = (logprobs_B_T - sampler_logprobs_B_T) * mask  # 0 on padding: exp gives 1, masked below
    ratio = torch.exp(log_ratio)
    if clip_eps is not None:
        clipped = torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
        per_token = -torch.minimum(ratio * adv, clipped * adv)
        limited = (per_token != -ratio * adv) & (mask > 0)
    elif ratio_cap is not None:
        coeff = torch.clamp(ratio, max=ratio_cap).detach()
        per_token = -(coeff * adv * logprobs_B_T)
        limited = (ratio > ratio_cap) & (mask > 0)
    else:
        per_token = -(ratio * adv)
        limited = torch.zeros_like(mask, dtype=torch.bool)
    loss = (per_token * mask).sum() / denominator
    r = ratio.detach()
    stats = {
        "ratio_sum": (r * mask).sum(),
        "ratio_sq_sum": (r * r * mask).sum(),
        "kl_sum": ((r - 1 - log_ratio.detach()) * mask).sum(),
        "ratio_max": (r * mask).max() if mask.any() else torch.tensor(1.0),
        "limited": limited.sum(),
        "tokens": mask.sum(),
    }
    return loss, stats


def denominator(normalizer: str, num_sequences: int, num_tokens: int) -> float:
    """The divisor of the token sum for the whole step (see the module doc)."""
    return {"sequences": num_sequences, "tokens": num_tokens, "none": 1}[normalizer] or 1
