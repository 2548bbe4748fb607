"""The learner's arithmetic per step, estimated from the model's shape (`learner/flops`).

Counted per sequence of S positions (prompt and completion; padding left out) of which C
are completion tokens, with P the weights of the decoder's linear layers, L layers, a
attention width (heads x head size), V x d the LM head, and multiply-adds as 2 FLOPs:

    forward  F = 2 P S  +  2 L a S^2  +  2 V d C

(the attention term is QK^T and AV under the causal mask, half of 4 L a S^2; the head is
applied only at the C positions that predict completion tokens, learner/logprobs.py).

* Full fine-tuning: 3 F. The backward pass is about twice the forward: the gradient with
  respect to each layer's input and the one with respect to its weights.
* LoRA: 2 F + 6 S sum_m r (in_m + out_m). The frozen base needs only the input
  gradients (one more F); each adapted module m (in_m -> out_m, rank r) adds 2 r (in_m +
  out_m) per position forward, and as much again for each of its two gradients.

Recomputation under gradient checkpointing (one more forward of the layers) is not
counted: the figure is the algorithm's, the same whatever memory trade-off is chosen, as
in the seed's "LoRA needs about 2/3 of the FLOPs of full fine-tuning" (2 F / 3 F).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    linear: int  # P: weights of the decoder layers' linear modules (LM head and embeddings left out)
    layers: int  # L
    attention: int  # a: heads x head size
    head: int  # V x d
    modules: dict[str, tuple[int, int]]  # linear module name -> (in, out) features, for the adapter terms

    @classmethod
    def of(cls, model) -> Shape:
        """The shape of a transformers causal LM (before PEFT wraps it)."""
        import torch

        c = model.config
        modules = {name: (m.in_features, m.out_features) for name, m in model.named_modules()
                   if isinstance(m, torch.nn.Linear) and name != "lm_head" and not name.endswith("lm_head")}
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(linear=sum(i * o for i, o in modules.values()), layers=c.num_hidden_layers,
                   attention=c.num_attention_heads * head_dim, head=c.vocab_size * c.hidden_size, modules=modules)

    def forward(self, positions: int, completion: int) -> float:
        """F for one sequence of `positions` of which `completion` are scored."""
        return 2.0 * self.linear * positions + 2.0 * self.layers * self.attention * positions ** 2 \
            + 2.0 * self.head * completion

    def adapter(self, rank: int, target_modules: tuple[str, ...]) -> int:
        """sum_m r (in_m + out_m) over the modules whose last name is a target."""
        return sum(rank * (i + o) for name, (i, o) in self.modules.items() if name.rsplit(".", 1)[-1] in target_modules)

    def train(self, lengths: list[tuple[int, int]], rank: int, target_modules: tuple[str, ...] = ()) -> float:
        """A step's FLOPs over sequences (positions, completion tokens); rank 0: full fine-tuning."""
        forward = sum(self.forward(s, c) for s, c in lengths)
        if rank == 0:
            return 3.0 * forward
        return 2.0 * forward + 6.0 * sum(s for s, _ in lengths) * self.adapter(rank, target_modules)
