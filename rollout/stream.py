"""A sampler's engine driven by one thread of its own (run.mode=stream): continuous batching.

`EngineLoop` owns vLLM's `LLMEngine` once streaming starts: groups are added one at a time
(each completion a request of its own, seeded `seed + i` as vLLM seeds the children of an
n-completion request), the engine steps while any request runs, and each group is handed
back the moment its last completion finishes. Everything else that touches the engine (an
adapter load, an eviction, an evaluation's requests) is a call the loop runs between two
decoding steps, so no lock is held across generation and an adapter loads while requests run.

A group runs on the adapter version that was newest when it was added, to the end: the
sampler keeps max_staleness + 1 versions resident, and when a version leaves that window
its running groups are aborted (a group that old could not be trained on any more) and
reported, so that the driver draws their prompts again.
"""

from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class Running:
    """One group in the engine: its completions as they finish, and who serves it."""

    key: str
    n: int
    lora_id: int  # vLLM's id of the adapter version it runs on (0: full weights)
    served: tuple  # (arm, version, digest)
    outputs: dict = field(default_factory=dict)  # completion index -> vLLM's CompletionOutput
    done: Future | None = None  # a blocking caller's (generate_many), else None: streamed


class EngineLoop:
    """The thread that alone drives the engine once streaming starts."""

    def __init__(self, engine):
        from vllm.v1.engine.exceptions import EngineDeadError

        self.engine, self._dead_error = engine, EngineDeadError
        self._calls: queue.SimpleQueue = queue.SimpleQueue()  # (fn, Future) run between two steps
        self._running: dict[str, Running] = {}  # key -> group
        self._requests: dict[str, tuple[str, int]] = {}  # engine request id -> (key, completion index)
        self._ids = itertools.count()
        self._finished: list[tuple[Running, list]] = []  # streamed groups done since the last take
        self._aborted: list[str] = []
        self._changed = threading.Condition()
        self.busy_s = 0.0  # seconds the engine stepped with requests running
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def call(self, fn):
        """fn() run by the loop between two decoding steps; its result (or error) here."""
        if threading.current_thread() is self._thread:
            return fn()
        done: Future = Future()
        self._calls.put((fn, done))
        return done.result()

    def add(self, group: Running, prompt_ids: list[int], params: list, lora_request):
        """In the loop: the group's completions as requests (params[i] for completion i)."""
        self._running[group.key] = group
        for i, p in enumerate(params):
            rid = f"stream-{next(self._ids)}"
            self._requests[rid] = (group.key, i)
            self.engine.add_request(rid, {"prompt_token_ids": prompt_ids}, p, lora_request=lora_request)

    def abort_version(self, lora_id: int) -> list[str]:
        """In the loop: abort every group running on this adapter id; returns their keys."""
        keys = [k for k, g in self._running.items() if g.lora_id == lora_id]
        rids = [rid for rid, (k, _) in self._requests.items() if k in keys]
        if rids:
            self.engine.abort_request(rids)
        for rid in rids:
            del self._requests[rid]
        for k in keys:
            g = self._running.pop(k)
            if g.done is not None:
                g.done.set_exception(RuntimeError(f"adapter version {g.served[1]} was evicted while in use"))
        with self._changed:
            self._aborted += [k for k in keys]
            self._changed.notify_all()
        return keys

    def take(self, wait_s: float) -> tuple[list[tuple[Running, list]], list[str], float]:
        """Groups finished and keys aborted since the last take, waiting up to wait_s for one;
        and the engine's busy seconds so far."""
        with self._changed:
            self._changed.wait_for(lambda: self._finished or self._aborted or self._closing, timeout=wait_s)
            finished, aborted, self._finished, self._aborted = self._finished, self._aborted, [], []
            return finished, aborted, self.busy_s

    def running(self) -> int:
        return len(self._running)

    def stop(self):
        """Abort every group (streamed or not) and forget what finished; the loop goes on."""
        def clear():
            if self._requests:
                self.engine.abort_request(list(self._requests))
            for g in self._running.values():
                if g.done is not None:
                    g.done.set_exception(RuntimeError("streaming stopped"))
            self._running.clear()
            self._requests.clear()
            with self._changed:
                self._finished, self._aborted = [], []

        self.call(clear)

    def close(self):
        self._closing = True
        self._calls.put((lambda: None, Future()))
        with self._changed:
            self._changed.notify_all()
        self._thread.join(timeout=30)

    def _run(self):
        try:
            while not self._closing:
                block = not self.engine.has_unfinished_requests()
                while True:  # every waiting call, then one decoding step
                    try:
                        fn, done = self._calls.get(block=block, timeout=0.5 if block else None)
                    except queue.Empty:
                        break
                    block = False
                    try:
                        done.set_result(fn())
                    except BaseException as e:  # the caller raises it
                        done.set_exception(e)
                if self.engine.has_unfinished_requests():
                    start = time.perf_counter()
                    outputs = self.engine.step()
                    self.busy_s += time.perf_counter() - start
                    self._collect(outputs)
        except self._dead_error:
            # vLLM's engine is gone (OOM-killed, crashed): end this actor too, so that Ray
            # restarts it and the driver draws its groups again.
            log.exception("the vLLM engine died; exiting so that Ray restarts this sampler")
            os._exit(1)
        except BaseException:
            log.exception("the engine loop failed; exiting so that Ray restarts this sampler")
            os._exit(1)

    def _collect(self, outputs: list):
        for out in outputs:
            if not out.finished or out.request_id not in self._requests:
                continue
            key, i = self._requests.pop(out.request_id)
            group = self._running[key]
            group.outputs[i] = out.outputs[0]
            if len(group.outputs) < group.n:
                continue
            del self._running[key]
            completions = [group.outputs[i] for i in range(group.n)]
            if group.done is not None:
                group.done.set_result(completions)
            else:
                with self._changed:
                    self._finished.append((group, completions))
                    self._changed.notify_all()
