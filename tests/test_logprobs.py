"""The learner's log-probs and micro-batches (learner/logprobs.py), on a small random Qwen2
model with a random rank-1 LoRA (PEFT), in this process: no Ray, vLLM or DeepSpeed."""

import pytest
import torch

from common.records import Datum
from learner.logprobs import ChunkedTokenLogprobs, micro_batches, sequence_logprobs
from learner.loss import denominator, policy_gradient_loss


def lora_model(dtype=torch.float32, checkpointing=False):
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=128,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).to(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # init_lora_weights=False: random A and B, so the adapter changes the log-probs.
    lora = LoraConfig(r=1, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, lora)


def batch(n=6, seed=1):
    """Completions of uneven prompt and completion lengths, with random advantages and sampler log-probs."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        prompt, tokens = 3 + 5 * i % 11, 1 + 7 * i % 13
        prompt_ids = torch.randint(1, 384, (prompt,), generator=g).tolist()
        completion = torch.randint(1, 384, (tokens,), generator=g).tolist()
        advantage = float(torch.randn(1, generator=g))
        seqs.append(Datum(prompt_ids, completion, (-5 + torch.randn(tokens, generator=g)).tolist(), advantage))
    return seqs


def grads(model) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def logprobs_and_grads(model, seqs, chunk):
    model.zero_grad()
    lp, mask, _ = sequence_logprobs(model, seqs, 0.7, chunk)
    weights = torch.linspace(-1, 1, lp.numel(), dtype=lp.dtype).view_as(lp)
    (lp * mask * weights).sum().backward()
    return lp.detach(), mask, grads(model)


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_chunked_logprobs_match_full_logits(chunk):
    """Chunks that split the tokens unevenly (7), one token at a time and all at once give the
    full-logits values in float32 within 1e-5: the same sums rounded in another order, ~1e-7
    relative on logits of magnitude ~1."""
    model, seqs = lora_model(), batch()
    (lp0, mask0, _), (lp1, mask1, _) = logprobs_and_grads(model, seqs, 0), logprobs_and_grads(model, seqs, chunk)
    assert torch.equal(mask0, mask1) and mask0.sum() == sum(len(s.tokens) for s in seqs)
    assert (lp0 * (1 - mask0)).abs().max() == 0 and (lp1 * (1 - mask1)).abs().max() == 0
    assert (lp0 - lp1).abs().max() <= 1e-5


@pytest.mark.parametrize("chunk", [1, 7])
def test_chunked_gradients_match_full_logits(chunk):
    """The same gradient through the whole model. Compared in float64: the gradients of layer
    0's attention LoRA are sums of many cancelling terms, so in float32 two summation orders
    differ by ~2e-5 of their size (seen); float64's rounding (1e-16), amplified as much, stays
    below 1e-10."""
    model, seqs = lora_model(torch.float64), batch()
    (lp0, _, g0), (lp1, _, g1) = logprobs_and_grads(model, seqs, 0), logprobs_and_grads(model, seqs, chunk)
    assert (lp0 - lp1).abs().max() <= 1e-12
    scale = max(g.abs().max() for g in g0.values())
    assert scale > 0
    assert max((g0[k] - g1[k]).abs().max() for k in g0) <= 1e-10 * scale


@pytest.mark.parametrize("head_trains", [True, False])
def test_chunked_backward_against_float64_finite_differences(head_trains):
    """The custom backward against torch's numerical gradient in float64, with chunks that do
    not divide the tokens: for hidden states, head weight and bias (the recomputing backward),
    and for hidden states alone under a frozen head (the gradient prepared in forward)."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(11, 8, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(23, 8, dtype=torch.float64, generator=g, requires_grad=head_trains)
    bias = torch.randn(23, dtype=torch.float64, generator=g, requires_grad=head_trains)
    targets = torch.randint(0, 23, (11,), generator=g)
    inputs = (hidden, weight, bias) if head_trains else (hidden,)
    assert torch.autograd.gradcheck(
        lambda h, w=weight, b=bias: ChunkedTokenLogprobs.apply(h, w, b, targets, 0.6, 4)[0], inputs, eps=1e-6,
        atol=1e-5)


def test_chunked_logprobs_in_bfloat16():
    """In bfloat16 the two paths run the same matmuls on different row counts; each bf16 logit
    is rounded once (relative error <= 2^-8), so a log-prob (a logit minus a logsumexp) moves
    by at most 2 x 2^-8 x the largest |logit| / temperature."""
    model, seqs = lora_model(torch.bfloat16), batch()
    with torch.no_grad():
        full, mask, _ = sequence_logprobs(model, seqs, 0.7, 0)
        chunked, _, _ = sequence_logprobs(model, seqs, 0.7, 5)
        biggest = max(model(input_ids=torch.tensor([s.prompt_ids + s.tokens])).logits.float().abs().max().item()
                      for s in seqs)
    bound = 2 * 2**-8 * biggest / 0.7
    assert (full - chunked).abs().max().item() <= bound


def test_gradient_checkpointing_gives_the_same_gradient():
    """Recomputing activations in backward runs the same ops again, on the same shapes: the
    same gradient up to the order autograd accumulates it in (float64, as above: 1e-10)."""
    seqs = batch()
    out = []
    for checkpointing in (False, True):
        model = lora_model(torch.float64, checkpointing).train()
        lp, mask, _ = sequence_logprobs(model, seqs, 1.0, 16)
        (lp * mask).sum().backward()
        out.append(grads(model))
    assert max((out[0][k] - out[1][k]).abs().max() for k in out[0]) <= 1e-10 * max(g.abs().max() for g in out[0].values())


@pytest.mark.parametrize("chunk", [0, 3, 4096])
def test_entropy_of_each_token_against_the_full_distribution(chunk, monkeypatch):
    """learner/entropy: -sum_v p log p of the distribution each completion token was drawn from,
    at the temperature, computed in the log-prob pass (chunked: ENTROPY_ROWS rows at a time,
    set to 2 here so that blocks split unevenly). Against the full softmax at each position,
    in float64: the same sums in another order (1e-10)."""
    import learner.logprobs

    monkeypatch.setattr(learner.logprobs, "ENTROPY_ROWS", 2)
    model, seqs = lora_model(torch.float64), batch()
    with torch.no_grad():
        _, mask, entropy = sequence_logprobs(model, seqs, 0.7, chunk)
        for b, s in enumerate(seqs):
            logits = model(input_ids=torch.tensor([s.prompt_ids + s.tokens])).logits[0] / 0.7
            p = torch.softmax(logits, dim=-1)
            want = -(p * torch.log(p)).sum(-1)[len(s.prompt_ids) - 1: len(s.prompt_ids) - 1 + len(s.tokens)]
            assert torch.allclose(entropy[b, :len(s.tokens)], want, atol=1e-10)
    assert (entropy * (1 - mask)).abs().max() == 0 and (entropy * mask).min() >= 0


def test_dropout_is_off_in_training_mode():
    """A base model with dropout (attention and nn.Dropout): in training mode, as the learner
    trains, its log-probs were random draws, not the policy's (issue 29). disable_dropout sets
    every rate to 0: training mode then gives exactly eval mode's log-probs."""
    from learner.learner import disable_dropout

    model, seqs = lora_model(), batch()
    base = model.get_base_model()
    for layer in base.model.layers:
        layer.self_attn.attention_dropout = 0.5  # what Qwen2Config(attention_dropout=0.5) sets
        layer.mlp.act_fn = torch.nn.Sequential(layer.mlp.act_fn, torch.nn.Dropout(0.5))
    with torch.no_grad():
        model.eval()
        eval_lp, mask, _ = sequence_logprobs(model, seqs, 1.0, 8)
        model.train()
        assert (sequence_logprobs(model, seqs, 1.0, 8)[0] - eval_lp).abs().max() > 1e-3  # dropout on
        assert disable_dropout(model) == 2 * len(base.model.layers)
        assert torch.equal(sequence_logprobs(model, seqs, 1.0, 8)[0], eval_lp)


def test_a_model_that_transforms_its_logits_is_refused_by_the_chunked_path():
    """Gemma 2 soft-caps its logits after the LM head (30 tanh(z / 30)); the chunked head would
    skip it and compute other log-probs than the model's. Refused, naming the key and the
    remedy; the full-logits path (chunk 0) is the model's own forward and works."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=32))
    seqs = batch()
    with pytest.raises(ValueError, match=r"final_logit_softcapping=30.0.*set learner.logprob_chunk=0"):
        sequence_logprobs(model, seqs, 1.0, 8)
    lp, mask, _ = sequence_logprobs(model, seqs, 1.0, 0)
    assert lp.shape == mask.shape and (lp * mask).sum() < 0


def test_micro_batches_by_count_keep_the_order():
    assert micro_batches([5, 9, 2, 7, 3], 2) == [[0, 1], [2, 3], [4]]


@pytest.mark.parametrize("budget", [10, 17, 40, 1000])
def test_micro_batches_by_token_budget(budget):
    sizes = [5, 9, 2, 7, 3, 12, 8, 8, 1]
    plan = micro_batches(sizes, 3, budget)
    assert sorted(i for b in plan for i in b) == list(range(len(sizes)))
    order = [i for b in plan for i in b]
    assert [sizes[i] for i in order] == sorted(sizes, reverse=True)  # longest first
    for b in plan:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(sizes[i] for i in b) <= budget
    # Greedy packing: a micro-batch is closed only when the next completion does not fit.
    for b, nxt in zip(plan, plan[1:]):
        assert len(b) == 3 or (len(b) + 1) * sizes[b[0]] > budget


@pytest.mark.parametrize("budget", [0, 30, 60])
def test_the_step_gradient_does_not_depend_on_the_micro_batches(budget):
    """Each micro-batch's loss is its part of the step's sum / the step's denominator, so
    accumulating over any grouping gives the gradient of the whole batch at once (float64, as
    above: the same terms summed in another order, within 1e-10 of the gradient's size)."""
    model, seqs = lora_model(torch.float64), batch(8)
    denom = denominator("sequences", len(seqs), sum(len(s.tokens) for s in seqs))

    def step_grad(plan):
        model.zero_grad()
        for indices in plan:
            chunk = [seqs[i] for i in indices]
            lp, mask, _ = sequence_logprobs(model, chunk, 1.0, 8)
            T = lp.shape[1]
            old = torch.tensor([s.sampler_logprobs + [0.0] * (T - len(s.tokens)) for s in chunk], dtype=lp.dtype)
            adv = torch.tensor([s.advantage for s in chunk], dtype=lp.dtype)
            loss, _ = policy_gradient_loss(lp, old, adv, mask, denom)
            loss.backward()
        return grads(model)

    whole = step_grad([list(range(len(seqs)))])
    plan = micro_batches([len(s.prompt_ids) + len(s.tokens) for s in seqs], 3, budget)
    assert len(plan) > 1
    grouped = step_grad(plan)
    scale = max(g.abs().max() for g in whole.values())
    assert scale > 0
    assert max((whole[k] - grouped[k]).abs().max() for k in whole) <= 1e-10 * scale
