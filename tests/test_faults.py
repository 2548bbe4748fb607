"""The driver loop's fault handling, with small Ray actors in the learner's and samplers' parts.

The real learner's skip of a non-finite step is tested in test_integration.py; a real job
killed and resumed, and a real sampler killed mid-rollout, in test_run.py.
"""

import json
import signal

import pytest
import ray

from rl.arms import ArmRun
from rl.config import load_config
from rl.faults import Faults
from rl.run import rl_loop
from rl.samplers import Samplers
from rl.splits import Split
from tests.fakes import FakeLearner, FakeRewards, FakeSampler

pytestmark = pytest.mark.integration


class StopAfter:
    """Plays StopSignal: SIGTERM arrives once `step` has been logged."""

    def __init__(self, metrics_path, step):
        self.metrics_path, self.step = metrics_path, step

    @property
    def signal(self):
        if self.metrics_path.exists() and len(self.metrics_path.read_text().splitlines()) > self.step:
            return signal.SIGTERM
        return None


class NoSignal:
    signal = None


def setup(nan_steps=(), steps=10, mode="sync"):
    cfg = load_config(None, [f"run.steps={steps}", f"run.mode={mode}", f"rollout.max_staleness={int(mode != 'sync')}",
                             "rollout.prompts_per_step=4", "rollout.group_size=2",
                             "sync.probe_every=-1", "run.checkpoint_every=0", "learner.max_skipped_steps=3"])
    fakes = [ray.remote(FakeSampler).remote(i) for i in range(2)]
    learner = ray.remote(FakeLearner).remote(fakes, nan_steps)
    train = Split([{"prompt_ids": [i], "answer": "1", "prompt": str(i)} for i in range(50)])
    evals = {"eval": Split([{"prompt_ids": [i], "answer": "1", "prompt": str(i)} for i in range(4)])}
    samplers = Samplers(fakes, faults=Faults(cfg.learner.max_skipped_steps))
    return cfg, learner, samplers, train, evals


def loop(cfg, learner, samplers, train, evals, run_dir, resume, stop):
    """rl_loop on one arm (a run without arms section), as rl/run.py's main calls it."""
    arm = ArmRun("", cfg, run_dir, train, FakeRewards(), samplers.faults)
    return rl_loop(cfg, learner, samplers, FakeRewards(), [arm], evals, {"": resume} if resume else {}, samplers.faults,
                   stop)


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_non_finite_steps_are_skipped_and_k_in_a_row_stop_the_run_with_a_checkpoint(local_ray, tmp_path):
    # Step 2 is skipped and the run goes on; 4, 5, 6 in a row end it.
    cfg, learner, samplers, train, evals = setup(nan_steps={2, 4, 5, 6})
    with pytest.raises(FloatingPointError, match=r"3 steps in a row \(to step 6\).*learner.max_skipped_steps=3"):
        loop(cfg, learner, samplers, train, evals, tmp_path, None, NoSignal())
    logged = rows(tmp_path)
    assert [r["step"] for r in logged] == list(range(7))
    assert [r["learner/skipped"] for r in logged[1:]] == [0, 1, 0, 1, 1, 1]
    assert [r["fault/skipped_steps"] for r in logged[1:]] == [0, 1, 1, 2, 3, 4]
    saved = json.loads((tmp_path / "checkpoints" / "step-000006" / "state.json").read_text())
    assert saved["faults"]["fault/skipped_steps"] == 4 and saved["data"]["position"] == 6 * 4


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigterm_checkpoints_and_stops_and_the_same_command_resumes(local_ray, tmp_path, mode):
    """In async mode the sampling thread has drawn rows ahead of the learner: the checkpoint
    holds the position the learner consumed, so no row is skipped or drawn twice."""
    cfg, learner, samplers, train, evals = setup(mode=mode)
    step = loop(cfg, learner, samplers, train, evals, tmp_path, None, StopAfter(tmp_path / "metrics.jsonl", 2))
    assert step == 2 and [r["step"] for r in rows(tmp_path)] == [0, 1, 2]
    path = tmp_path / "checkpoints" / "step-000002"
    assert json.loads((path / "state.json").read_text())["data"]["position"] == 2 * 4
    assert train.position > 2 * 4 if mode == "async" else train.position == 2 * 4  # drawn ahead, or not

    # Relaunch: a new learner and split, as a new driver would have; it resumes at step 3.
    cfg, learner, samplers, train, evals = setup(mode=mode)
    step = loop(cfg, learner, samplers, train, evals, tmp_path, path, NoSignal())
    logged = rows(tmp_path)
    assert step == 10 and [r["step"] for r in logged] == list(range(11))
    assert "eval/accuracy" in logged[0] and "eval/accuracy" in logged[-1]  # before training, and at the end
    assert [r["data/position"] for r in logged[1:]] == [4 * s for s in range(1, 11)]  # no row drawn twice
    assert [r["fault/resumes"] for r in logged[1:]] == [0, 0] + [1] * 8
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-000002", "step-000010"]


def test_an_arm_that_keeps_failing_stops_alone_and_the_others_go_on(local_ray, tmp_path):
    """In a sweep, arm b's steps 3, 4, 5 are non-finite: b checkpoints, stops with its error
    in failed.json and is no longer sampled or trained; a runs to the end. A relaunch keeps
    b stopped and resumes a from its last checkpoint."""
    from rl.checkpoint import arm_runs

    cfg = load_config(None, ["run.steps=8", "rollout.prompts_per_step=2", "rollout.group_size=2", "sync.probe_every=-1",
                             "run.checkpoint_every=4", "arms.list=[{name: a}, {name: b, learner.lr: 0.01}]"])
    fakes = [ray.remote(FakeSampler).remote(0)]
    learner = ray.remote(FakeLearner).remote(fakes, {3, 4, 5}, ("a", "b"), "b")
    samplers = Samplers(fakes, faults=Faults())
    evals = {"eval": Split([{"prompt_ids": [i], "answer": "1", "prompt": str(i)} for i in range(4)])}
    arms, resumes = arm_runs(cfg, tmp_path, None)
    for arm in arms:
        arm.train, arm.rewards = Split([{"prompt_ids": [i], "answer": "1", "prompt": str(i)} for i in range(50)]), FakeRewards()
    assert rl_loop(cfg, learner, samplers, FakeRewards(), arms, evals, resumes, samplers.faults, NoSignal()) == 8
    a, b = (rows(tmp_path / "arms" / name) for name in ("a", "b"))
    assert [r["step"] for r in a] == list(range(9)) and [r["step"] for r in b] == list(range(6))
    assert [r["learner/skipped"] for r in b[1:]] == [0, 0, 1, 1, 1]
    failed = json.loads((tmp_path / "arms" / "b" / "failed.json").read_text())
    assert failed["step"] == 5 and "3 steps in a row (to step 5)" in failed["error"]
    assert sorted(p.name for p in (tmp_path / "arms" / "b" / "checkpoints").iterdir()) == ["step-000004", "step-000005"]
    assert a[-1]["data/position"] == 8 * 2 and b[-1]["data/position"] == 5 * 2  # b drew no rows after it stopped

    cfg = load_config(None, ["run.steps=10", "rollout.prompts_per_step=2", "rollout.group_size=2", "sync.probe_every=-1",
                             "run.checkpoint_every=4", "arms.list=[{name: a}, {name: b, learner.lr: 0.01}]"])
    arms, resumes = arm_runs(cfg, tmp_path, None)
    assert [arm.error != "" for arm in arms] == [False, True] and list(resumes) == ["a"]
    assert resumes["a"].name == "step-000008"
