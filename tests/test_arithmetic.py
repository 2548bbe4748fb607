import random

from demo import arithmetic
from rewards.math import math_reward


def test_splits_are_disjoint_and_answers_right():
    train = arithmetic.problems("train", 3000, seed=0)
    evals = arithmetic.problems("eval", 300, seed=0)
    assert not {p["prompt"] for p in train} & {p["prompt"] for p in evals}
    assert len({p["prompt"] for p in evals}) == 300
    for p in train[:200]:
        assert int(p["answer"]) == (p["a"] + p["b"] if p["op"] == "+" else p["a"] - p["b"])


def test_warm_start_targets_grade_as_designed():
    """Boxed targets score 1 and unboxed ones 0: the format is what RL has to learn."""
    rng = random.Random(0)
    problems = arithmetic.problems("train", 600, seed=1)
    targets = [arithmetic.sft_target(p, rng) for p in problems]
    for p, t in zip(problems, targets):
        assert math_reward(t, p["answer"]) == (1.0 if "boxed" in t else 0.0)
    boxed = sum("boxed" in t for t in targets) / len(targets)
    assert abs(boxed - sum(arithmetic.BOX_PROB) / len(arithmetic.BOX_PROB)) < 0.06
