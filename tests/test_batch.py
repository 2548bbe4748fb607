"""From scored groups to the learner's batch and the step's rollout metrics (rl/run.py
training_batch, rl/rollouts.py rollout_metrics), by hand."""

import pytest

from common.records import Completion, Group
from rl.config import load_config
from rl.rollouts import has_signal, rollout_metrics
from rl.run import training_batch


def group(scores, rewards=None, version=4, lengths=None, row=None):
    lengths = lengths or [3] * len(scores)
    completions = [Completion([7] * n, [-0.5] * n, f"c{i}", True) for i, n in enumerate(lengths)]
    return Group(row or {"prompt": "p", "prompt_ids": [1, 2]}, completions, version, "d",
                 scores=list(scores), rewards=list(scores if rewards is None else rewards))


def test_a_completion_whose_grading_timed_out_is_left_out():
    """Issue 29, item 5: a right answer whose grading timed out scored 0 and got a negative
    advantage. Now it has no grade (None): its group's mean is over the graded three, and it
    is not in the learner's batch; the sample table shows it without an advantage."""
    cfg = load_config(None, [])
    g = group([1.0, None, 0.0, 1.0])
    batch, tables, metrics = training_batch({"": ([g], {})}, {"": cfg}, step=5)
    assert [d.tokens for d in batch] == [[7] * 3] * 3 and [d.advantage for d in batch] == pytest.approx(
        [1 / 3, -2 / 3, 1 / 3])
    assert [row["advantage"] for row in tables[""]] == pytest.approx([1 / 3, None, -2 / 3, 1 / 3])
    assert metrics[""]["advantage/mean"] == pytest.approx(0.0, abs=1e-6)  # float32 thirds: ~1e-8 each
    assert rollout_metrics([g], newest=4, max_staleness=0)["rollout/ungraded_completions"] == 1


def test_each_completion_carries_its_lag_and_the_advantage_metrics():
    """lag = the learner's version (step - 1) minus the group's; advantage/zero_frac counts
    the tokens of groups without signal (the flat group's 2 + 4 of 12)."""
    cfg = load_config(None, [])
    live, flat = group([1.0, 0.0], version=4, lengths=[3, 3]), group([0.0, 0.0], version=3, lengths=[2, 4])
    batch, _, metrics = training_batch({"": ([live, flat], {})}, {"": cfg}, step=5)
    assert [d.lag for d in batch] == [0, 0, 1, 1]
    assert metrics[""]["advantage/zero_frac"] == pytest.approx(6 / 12)
    assert metrics[""]["advantage/std"] == pytest.approx(0.5 / 2 ** 0.5)  # (0.5, -0.5, 0, 0)


def test_rollout_metrics_by_correctness():
    """Lengths of the right and the wrong completions apart; accuracy and mean reward over the
    graded ones only; signal is judged on graded completions."""
    g = group([1.0, 0.0, None], rewards=[1.1, 0.0, None], lengths=[2, 6, 9])
    m = rollout_metrics([g], newest=4, max_staleness=0)
    assert m["rollout/response_len_right"] == 2 and m["rollout/response_len_wrong"] == 6
    assert m["reward/accuracy"] == 0.5 and m["reward/mean"] == pytest.approx(0.55)
    assert has_signal(g, "correctness") and not has_signal(group([0.0, None, 0.0]), "correctness")
    # All wrong, but shaped apart (a format bonus): signal in the rewards, none in correctness.
    shaped = group([0.0, 0.0], rewards=[0.1, 0.0])
    assert has_signal(shaped, "reward") and not has_signal(shaped, "correctness")
