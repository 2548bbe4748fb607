"""Per-token log-probs of completions under a causal LM, and micro-batches by token budget.

At real shapes the vocabulary dominates a naive learner's memory: full logits for every
position of every sequence (prompts included) are B x L x V float32 (151,936 x 4 bytes =
0.6 MB per token for Qwen's vocabulary), and the temperature and log-softmax make more
copies of the same size, all kept for backward. Here the LM head is applied only at the
positions that predict completion tokens, `chunk` tokens at a time, and each token's log-prob
is its logit minus a logsumexp over the vocabulary; backward recomputes each chunk's logits
(one more matmul) instead of keeping them, so at most a chunk x V block of logits is alive.

Each token's entropy, -sum_v p_v log p_v of the sampling distribution (at the temperature), is
computed in the same pass from the block at hand (`learner/entropy`): no gradient, and at most
ENTROPY_ROWS x V more floats. With a frozen head (LoRA) it comes from the probabilities the
gradient needs anyway; where the head trains, from one more pass over the block.

Models whose logits are more than the LM head's output (Gemma 2's final soft-capping, Cohere's
logit_scale, Granite's logits_scaling) would get wrong log-probs from the chunked head:
`output_head` refuses them (the full-logits path, chunk 0, is the model's own).
"""

from __future__ import annotations

import torch

from common.records import Datum

ENTROPY_ROWS = 64  # rows of a logits block whose probabilities are materialised at once for the entropy
# Config attributes by which a model scales or caps its logits beyond the LM head (when not neutral).
# (transformers' Gemma 2/3, Cohere and Granite families; a remote-code model's own scaling is not seen.)
LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits to float32 for the softmax; float32 and float64 stay."""
    return x.float() if x.dtype in (torch.bfloat16, torch.float16) else x


def _logits(hidden_C_H: torch.Tensor, weight_V_H: torch.Tensor, bias_V, temperature: float) -> torch.Tensor:
    """A chunk's logits at the sampling temperature, at least float32 (the matmul in the
    model's dtype, as the LM head computes it)."""
    logits = hidden_C_H @ weight_V_H.T
    if bias_V is not None:
        logits = logits + bias_V
    return _upcast(logits).div_(temperature)


def _entropy(logits_C_V: torch.Tensor, lse_C: torch.Tensor) -> torch.Tensor:
    """-sum p log p per row, with p = softmax(logits): lse - sum p * logits, ENTROPY_ROWS rows at a time."""
    out = torch.empty_like(lse_C)
    for s in range(0, len(lse_C), ENTROPY_ROWS):
        z = logits_C_V[s:s + ENTROPY_ROWS]
        p = (z - lse_C[s:s + ENTROPY_ROWS, None]).exp_()
        out[s:s + ENTROPY_ROWS] = lse_C[s:s + ENTROPY_ROWS] - torch.linalg.vecdot(p, z)
    return out


class ChunkedTokenLogprobs(torch.autograd.Function):
    """log softmax(hidden W^T / temperature)[target] for N tokens, `chunk` tokens at a time,
    and (a second output, without gradient) each token's entropy.

    d logp / d logits = (onehot(target) - p) / temperature. With a frozen head (LoRA) only the
    hidden states need a gradient, and each token's is its upstream scalar times
    d logp / d hidden = (onehot - p) W / temperature: forward computes that [N, H] block while
    the chunk's probabilities are at hand, and backward only scales it (no second pass over the
    vocabulary). Where the head itself trains, forward keeps one logsumexp per token and
    backward recomputes each chunk's logits instead.
    """

    @staticmethod
    def forward(ctx, hidden_N_H, weight_V_H, bias_V, targets_N, temperature: float, chunk: int):
        logprobs_N = torch.empty(len(targets_N), dtype=_upcast(hidden_N_H[:0]).dtype, device=hidden_N_H.device)
        lse_N = torch.empty_like(logprobs_N)
        entropy_N = torch.empty_like(logprobs_N)
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        precompute = want_h and not (want_w or want_b)
        dlogp_dh = torch.empty(hidden_N_H.shape, dtype=logprobs_N.dtype, device=hidden_N_H.device) if precompute else None
        for s in range(0, len(targets_N), chunk):
            logits = _logits(hidden_N_H[s:s + chunk], weight_V_H, bias_V, temperature)
            lse_N[s:s + chunk] = torch.logsumexp(logits, dim=1)
            logprobs_N[s:s + chunk] = logits.gather(1, targets_N[s:s + chunk, None]).squeeze(1) - lse_N[s:s + chunk]
            if precompute:  # the entropy from the probabilities the gradient needs anyway
                g = _dlogp_dlogits(logits, lse_N[s:s + chunk], targets_N[s:s + chunk], temperature,
                                   entropy_N[s:s + chunk])
                dlogp_dh[s:s + chunk] = g.to(weight_V_H.dtype) @ weight_V_H
            else:
                entropy_N[s:s + chunk] = _entropy(logits, lse_N[s:s + chunk])
            logits = g = None  # freed before the next chunk's block: one chunk x V block alive at a time
        if precompute:
            ctx.save_for_backward(dlogp_dh)
        else:
            ctx.save_for_backward(hidden_N_H, weight_V_H, bias_V, targets_N, lse_N)
        ctx.precompute, ctx.temperature, ctx.chunk, ctx.hidden_dtype = precompute, temperature, chunk, hidden_N_H.dtype
        ctx.mark_non_differentiable(entropy_N)
        return logprobs_N, entropy_N

    @staticmethod
    def backward(ctx, grad_N, _grad_entropy):
        if ctx.precompute:
            (dlogp_dh,) = ctx.saved_tensors
            grad_h = (grad_N[:, None].to(dlogp_dh.dtype) * dlogp_dh).to(ctx.hidden_dtype)
            return grad_h, None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros_like(_upcast(weight)) if want_w else None
        grad_b = torch.zeros_like(_upcast(weight[:, 0])) if want_b else None
        for s in range(0, len(targets), ctx.chunk):
            h, g_up = hidden[s:s + ctx.chunk], grad_N[s:s + ctx.chunk].to(lse.dtype)
            g = _dlogp_dlogits(_logits(h, weight, bias, ctx.temperature), lse[s:s + ctx.chunk],
                               targets[s:s + ctx.chunk], ctx.temperature)
            g.mul_(g_up[:, None])  # d loss / d logit
            if want_b:
                grad_b += g.sum(0)
            g = g.to(weight.dtype)
            if want_h:
                grad_h[s:s + ctx.chunk] = g @ weight
            if want_w:
                grad_w += g.T @ h
            g = None  # freed before the next chunk's block
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None)


def _dlogp_dlogits(logits_C_V: torch.Tensor, lse_C: torch.Tensor, targets_C: torch.Tensor,
                   temperature: float, entropy_C: torch.Tensor | None = None) -> torch.Tensor:
    """(onehot(target) - softmax) / temperature, written over the logits (in place). With
    entropy_C, each row's entropy -sum p log p is written there on the way, from the same
    exponentials (ENTROPY_ROWS rows at a time: no second pass over the block)."""
    logp = logits_C_V.sub_(lse_C[:, None])
    if entropy_C is None:
        logp.exp_()
    else:
        for s in range(0, len(lse_C), ENTROPY_ROWS):
            rows = logp[s:s + ENTROPY_ROWS]
            p = rows.exp()
            entropy_C[s:s + ENTROPY_ROWS] = -torch.linalg.vecdot(p, rows)
            rows.copy_(p)
    g = logp.neg_()  # -p
    g[torch.arange(len(g), device=g.device), targets_C] += 1
    return g.div_(temperature)


def _batch(seqs: list[Datum]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids and attention mask of prompt + completion."""
    ids = [list(s.prompt_ids) + list(s.tokens) for s in seqs]
    width = max(len(i) for i in ids)
    input_ids = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    attention = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    return input_ids, attention


def output_head(model):
    """The causal LM under any PEFT wrapper, its decoder body and its LM head (a Linear); a
    model that transforms its logits beyond the head (LOGIT_TRANSFORMS) is refused."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    for key, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(config, key, neutral)
        if value != neutral:
            raise ValueError(f"the model's config sets {key}={value!r}: its logits are transformed after the LM head, "
                             "which the chunked log-probs do not apply; set learner.logprob_chunk=0 (the model's "
                             "own forward)")
    head = lm.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"learner.logprob_chunk needs a plain Linear LM head, got {type(head).__name__} "
                         "(an adapter on lm_head?); set learner.logprob_chunk=0")
    return lm.base_model, head


def sequence_logprobs(model, seqs: list[Datum], temperature: float, chunk: int = 0
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of each completion under `model`, at the sampling temperature.

    seqs: Datums (only their prompt_ids and tokens are read). Returns (logprobs_B_T, mask_B_T,
    entropy_B_T) over the completion tokens, right-padded (the entropy of the distribution each
    token was drawn from, at the temperature, without gradient). Dividing logits by the temperature matches vLLM's
    processed log-probs, which are taken after temperature. chunk > 0: the LM head only at
    positions that predict completion tokens, `chunk` tokens at a time (module doc); 0: full
    logits at every position and a log-softmax over them (the reference).
    """
    input_ids, attention = _batch(seqs)
    B, T = len(seqs), max(len(s.tokens) for s in seqs)
    lengths = [len(s.tokens) for s in seqs]
    mask = torch.zeros(B, T)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    # Completion token t of row b sits at position len(prompt) + t and is predicted one earlier.
    rows = torch.tensor([b for b, n in enumerate(lengths) for _ in range(n)], dtype=torch.long)
    cols = torch.tensor([t for n in lengths for t in range(n)], dtype=torch.long)
    starts = torch.tensor([len(s.prompt_ids) for s in seqs])
    positions = starts[rows] + cols - 1
    targets = input_ids[rows, positions + 1]
    if chunk:
        body, head = output_head(model)
        hidden = body(input_ids=input_ids, attention_mask=attention).last_hidden_state
        logprobs_N, entropy_N = ChunkedTokenLogprobs.apply(hidden[rows, positions], head.weight, head.bias, targets,
                                                           temperature, chunk)
    else:
        logits = _upcast(model(input_ids=input_ids, attention_mask=attention).logits) / temperature
        log_softmax_N_V = torch.log_softmax(logits, dim=-1)[rows, positions]
        logprobs_N = log_softmax_N_V.gather(1, targets[:, None]).squeeze(1)
        with torch.no_grad():
            entropy_N = -(log_softmax_N_V.exp() * log_softmax_N_V).sum(-1)
    logprobs_B_T = torch.zeros(B, T, dtype=logprobs_N.dtype).index_put((rows, cols), logprobs_N)
    entropy_B_T = torch.zeros(B, T, dtype=entropy_N.dtype).index_put((rows, cols), entropy_N.detach())
    return logprobs_B_T, mask, entropy_B_T


def micro_batches(sizes: list[int], max_count: int, max_tokens: int = 0) -> list[list[int]]:
    """Indices of the completions in each micro-batch; sizes: prompt + completion tokens each.

    max_tokens 0: runs of `max_count` in the given order. Otherwise the longest first, each
    micro-batch as many (at most max_count) as keep its padded size, count x longest, within
    max_tokens; a completion longer than the budget goes alone.
    """
    if not max_tokens:
        return [list(range(i, min(i + max_count, len(sizes)))) for i in range(0, len(sizes), max_count)]
    batches: list[list[int]] = []
    for i in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if batches and len(batches[-1]) < max_count and (len(batches[-1]) + 1) * sizes[batches[-1][0]] <= max_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches
