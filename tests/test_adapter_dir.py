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
