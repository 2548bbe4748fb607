"""/dev/shm after vLLM engines (issue 18, failure 7): a sampler leaves nothing behind.

With vLLM's engine in processes of its own (rollout.separate_engine, the default on GPUs) its
message queues are Python shared memory, /dev/shm/psm_* files, that only a clean shutdown of
those processes unlinks. A sampler started and closed leaves /dev/shm as it found it; one
killed with its engine (no close) leaves its engine's files, which the next sampler started on
the node removes (rollout/sampler.py: adapter_dir). Two engine starts.

The files compared are the samplers' own (those their processes map or hold open, and their
adapter folders), not all of /dev/shm, which other programs on the machine use meanwhile.
"""

import os
import secrets
import signal
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from demo.tiny_model import build_tiny_model  # noqa: E402
from rl.config import load_config  # noqa: E402

pytestmark = pytest.mark.integration

SHM = Path("/dev/shm")


def engine_files(sampler) -> tuple[int, set[str]]:
    """The sampler's pid and the /dev/shm files it lists as its engine's (the ones it releases)."""
    return ray.get(sampler.__ray_call__.remote(lambda self: (os.getpid(), set(self._engine_shm))))


def mine(pid: int) -> set[str]:
    """A sampler's adapter folders (named by its pid)."""
    return {p.name for p in SHM.glob(f"rl-lora-adapters-{pid}-*")}


@pytest.mark.skipif(not SHM.is_dir(), reason="no /dev/shm on this machine")
def test_a_sampler_leaves_dev_shm_as_it_found_it_and_removes_a_killed_ones_files():
    import psutil

    from rl.fleet import sampler_spec, start_sampler

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        cfg = load_config(None, ["rollout.separate_engine=true", "rollout.max_restarts=0"])
        spec = sampler_spec(cfg, build_tiny_model(), 0)
        first = start_sampler(cfg, spec, secrets.token_bytes(32), {"": {}}, 0)
        pid, held = engine_files(first)
        held = {n for n in held if (SHM / n).exists()}  # (a transient file of the start may be listed, and gone)
        assert any(n.startswith("psm_") for n in held), held  # vLLM's message queues: what this test is about
        assert mine(pid)

        # Killed with its engine, as a killed job or Ray killing the actor's children is: no close.
        tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        for p in tree:
            p.send_signal(signal.SIGKILL)
        psutil.wait_procs(tree, timeout=30)
        time.sleep(1.0)  # anything that would clean up after them has had its chance
        left = {n for n in held if (SHM / n).exists()}
        assert left, "nothing was left behind: the fix below is not exercised"

        second = start_sampler(cfg, spec, secrets.token_bytes(32), {"": {}}, 1)
        pid2, held2 = engine_files(second)
        assert not {n for n in left if (SHM / n).exists()} and not mine(pid)  # the dead one's, removed
        assert held2 and not held2 & held

        ray.get(second.close.remote())
        assert not {n for n in held2 if (SHM / n).exists()} and not mine(pid2)
        ray.kill(second)
    finally:
        ray.shutdown()
