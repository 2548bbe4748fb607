"""The adapter window, and where batches come from in sync and async mode.

The samplers here are small Ray actors that play vLLM's part (they return their adapter
version with fake completions, after a random delay); the real engines are exercised in
test_integration.py and test_run.py. Staleness is asserted on recorded versions, not timing.
"""

import random
import time
from pathlib import Path

import pytest
import ray

from common.records import Group
from rl.arms import ArmRun
from rl.config import load_config
from rl.rollouts import AsyncBatches, Batches, Window, keep_in_window
from rl.samplers import Samplers
from rl.splits import Split
from tests.fakes import FakeRewards, FakeSampler

pytestmark = pytest.mark.integration

PUBLISHED = {3: "d3", 4: "d4", 5: "d5"}


def groups(versions, digests):
    return [Group({"i": i}, [], v, d) for i, (v, d) in enumerate(zip(versions, digests))]


def test_stale_and_unknown_adapters_are_refused():
    kept, refused = keep_in_window(groups([5, 4, 3, 5, 5], ["d5", "d4", "d3", "forged", "d5"]), PUBLISHED,
                                   newest=5, max_staleness=1)
    assert [g.row["i"] for g in kept] == [0, 1, 4]
    assert [g.row["i"] for g in refused] == [2, 3]  # version 3 is two behind; "forged" is not what 5 published


def test_another_arms_groups_are_refused():
    """A sweep's arms have version streams of their own: a group produced by arm b's adapter
    (its version and digest as b published them) is refused by arm a's window."""
    crossed = [Group({"i": 0}, [], 5, "d5", arm="a"), Group({"i": 1}, [], 5, "d5", arm="b")]
    kept, refused = keep_in_window(crossed, PUBLISHED, newest=5, max_staleness=0, arm="a")
    assert [g.row["i"] for g in kept] == [0] and [g.row["i"] for g in refused] == [1]


def test_the_record_of_published_versions_stays_small():
    """A 1,000-step run keeps a few digests, not one per version (the soak saw the driver grow):
    every version a group may still come from (max_staleness behind the newest) is kept."""
    arm = ArmRun("", load_config(None, ["run.mode=async", "rollout.max_staleness=2"]), Path("."), published={0: "d0"})
    window = Window(arm)
    for version in range(1, 1001):
        window.publish(version, f"d{version}")
    assert sorted(arm.published) == [997, 998, 999, 1000]  # 998-1000 admissible, one spare
    kept, _ = keep_in_window(groups([998, 997], ["d998", "d997"]), arm.published, newest=1000, max_staleness=2)
    assert [g.version for g in kept] == [998]


def test_sync_window_keeps_only_the_newest():
    kept, refused = keep_in_window(groups([5, 4], ["d5", "d4"]), PUBLISHED, newest=5, max_staleness=0)
    assert [g.version for g in kept] == [5] and len(refused) == 1


def drive(mode, max_staleness, steps=12, on_stale="drop", digest_prefix="d", lag=None):
    """The driver loop without a learner: take a batch, 'train' for a random time, publish.

    lag: sampler index -> versions it stays behind the learner (a sampler that missed loads)."""
    cfg = load_config(None, [f"run.mode={mode}", f"run.steps={steps}", f"rollout.max_staleness={max_staleness}",
                             f"rollout.on_stale={on_stale}", "rollout.prompts_per_step=4", "rollout.group_size=2"])
    samplers = Samplers([ray.remote(FakeSampler).remote(i, digest_prefix) for i in range(2)])
    train = Split([{"prompt_ids": [i], "answer": "1"} for i in range(50)])
    rng, history = random.Random(0), []
    make = AsyncBatches if mode == "async" else Batches
    arm = ArmRun("", cfg, Path("."), train, FakeRewards(), published={0: "d0"})
    with make(cfg, samplers, [arm]) as batches:
        for step in range(1, steps + 1):
            ((kept, metrics),) = batches.next(step).values()
            history.append(([g.version for g in kept], metrics))
            time.sleep(rng.uniform(0.0, 0.05))  # the learner's step
            ray.get([s.load.remote(max(0, step - (lag or {}).get(i, 0))) for i, s in enumerate(samplers)])
            batches.publish("", step, f"d{step}")
    return history


@pytest.mark.parametrize("max_staleness", [0, 1, 2])
def test_async_staleness_never_exceeds_the_bound(local_ray, max_staleness):
    history = drive("async", max_staleness)
    lags = [step - 1 - v for step, (versions, _) in enumerate(history, start=1) for v in versions]
    assert min(lags) >= 0 and max(lags) <= max_staleness, lags
    for step, (versions, metrics) in enumerate(history, start=1):
        assert metrics["rollout/staleness_max"] == max(step - 1 - v for v in versions) <= max_staleness
        assert sum(metrics["rollout/staleness_hist"]) == len(versions) == 4
        assert metrics["rollout/refused_groups"] == 0 and 1 <= metrics["async/queue_depth"] <= max_staleness + 1
    if max_staleness > 0:  # sampling ran ahead of the learner at least once
        assert max(lags) >= 1


def test_async_with_no_staleness_samples_like_sync(local_ray):
    sync, async_ = drive("sync", 0), drive("async", 0)
    assert [v for v, _ in sync] == [v for v, _ in async_] == [[s - 1] * 4 for s in range(1, 13)]


@pytest.mark.parametrize("on_stale, kept, regenerated", [("drop", 2, 0), ("regenerate", 3, 1)])
def test_groups_from_a_lagging_sampler_are_dropped_or_regenerated(local_ray, on_stale, kept, regenerated):
    # Sampler 1 keeps serving the version before the newest: its half of each batch is stale.
    # Regenerated groups are split over both samplers again, so half of them are stale again.
    history = drive("sync", 0, steps=4, on_stale=on_stale, lag={1: 1})
    for step, (versions, metrics) in enumerate(history[1:], start=2):
        assert versions == [step - 1] * kept
        assert (metrics["rollout/refused_groups"], metrics["rollout/regenerated_groups"]) == (2, regenerated)


def test_forged_digests_never_reach_the_learner(local_ray):
    with pytest.raises(RuntimeError, match="outside the adapter window"):
        drive("async", 1, steps=2, digest_prefix="forged")


@ray.remote
class SeedRecorder:
    """A sampler that answers each prompt with the seed it was given (as its completion's text)."""

    def arms(self):
        return [""]

    def generate_many(self, requests):
        from common.records import Completion, Rollout

        return [Rollout("", 0, "d0", [[Completion([1], [-0.1], str(seed), True)] * sampling.n
                                      for seed in sampling.prompt_seeds(len(prompts))])
                for prompts, sampling in requests]


def test_each_prompt_keeps_its_seed_however_many_samplers_split_the_prompts(local_ray):
    """A prompt's seed travels with it (common/records.py Sampling): split over one sampler or
    three, prompt p gets the seed the request gave it. Without explicit seeds prompt p's is
    seed + p * n, so no two prompts of a request share a stream (issue 29, item 1)."""
    from common.records import Sampling

    prompts = [[k] for k in range(7)]
    fleets = [Samplers([SeedRecorder.remote()]), Samplers([SeedRecorder.remote() for _ in range(3)])]
    for sampling, want in ((Sampling(2, 1.0, 4, seed=5), [5 + 2 * p for p in range(7)]),
                           (Sampling(2, 1.0, 4, seeds=tuple(range(100, 107))), list(range(100, 107)))):
        for fleet in fleets:
            assert [int(g.completions[0].text) for g in fleet.generate(prompts, sampling)] == want


def test_training_seeds_follow_the_prompts_position():
    """rl/rollouts.py prompt_seed: a hash of (run.seed, position, attempt), each below 2**62,
    all distinct over a run's draws, and the same again for the same arguments (resume)."""
    from rl.rollouts import prompt_seed

    seeds = [prompt_seed(s, p, a) for s in range(3) for p in range(2000) for a in range(2)]
    assert len(set(seeds)) == len(seeds) and all(0 <= x < 2**62 for x in seeds)
    # Completion i draws seed + i: the streams of nearby draws do not overlap either.
    assert min(abs(a - b) for a, b in zip(sorted(seeds), sorted(seeds)[1:])) > 64
    assert prompt_seed(0, 17) == prompt_seed(0, 17, 0) != prompt_seed(1, 17)
