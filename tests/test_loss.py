"""The loss gradient and value against a hand computation, for every objective option and the
combinations the papers use, and the advantage function.

Each option changes only each token's coefficient w_t in the gradient -sum_t w_t A_t grad log p_t
/ denominator, and the objective's value (learner/loss.py). The hand computation below takes
the coefficients written out for the toy batch and differentiates log softmax by hand; autograd
through the loss must give the same gradient to float32 rounding (~1e-7 relative on values of
order 1, summed over 5 tokens: 1e-6 absolute leaves a factor of 10).
"""

import math

import pytest
import torch

from common.specs import Objective
from learner.loss import denominator, group_advantages, policy_gradient_loss

# A toy policy: logits = W @ x_t for 5 tokens over a vocabulary of 4, two completions.
torch.manual_seed(0)
X = torch.randn(2, 3, 6)  # (B, T, features)
Y = torch.tensor([[0, 3, 1], [2, 2, 0]])  # sampled tokens
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # second completion has 2 tokens
ADV = torch.tensor([0.5, -0.5])
W0 = torch.randn(4, 6)
LENGTHS = MASK.sum(1)


def logprobs(W):
    return torch.log_softmax(X @ W.T, dim=-1).gather(-1, Y[..., None]).squeeze(-1)


def autograd_grad(shift, **objective):
    """The loss's gradient and value, and its stats, with the sampler's log-probs `shift` below the learner's."""
    W = W0.clone().requires_grad_(True)
    o = Objective(**objective)
    loss, stats = policy_gradient_loss(logprobs(W), logprobs(W0).detach() - shift, ADV, MASK,
                                       denominator(o.normalizer, 2, 5), o)
    loss.backward()
    return W.grad, loss.item(), stats


def hand_grad(coeff, per_sequence=(1.0, 1.0)):
    """-(1/B) sum_t coeff_t * A * d log p_t / dW (each sequence's tokens times per_sequence), with
    d log softmax_y / dz = onehot(y) - p and z = W x."""
    probs = torch.softmax(X @ W0.T, dim=-1)
    grad = torch.zeros_like(W0)
    for b in range(2):
        for t in range(3):
            if MASK[b, t]:
                dz = torch.nn.functional.one_hot(Y[b, t], 4).float() - probs[b, t]
                grad -= coeff[b][t] * per_sequence[b] * ADV[b] * torch.outer(dz, X[b, t]) / 2
    return grad


def hand_value(values):
    """-(1/B) sum over the real tokens of the objective's value per token."""
    return -sum(values[b][t] for b in range(2) for t in range(3) if MASK[b, t]) / 2


def e(x):
    return math.exp(x)


def test_ratio_one_is_reinforce_with_group_mean_baseline():
    grad, value, stats = autograd_grad(torch.zeros(2, 3))
    assert torch.allclose(grad, hand_grad([[1, 1, 1], [1, 1, 0]]), atol=1e-6)
    assert value == pytest.approx(hand_value([[0.5] * 3, [-0.5] * 3]))  # -(3 * 0.5 - 2 * 0.5) / 2
    assert stats["ratio_sum"].item() == pytest.approx(5.0)
    assert stats["ratio_sq_sum"].item() == pytest.approx(5.0) and stats["kl_sum"].item() == pytest.approx(0.0, abs=1e-6)


def test_importance_ratio_weights_each_token():
    shift = torch.tensor([[0.3, -0.2, 0.1], [-0.4, 0.25, 9.0]])  # padding's value must not matter
    grad, value, stats = autograd_grad(shift)
    ratio = (torch.exp(shift) * MASK).tolist()
    assert torch.allclose(grad, hand_grad(ratio), atol=1e-6)
    assert value == pytest.approx(hand_value([[r * 0.5 for r in ratio[0]], [r * -0.5 for r in ratio[1]]]), rel=1e-6)
    assert stats["ratio_max"].item() == pytest.approx(e(0.3), rel=1e-6)
    # Sums behind the ESS and mismatch-KL metrics, over the 5 real tokens only.
    r = torch.exp(shift)[MASK > 0]
    assert stats["ratio_sq_sum"].item() == pytest.approx((r * r).sum().item(), rel=1e-6)
    assert stats["kl_sum"].item() == pytest.approx((r - 1 - torch.log(r)).sum().item(), rel=1e-5)
    assert stats["kl_sum"].item() > 0


def test_truncated_ratio_caps_the_coefficient():
    shift = torch.tensor([[1.0, -0.2, 0.1], [0.0, 0.0, 0.0]])  # ratio e^1 = 2.72 on the first token
    grad, value, stats = autograd_grad(shift, ratio_cap=2.0)
    coeff = [[2.0, e(-0.2), e(0.1)], [1.0, 1.0, 0.0]]
    assert torch.allclose(grad, hand_grad(coeff), atol=1e-6)
    assert value == pytest.approx(hand_value([[c * 0.5 for c in coeff[0]], [-0.5, -0.5, 0]]), rel=1e-6)
    assert stats["capped"].item() == 1 and stats["clipped_low"].item() == stats["clipped_high"].item() == 0


def test_ppo_clip_zeroes_clipped_tokens():
    shift = torch.tensor([[0.5, 0.0, 0.0], [0.0, -0.5, 0.0]])  # A>0 ratio 1.65; A<0 ratio 0.61
    grad, value, stats = autograd_grad(shift, clip_low=0.2, clip_high=0.2)
    coeff = [[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]]  # past 1+eps with A>0, and below 1-eps with A<0: no gradient
    assert torch.allclose(grad, hand_grad(coeff), atol=1e-6)
    # The clipped tokens' value is clip(ratio) * A: 1.2 * 0.5 and 0.8 * -0.5.
    assert value == pytest.approx(hand_value([[0.6, 0.5, 0.5], [-0.5, -0.4, 0]]), rel=1e-6)
    assert stats["clipped_high"].item() == 1 and stats["clipped_low"].item() == 1


def test_ppo_leaves_the_unclipped_side_alone():
    """A > 0 with a small ratio and A < 0 with a large one are not clipped by PPO (min picks r * A)."""
    shift = torch.tensor([[-0.5, 0.0, 0.0], [0.5, 0.0, 0.0]])  # A>0 ratio 0.61; A<0 ratio 1.65
    grad, _, stats = autograd_grad(shift, clip_low=0.2, clip_high=0.2)
    assert torch.allclose(grad, hand_grad([[e(-0.5), 1, 1], [e(0.5), 1, 0]]), atol=1e-6)
    assert stats["clipped_high"].item() == stats["clipped_low"].item() == 0


def test_asymmetric_clipping_clip_higher():
    """DAPO's clip-higher: eps_low 0.2, eps_high 0.28. A ratio of 1.25 with A > 0 is inside
    [0.8, 1.28] (symmetric 0.2 would clip it); 0.75 with A < 0 is below 0.8: clipped."""
    shift = torch.tensor([[math.log(1.25), math.log(1.3), 0.0], [math.log(0.75), 0.0, 0.0]])
    grad, value, stats = autograd_grad(shift, clip_low=0.2, clip_high=0.28)
    coeff = [[1.25, 0.0, 1.0], [0.0, 1.0, 0.0]]
    assert torch.allclose(grad, hand_grad(coeff), atol=1e-6)
    assert value == pytest.approx(hand_value([[0.625, 1.28 * 0.5, 0.5], [0.8 * -0.5, -0.5, 0]]), rel=1e-6)
    assert stats["clipped_high"].item() == 1 and stats["clipped_low"].item() == 1
    symmetric, _, _ = autograd_grad(shift, clip_low=0.2, clip_high=0.2)
    assert torch.allclose(symmetric, hand_grad([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]]), atol=1e-6)


def test_dual_clip_bounds_negative_advantages():
    """Dual-clip c = 3: A < 0 with ratio 3.5 gets no gradient and value 3 * A; ratio 2.5 keeps
    its coefficient (PPO alone never clips that side)."""
    shift = torch.tensor([[0.0, 0.0, 0.0], [math.log(3.5), math.log(2.5), 0.0]])
    grad, value, stats = autograd_grad(shift, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    coeff = [[1, 1, 1], [0.0, 2.5, 0]]
    assert torch.allclose(grad, hand_grad(coeff), atol=1e-6)
    assert value == pytest.approx(hand_value([[0.5] * 3, [3.0 * -0.5, 2.5 * -0.5, 0]]), rel=1e-6)
    assert stats["dual_clipped"].item() == 1 and stats["clipped_low"].item() == 0


def test_tis_with_ppo_clipping_both_act():
    """TIS and PPO together (clipping no longer wins silently): clipping decides which tokens
    get no gradient, the cap bounds the weight of the others. A < 0 with ratio 2.5: not
    clipped, capped at 2; A > 0 with ratio 1.5: clipped; A > 0 with ratio 0.5: coefficient 0.5."""
    shift = torch.tensor([[math.log(1.5), math.log(0.5), 0.0], [math.log(2.5), 0.0, 0.0]])
    grad, value, stats = autograd_grad(shift, ratio_cap=2.0, clip_low=0.2, clip_high=0.2)
    coeff = [[0.0, 0.5, 1.0], [2.0, 1.0, 0]]
    assert torch.allclose(grad, hand_grad(coeff), atol=1e-6)
    assert value == pytest.approx(hand_value([[1.2 * 0.5, 0.25, 0.5], [2.0 * -0.5, -0.5, 0]]), rel=1e-6)
    assert stats["capped"].item() == 1 and stats["clipped_high"].item() == 1


def test_masked_importance_sampling_drops_tokens_outside_the_band():
    """MIS with C = 2: ratios 2.72 (above 2) and 0.4 (below 1/2) are left out (coefficient and
    value 0), where TIS would cap the first at 2 and keep the second."""
    shift = torch.tensor([[1.0, math.log(0.4), 0.1], [0.0, math.log(1.9), 0.0]])
    grad, value, stats = autograd_grad(shift, ratio_mask=2.0)
    coeff = [[0.0, 0.0, e(0.1)], [1.0, 1.9, 0]]
    assert torch.allclose(grad, hand_grad(coeff), atol=1e-6)
    assert value == pytest.approx(hand_value([[0, 0, e(0.1) * 0.5], [-0.5, 1.9 * -0.5, 0]]), rel=1e-6)
    assert stats["masked_high"].item() == 1 and stats["masked_low"].item() == 1


def test_sequence_masking_drops_whole_completions():
    """mask_level sequence: completion 0's length-normalised ratio exp(mean(1.5, 0.9, 0.3)) =
    e^0.9 = 2.46 leaves [1/2, 2]: all its tokens go; completion 1's exp(0.25) stays, with
    each token's own ratio as its coefficient."""
    shift = torch.tensor([[1.5, 0.9, 0.3], [0.0, 0.5, 7.0]])
    grad, value, stats = autograd_grad(shift, ratio_mask=2.0, mask_level="sequence")
    coeff = [[0.0, 0.0, 0.0], [1.0, e(0.5), 0]]
    assert torch.allclose(grad, hand_grad(coeff), atol=1e-6)
    assert stats["masked_high"].item() == 3 and stats["masked_low"].item() == 0


def test_gspo_sequence_ratio_and_clipping():
    """GSPO: every token takes its completion's length-normalised ratio s = exp(mean log r);
    with normalizer sequence_mean each completion's tokens are averaged. Completion 0 (A > 0):
    s = exp(0.1) = 1.105, inside [0.8, 1.2]: coefficient s / 3 per token; completion 1 (A < 0):
    s = exp(-0.3) = 0.74 < 0.8: clipped as a whole, no gradient, value 0.8 * A."""
    shift = torch.tensor([[0.4, -0.2, 0.1], [-0.5, -0.1, 3.0]])
    s0, s1 = e(0.1), e(-0.3)
    grad, value, stats = autograd_grad(shift, ratio_level="sequence", normalizer="sequence_mean",
                                       clip_low=0.2, clip_high=0.2)
    assert torch.allclose(grad, hand_grad([[s0] * 3, [0.0, 0.0, 0]], per_sequence=(1 / 3, 1 / 2)), atol=1e-6)
    assert value == pytest.approx(-(s0 * 0.5 + 0.8 * -0.5) / 2, rel=1e-6)  # each sequence's objective, / B
    assert stats["clipped_low"].item() == 2
    # Without clipping, completion 1 takes s1 on both of its tokens.
    grad, _, _ = autograd_grad(shift, ratio_level="sequence", normalizer="sequence_mean")
    assert torch.allclose(grad, hand_grad([[s0] * 3, [s1, s1, 0]], per_sequence=(1 / 3, 1 / 2)), atol=1e-6)


def test_sequence_mean_normalizer_averages_each_completion():
    grad, value, _ = autograd_grad(torch.zeros(2, 3), normalizer="sequence_mean")
    assert torch.allclose(grad, hand_grad([[1, 1, 1], [1, 1, 0]], per_sequence=(1 / 3, 1 / 2)), atol=1e-6)
    assert value == pytest.approx(-(0.5 - 0.5) / 2, abs=1e-7)


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    a = group_advantages(r)
    assert a.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]]
    s = group_advantages(r, std_normalize=True)
    assert s[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)  # population std 0.5
    assert s[2].tolist() == pytest.approx([-1 / math.sqrt(3)] * 3 + [math.sqrt(3)], abs=1e-5)  # std sqrt(3)/4
    assert s[1].tolist() == [0.0] * 4  # no signal stays no signal


def test_ungraded_completions_take_no_part_in_their_group():
    """A completion whose grading timed out (issue 29: a right answer that took too long to
    check got a negative advantage) is left out of its group's mean and std and gets 0."""
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    graded = torch.tensor([[True, True, True, False], [True, True, False, False]])
    a = group_advantages(r, graded_P_G=graded)
    assert torch.allclose(a, torch.tensor([[2 / 3, -1 / 3, -1 / 3, 0.0], [0.5, -0.5, 0.0, 0.0]]))
    s = group_advantages(r, std_normalize=True, graded_P_G=graded)  # std sqrt(2)/3 and 0.5
    expected = torch.tensor([[math.sqrt(2), -1 / math.sqrt(2), -1 / math.sqrt(2), 0.0], [1.0, -1.0, 0.0, 0.0]])
    assert torch.allclose(s, expected, atol=1e-5)


def test_denominators():
    assert denominator("sequences", 64, 900) == 64
    assert denominator("sequence_mean", 64, 900) == 64
    assert denominator("tokens", 64, 900) == 900
    assert denominator("none", 64, 900) == 1


def test_the_k3_kl_estimate_is_never_negative_and_accurate_near_on_policy():
    """exp(x) - 1 - x >= 0, but in float32 exp(x) rounds to 1 for |x| below half an ulp
    (6e-8) and the sum came out negative (-4.9e-9 on an async job's first, on-policy step).
    k3 = expm1(x) - x, clamped at 0: never negative, and within float32's rounding of the
    float64 value: expm1's relative error (a few 2**-24) times |expm1(x)| ~ |x|, so
    |error| <= 2**-21 |x| (the clamp moves values of at most x**2 / 2 <= that for
    |x| <= 2**-20, where it can act)."""
    from learner.loss import k3

    torch.manual_seed(0)
    x = torch.cat([torch.rand(10_000) * 2e-7 - 1e-7, torch.rand(10_000) * 2e-3 - 1e-3, torch.tensor([0.0, 2.0, -3.0])])
    assert (torch.exp(x) - 1 - x).min() < 0  # the old formula, on the same values
    got, ref = k3(x), torch.expm1(x.double()) - x.double()
    assert (got >= 0).all()
    assert ((got.double() - ref).abs() <= 2**-21 * x.abs().double() + 1e-12 * ref).all()
