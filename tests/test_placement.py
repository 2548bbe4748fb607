"""Placement from the config: bundles per learner rank and sampler, and errors that name
the resources the cluster lacks (a real local Ray instance; no actors are started)."""

import pytest
import ray

from rl.config import ConfigError, load_config
from rl.setup import bundles, place


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
