"""A DeepSpeed op build killed mid-way (an OOM kill) leaves torch's build lock behind, and
every later learner on the machine waited for it for ever: the learner now removes a lock
that no process holds (learner/learner.py: release_stale_build_locks)."""

import os
import time

from learner.learner import release_stale_build_locks


def test_only_a_lock_that_no_process_holds_is_removed(tmp_path):
    def lock(name: str, age_s: float):
        path = tmp_path / "py311_cpu" / name / "lock"
        path.parent.mkdir(parents=True)
        path.touch()
        os.utime(path, (time.time() - age_s,) * 2)
        return path

    orphan = lock("killed_op", 600)  # its builder died: nobody holds it
    building = lock("live_op", 600)  # a build in progress holds it open, as torch's FileBaton does
    fresh = lock("just_released", 1)  # younger than min_age_s: a builder may be between close and remove
    held = os.open(building, os.O_RDONLY)
    try:
        assert release_stale_build_locks(tmp_path) == [orphan]
    finally:
        os.close(held)
    assert not orphan.exists() and building.exists() and fresh.exists()
    assert release_stale_build_locks(tmp_path / "missing") == []
