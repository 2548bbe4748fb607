"""Where each step's training groups come from: sampled on the vLLM samplers, then scored.

A group (common/records.py `Group`) is one prompt's G completions with the adapter version
and payload digest that produced them, the grader's scores and the rewards trained on
(scores plus optional shaping).

Both batch sources are composed of a `Source` (rows drawn, sampled, scored) and a `Window`
per arm (its published versions and the check below); neither inherits the other. A run
without arms is one arm (rl/arms.py); a sweep's arms step together, their requests sampled
in one batch on the shared engines.

run.mode=sync (`Batches`): step s's groups are sampled when the learner asks for them, on
the adapter it published after step s-1; the samplers wait while the learner trains.

run.mode=async (`AsyncBatches`): a thread samples and scores ahead while the learner trains.
It starts step s's batch as soon as version s-1-max_staleness is published, so no group is
more than rollout.max_staleness versions behind the learner that trains on it; with
max_staleness 0 it waits for each version, which is the sync loop.

run.mode=stream (rl/stream.py `StreamBatches`) streams groups one at a time instead.

Either way every group is checked against the window before it reaches the learner
(`keep_in_window`): a group too stale, or whose digest is not what the learner published,
is dropped or sampled again (rollout.on_stale), and counted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import threading
import time

from common.records import Completion, Group, Sampling
from rl.arms import ArmRun

log = logging.getLogger(__name__)


def prompt_seed(run_seed: int, position: int, attempt: int = 0) -> int:
    """The sampling seed of the prompt drawn at `position` of its train split (rl/splits.py),
    at its `attempt`-th sampling (a group sampled again draws anew): its completion i draws
    from the stream seeded seed + i. A hash of the three, below 2**62: every prompt of every
    step has streams of its own in every mode (no two prompts, steps or attempts share one,
    but with a chance of ~G * 2**-62 per pair), however many samplers split the prompts, and
    a resumed run, whose split restarts at the same position, draws the same."""
    digest = hashlib.blake2b(f"{run_seed}/{position}/{attempt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def collect(samplers, jobs: list[tuple[ArmRun, list[tuple[int, dict]], int]]) -> list[tuple[list[Group], dict]]:
    """Sample G completions for each (position, row) of each job (arm, its rows, their
    attempt), every arm's requests in one call to the samplers, and score them with each arm's
    reward: per job, the groups and their metrics."""
    start = time.perf_counter()
    requests = [([list(row["prompt_ids"]) for _, row in drawn], sampling(
        arm.cfg, arm.name, tuple(prompt_seed(arm.cfg.run.seed, position, attempt) for position, _ in drawn)))
        for arm, drawn, attempt in jobs]
    sampled_all = samplers.generate_many(requests)
    sampled = time.perf_counter()
    tokens = sum(len(c.tokens) for groups in sampled_all for g in groups for c in g.completions)
    out = []
    for (arm, drawn, _), groups in zip(jobs, sampled_all):
        rows_P = [row for _, row in drawn]
        scored = time.perf_counter()
        r = arm.cfg.rollout
        completions = [c for g in groups for c in g.completions]
        samples = [sample for row in rows_P for sample in [fields(row)] * r.group_size]  # one dict per row
        scores, metrics = arm.rewards.score([(c.text, s) for c, s in zip(completions, samples)])
        totals = shaped(arm.cfg, completions, scores, metrics)
        parts = [slice(i * r.group_size, (i + 1) * r.group_size) for i in range(len(groups))]
        groups = [dataclasses.replace(g, row=row, scores=scores[part], rewards=totals[part], position=position)
                  for (position, row), g, part in zip(drawn, groups, parts)]
        # Sampling is one batch for every arm: its time and throughput are the fleet's.
        metrics.update({"rollout/tokens_per_s": tokens / (sampled - start), "time/sample": sampled - start,
                        "time/score": time.perf_counter() - scored})
        out.append((groups, metrics))
    return out


def sampling(cfg, arm: str, seeds: tuple[int, ...]) -> Sampling:
    """A training request: each prompt's seed from `prompt_seed`."""
    r = cfg.rollout
    return Sampling(r.group_size, r.temperature, r.max_tokens, r.top_p, arm=arm, length_profile=r.length_profile,
                    seeds=seeds)


def fields(row: dict) -> dict:
    """What a reward function gets as the sample: the row's fields, without token ids."""
    return {k: v for k, v in row.items() if k != "prompt_ids"}


def shaped(cfg, completions: list[Completion], scores: list[float | None], metrics: dict) -> list[float | None]:
    """Graded scores plus the optional shaping terms (rewards/shaping.py), which are logged; a
    completion without a grade (None: its grading timed out) stays without a reward."""
    from rewards.shaping import format_score, overlong_penalty

    w, totals = cfg.reward, list(scores)
    if w.format_weight:
        formats = [format_score(c.text) for c in completions]
        totals = [None if t is None else t + w.format_weight * f for t, f in zip(totals, formats)]
        metrics["reward/format"] = sum(formats) / len(formats)
    if w.overlong_buffer:
        penalties = [overlong_penalty(len(c.tokens), c.finished, cfg.rollout.max_tokens, w.overlong_buffer,
                                      w.overlong_penalty) for c in completions]
        totals = [None if t is None else t + p for t, p in zip(totals, penalties)]
        metrics["reward/overlong"] = sum(penalties) / len(penalties)
    return totals


def graded(values: list[float | None]) -> list[float]:
    """The values of the completions that have a grade."""
    return [v for v in values if v is not None]


def has_signal(g: Group, on: str = "reward") -> bool:
    """Whether a group's graded completions differ in what `on` names: reward (the shaped
    rewards trained on: a non-zero advantage) or correctness (the grader's scores alone,
    rollout.filter_on's default)."""
    return len(set(graded(g.scores if on == "correctness" else g.rewards))) > 1


def reward_summary(groups: list[Group], prefix: str = "reward/") -> dict:
    """The mean shaped reward and the accuracy (the share of grades of 1) of the graded completions."""
    rewards = [x for g in groups for x in graded(g.rewards)]
    scores = [x for g in groups for x in graded(g.scores)]
    if not scores:
        return {}
    return {f"{prefix}mean": sum(rewards) / len(rewards), f"{prefix}accuracy": sum(x == 1.0 for x in scores) / len(scores)}


def keep_in_window(groups: list[Group], published: dict[int, str], newest: int,
                   max_staleness: int, arm: str = "") -> tuple[list[Group], list[Group]]:
    """(kept, refused): refused groups come from an adapter more than max_staleness versions
    behind `newest`, from another arm's adapter, or carry a digest that is not the one
    published for their version."""
    kept, refused = [], []
    for g in groups:
        ok = (g.arm == arm and 0 <= newest - g.version <= max_staleness
              and published.get(g.version) == g.digest)
        (kept if ok else refused).append(g)
    return kept, refused


def rollout_metrics(groups: list[Group], newest: int, max_staleness: int) -> dict:
    completions = [c for g in groups for c in g.completions]
    lengths = sorted(len(c.tokens) for c in completions)
    staleness = [newest - g.version for g in groups]
    zero_signal = sum(not has_signal(g) for g in groups)
    by_grade = {}  # the lengths of the right and of the wrong completions
    for g in groups:
        for c, score in zip(g.completions, g.scores):
            if score is not None:
                by_grade.setdefault("right" if score == 1.0 else "wrong", []).append(len(c.tokens))
    return {
        "reward/mean": 0.0, "reward/accuracy": 0.0,  # no graded completion at all: 0, as a timed-out grade was
        **reward_summary(groups),
        **{f"rollout/response_len_{k}": sum(v) / len(v) for k, v in by_grade.items()},
        "rollout/ungraded_completions": sum(s is None for g in groups for s in g.scores),  # left out of the loss
        "rollout/zero_signal_groups": zero_signal,  # all rewards equal: no learning signal
        "rollout/zero_signal_frac": zero_signal / len(groups),
        "rollout/response_len": sum(lengths) / len(lengths),
        "rollout/response_len_p50": lengths[len(lengths) // 2],
        "rollout/response_len_p90": lengths[min(len(lengths) - 1, int(0.9 * len(lengths)))],
        "rollout/response_len_max": lengths[-1],
        "rollout/truncated_frac": sum(not c.finished for c in completions) / len(completions),
        "rollout/adapter_version": min(g.version for g in groups),
        "rollout/staleness_mean": sum(staleness) / len(staleness),  # versions behind the learner
        "rollout/staleness_max": max(staleness),
        "rollout/staleness_hist": [staleness.count(k) for k in range(max_staleness + 1)],  # groups per lag
    }


class Source:
    """Draws each step's prompt rows from every running arm's train split, samples (all arms
    in one batch) and scores them."""

    def __init__(self, samplers, arms: list[ArmRun]):
        self.samplers, self.arms = samplers, arms
        self._last_end: float | None = None  # when the samplers last finished a batch

    def batch(self, step: int) -> dict[str, tuple[list[Group], dict, int]]:
        """Step `step`'s groups of each running arm, their metrics, and the arm's train split
        position after them (rows drawn so far, epochs included: the data state a checkpoint
        keeps)."""
        start = time.perf_counter()
        running = [arm for arm in self.arms if not arm.error]
        jobs = [(arm, arm.train.draw(arm.cfg.rollout.prompts_per_step), 0) for arm in running]
        out = {}
        for arm, (groups, metrics) in zip(running, collect(self.samplers, jobs)):
            metrics["data/position"] = arm.train.position
            # Between two batches the samplers only serve adapter loads (and evaluations).
            metrics["time/sampler_idle"] = start - self._last_end if self._last_end else 0.0
            out[arm.name] = (groups, metrics, arm.train.position)
        self._last_end = time.perf_counter()
        return out

    def again(self, arm: ArmRun, drawn: list[tuple[int, dict]], attempt: int = 1) -> list[Group]:
        """(position, row)s sampled now, on the arm's newest adapter: rows drawn anew (attempt 0)
        or sampled again (attempt 1: a group refused by the window, drawn with other seeds)."""
        ((groups, _),) = collect(self.samplers, [(arm, drawn, attempt)])
        return groups


class Window:
    """The versions an arm's adapter was published at, and the check every group passes
    before training."""

    def __init__(self, arm: ArmRun):
        self.arm = arm  # arm.published: version -> payload digest, as the learner published them

    def publish(self, version: int, digest: str):
        """Record a version; forget those no group can be admitted from any more (more than
        max_staleness behind it, one kept spare), so a long run's record stays a few entries."""
        self.arm.published[version] = digest
        for old in [v for v in self.arm.published if v < version - self.arm.cfg.rollout.max_staleness - 1]:
            del self.arm.published[old]

    def admit(self, step: int, groups: list[Group], metrics: dict, source: Source) -> tuple[list[Group], dict]:
        """The groups the learner may train on at `step`, and the batch's rollout metrics."""
        arm, r, newest = self.arm, self.arm.cfg.rollout, step - 1  # the learner holds version step - 1
        kept, refused = keep_in_window(groups, arm.published, newest, r.max_staleness, arm.name)
        regenerated = 0
        if refused and r.on_stale == "regenerate":  # sampled again now, on the newest adapter
            again, _ = keep_in_window(source.again(arm, [(g.position, g.row) for g in refused]), arm.published,
                                      newest, r.max_staleness, arm.name)
            kept, regenerated = kept + again, len(again)
        if not kept:
            raise RuntimeError(f"step {step}: every group{' of arm ' + arm.name if arm.name else ''} came from "
                               f"outside the adapter window (learner at version {newest}, max_staleness "
                               f"{r.max_staleness}, got versions {sorted({g.version for g in groups})})")
        metrics.update(rollout_metrics(kept, newest, r.max_staleness))
        metrics["rollout/refused_groups"] = len(refused)  # outside the window: never trained on
        metrics["rollout/regenerated_groups"] = regenerated
        return kept, metrics


class Batches:
    """Step s's groups of every running arm, sampled when the learner asks (run.mode=sync)."""

    def __init__(self, cfg, samplers, arms: list[ArmRun], first_step: int = 1):
        self.source, self.windows = Source(samplers, arms), {arm.name: Window(arm) for arm in arms}
        # Train rows drawn for the batches handed to the learner, per arm (checkpointed).
        self.consumed = {arm.name: arm.train.position for arm in arms}

    def publish(self, arm: str, version: int, digest: str):
        self.windows[arm].publish(version, digest)

    def next(self, step: int) -> dict[str, tuple[list[Group], dict]]:
        """Per running arm, the groups the learner trains on at `step` (all in the window) and their metrics."""
        start = time.perf_counter()
        batch = self.source.batch(step)
        out = {}
        for arm, (groups, metrics, self.consumed[arm]) in batch.items():
            out[arm] = self.windows[arm].admit(step, groups, metrics, self.source)
            if self.windows[arm].arm.cfg.rollout.filter_zero_signal:
                out[arm] = self._with_signal(step, self.windows[arm].arm, *out[arm])
            metrics["time/learner_idle"] = time.perf_counter() - start  # the learner waits for all of it
        return out

    def _with_signal(self, step: int, arm: ArmRun, groups: list[Group], metrics: dict) -> tuple[list[Group], dict]:
        """rollout.filter_zero_signal: the groups whose rewards differ, with new prompts drawn
        and sampled until there are prompts_per_step of them or max_draws_per_step were looked
        at; then the newest zero-signal groups fill the step."""
        r = arm.cfg.rollout
        limit = r.max_draws_per_step or 4 * r.prompts_per_step
        signal = [g for g in groups if has_signal(g, r.filter_on)]
        flat = [g for g in groups if not has_signal(g, r.filter_on)]
        looked = len(groups)
        while len(signal) < r.prompts_per_step and looked < limit:
            drawn = arm.train.draw(min(r.prompts_per_step - len(signal), limit - looked))
            more = self.source.again(arm, drawn, attempt=0)
            signal += [g for g in more if has_signal(g, r.filter_on)]
            flat += [g for g in more if not has_signal(g, r.filter_on)]
            looked += len(drawn)
        self.consumed[arm.name] = arm.train.position
        fill = max(0, r.prompts_per_step - len(signal))
        kept = signal[: r.prompts_per_step] + (flat[-fill:] if fill else [])
        metrics.update(rollout_metrics(kept, step - 1, r.max_staleness))
        # After filtering reward/mean describes the groups kept, not the policy: every group looked at does.
        metrics.update(reward_summary(signal + flat, "reward/unfiltered_"))
        metrics.update({"rollout/filtered_groups": len(flat), "rollout/filter_fill": fill, "data/position": arm.train.position})
        return kept, metrics

    def state(self, arm: str) -> dict:
        """The arm's split state for a checkpoint: the rows of the batches handed to the learner."""
        return self.windows[arm].arm.train.state(self.consumed[arm])

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncBatches:
    """Step s's groups of every running arm, sampled ahead by a thread while the learner
    trains (run.mode=async). The arms step together, so one version number paces them all."""

    def __init__(self, cfg, samplers, arms: list[ArmRun], first_step: int = 1):
        self.cfg, self.first_step = cfg, first_step  # first_step > 1 when a run resumes
        self.source, self.windows = Source(samplers, arms), {arm.name: Window(arm) for arm in arms}
        self.consumed = {arm.name: arm.train.position for arm in arms}  # not the rows drawn ahead
        self._ready: queue.Queue = queue.Queue(maxsize=cfg.rollout.max_staleness + 1)
        self._version = first_step - 1  # newest version every sampler serves
        self._changed = threading.Condition()
        self._stopping = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._produce, name="rollout-producer", daemon=True)
        self._thread.start()

    def publish(self, arm: str, version: int, digest: str):
        self.windows[arm].publish(version, digest)
        with self._changed:
            self._version = version
            self._changed.notify_all()

    def _produce(self):
        lag = self.cfg.rollout.max_staleness
        try:
            for step in range(self.first_step, self.cfg.run.steps + 1):
                with self._changed:  # start step s's batch on version >= s - 1 - lag
                    self._changed.wait_for(lambda s=step: self._stopping or self._version >= s - 1 - lag)
                if self._stopping:
                    return
                item = (step, self.source.batch(step))
                while not self._stopping:
                    try:
                        self._ready.put(item, timeout=0.2)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # handed to the learner's side, which raises it
            self._error = e

    def next(self, step: int) -> dict[str, tuple[list[Group], dict]]:
        start = time.perf_counter()
        while True:
            try:
                made_for, batch = self._ready.get(timeout=0.2)
                break
            except queue.Empty:
                if self._error is not None:
                    raise RuntimeError(f"sampling failed while preparing step {step}: {self._error!r}") from self._error
                if not self._thread.is_alive():
                    raise RuntimeError(f"the rollout thread stopped before step {step}") from None
        assert made_for == step, (made_for, step)
        idle, depth = time.perf_counter() - start, self._ready.qsize() + 1  # batches ready when the learner took this one
        out = {}
        for arm, (groups, metrics, position) in batch.items():
            if self.windows[arm].arm.error:  # stopped after the producer sampled it
                continue
            self.consumed[arm] = position  # the producer has drawn further ahead
            metrics["time/learner_idle"], metrics["async/queue_depth"] = idle, depth
            out[arm] = self.windows[arm].admit(step, groups, metrics, self.source)
        return out

    def state(self, arm: str) -> dict:
        """The arm's split state for a checkpoint: the rows of the batches handed to the learner
        (those drawn ahead are drawn again on resume)."""
        return self.windows[arm].arm.train.state(self.consumed[arm])

    def close(self):
        """Stop sampling ahead; an in-flight batch finishes (or fails when the actors go)."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join(timeout=60)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
