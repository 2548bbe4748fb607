"""The reward plug-in API, optional shaping, and the golden grading table through the pool
inside a threaded Ray actor (scoring off the actor's main thread, as a real actor would)."""

import pytest

from rewards.pool import RewardPool
from rewards.shaping import format_score, overlong_penalty
from tests.test_rewards import GRADING_TABLE


def test_plugin_by_file_path_with_components_and_sample_fields():
    with RewardPool("tests/reward_plugin_example.py:graded_and_brief", num_workers=1, timeout_s=5) as pool:
        items = [("72", {"answer": "72"}), ("71", {"answer": "72"}),
                 ("a long answer: 72", {"answer": "72", "max_chars": 40})]
        scores, metrics = pool.score(items)
    assert scores == pytest.approx([1.1, 0.1, 0.1])
    assert metrics["reward/exact"] == pytest.approx(1 / 3) and metrics["reward/brevity"] == pytest.approx(0.1)
    assert metrics["reward/error_frac"] == 0.0


def test_plugin_errors_are_counted_not_silent(caplog):
    with RewardPool("tests/reward_plugin_example.py:bad_name", num_workers=1, timeout_s=5) as pool:
        scores, metrics = pool.score([("x", {"answer": "1"})])
    assert scores == [0.0] and metrics["reward/error_frac"] == 1.0
    assert "reserved" in caplog.text
    with pytest.raises(ValueError, match="no such file"):
        RewardPool("tests/no_such_file.py:fn")


def test_default_reward_grades_the_sample_answer():
    with RewardPool("rewards.math:reward", num_workers=1, timeout_s=5) as pool:
        scores, metrics = pool.score([(r"\boxed{72}", {"prompt": "p", "answer": "#### 72"}),
                                      (r"\boxed{7}", {"prompt": "p", "answer": "72"})])
    assert scores == [1.0, 0.0] and metrics["reward/error_frac"] == 0.0


def test_format_score():
    assert format_score(r"so \boxed{\frac{1}{2}}.") == 1.0
    assert format_score(r"so \boxed{\frac{1}{2}") == 0.0  # unbalanced: no answer the grader reads
    assert format_score("The answer is 5") == 0.0
    # An empty box is no answer: the bonus paid for it would reward the form alone (issue 29).
    for empty in (r"\boxed{}", r"so \boxed{ }.", r"\boxed{{}}", "\\boxed{\n}"):
        assert format_score(empty) == 0.0, empty


@pytest.mark.parametrize("tokens, finished, expected", [
    (30, True, 0.0),     # max_tokens 48, buffer 16: no penalty up to 32 tokens
    (40, True, -0.5),    # 8 of the 16 buffer tokens used
    (44, True, -0.75),
    (48, True, -1.0),    # finished exactly at the limit
    (48, False, -1.0),   # cut at the limit
])
def test_overlong_penalty(tokens, finished, expected):
    assert overlong_penalty(tokens, finished, 48, 16, 1.0) == pytest.approx(expected)
    assert overlong_penalty(tokens, finished, 48, 16, 0.5) == pytest.approx(expected / 2)
    assert overlong_penalty(tokens, finished, 48, 0, 1.0) == 0.0  # off


def test_golden_table_through_the_pool_in_a_threaded_ray_actor():
    ray = pytest.importorskip("ray")

    @ray.remote(max_concurrency=4)
    class Grader:
        def __init__(self):
            self.pool = RewardPool("rewards.math:reward", num_workers=2, timeout_s=5)

        def score(self, items):
            import threading

            return self.pool.score(items), threading.current_thread() is threading.main_thread()

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        grader = Grader.remote()
        items = [(completion, {"answer": answer}) for completion, answer, _ in GRADING_TABLE]
        (scores, metrics), on_main_thread = ray.get(grader.score.remote(items))
    finally:
        ray.shutdown()
    assert not on_main_thread
    assert scores == [expected for _, _, expected in GRADING_TABLE]
    assert metrics["reward/timeout_frac"] == 0.0 and metrics["reward/error_frac"] == 0.0
