"""The loss gradient against a hand computation, and the advantage function."""

import pytest
import torch

from learner.loss import denominator, group_advantages, policy_gradient_loss

# A toy policy: logits = W @ x_t for 5 tokens over a vocabulary of 4, two completions.
torch.manual_seed(0)
X = torch.randn(2, 3, 6)  # (B, T, features)
Y = torch.tensor([[0, 3, 1], [2, 2, 0]])  # sampled tokens
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # second completion has 2 tokens
ADV = torch.tensor([0.5, -0.5])
W0 = torch.randn(4, 6)


def logprobs(W):
    return torch.log_softmax(X @ W.T, dim=-1).gather(-1, Y[..., None]).squeeze(-1)


def autograd_grad(sampler_lp, **kw):
    W = W0.clone().requires_grad_(True)
    loss, stats = policy_gradient_loss(logprobs(W), sampler_lp, ADV, MASK, denominator("sequences", 2, 5), **kw)
    loss.backward()
    return W.grad, stats


def hand_grad(coeff):
    """-(1/B) sum_t coeff_t * A * d log p_t / dW, with d log softmax_y / dz = onehot(y) - p and z = W x."""
    probs = torch.softmax(X @ W0.T, dim=-1)
    grad = torch.zeros_like(W0)
    for b in range(2):
        for t in range(3):
            if MASK[b, t]:
                dz = torch.nn.functional.one_hot(Y[b, t], 4).float() - probs[b, t]
                grad -= coeff[b, t] * ADV[b] * torch.outer(dz, X[b, t]) / 2
    return grad


def test_ratio_one_is_reinforce_with_group_mean_baseline():
    grad, stats = autograd_grad(logprobs(W0).detach())
    assert torch.allclose(grad, hand_grad(torch.ones(2, 3)), atol=1e-6)
    assert stats["ratio_sum"].item() == pytest.approx(5.0)
    assert stats["ratio_sq_sum"].item() == pytest.approx(5.0) and stats["kl_sum"].item() == pytest.approx(0.0, abs=1e-6)


def test_importance_ratio_weights_each_token():
    shift = torch.tensor([[0.3, -0.2, 0.1], [-0.4, 0.25, 9.0]])  # padding's value must not matter
    sampler_lp = logprobs(W0).detach() - shift
    grad, stats = autograd_grad(sampler_lp)
    ratio = torch.exp(shift) * MASK
    assert torch.allclose(grad, hand_grad(ratio), atol=1e-6)
    assert stats["ratio_max"].item() == pytest.approx(torch.exp(torch.tensor(0.3)).item(), rel=1e-6)
    # Sums behind the ESS and mismatch-KL metrics, over the 5 real tokens only.
    r = torch.exp(shift)[MASK > 0]
    assert stats["ratio_sq_sum"].item() == pytest.approx((r * r).sum().item(), rel=1e-6)
    assert stats["kl_sum"].item() == pytest.approx((r - 1 - torch.log(r)).sum().item(), rel=1e-5)
    assert stats["kl_sum"].item() > 0


def test_truncated_ratio_caps_the_coefficient():
    shift = torch.tensor([[1.0, -0.2, 0.1], [0.0, 0.0, 0.0]])  # ratio e^1 = 2.72 on the first token
    grad, stats = autograd_grad(logprobs(W0).detach() - shift, ratio_cap=2.0)
    coeff = torch.clamp(torch.exp(shift), max=2.0) * MASK
    assert torch.allclose(grad, hand_grad(coeff), atol=1e-6)
    assert stats["limited"].item() == 1


def test_ppo_clip_zeroes_clipped_tokens():
    shift = torch.tensor([[0.5, 0.0, 0.0], [0.0, -0.5, 0.0]])  # A>0 ratio 1.65; A<0 ratio 0.61
    grad, stats = autograd_grad(logprobs(W0).detach() - shift, clip_eps=0.2)
    coeff = torch.exp(shift) * MASK
    coeff[0, 0] = 0.0  # above 1+eps with A>0: clipped, no gradient
    coeff[1, 1] = 0.0  # below 1-eps with A<0: clipped, no gradient
    assert torch.allclose(grad, hand_grad(coeff), atol=1e-6)
    assert stats["limited"].item() == 2


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    a = group_advantages(r)
    assert a.tolist() == [[0.5, -0.5, -0.5, 0.5], [0.0] * 4, [-0.25, -0.25, -0.25, 0.75]]
    s = group_advantages(r, std_normalize=True)
    assert s[0].tolist() == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=1e-5)
    assert s[1].tolist() == [0.0] * 4  # no signal stays no signal


def test_denominators():
    assert denominator("sequences", 64, 900) == 64
    assert denominator("tokens", 64, 900) == 900
    assert denominator("none", 64, 900) == 1
