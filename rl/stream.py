"""run.mode=stream: groups flow one at a time through the samplers, and each step trains on the
first prompts_per_step that finish inside the adapter window.

A pump thread keeps up to `room` groups drawn (running on the samplers, or finished and
waiting for the learner): prompts_per_step for each step still to come inside the staleness
window (max_staleness + 1 steps while the learner waits, max_staleness while it trains: a
group started now runs on the version the learner is replacing), plus rollout.oversample more
so that the learner never waits on the tail. Each group goes to the sampler with the fewest
groups running for its speed (a slow or restarting sampler gets fewer) and comes back, scored,
the moment its last completion finishes (rollout/stream.py keeps the engine batching
continuously meanwhile).

The learner's step s takes prompts_per_step of the finished groups whose adapter is inside
the window (version s - 1 - max_staleness or newer, with the digest published for it), oldest
version first and in finish order within a version (a newer group stays usable a step longer);
the others carry over to later steps. A group that falls out of the window, that its sampler
aborted (its version left the resident window) or that was lost with a sampler is dropped,
counted, and its prompt drawn again.

rollout.filter_zero_signal (DAPO's dynamic sampling): a finished group whose rewards are all
equal does not wait for the learner; its room goes to a new prompt, until the step has its
groups or has looked at rollout.max_draws_per_step groups, when the newest zero-signal ones
fill the step (no gradient; counted).

Accounting: each group carries the position in the train split of its prompt (rl/splits.py).
A prompt is trained once or filtered once; one that is dropped or lost is drawn again. A
checkpoint's data state lists the positions drawn and not yet trained (running, waiting, to be
drawn again), which a resume draws first.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
import time
from collections import deque

from common.records import Group
from rl.arms import ArmRun
from rl.rollouts import (Window, fields, has_signal, keep_in_window, prompt_seed, reward_summary, rollout_metrics,
                         sampling, shaped)

log = logging.getLogger(__name__)

WAIT_S = 0.05  # how long a sampler's exchange waits for a group to finish before it returns


class StreamBatches:
    """Step s's groups, streamed (run.mode=stream); the interface of rl/rollouts.py's Batches."""

    def __init__(self, cfg, samplers, arms: list[ArmRun], first_step: int = 1):
        (self.arm,) = arms  # the config refuses an arms section with run.mode=stream
        r = cfg.rollout
        self.cfg, self.samplers, self.window = cfg, samplers, Window(self.arm)
        self.per_step, self.lag = r.prompts_per_step, r.max_staleness
        self.oversample = r.oversample if r.oversample >= 0 else r.prompts_per_step // 2
        self.max_draws = r.max_draws_per_step or 4 * r.prompts_per_step
        self.taken = first_step - 1  # the last step handed to the learner
        self.training = False  # from next() to publish(): groups started now run on the version being replaced
        self.redraw: deque[tuple[int, dict]] = deque()  # (position, row) drawn, to be sent again first
        self.flying: dict[str, tuple[int, int, dict, float]] = {}  # key -> (sampler, position, row, sent at)
        self.ready: list[tuple[int, Group]] = []  # finished and scored, in finish order
        self.filtered: list[tuple[int, Group]] = []  # zero-signal groups since the last step
        self.scoring: set[int] = set()  # positions of the groups finished and being scored
        self.scored: list[tuple[dict, int]] = []  # reward metrics of the groups scored since the last step
        self.looked: list[Group] = []  # the groups scored since the last step, filtered ones included
        self.counts = dict.fromkeys(("refused", "aborted", "filtered", "tokens", "score_s"), 0)  # since the last step
        self.latency = [0.0] * len(samplers)  # per sampler: moving mean seconds from send to finish
        self.busy_s = [0.0] * len(samplers)  # per sampler: its engine's busy seconds, as it last said
        self._busy_at_step = [0.0] * len(samplers)
        self._recovering: set[int] = set()
        self._recoveries: list[threading.Thread] = []  # joined by close: no sampler is left half caught up
        self._keys = itertools.count()
        self._changed = threading.Condition()
        self._stopping = False
        self._error: BaseException | None = None
        self._step_start = time.perf_counter()
        self._thread = threading.Thread(target=self._pump, name="rollout-stream", daemon=True)
        self._thread.start()

    # The learner's side.

    def publish(self, arm: str, version: int, digest: str):
        self.window.publish(version, digest)
        with self._changed:
            self.training = False
            self._changed.notify_all()

    def next(self, step: int) -> dict[str, tuple[list[Group], dict]]:
        """The groups the learner trains on at `step` (every one inside the window) and their metrics."""
        start = time.perf_counter()
        newest = step - 1  # the version the learner holds
        with self._changed:
            while True:
                if self._error is not None:
                    raise RuntimeError(f"streaming failed while preparing step {step}: {self._error!r}") from self._error
                self._refuse_stale(newest)
                looked = len(self.ready) + len(self.filtered)
                if len(self.ready) >= self.per_step or (self.filtered and looked >= self.max_draws):
                    break
                if not self._thread.is_alive():
                    raise RuntimeError(f"the rollout stream stopped before step {step}")
                self._changed.wait(0.2)
            # Oldest version first (finish order within one): a newer group stays usable a step longer.
            self.ready.sort(key=lambda item: item[1].version)
            taken, self.ready = self.ready[: self.per_step], self.ready[self.per_step:]
            fill = self.per_step - len(taken)  # max_draws reached: the newest zero-signal groups fill the step
            if fill:
                taken += self.filtered[-fill:]
            groups = [g for _, g in taken]
            self.taken, self.training = step, True
            metrics = self._step_metrics(groups, newest, time.perf_counter() - start, fill)
            self._changed.notify_all()
        return {self.arm.name: (groups, metrics)}

    def state(self, arm: str) -> dict:
        """The split's state for a checkpoint: every prompt drawn and not yet trained (running,
        waiting, or to be drawn again) is drawn again first on resume."""
        with self._changed:
            # Zero-signal groups since the last step count as pending too: no logged step looked at them.
            pending = ([p for p, _ in self.redraw] + [p for _, p, _, _ in self.flying.values()] + sorted(self.scoring)
                       + [p for p, _ in self.ready] + [p for p, _ in self.filtered])
        if pending:
            log.info("checkpoint: %d prompts drawn but not trained yet (in flight or waiting) are drawn again on "
                     "resume", len(pending))
        return self.arm.train.state(redraw=pending)

    def close(self):
        """Stop the pump; the samplers abort what they still run."""
        import ray

        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout=60)
        for thread in self._recoveries:  # a sampler coming back (its engine starting) finishes coming back
            thread.join(timeout=self.samplers.restart_timeout_s)
        try:
            ray.get([a.stop_stream.remote() for a in self.samplers], timeout=60)  # those lost with a node: gone
        except Exception:  # a sampler gone meanwhile: nothing of it is left to stop
            log.warning("a sampler did not stop its stream", exc_info=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Under the lock.

    def _room(self) -> int:
        """How many groups may be drawn (running or waiting) now."""
        steps = min(self.cfg.run.steps - self.taken, self.lag + (0 if self.training else 1))
        return steps * self.per_step + self.oversample if steps > 0 else 0

    def _usable(self, version: int) -> bool:
        """Whether a group of this version can still be trained on: the next step to take holds
        version self.taken (after its publish) and takes versions down to self.taken - lag."""
        return version >= self.taken - self.lag

    def _refuse_stale(self, newest: int):
        kept, refused = keep_in_window([g for _, g in self.ready], self.arm.published, newest, self.lag, self.arm.name)
        if refused:
            positions = {id(g): p for p, g in self.ready}
            self.redraw.extendleft((positions[id(g)], g.row) for g in refused)
            self.ready = [(positions[id(g)], g) for g in kept]
            self.counts["refused"] += len(refused)
        # Zero-signal groups only fill a step from inside the window too (the others stay filtered).
        kept, _ = keep_in_window([g for _, g in self.filtered], self.arm.published, newest, self.lag, self.arm.name)
        self.filtered = [(p, g) for p, g in self.filtered if any(g is k for k in kept)]

    def _step_metrics(self, groups: list[Group], newest: int, idle: float, fill: int) -> dict:
        now = time.perf_counter()
        wall = max(now - self._step_start, 1e-9)
        metrics = rollout_metrics(groups, newest, self.lag)
        total = sum(n for _, n in self.scored) or 1
        for key in dict.fromkeys(k for m, _ in self.scored for k in m):
            metrics[key] = sum(m.get(key, 0.0) * n for m, n in self.scored) / total
        # As the samplers last said (their busy seconds lag the driver's clock by up to WAIT_S).
        busy = [min(1.0, (self.busy_s[i] - self._busy_at_step[i]) / wall) for i in self.samplers.live()]
        metrics.update({
            "data/position": self.arm.train.position,
            "time/learner_idle": idle,
            "time/sample": idle,  # what sampling cost the step: the wait for its groups (the rest overlaps)
            "time/sampler_idle": sum(max(0.0, 1.0 - f) * wall for f in busy) / len(busy),
            "rollout/in_flight": len(self.flying),
            "rollout/carried_over": len(self.flying) + len(self.ready),  # drawn, left for later steps
            "rollout/refused_groups": self.counts["refused"],  # outside the window: drawn again
            "rollout/aborted_groups": self.counts["aborted"],  # their version left a sampler's window
            "rollout/filtered_groups": self.counts["filtered"],  # zero signal, left out
            "rollout/filter_fill": fill,  # zero-signal groups that filled the step (max_draws_per_step)
            "rollout/regenerated_groups": 0,
            "rollout/tokens_per_s": self.counts["tokens"] / wall,  # of every group that finished since the last step
            "time/score": self.counts["score_s"],  # overlaps sampling and learning
            **{f"rollout/busy_frac/sampler-{i}": f for i, f in zip(self.samplers.live(), busy)},
        })
        metrics["rollout/busy_frac"] = sum(busy) / len(busy)
        if self.cfg.rollout.filter_zero_signal:  # reward/mean describes the groups kept; these, the policy
            metrics.update(reward_summary(self.looked, "reward/unfiltered_"))
        self.scored, self.filtered, self.looked = [], [], []
        self.counts = dict.fromkeys(self.counts, 0)
        self._busy_at_step, self._step_start = list(self.busy_s), now
        return metrics

    # The pump's side.

    def _pump(self):
        import ray

        calls: dict[int, tuple] = {}  # sampler -> (its exchange's ref, the endpoint it was sent to)
        try:
            while not self._stopping:
                for i in self.samplers.live():  # not those dropped with their node
                    if i not in calls and i not in self._recovering:
                        endpoint = self.samplers.endpoints[i] if self.samplers.endpoints else ""  # stand-ins: none
                        calls[i] = (self.samplers.actors[i].exchange.remote(self._assign(i), WAIT_S), endpoint)
                if not calls:
                    time.sleep(WAIT_S)
                    continue
                done, _ = ray.wait([ref for ref, _ in calls.values()], num_returns=1, timeout=1.0)
                for ref in done:
                    i = next(i for i, (r, _) in calls.items() if r == ref)
                    _, endpoint = calls.pop(i)
                    try:
                        streamed = ray.get(ref)
                    except ray.exceptions.RayActorError as e:
                        self._lost(i, endpoint, e)
                        continue
                    self._arrived(i, streamed)
        except BaseException as e:  # handed to the learner's side, which raises it
            log.exception("the rollout stream failed")
            with self._changed:
                self._error = e
                self._changed.notify_all()

    def _assign(self, i: int) -> list[tuple]:
        """New groups for sampler i: its share of the free room, by its speed (a sampler
        whose groups take twice as long gets half the share)."""
        alive = [j for j in self.samplers.live() if j not in self._recovering]
        with self._changed:
            free = self._room() - len(self.flying) - len(self.ready)
            if free <= 0 or self._stopping or i not in alive:  # dropped meanwhile (a publish it missed)
                return []
            speed = [1.0 / self.latency[j] if self.latency[j] else 0.0 for j in alive]
            known = [s for s in speed if s]
            mean = sum(known) / len(known) if known else 1.0
            speed = [s or mean for s in speed]  # no group back yet: an average sampler
            running = {j: 0 for j in alive}
            for j, *_ in self.flying.values():
                running[j] = running.get(j, 0) + 1
            total = len(self.flying) + free
            share = math.ceil(total * speed[alive.index(i)] / sum(speed))
            n = max(0, min(free, share - running.get(i, 0)))
            if not n:
                return []
            rows = [self.redraw.popleft() for _ in range(min(n, len(self.redraw)))]
            rows += self.arm.train.draw(n - len(rows))
            now, out = time.perf_counter(), []
            for position, row in rows:
                key = f"g{next(self._keys)}"
                self.flying[key] = (i, position, row, now)
                # Seeded by the prompt's position: the same group whichever sampler samples it, again.
                seeds = (prompt_seed(self.cfg.run.seed, position),)
                out.append((key, list(row["prompt_ids"]), sampling(self.arm.cfg, self.arm.name, seeds)))
            return out

    def _arrived(self, i: int, streamed):
        """Sampler i's finished groups, scored; its aborted ones, drawn again."""
        with self._changed:
            self.busy_s[i] = streamed.busy_s
            for key in streamed.aborted:
                if key in self.flying:
                    _, position, row, _ = self.flying.pop(key)
                    self.redraw.appendleft((position, row))
                    self.counts["aborted"] += 1
            finished = []
            for key, rollout in streamed.finished:
                if key not in self.flying:  # not ours any more (drawn again after a loss): never twice
                    continue
                _, position, row, sent = self.flying.pop(key)
                took = time.perf_counter() - sent
                self.latency[i] = 0.8 * self.latency[i] + 0.2 * took if self.latency[i] else took
                finished.append((position, Group(row, rollout.completions_P_G[0], rollout.version, rollout.digest,
                                                 arm=rollout.arm, position=position)))
                self.scoring.add(position)
            self._changed.notify_all()
        if not finished:
            return
        scored = self._score(finished)  # outside the lock: the learner's side may take meanwhile
        with self._changed:
            for position, g in scored:
                self.scoring.discard(position)
                if not self._usable(g.version):
                    self.redraw.appendleft((position, g.row))
                    self.counts["refused"] += 1
                elif self.cfg.rollout.filter_zero_signal and not has_signal(g, self.cfg.rollout.filter_on):
                    self.filtered.append((position, g))
                    self.counts["filtered"] += 1
                else:
                    self.ready.append((position, g))
            self._changed.notify_all()

    def _score(self, finished: list[tuple[int, Group]]) -> list[tuple[int, Group]]:
        start, cfg = time.perf_counter(), self.arm.cfg
        completions = [c for _, g in finished for c in g.completions]
        samples = [fields(g.row) for _, g in finished for _ in g.completions]
        scores, metrics = self.arm.rewards.score([(c.text, s) for c, s in zip(completions, samples)])
        totals = shaped(cfg, completions, scores, metrics)
        out, k = [], 0
        for position, g in finished:
            n = len(g.completions)
            out.append((position, dataclasses.replace(g, scores=scores[k:k + n], rewards=totals[k:k + n])))
            k += n
        with self._changed:
            self.scored.append((metrics, len(completions)))
            self.looked += [g for _, g in out]
            self.counts["tokens"] += sum(len(c.tokens) for c in completions)
            self.counts["score_s"] += time.perf_counter() - start
        return out

    def _lost(self, i: int, endpoint: str, error: BaseException):
        """Sampler i died: its running groups are drawn again, and it is brought back (Ray
        restarts it; the learner catches it up) while the others go on; or, its node gone,
        it is dropped (Samplers.recover) and the others take its share from then on."""
        with self._changed:
            lost = [k for k, (j, *_) in self.flying.items() if j == i]
            for key in lost:
                _, position, row, _ = self.flying.pop(key)
                self.redraw.appendleft((position, row))
            self.samplers.faults.resampled_groups += len(lost)
            self._recovering.add(i)
        log.warning("sampler-%d died with %d groups running; they are drawn again", i, len(lost))

        def recover():
            try:
                self.samplers.recover(i, endpoint, error)
            except BaseException as e:
                with self._changed:
                    self._error = e
                    self._changed.notify_all()
                return
            with self._changed:
                self._recovering.discard(i)
                self._changed.notify_all()

        thread = threading.Thread(target=recover, name=f"recover-sampler-{i}", daemon=True)
        self._recoveries.append(thread)
        thread.start()
