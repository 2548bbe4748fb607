"""Adapter files live in RAM (/dev/shm): folders of dead samplers must not pile up."""

import os
import subprocess
from pathlib import Path

from rollout.sampler import adapter_dir


def test_folders_of_dead_samplers_are_removed_and_live_ones_kept():
    gone = subprocess.Popen(["true"])
    gone.wait()
    root = Path("/dev/shm") if os.path.isdir("/dev/shm") else None
    if root is None:
        import tempfile

        root = Path(tempfile.gettempdir())
    dead = root / f"rl-lora-adapters-{gone.pid}-test"
    live = root / f"rl-lora-adapters-{os.getpid()}-test"
    for d in (dead, live):
        d.mkdir(exist_ok=True)
        (d / "adapter_model.safetensors").write_bytes(b"x" * 1024)
    try:
        mine = adapter_dir()
        assert not dead.exists() and live.exists()
        assert mine.parent == root and mine.name.startswith(f"rl-lora-adapters-{os.getpid()}-")
        mine.rmdir()
    finally:
        for d in (dead, live):
            if d.exists():
                (d / "adapter_model.safetensors").unlink()
                d.rmdir()


def test_a_dead_samplers_engine_shared_memory_is_released_with_its_folder_and_only_what_it_listed():
    """vLLM's engine processes share memory through /dev/shm/psm_* files that only their clean
    shutdown unlinks: a sampler lists its engine's in its adapter folder, and the next
    sampler on the node unlinks them once that sampler's process is gone. Names the module
    does not list (another program's file, a path out of /dev/shm) are left alone."""
    import json
    from multiprocessing import resource_tracker, shared_memory

    from rollout.sampler import ENGINE_SHM, engine_shm_files, shm_files

    if not os.path.isdir("/dev/shm"):
        import pytest

        pytest.skip("no /dev/shm on this machine")
    gone = subprocess.Popen(["true"])
    gone.wait()
    before = shm_files()
    held = shared_memory.SharedMemory(create=True, size=4096)  # as vLLM's message queue makes one
    unheld = Path("/dev/shm") / f"sem.mp-test{os.getpid()}"  # made since `before`, held by nobody
    unheld.write_bytes(b"x" * 32)
    other = Path("/dev/shm") / f"not-an-engine-file-{os.getpid()}"
    other.write_bytes(b"x")
    dead = Path("/dev/shm") / f"rl-lora-adapters-{gone.pid}-test"
    try:
        # This process maps it: listed as a sampler lists its engine's, then "the sampler dies".
        listed = engine_shm_files(os.getpid(), before)
        assert held.name in listed and unheld.name in listed and other.name not in listed
        dead.mkdir()
        (dead / ENGINE_SHM).write_text(json.dumps([held.name, unheld.name, other.name, "../" + other.name, "psm_/../x"]))
        held.close()
        resource_tracker.unregister(held._name, "shared_memory")  # the dead process's tracker is gone too
        mine = adapter_dir()
        mine.rmdir()
        assert not dead.exists()
        assert not (Path("/dev/shm") / held.name).exists() and not unheld.exists()
        assert other.exists()
    finally:
        other.unlink()
        unheld.unlink(missing_ok=True)
        if dead.exists():
            import shutil

            shutil.rmtree(dead)
        if (Path("/dev/shm") / held.name).exists():
            os.unlink(Path("/dev/shm") / held.name)  # unregistered above: not through the tracker
