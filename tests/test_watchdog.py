"""The sampler cannot hang: its engine watchdog cannot die silently (issue 30, item 1), and a
half-loaded version of full weights ends it (item 7).

psutil races processes that exit: a child of the sampler gone between `children()` and
`name()` raised NoSuchProcess in the watchdog thread, which died; with vLLM's engine in a
process of its own the sampler then waited for ever on an engine that died later. The
watchdog is run here in this thread with psutil's processes replaced by fakes (the real
engine kill and restart is tests/test_run.py's), and `os._exit` by a recorder.
"""

import threading
import types

import psutil
import pytest

from rollout import sampler as sampler_module
from rollout.sampler import Sampler, engine_processes


class Exited(Exception):
    pass


class Gone:
    """A child that exited before the watchdog looked at it."""

    pid = 11

    def name(self):
        raise psutil.NoSuchProcess(self.pid)

    def children(self):
        raise psutil.NoSuchProcess(self.pid)


class Engine:
    """vLLM's engine core: alive for `lives` checks, then a zombie."""

    pid = 12

    def __init__(self, lives=2, name="VLLM::EngineCore"):
        self.lives, self._name = lives, name

    def name(self):
        return self._name

    def children(self):
        return [object()]  # its worker

    def is_running(self):
        return True

    def status(self):
        self.lives -= 1
        return psutil.STATUS_ZOMBIE if self.lives < 0 else psutil.STATUS_SLEEPING


class Vanishing(Engine):
    """The engine, dying between is_running() and status()."""

    def status(self):
        raise psutil.NoSuchProcess(self.pid)


@pytest.fixture
def watch(monkeypatch):
    """Run the watchdog over these children; the exit code and the log, or None if it returned."""
    exits = []

    def exit_(code):
        exits.append(code)
        raise Exited

    monkeypatch.setattr(sampler_module.os, "_exit", exit_)
    monkeypatch.setattr(sampler_module.Sampler, "__init__", lambda self: None)

    def run(children, separate_engine=True, closing=False):
        me = types.SimpleNamespace(children=lambda: list(children))
        monkeypatch.setattr(psutil, "Process", lambda *a: me)
        sampler = Sampler()
        sampler.spec = types.SimpleNamespace(separate_engine=separate_engine)
        sampler._closing = threading.Event()
        if closing:
            sampler._closing.set()
        sampler._closing.wait = lambda timeout: sampler._closing.is_set()  # no 1 s sleeps
        try:
            sampler._watch_engine()
        except Exited:
            return exits[-1]
        return None

    return run


def test_a_child_that_exits_while_listed_is_skipped_and_the_engine_still_watched(watch, caplog):
    assert engine_processes(types.SimpleNamespace(children=lambda: [Gone(), Engine()]))[0].pid == 12
    assert watch([Gone(), Engine(lives=2)]) == 1  # the engine turned zombie on its third check
    assert "the vLLM engine process died" in caplog.text


def test_the_engine_gone_before_the_watchdog_looked_ends_the_sampler(watch, caplog):
    # Today's code raised NoSuchProcess in the thread: no exit, the sampler waited for ever.
    assert watch([Gone()]) == 1
    assert "no vLLM engine process" in caplog.text


def test_an_error_inside_the_watch_loop_ends_the_sampler(watch, caplog):
    assert watch([Vanishing()]) == 1
    assert "the engine watchdog failed" in caplog.text and "NoSuchProcess" in caplog.text


def test_an_engine_inside_the_sampler_process_has_nothing_to_watch(watch):
    # rollout.separate_engine=false: no engine child; the watchdog waits until close.
    assert watch([Gone()], separate_engine=False, closing=True) is None


def test_an_engine_found_by_its_worker_when_vllm_did_not_name_it(watch):
    assert watch([Engine(lives=0, name="python")]) == 1


def test_a_version_of_full_weights_left_half_loaded_ends_the_sampler(monkeypatch, caplog):
    """Issue 30, item 7: loading is in place, so a half-loaded version leaves no complete one
    to serve; requests used to wait 600 s and then fail, one by one, for ever. The sampler
    exits now (Ray restarts it on the base weights and the driver catches it up)."""
    exits = []

    def exit_(code):
        exits.append(code)
        raise Exited

    monkeypatch.setattr(sampler_module.os, "_exit", exit_)
    monkeypatch.setattr(sampler_module, "WEIGHTS_WAIT_S", 0.05)
    monkeypatch.setattr(sampler_module.Sampler, "__init__", lambda self: None)
    sampler = Sampler()
    sampler.ready, sampler.updating, sampler.adapters = threading.Condition(), 7, {"": {6: (None, "d6")}}
    with sampler.ready, pytest.raises(Exited):
        sampler._wait_for_weights("")
    assert exits == [1] and "version 7 of the weights half loaded" in caplog.text
    sampler.updating, sampler.adapters = None, {}  # nothing loaded yet, nothing half loaded: the request fails
    with sampler.ready, pytest.raises(RuntimeError, match="no complete version of the weights within"):
        sampler._wait_for_weights("")
