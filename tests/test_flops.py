"""learner/flops.py against a hand count on a small Qwen2 shape."""

import pytest

from learner.flops import Shape


@pytest.fixture(scope="module")
def shape():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return Shape.of(Qwen2ForCausalLM(config))


def test_the_shape_is_the_models(shape):
    h, kv, inner = 128, 64, 512  # one key/value head of 64: k and v are 128 -> 64
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * inner
    assert shape.linear == 4 * per_layer and shape.layers == 4 and shape.attention == 128
    assert shape.head == 512 * 128 and len(shape.modules) == 4 * 7


def test_full_fine_tuning_is_three_forwards_and_lora_two_plus_its_adapter(shape):
    lengths = [(40, 30), (25, 10)]  # (positions, completion tokens) per sequence
    forward = sum(2 * shape.linear * s + 2 * 4 * 128 * s * s + 2 * 512 * 128 * c for s, c in lengths)
    assert shape.train(lengths, rank=0) == 3 * forward
    # Rank 2 on q_proj and down_proj only: 2 x (128 + 128) + 2 x (512 + 128) per layer.
    adapter = 4 * (2 * (128 + 128) + 2 * (512 + 128))
    assert shape.train(lengths, 2, ("q_proj", "down_proj")) == 2 * forward + 6 * 65 * adapter
    # A rank-1 adapter on every projection adds 6 (in + out) per position and module against
    # the frozen passes' 4 in x out: ~3 / (2 x 128) = 1.2% of the linear work at this width
    # (0.2% at Qwen2.5-0.5B's 896), so LoRA's step is just above 2/3 of full FT's.
    every = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert 2 / 3 < shape.train(lengths, 1, every) / shape.train(lengths, 0) < 2 / 3 * 1.02
