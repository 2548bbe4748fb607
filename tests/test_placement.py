"""Placement from the config: bundles per learner rank and sampler, errors that name the
resources the cluster lacks, and CPU cores split in async mode (a real local Ray instance;
no actors are started)."""

import pytest
import ray

from rl.config import ConfigError, load_config
from rl.fleet import actor_cores, bundles, place, place_actors, split_cores
from rl.samplers import _own_group

pytestmark = pytest.mark.integration


def test_bundles_follow_the_config():
    cfg = load_config(None, ["learner.world_size=2", "learner.num_gpus=1", "learner.num_cpus=4",
                             "rollout.num_samplers=3", "rollout.num_gpus=2", "rollout.resources={sampler_node: 1}"])
    assert bundles(cfg) == [{"CPU": 4.0, "GPU": 1.0}] * 2 + [{"CPU": 1.0, "GPU": 2.0, "sampler_node": 1.0}] * 3


def test_missing_resources_are_named():
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        cfg = load_config(None, ["rollout.num_samplers=4", "rollout.num_gpus=1", "learner.resources={big_node: 1}"])
        with pytest.raises(ConfigError) as info:
            place(cfg)
        message = str(info.value)
        assert "rollout.num_samplers=4" in message and "CPU 5 (the cluster has 2)" in message
        assert "GPU 4 (the cluster has 0)" in message and "big_node 1 (the cluster has 0)" in message
        group = place(load_config(None, ["learner.num_cpus=0.5", "rollout.num_cpus=0.5"]))  # fits: placed
        assert ray.get(group.ready(), timeout=30) is not None
    finally:
        ray.shutdown()


def test_cores_are_split_between_actors_that_share_a_node():
    # The learner (bundle 0) and two samplers on node a, one sampler alone on node b.
    assert split_cores(["a", "a", "a", "b"], [2, 1, 1, 1], {"a": 8, "b": 4}) == ["0-3", "4-5", "6-7", ""]
    assert split_cores(["a", "a"], [1, 1], {"a": 2}) == ["0", "1"]
    assert split_cores(["a", "a", "a"], [1, 1, 4], {"a": 3}) == ["0", "1", "2"]  # one core each at least
    assert split_cores(["a", "a", "a"], [1, 1, 1], {"a": 2}) == ["", "", ""]  # fewer cores than actors


def test_async_mode_pins_the_learner_and_the_sampler_apart():
    """run.mode=async on 2 CPUs: the learner and the sampler overlap, so each gets a core of
    its own; sync mode and explicit cpu_cores are left as configured."""
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        base = ["learner.num_cpus=1", "rollout.num_cpus=1"]
        for mode, pinned, expected in (("async", [], ("0", "1")), ("sync", [], ("", "")),
                                       ("async", ["rollout.cpu_cores=1"], ("", "1"))):
            cfg = load_config(None, base + [f"run.mode={mode}", *pinned])
            group = place(cfg)
            nodes = ray.util.placement_group_table(group)["bundles_to_node_id"]
            assert tuple(actor_cores(cfg, [nodes[0], nodes[1]])) == expected, mode
            ray.util.remove_placement_group(group)
    finally:
        ray.shutdown()


def test_each_sampler_holds_a_placement_group_of_its_own():
    """place_actors: the learner's ranks in one group, pinned to the nodes `place` chose; each
    sampler in a group of one bundle (so that dropping it removes its group alone), which an
    actor inside it reports as its own. The groups need all 3 CPUs of the cluster: they are
    placed only because the first reservation (`place`) was given back."""
    ray.init(num_cpus=3, include_dashboard=False)
    try:
        cfg = load_config(None, ["learner.world_size=2", "learner.num_cpus=0.5", "rollout.num_samplers=2",
                                 "rollout.num_cpus=1"])
        placed = place_actors(cfg)
        node = ray.get_runtime_context().get_node_id()
        assert placed.nodes == [node] * 4
        assert placed.learners.bundle_specs == [{"CPU": 0.5}] * 2
        assert [g.bundle_specs for g in placed.samplers] == [[{"CPU": 1.0}]] * 2
        in_group = {"scheduling_strategy": ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(
            placed.samplers[1], placement_group_bundle_index=0)}

        @ray.remote(num_cpus=1)
        class Inside:
            def group(self):
                return _own_group(self)

        assert ray.get(Inside.options(**in_group).remote().group.remote()) == placed.samplers[1].id.hex()
        learner_in = {"scheduling_strategy": ray.util.scheduling_strategies.PlacementGroupSchedulingStrategy(
            placed.learners, placement_group_bundle_index=0)}
        assert ray.get(Inside.options(num_cpus=0.5, **learner_in).remote().group.remote()) is None  # shared
    finally:
        ray.shutdown()
