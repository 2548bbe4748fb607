"""rollout/cpu_lora.py: vLLM-CPU's LoRA sums computed adapter by adapter equal vLLM's own ops.

The real engine runs GroupedLoRA in every sampler test (the sampler/learner log-prob checks of
test_integration.py); here its sums are checked against vLLM's PunicaWrapperCPU and a float64
reference on batches the training loop does not make: several adapters, and tokens without one
(where vLLM-CPU's own ops are wrong: see below).
"""

import pytest
import torch

pytest.importorskip("vllm")
from vllm.lora.layers.utils import LoRAMapping  # noqa: E402
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU  # noqa: E402

from rollout.cpu_lora import GroupedLoRA  # noqa: E402

SLOTS = [None, 11, 12, 13]  # vLLM's slot -> adapter id; slot 0 free
EPS = torch.finfo(torch.float32).eps


def wrapper(cls, ids: list[int], prefill: bool):
    w = cls(1024, 256, "cpu")
    w.update_metadata(LoRAMapping(ids, ids, is_prefill=prefill), SLOTS, len(SLOTS), 512)
    return w


def reference(y, x, a, b, ids, slices):
    """y[t, slice i] += x[t] @ A_i[slot(t)]^T @ B_i[slot(t)]^T, in float64, token by token."""
    out = y.double().clone()
    for t, lora_id in enumerate(ids):
        if lora_id <= 0:
            continue
        k, offset = SLOTS.index(lora_id), 0
        for ai, bi, size in zip(a, b, slices):
            out[t, offset:offset + size] += (x[t].double() @ ai[k, 0].double().T) @ bi[k, 0].double().T
            offset += size
    return out


@pytest.mark.parametrize("rank", [2, 48], ids=["rank 2", "rank 48"])
@pytest.mark.parametrize("prefill", [False, True])
@pytest.mark.parametrize("ids", [[12] * 9, [11, 13, 13, 0, 12, 11, 0, 13, 12], [0] * 5],
                         ids=["one adapter", "mixed, some tokens without", "no adapter"])
@pytest.mark.parametrize("slices", [(96, 32, 32), (160,)], ids=["fused qkv", "single"])
def test_grouped_lora_equals_vllm(ids, slices, prefill, rank):
    """Mixed batches take the dense path (all slots at once) at rank 2 (4 slots x 3 slices x 2
    columns <= DENSE_COLUMNS) and the adapter-by-adapter path at rank 48."""
    from rollout.cpu_lora import DENSE_COLUMNS

    assert len(SLOTS) * 3 * 2 <= DENSE_COLUMNS < len(SLOTS) * 48
    g = torch.Generator().manual_seed(len(ids) + len(slices) + rank)
    width_in = 64
    a = tuple(torch.randn(len(SLOTS), 1, rank, width_in, generator=g) for _ in slices)
    b = tuple(torch.randn(len(SLOTS), 1, s, rank, generator=g) for s in slices)
    x = torch.randn(len(ids), width_in, generator=g)
    y0 = torch.randn(len(ids), sum(slices), generator=g)
    ours, theirs = y0.clone(), y0.clone()
    wrapper(GroupedLoRA, ids, prefill).add_lora_linear(ours, x, a, b, 1.0, slices)
    wrapper(PunicaWrapperCPU, ids, prefill).add_lora_linear(theirs, x, a, b, 1.0, slices)
    exact = reference(y0, x, a, b, ids, slices)
    # Both sum the same products in float32 in different orders: each rank-r entry of x @ A^T
    # is a length-64 dot product (error <= 64 eps sum|x_j a_j|), then a length-r product with
    # B (the dense path's longer one adds only exact zeros) and one addition into y. Bound:
    # (64 + r + 1) eps times the sums of absolute terms.
    scale = reference(y0.abs(), x.abs(), tuple(t.abs() for t in a), tuple(t.abs() for t in b), ids, slices)
    bound = (width_in + rank + 1) * EPS * scale
    assert ((ours.double() - exact).abs() <= bound).all()
    if all(i > 0 for i in ids):
        # vLLM's torch ops gather weights[-1] for a token without an adapter (index -1): the
        # last slot's adapter, where its GPU kernels skip the token. Compared where all have one.
        assert ((theirs.double() - exact).abs() <= bound).all()
    if all(i <= 0 for i in ids):
        assert torch.equal(ours, y0)


def test_install_selects_grouped_lora_on_cpu():
    from vllm.platforms import current_platform

    from rollout import cpu_lora

    cpu_lora.install()
    assert current_platform.get_punica_wrapper() == "rollout.cpu_lora.GroupedLoRA"
