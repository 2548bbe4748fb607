"""The run directory: one live run at a time (issue 30, item 2), and its checkpoints folder.

Two launches with the same run.name used to run at once: the second moved the live run's
metrics.jsonl, samples.jsonl and best_adapter/ aside, then both wrote the same checkpoints
and adapters and both exited 0. The second launch is refused now, naming the live run's
host and pid, before it writes anything; a lock left by a run killed with SIGKILL does not
block the relaunch (flock goes with its holder's process).
"""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rl.checkpoint import LOCK

ROOT = Path(__file__).resolve().parents[1]
HOLD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from rl.checkpoint import lock_run_dir
lock = lock_run_dir(Path({run_dir!r}))
print("locked", flush=True)
time.sleep(600)
"""


def hold(run_dir: Path) -> subprocess.Popen:
    """A process that holds run_dir's lock, as a live run does."""
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(root=str(ROOT), run_dir=str(run_dir))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def launch(tmp_path: Path):
    from rl.run import main

    return main([str(ROOT / "configs/default.yaml"), f"run.output_dir={tmp_path}", "run.name=same",
                 "model.path=/nonexistent"])


def test_a_second_launch_is_refused_naming_the_live_run_and_touches_nothing(tmp_path):
    run_dir = tmp_path / "same"
    live = hold(run_dir)
    try:
        for name, text in (("metrics.jsonl", '{"step": 0}\n'), ("config.yaml", "the live run's\n")):
            (run_dir / name).write_text(text)
        with pytest.raises(SystemExit, match=rf"in use by a live run \(host {socket.gethostname()}, pid {live.pid},"):
            launch(tmp_path)
        # Nothing of the live run was moved aside or rewritten.
        assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "metrics.jsonl", LOCK]
        assert (run_dir / "config.yaml").read_text() == "the live run's\n"
    finally:
        live.kill()
        live.wait()


def test_the_lock_of_a_killed_run_does_not_block_the_relaunch(tmp_path):
    from rl.checkpoint import lock_run_dir

    run_dir = tmp_path / "same"
    dead = hold(run_dir)
    os.kill(dead.pid, signal.SIGKILL)
    dead.wait()
    assert (run_dir / LOCK).exists()  # left behind, and no obstacle
    with lock_run_dir(run_dir) as lock:
        lock.seek(0)
        assert lock.read().startswith(f"host {socket.gethostname()}, pid {os.getpid()},")
    # Released with its file: the next launch takes it again.
    lock_run_dir(run_dir).close()


def test_a_dangling_checkpoints_link_is_refused_not_read_as_no_checkpoint(tmp_path):
    """Issue 30, item 7: a `checkpoints` link to a volume that is not mounted read as "no
    checkpoint" (a run of 700 steps would start again at 0), then the first write failed."""
    run_dir = tmp_path / "same"
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(tmp_path / "volume-not-mounted")
    with pytest.raises(SystemExit, match=r"checkpoints is a symbolic link to .*volume-not-mounted, which is not a "
                                         r"folder \(a storage volume not mounted\?\)"):
        launch(tmp_path)


def test_a_read_only_output_directory_is_a_message_not_a_traceback(tmp_path):
    """Issue 30, item 7: a read-only (or full) run.output_dir gave a raw traceback. As root
    the permission bits do not bind: a file in the output folder's place takes the same
    path (an OSError from making the run directory, as EROFS or ENOSPC would be)."""
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the output folder should be\n")
    with pytest.raises(SystemExit, match=r"config error: run.output_dir=.*blocked: cannot write the run directory "
                                         r".*blocked/same \((Not a directory|File exists)"):
        launch(blocked)
