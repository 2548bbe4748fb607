"""run.mode=stream's driver side (rl/stream.py): what each step trains on, whatever the samplers do.

The samplers are small Ray actors that play the streaming sampler's part (tests/fakes.py
FakeStreamSampler: each group finishes after a delay, on the version it was sent on; a load
aborts the groups that leave the resident window); the real engine loop is tested in
test_integration.py and the whole job in test_run.py. Everything is asserted on recorded
versions, positions and counts, not on timing.
"""

import random
import time
from pathlib import Path

import pytest
import ray

from rl.arms import ArmRun
from rl.config import load_config
from rl.samplers import Samplers
from rl.splits import Split
from rl.stream import StreamBatches
from tests.fakes import FakeLearner, FakeRewards, FakeStreamSampler, FlatRewards

pytestmark = pytest.mark.integration

PER_STEP = 4
RAY_CPUS = 4  # the local_ray fixture's (tests/conftest.py)


def drive(samplers, max_staleness=1, steps=12, rewards=None, rows=None, extra=(), seed=0, on_step=None, learner=None):
    """The driver loop without a learner: take a step's groups, 'train' for a random time
    (0-50 ms), publish version `step` to every sampler. Returns, per step, the trained groups'
    (version, split position, rewards), the metrics, and the batches' data state at the end."""
    cfg = load_config(None, ["run.mode=stream", f"run.steps={steps}", f"rollout.max_staleness={max_staleness}",
                             f"rollout.prompts_per_step={PER_STEP}", "rollout.group_size=2", *extra])
    train = Split(rows or [{"prompt_ids": [i], "answer": "1", "i": i} for i in range(200)])
    arm = ArmRun("", cfg, Path("."), train, rewards or FakeRewards(), published={0: "d0"})
    rng, history = random.Random(seed), []
    with StreamBatches(cfg, samplers, [arm]) as batches:
        for step in range(1, steps + 1):
            ((groups, metrics),) = batches.next(step).values()
            history.append(([(g.version, g.row["i"], list(g.rewards)) for g in groups], metrics))
            if on_step:
                on_step(step)
            time.sleep(rng.uniform(0.0, 0.05))  # the learner's step
            if learner is not None:
                ray.get(learner.train_step.remote([]))  # its version: what a restarted sampler catches up to
            for s in samplers:
                try:
                    ray.get(s.load.remote(step))
                except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError):
                    pass  # restarting: the recovery catches it up
            batches.publish("", step, f"d{step}")
        state = batches.state("")
    return history, state, train


def fakes(delays, max_staleness, max_restarts=0):
    return [ray.remote(FakeStreamSampler).options(max_restarts=max_restarts).remote(i, d, max_staleness)
            for i, d in enumerate(delays)]


def assert_accounted(history, state, train):
    """Every prompt trained once at most, and every one drawn is trained, filtered or still
    pending (the runs stay inside one epoch, so a row's index names its draw)."""
    trained = [i for groups, _ in history for _, i, _ in groups]
    assert len(trained) == len(set(trained)), "a prompt was trained twice"
    filtered = sum(m["rollout/filtered_groups"] for _, m in history) - sum(m["rollout/filter_fill"] for _, m in history)
    pending = [train.row_at(p)["i"] for p in state.get("redraw", [])]
    assert state["position"] <= len(train.rows)
    assert not set(pending) & set(trained)
    assert len(trained) + len(pending) + filtered == state["position"] == train.position


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_staleness_never_exceeds_the_bound_under_random_delays(local_ray, max_staleness):
    samplers = Samplers(fakes([0.0, 0.02], max_staleness))
    history, state, train = drive(samplers, max_staleness)
    for step, (groups, metrics) in enumerate(history, start=1):
        assert len(groups) == PER_STEP
        assert all(0 <= (step - 1) - v <= max_staleness for v, _, _ in groups), (step, groups)
        assert metrics["rollout/staleness_max"] <= max_staleness
    assert_accounted(history, state, train)


def test_a_slow_sampler_gets_a_smaller_share(local_ray):
    """One sampler takes 0.4 s a group, the other under 0.05 s: a static split would put half
    the groups, and the 0.4 s, into every step. Shares follow each sampler's measured speed,
    so the slow one ends up with a small share, and many steps train on no group of it."""
    actors = fakes([0.0, 0.4], 1)
    history, state, train = drive(Samplers(actors), 1, steps=20)
    fast, slow = ray.get([a.groups_served.remote() for a in actors])
    assert slow < 0.25 * (fast + slow), (fast, slow)
    assert_accounted(history, state, train)


def test_filter_zero_signal_keeps_only_groups_with_signal(local_ray):
    rows = [{"prompt_ids": [i], "answer": "flat" if i % 3 == 0 else "1", "i": i} for i in range(300)]
    samplers = Samplers(fakes([0.0, 0.0], 1))
    history, state, train = drive(samplers, 1, rewards=FlatRewards(), rows=rows,
                                  extra=["rollout.filter_zero_signal=true"])
    for groups, metrics in history:
        assert len(groups) == PER_STEP
        assert all(len(set(rewards)) > 1 for _, _, rewards in groups)
        assert metrics["rollout/filter_fill"] == 0
    assert sum(m["rollout/filtered_groups"] for _, m in history) > 0
    assert_accounted(history, state, train)


def test_filter_fills_the_step_when_draws_run_out(local_ray):
    """Every row without signal: each step looks at max_draws_per_step groups, then trains on
    the newest zero-signal ones (counted) rather than waiting for ever."""
    rows = [{"prompt_ids": [i], "answer": "flat", "i": i} for i in range(300)]
    samplers = Samplers(fakes([0.0], 1))
    history, state, train = drive(samplers, 1, steps=4, rewards=FlatRewards(), rows=rows,
                                  extra=["rollout.filter_zero_signal=true", "rollout.max_draws_per_step=8"])
    for groups, metrics in history:
        assert len(groups) == PER_STEP and metrics["rollout/filter_fill"] == PER_STEP
    assert_accounted(history, state, train)


def test_killing_a_sampler_mid_stream_loses_and_duplicates_nothing(local_ray):
    """The victim takes 1 s a group, so a group it runs is still running milliseconds after it
    says so: it is killed at the first step from 3 on where it runs one."""
    actors = fakes([0.0, 1.0], 1, max_restarts=1)
    learner = ray.remote(FakeLearner).remote(actors)
    samplers = Samplers(actors, learner)
    killed = []

    def kill(step):
        if step >= 3 and not killed and ray.get(actors[1].running_count.remote()) > 0:
            ray.kill(actors[1], no_restart=False)  # Ray restarts it; its running groups are gone
            killed.append(step)

    history, state, train = drive(samplers, 1, steps=12, on_step=kill, learner=learner)
    assert killed
    assert samplers.faults.sampler_restarts == 1
    assert samplers.faults.resampled_groups > 0
    assert all(len(groups) == PER_STEP for groups, _ in history)
    assert_accounted(history, state, train)


def test_resume_draws_the_pending_prompts_first():
    """A checkpoint's data state lists the positions drawn but not trained; a restored split
    hands them out before new ones, so none is lost and none trained twice."""
    rows = [{"i": i} for i in range(10)]
    train = Split(rows, seed=3)
    drawn = train.draw(6)
    state = train.state(redraw=[drawn[1][0], drawn[4][0]])
    again = Split(rows, seed=3)
    again.restore(state)
    assert [p for p, _ in again.draw(3)] == [1, 4, 6]
    assert again.row_at(1) is drawn[1][1]  # the same row as the first draw at that position


def test_sync_mode_filter_draws_more_prompts_until_the_step_is_full(local_ray):
    """rollout.filter_zero_signal in run.mode=sync: the batch's zero-signal groups are left out
    and new prompts drawn and sampled until the step has prompts_per_step groups with signal;
    the checkpointed position counts every prompt looked at."""
    from rl.rollouts import Batches
    from tests.fakes import FakeSampler

    cfg = load_config(None, ["rollout.filter_zero_signal=true", f"rollout.prompts_per_step={PER_STEP}",
                             "rollout.group_size=2"])
    rows = [{"prompt_ids": [i], "answer": "flat" if i % 2 == 0 else "1", "i": i} for i in range(100)]
    train = Split(rows)
    sampler = ray.remote(FakeSampler).remote(0)
    arm = ArmRun("", cfg, Path("."), train, FlatRewards(), published={0: "d0"})
    looked = 0
    with Batches(cfg, Samplers([sampler]), [arm]) as batches:
        for step in range(1, 6):
            ((groups, metrics),) = batches.next(step).values()
            assert len(groups) == PER_STEP and all(len(set(g.rewards)) > 1 for g in groups)
            assert metrics["rollout/filter_fill"] == 0
            looked += PER_STEP + metrics["rollout/filtered_groups"]
            ray.get(sampler.load.remote(step))
            batches.publish("", step, f"d{step}")
        assert batches.state("")["position"] == looked == train.position


@pytest.mark.parametrize("filter_on, flat_kept", [("correctness", False), ("reward", True)])
def test_dynamic_sampling_filters_on_correctness(local_ray, filter_on, flat_kept):
    """Issue 29, item 4: dynamic sampling compared the shaped rewards, so a group all wrong but
    of different lengths (here DAPO's overlong penalty: 1 token against 4 of max_tokens 4)
    counted as signal. With rollout.filter_on=correctness (the default, as DAPO and verl) such a
    group is left out; with filter_on=reward it is kept. Every group looked at reports the
    policy's reward and accuracy before filtering (reward/unfiltered_*)."""
    from rl.rollouts import Batches
    from tests.fakes import FakeSampler

    cfg = load_config(None, ["rollout.filter_zero_signal=true", f"rollout.prompts_per_step={PER_STEP}",
                             "rollout.group_size=2", "rollout.max_tokens=4", "reward.overlong_buffer=3",
                             f"rollout.filter_on={filter_on}", "model.max_model_len=16"])
    rows = [{"prompt_ids": [i], "answer": "flat" if i % 2 == 0 else "1", "i": i} for i in range(100)]
    sampler = ray.remote(FakeSampler).remote(0, lengths=(4, 1))  # the 4-token completion is cut: penalty -1
    arm = ArmRun("", cfg, Path("."), Split(rows), FlatRewards(), published={0: "d0"})
    with Batches(cfg, Samplers([sampler]), [arm]) as batches:
        for step in range(1, 4):
            ((groups, metrics),) = batches.next(step).values()
            assert len(groups) == PER_STEP and all(len(set(g.rewards)) > 1 for g in groups)  # all have a gradient
            flat = [g for g in groups if g.row["answer"] == "flat"]
            assert bool(flat) == flat_kept
            if not flat_kept:
                assert all(len(set(g.scores)) > 1 for g in groups)
                assert metrics["rollout/filtered_groups"] > 0
                # The groups kept are half right; of all those looked at, the flat ones are all wrong.
                assert metrics["reward/accuracy"] == 0.5 > metrics["reward/unfiltered_accuracy"]
            ray.get(sampler.load.remote(step))
            batches.publish("", step, f"d{step}")
