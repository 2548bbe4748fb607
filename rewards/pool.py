"""A process pool that scores (completion, sample) pairs with a hard deadline per item.

The reward function is named by a spec, "package.module:function" or
"path/to/file.py:function", and called as `fn(completion, sample)`: `sample` is whatever the
caller pairs with the completion (the driver passes the dataset row: "prompt", "answer" and
the row's other fields). It returns a float, or a dict of named float components whose sum
is the score; each component's mean is reported as `reward/<name>`.

Why a pool of our own: math-verify's timeouts use `signal.alarm`, which raises when called
off the main thread (threaded or async Ray actors) and cannot interrupt C-level work (a 2 s
timeout still running after 25 s was reproduced). Here the reward function runs in spawned
worker processes; the caller only waits on pipes, so `score` is safe from any thread and
uses no signals. A worker that misses its deadline is killed and replaced.

A score is a finite real number (an int or a float, not a bool or a string) of magnitude at
most MAX_REWARD, and so is each component: anything else is an error. A reward function
that forks leaves no process behind: each worker leads a process group of its own, which is
killed with it (when it is replaced, and on close); and a second answer on a worker's pipe
(a forked child answering as the worker would) is refused, counted in `reward/stray_frac`
(per item scored), and the worker replaced.

Accounting, per batch: a timeout has no score (None: the driver leaves it out of the loss and
the means, since a right answer that took too long to check is not a wrong one; evaluation
counts it wrong) and counts in `reward/timeout_frac`; an
exception in the function, or a worker that dies (segfault, `os._exit`), scores 0.0 and
counts in `reward/error_frac`; the first error of each batch is logged with its traceback.
Nothing is dropped silently.

Invariants: each worker holds at most one task; each task carries an id unique in the pool's
life and the worker echoes it, so a result is never attributed to another item or batch; a deadline starts when
the item is sent to a worker that has finished starting up, so a slow spawn never eats an
item's time.

Spawn start-up cost: a spawned child imports the fn's module, and also re-imports the
parent's `__main__` script when the parent was started as `python some_script.py` (not with
`-m`). Keep a driver script's heavy imports inside functions, or accept a slower start.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import numbers
import os
import signal
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from threading import Lock
from typing import Callable

logger = logging.getLogger(__name__)

__all__ = ["RewardPool"]

# A worker must import the fn's module and answer "ready" within this many seconds; one that
# does not is a broken environment, not a slow item, so `score` raises.
_STARTUP_TIMEOUT_S = 120.0
# After terminate (SIGTERM), how long to wait before SIGKILL.
_TERMINATE_GRACE_S = 0.5


# Metric names the driver already uses: a component may not take one.
RESERVED_COMPONENTS = {"mean", "accuracy", "timeout_frac", "error_frac", "stray_frac", "format", "overlong"}
# The largest |score| (and |component|) accepted. Real rewards are O(1); the learner squares
# them (the std normaliser) and sums them with the batch's tokens in float32 (max 3.4e38):
# 1e308, accepted as a float, became non-finite steps and "Infinity" in metrics.jsonl.
MAX_REWARD = 1e6


def _resolve(spec: str) -> Callable:
    """Import "package.module:function" or "path/to/file.py:function" and return the function."""
    module_name, _, attr = _check_spec(spec)
    if module_name.endswith(".py"):
        file_spec = importlib.util.spec_from_file_location(f"reward_plugin_{abs(hash(module_name))}", module_name)
        if file_spec is None:
            raise ImportError(f"cannot import reward file {module_name!r}")
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    fn = getattr(module, attr)
    if not callable(fn):
        raise TypeError(f"reward fn spec {spec!r} names a non-callable {type(fn).__name__}")
    return fn


def _worker_main(conn: multiprocessing.connection.Connection, spec: str) -> None:
    """Worker loop: receive `(task id, completion, sample)`, send `(task id, ok, value)`.

    `value` is (score, components or None) when ok, else the formatted traceback. `None` asks
    the worker to exit.
    """
    # Scoring is single-threaded; do not let a numeric library start a thread per core.
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    # A process group of its own, killed with the worker: whatever the reward fn forks goes too.
    os.setpgid(0, 0)
    # Ctrl-C goes to the whole process group, and `ray job stop` signals the driver's children
    # too: the parent decides when workers stop (it finishes a step and checkpoints first).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        fn = _resolve(spec)
    except BaseException:
        conn.send(("init_error", traceback.format_exc()))
        return
    conn.send(("ready", None))
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        task_id, completion, sample = task
        try:
            value = _checked(fn(completion, sample))
        except Exception:
            conn.send((task_id, False, traceback.format_exc()))
        else:
            conn.send((task_id, True, value))


def _real(value, what: str) -> float:
    """`value` as a float if it is a finite real number within MAX_REWARD, else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"reward fn returned {what} {value!r} of type {type(value).__name__}: "
                        "a score must be an int or a float")
    value = float(value)
    if not math.isfinite(value) or abs(value) > MAX_REWARD:
        raise ValueError(f"reward fn returned {what} {value!r}: a score must be finite and within "
                         f"+-{MAX_REWARD:g}")
    return value


def _checked(result) -> tuple[float, dict[str, float] | None]:
    """(score, components) from what a reward fn returned, or raise naming what is wrong."""
    if isinstance(result, dict):
        components = {}
        for name, part in result.items():
            if not isinstance(name, str) or name in RESERVED_COMPONENTS:
                raise ValueError(f"reward component name {name!r} is not a string or is reserved "
                                 f"({sorted(RESERVED_COMPONENTS)})")
            components[name] = _real(part, f"component {name!r} =")
        return _real(sum(components.values()), "components summing to"), components
    return _real(result, "a score of"), None


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    ready: bool = False
    started_at: float = field(default_factory=time.monotonic)
    # (item index, deadline, task id) of the task in flight; None when idle.
    task: tuple[int, float, int] | None = None


class RewardPool:
    """Score `(completion, sample)` pairs with `fn` in spawned processes, a deadline per item.

    `fn` is a spec "package.module:function" or "path/to/file.py:function", resolved inside
    the workers; the function takes `(completion, sample)` and returns a float or a dict of
    float components (see the module doc). `timeout_s` is the wall-clock
    limit per item, counted from when the item reaches an idle worker. Workers start at
    construction. `score` may be called from any thread; calls are serialised.
    """

    def __init__(self, fn: str, num_workers: int = 2, timeout_s: float = 5.0):
        module_name, _, attr = _check_spec(fn)
        if module_name.endswith(".py"):  # workers may run elsewhere in the tree: make it absolute
            if not os.path.isfile(module_name):
                raise ValueError(f"reward fn spec {fn!r}: no such file {module_name!r}")
            fn = f"{os.path.abspath(module_name)}:{attr}"
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.fn = fn
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self._ctx = multiprocessing.get_context("spawn")
        self._lock = Lock()
        self._closed = False
        self._task_ids = itertools.count()
        self._workers = [self._start_worker() for _ in range(num_workers)]

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def score(self, items: list[tuple[str, object]]) -> tuple[list[float | None], dict[str, float]]:
        """Scores of `items` in order (None for an item whose deadline passed), and
        `{"reward/timeout_frac", "reward/error_frac"}` plus `reward/<name>` for each component
        (its mean over the items that returned it)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("RewardPool.score called after close()")
            try:
                return self._score(list(items))
            except BaseException:
                # A task still in flight would answer into the next batch: drop its worker.
                for slot, w in enumerate(self._workers):
                    if w.task:
                        self._replace(slot)
                raise

    def close(self) -> None:
        """Stop all workers; idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for w in self._workers:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
            deadline = time.monotonic() + 1.0
            for w in self._workers:  # exited, not yet reaped: _stop kills its group first
                multiprocessing.connection.wait([w.process.sentinel], max(0.0, deadline - time.monotonic()))
                self._stop(w)
            self._workers = []

    # -- internals; called with self._lock held ------------------------------------------

    def _score(self, items: list[tuple[str, str]]) -> tuple[list[float | None], dict[str, float]]:
        n = len(items)
        scores: list[float | None] = [0.0] * n
        done = [False] * n
        pending = deque(range(n))
        timeouts: list[int] = []
        errors: list[tuple[int, str]] = []
        self._strays = 0
        sums: dict[str, float] = {}  # per component
        counts: dict[str, int] = {}

        def finish(index: int, ok: bool, value) -> None:
            # A result for an item that is already settled would be a bookkeeping bug.
            assert not done[index], f"item {index} settled twice"
            done[index] = True
            if ok:
                scores[index], parts = value
                for name, part in (parts or {}).items():
                    sums[name] = sums.get(name, 0.0) + part
                    counts[name] = counts.get(name, 0) + 1
            else:
                errors.append((index, value))

        while pending or any(w.task for w in self._workers):
            for slot, w in enumerate(self._workers):
                if pending and w.ready and w.task is None:
                    index, task_id = pending.popleft(), next(self._task_ids)
                    completion, answer = items[index]
                    try:
                        w.conn.send((task_id, completion, answer))
                    except OSError:
                        # Died while idle: the item never ran, so it goes back to the queue.
                        pending.appendleft(index)
                        self._replace(slot)
                        continue
                    w.task = (index, time.monotonic() + self.timeout_s, task_id)

            now = time.monotonic()
            wake = [w.task[1] for w in self._workers if w.task]
            wake += [w.started_at + _STARTUP_TIMEOUT_S for w in self._workers if not w.ready]
            readable = multiprocessing.connection.wait(
                [w.conn for w in self._workers if w.task or not w.ready],
                timeout=max(0.0, min(wake) - now) if wake else None,
            )
            for slot, w in enumerate(self._workers):
                if w.conn in readable:
                    self._receive(slot, finish, pending)

            now = time.monotonic()
            for slot, w in enumerate(self._workers):
                if w.task and now >= w.task[1]:
                    index = w.task[0]
                    done[index] = True
                    scores[index] = None
                    timeouts.append(index)
                    self._replace(slot)
                elif not w.ready and now >= w.started_at + _STARTUP_TIMEOUT_S:
                    raise RuntimeError(
                        f"reward worker for {self.fn!r} did not start within {_STARTUP_TIMEOUT_S} s"
                    )

        assert all(done), "every item is settled exactly once"
        self._log_batch(n, timeouts, errors)
        return scores, {
            "reward/timeout_frac": len(timeouts) / n if n else 0.0,
            "reward/error_frac": len(errors) / n if n else 0.0,
            "reward/stray_frac": self._strays / n if n else 0.0,
            **{f"reward/{name}": sums[name] / counts[name] for name in sorted(sums)},
        }

    def _receive(self, slot: int, finish: Callable[[int, bool, object], None], pending: deque) -> None:
        """Handle one readable worker: its start-up message, its result, or its death; or a
        stray answer (one for no task in flight on it: a process the reward fn forked answering
        as the worker would), which is refused and counted, and the worker replaced with its
        process group, its task in flight going back to the queue."""
        w = self._workers[slot]
        try:
            message = w.conn.recv()
        except (EOFError, OSError):
            # EOF can arrive just before the exit; its group first, while its id is still held
            multiprocessing.connection.wait([w.process.sentinel], _TERMINATE_GRACE_S)
            self._kill_group(w)
            code = w.process.exitcode
            if w.task:
                finish(w.task[0], False, f"reward worker died (exit code {code}) scoring this item")
            elif not w.ready:
                raise RuntimeError(f"reward worker for {self.fn!r} died on start-up (exit code {code})")
            self._replace(slot)
            return
        if not w.ready:
            status, detail = message
            if status != "ready":
                raise RuntimeError(f"reward worker cannot load {self.fn!r}:\n{detail}")
            w.ready = True
            return
        task_id, ok, value = message if isinstance(message, tuple) and len(message) == 3 else (None, False, None)
        if not (w.task and w.task[2] == task_id):  # task ids are ints: a malformed message is stray too
            self._strays += 1
            logger.warning("reward fn %s: a stray answer on a worker's pipe (task %r, none such in flight: a process "
                           "it forked answering?); the worker and its process group are replaced", self.fn, task_id)
            if w.task:
                pending.appendleft(w.task[0])
            self._replace(slot)
            return
        index = w.task[0]
        w.task = None
        finish(index, ok, value)

    def _log_batch(self, n: int, timeouts: list[int], errors: list[tuple[int, str]]) -> None:
        if timeouts:
            logger.warning(
                "reward fn %s: %d/%d items timed out after %.1f s (no score); items %s",
                self.fn, len(timeouts), n, self.timeout_s, sorted(timeouts)[:10],
            )
        if errors:
            index, detail = min(errors)
            logger.warning(
                "reward fn %s: %d/%d items raised or crashed (scored 0.0); first, item %d:\n%s",
                self.fn, len(errors), n, index, detail.rstrip(),
            )

    def _start_worker(self) -> _Worker:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=_worker_main, args=(child_conn, self.fn), name="reward-worker", daemon=True
        )
        process.start()
        # Only the child may hold its end: then the child's death reads as EOF here.
        child_conn.close()
        return _Worker(process=process, conn=parent_conn)

    def _replace(self, slot: int) -> None:
        self._stop(self._workers[slot])
        self._workers[slot] = self._start_worker()

    @staticmethod
    def _kill_group(w: _Worker) -> None:
        """SIGKILL the worker's process group: what the reward fn forked. Called before the
        worker is reaped, so that its id (the group's) cannot belong to another process yet;
        none such if the worker died before it made its group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(w.process.pid, signal.SIGKILL)

    def _stop(self, w: _Worker) -> None:
        """Kill the worker (it ignores SIGTERM, see _worker_main) and its process group."""
        self._kill_group(w)
        if w.process.is_alive():
            w.process.kill()
        w.process.join()
        w.conn.close()
        w.process.close()


def _check_spec(spec: str) -> tuple[str, str, str]:
    parts = spec.rpartition(":")
    if not all(parts):
        raise ValueError(f"reward fn spec {spec!r} must look like 'package.module:function' "
                         "or 'path/to/file.py:function'")
    return parts
