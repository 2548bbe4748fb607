"""RL post-training of a rank-1 LoRA adapter: the driver loop.

    python rl/run.py [CONFIG.yaml] [dotted.key=value ...]
    ray job submit --working-dir . -- python rl/run.py configs/<recipe>.yaml key=value ...

Each step: sample G completions for P prompts on the vLLM samplers -> score them with
math-verify -> group-centred advantages -> one learner step (importance-corrected policy
gradient) -> publish the adapter to every sampler and wait for their acknowledgements ->
log one flat dict of metrics. With run.mode=async the sampling and scoring of the next
batches runs ahead, while the learner trains, at most rollout.max_staleness adapter versions
behind (rl/rollouts.py); with run.mode=stream groups flow one at a time and each step takes
the first to finish inside that window (rl/stream.py); the loop below is the same. The held-out sets are evaluated
(greedy accuracy, pass@k and mean@n: rl/evaluate.py) before training, every run.eval_every
steps and at the end. Every run.checkpoint_every steps, at the end and on SIGTERM a
checkpoint is written (rl/checkpoint.py); launching the same command again resumes from the
newest one. Metrics go to metrics.jsonl and the enabled loggers (rl/loggers.py); the end of
the run writes plots and report.md (rl/report.py).

Departures from GRPO (docs/objective.md): the advantage is not divided by the group std,
there is no KL penalty and no ratio clipping by default, and the importance ratio uses the
sampler's own log-probs (not a recomputed "old" policy), which also corrects the
sampler/learner numeric mismatch and the lag of stale samples.

It connects to a Ray cluster when RAY_ADDRESS is set or when run as a Ray job, and starts a
local Ray instance otherwise.

Glossary of suffixes: P prompts per step, G completions per prompt, B completions (P*G),
T tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import secrets
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python rl/run.py` from anywhere

from common.records import Datum, Group  # noqa: E402
from rl.arms import ArmRun  # noqa: E402
from rl.config import Config, ConfigError, describe, load_config, to_dict  # noqa: E402
from rl.faults import Faults  # noqa: E402


def main(argv: list[str]) -> Path:
    cfg = parse_args(argv)
    from rl.checkpoint import make_run_dir
    from rl.fleet import resolve_model

    model_path = resolve_model(cfg)
    try:
        # lock: run_dir is this run's while it lives (a second launch with its run.name is refused)
        run_dir, resume, lock = make_run_dir(cfg, model_path)  # resume: the newest good checkpoint (run.resume)
    except ConfigError as e:  # a changed config, run.resume pointing at no checkpoint, the run dir in use
        raise SystemExit(f"config error: {e}")
    with lock:
        return launch(cfg, run_dir, resume, model_path)


def launch(cfg: Config, run_dir: Path, resume: Path | None, model_path: str) -> Path:
    """The run, in its run directory (locked by main), from `resume` or from the start."""
    import ray

    from rewards.pool import RewardPool
    from rl import checkpoint, report
    from rl.checkpoint import arm_runs
    from rl.fleet import build_actors, dead_actors, placement, shutdown, write_adapter
    from rl.samplers import Samplers
    from rl.splits import load_splits

    try:
        arms, resumes = arm_runs(cfg, run_dir, resume, model_path)  # one arm, "", in run_dir without arms
    except ConfigError as e:  # an arm's changed config
        raise SystemExit(f"config error: {e}")
    sweep = len(arms) > 1
    print(f"run directory: {run_dir}" + (f" ({len(arms)} arms, each in arms/<name>)" if sweep else ""), flush=True)
    splits = {}  # (data, seed) -> (train, held-out sets): arms with the same share rows, each its own position

    def splits_of(c: Config):
        key = repr((c.data, c.run.seed))
        if key not in splits:
            splits[key] = load_splits(c, model_path)
        return splits[key]

    evals = splits_of(cfg)[1]  # name -> held-out split, the run's, shared by the arms
    for arm in arms:
        arm.train = dataclasses.replace(splits_of(arm.cfg)[0])
    # Ray starts only now: a bad config, checkpoint or data row has stopped the run before any actor.
    ray.init()  # joins RAY_ADDRESS's cluster, or the job's; else starts a local instance
    secret = secrets.token_bytes(32)  # the adapter channel's key, handed out through Ray only
    learners, actors = build_actors(cfg, model_path, secret)  # learners[0]: rank 0, the learner we talk to
    stop, where, samplers = StopSignal(), {}, None
    try:
        where = placement(learners, actors)  # {actor: node, address, pid}
        (run_dir / "placement.json").write_text(json.dumps(where, indent=1))
        fleet = arms[0].faults if not sweep else Faults()  # sampler restarts count for every arm
        for arm in arms:
            arm.faults.max_skipped_steps = arm.cfg.learner.max_skipped_steps
        samplers = Samplers(actors, learners[0], cfg.rollout.restart_timeout_s, fleet)
        with contextlib.ExitStack() as pools:
            graders = {}  # (fn, workers, timeout) -> pool: arms with the same reward share one

            def grader(c: Config):
                key = (c.reward.fn, c.reward.num_workers, c.reward.timeout_s)
                if key not in graders:
                    graders[key] = pools.enter_context(RewardPool(*key))
                return graders[key]

            rewards = grader(cfg)  # the run's: evaluation grades every arm with it
            for arm in arms:
                arm.rewards = grader(arm.cfg)
            step = rl_loop(cfg, learners[0], samplers, rewards, arms, evals, resumes, fleet, stop)
        for arm in arms:
            if not arm.error:  # a failed arm's last good adapter is in its checkpoint
                write_adapter(learners[0], arm.run_dir, arm=arm.name)
    except Exception as e:
        # The root cause when an actor, or its node, went away.
        dead = dead_actors(learners, actors, where, samplers.dropped if samplers else set())
        if dead:
            saved = [c for arm in arms for c in checkpoint.complete(arm.run_dir / "checkpoints")[-1:]]
            raise RuntimeError(f"run stopped: {' and '.join(dead)} died (see the error above); the same command "
                               + (f"resumes from {saved[0].name}" if saved else "starts again from step 0 (no "
                                  "checkpoint yet)")) from e
        raise
    finally:
        stop.restore()
        shutdown(learners, actors)
    for arm in arms:
        report.write(arm.run_dir)  # plots/*.png and report.md
    if sweep:
        report.write_sweep(run_dir)  # report.md and plots comparing the arms
        print(report.sweep_summary(run_dir), flush=True)
    else:
        print(report.summary(report.read(run_dir), run_dir), flush=True)
    print(f"run directory: {run_dir}", flush=True)
    if stop.signal:
        print(f"stopped by {stop.signal.name} after step {step}; the same command resumes", flush=True)
        raise SystemExit(128 + stop.signal)
    return run_dir


def rl_loop(cfg: Config, learner, samplers, rewards, arms: list[ArmRun], evals: dict, resumes: dict,
            fleet: Faults, stop: StopSignal) -> int:
    """The loop over every arm (one without an arms section), from step 1 or from each arm's
    checkpoint in `resumes` (arm -> path, all at one step); returns the last step it ran."""
    import ray
    from tqdm import tqdm

    from rl import checkpoint
    from rl.evaluate import evaluate_arms, selection_metric
    from rl.loggers import Loggers
    from rl.probe import run_probe
    from rl.rollouts import AsyncBatches, Batches
    from rl.stream import StreamBatches

    sweep = len(arms) > 1
    starts = {restore(arm, resumes[arm.name], learner, fleet) for arm in arms if resumes.get(arm.name)}
    start = starts.pop() if starts else 0
    if start == 0:  # an earlier attempt's logs and best adapter go aside: this one logs its steps once, its own
        for arm in arms:
            if not arm.error:
                checkpoint.set_aside(arm.run_dir)
    for out in ray.get(learner.publish.remote()):  # version `start` (0: the zero adapter): samplers serve it first
        next(arm for arm in arms if arm.name == out.arm).published = {start: out.digest}  # rollouts must match
    probe_prompts = [list(row["prompt_ids"]) for row in evals["eval"].rows[:4]]
    best = {arm.name: BestAdapter(selection_metric(arm.cfg), arm.run_dir, arm.name) for arm in arms}
    chosen_on = selection_metric(cfg)
    print(f"best adapter: chosen on {chosen_on}" + (" (data.eval's own prompts, which also report it: set "
                                                   "data.select_size for a selection set apart)"
                                                   if chosen_on.count("/") == 1 else ""), flush=True)
    last = cfg.run.steps
    with contextlib.ExitStack() as stack:
        log = {arm.name: stack.enter_context(Loggers(arm.cfg, arm.run_dir, resumed_at=start + 1 if start else None))
               for arm in arms}
        running = [arm for arm in arms if not arm.error]
        if start == 0:
            evaluated = evaluate_arms({arm.name: arm.cfg for arm in running}, samplers, rewards, evals)
            for arm in running:
                metrics = {"data/skipped_rows": arm.train.skipped + sum(e.skipped for e in evals.values()),
                           **evaluated[arm.name]}
                best[arm.name].update(0, metrics, learner)
                log[arm.name].log(0, metrics)
            print("eval/accuracy before training: " + ", ".join(
                f"{evaluated[arm.name]['eval/accuracy']:.3f}" + (f" ({arm.name})" if sweep else "") for arm in running),
                flush=True)
        make_batches = {"sync": Batches, "async": AsyncBatches, "stream": StreamBatches}[cfg.run.mode]
        bar = tqdm(range(start + 1, last + 1), disable=not cfg.run.progress, desc="rl" + (f" x{len(arms)} arms" if sweep
                   else ""), unit="step", initial=start, total=last, dynamic_ncols=True)
        with make_batches(cfg, samplers, running, start + 1) as batches:
            step = start
            for step in bar:
                t0 = time.perf_counter()
                sampled = batches.next(step)  # each running arm's groups, sampled together (async: ahead)
                batch_B, tables, advantages = training_batch(sampled, {arm.name: arm.cfg for arm in running}, step)
                learned = ray.get(learner.train_step.remote(batch_B, list(sampled)))  # per arm; non-finite: skipped
                synced = publish(learner, samplers, batches, list(sampled))  # returns once every sampler serves them
                if (step == start + 1 and cfg.sync.probe_every >= 0) or due(step, cfg.sync.probe_every):
                    for arm in running:
                        serving = [samplers.actors[i] for i in samplers.serving(arm.name)]
                        synced[arm.name].update(run_probe(learner, serving, probe_prompts, arm.cfg, arm=arm.name))
                evaluated = {}
                if step == last or due(step, cfg.run.eval_every):
                    evaluated = evaluate_arms({arm.name: arm.cfg for arm in running}, samplers, rewards, evals)
                elapsed, logged = time.perf_counter() - t0, {}
                for arm in running:
                    name = arm.name
                    arm.faults.learner_step(learned[name]["learner/skipped"])
                    metrics = {**sampled[name][1], **advantages[name], **learned[name], **synced[name],
                               **fault_metrics(arm, fleet),
                               **evaluated.get(name, {}), "time/step": elapsed}
                    if name in evaluated:
                        best[name].update(step, metrics, learner)
                    metrics.update(phase_shares(metrics))
                    log[name].log(step, metrics)
                    logged[name] = metrics
                    if due(step, cfg.logging.samples_every):
                        log[name].table(step, tables[name][: cfg.logging.samples])
                    if step == last or stop.signal or arm.faults.too_many_skipped or due(step, cfg.run.checkpoint_every):
                        save(arm, step, learner, batches.state(name), fault_metrics(arm, fleet))
                    stop_if_failed(arm, step, learned[name], sweep)
                running = [arm for arm in running if not arm.error]
                if not running:
                    raise RuntimeError(f"every arm stopped by step {step}: " + "; ".join(f"{a.name}: {a.error}" for a in arms))
                show_progress(bar, logged, best)
                if stop.signal:
                    break
    return step


def due(step: int, every: int) -> bool:
    """Whether a cadence of `every` steps falls on `step` (0 or less: never)."""
    return every > 0 and step % every == 0


def publish(learner, samplers, batches, arms: list[str]) -> dict[str, dict]:
    """Each arm's adapter after this step to every sampler; a sampler that missed it is
    restarted and caught up; the digests join the arms' windows. Returns each arm's sync metrics."""
    import ray

    outs = ray.get(learner.publish.remote(arms))
    samplers.recover_missing(tuple(dict.fromkeys(m for out in outs for m in out.missing)))
    for out in outs:
        batches.publish(out.arm, out.version, out.digest)
    return {out.arm: {**out.metrics, "time/sync": out.metrics["sync/latency_ms"] / 1e3} for out in outs}


def show_progress(bar, metrics: dict[str, dict], best: dict[str, BestAdapter]):
    """The bar's postfix: reward and held-out accuracy (in a sweep: the mean reward over the
    running arms and the best arm's accuracy), and steps per minute."""
    rate = bar.format_dict.get("rate") or 0.0
    if len(best) == 1:
        ((m, b),) = zip(metrics.values(), best.values())
        bar.set_postfix(reward=f"{m['reward/mean']:.3f}", eval_acc=f"{b.last:.3f}", steps_per_min=f"{60 * rate:.1f}")
        return
    top = max(best, key=lambda arm: best[arm].last if best[arm].last == best[arm].last else float("-inf"))
    reward = sum(m["reward/mean"] for m in metrics.values()) / max(len(metrics), 1)
    bar.set_postfix(arms=len(metrics), reward=f"{reward:.3f}", best=f"{top} {best[top].last:.3f}",
                    steps_per_min=f"{60 * rate:.1f}")


def training_batch(sampled: dict[str, tuple[list[Group], dict]], cfgs: dict[str, Config], step: int
                   ) -> tuple[list[Datum], dict[str, list[dict]], dict[str, dict]]:
    """The learner's batch at `step`, one entry per graded completion with its group-centred
    advantage (each arm's groups with its own loss.std_normalize) and its lag behind the
    learner's version (step - 1); each arm's completions as rows of a sample table; and each
    arm's advantage metrics. A completion without a grade (its grading timed out) is left out:
    of its group's mean, and of the loss (counted in rollout/ungraded_completions)."""
    import torch

    from learner.loss import group_advantages

    batch_B, tables, metrics = [], {}, {}
    for arm, (groups, _) in sampled.items():
        rewards_P_G = [[0.0 if r is None else r for r in g.rewards] for g in groups]
        graded_P_G = [[r is not None for r in g.rewards] for g in groups]
        advantages_P_G = group_advantages(torch.tensor(rewards_P_G), cfgs[arm].loss.std_normalize,
                                          graded_P_G=torch.tensor(graded_P_G)).tolist()
        tables[arm], advantages_B, tokens_B = [], [], []
        for g, adv_G, graded_G in zip(groups, advantages_P_G, graded_P_G):
            for c, reward, a, ok in zip(g.completions, g.rewards, adv_G, graded_G):
                tables[arm].append({"prompt": g.row["prompt"], "completion": c.text, "reward": reward,
                                    "advantage": a if ok else None})
                if ok:
                    batch_B.append(Datum(list(g.row["prompt_ids"]), c.tokens, c.logprobs, a, arm,
                                         lag=step - 1 - g.version))
                    advantages_B.append(a)
                    tokens_B.append(len(c.tokens))
        metrics[arm] = advantage_metrics(advantages_B, tokens_B)
    return batch_B, tables, metrics


def advantage_metrics(advantages_B: list[float], tokens_B: list[int]) -> dict:
    """Mean and (population) std of the completions' advantages, and the share of completion
    tokens whose advantage is 0 (no gradient: groups without signal)."""
    if not advantages_B:
        return {}
    mean = sum(advantages_B) / len(advantages_B)
    return {"advantage/mean": mean,
            "advantage/std": (sum((a - mean) ** 2 for a in advantages_B) / len(advantages_B)) ** 0.5,
            "advantage/zero_frac": sum(n for a, n in zip(advantages_B, tokens_B) if a == 0) / max(sum(tokens_B), 1)}


def phase_shares(metrics: dict) -> dict:
    """Each phase's share of the step's wall time (in async mode sampling overlaps learning)."""
    return {f"time/share/{phase}": metrics.get(f"time/{phase}", 0.0) / metrics["time/step"]
            for phase in ("sample", "score", "learn", "sync", "eval")}


def fault_metrics(arm: ArmRun, fleet: Faults) -> dict:
    """The arm's fault counters, with the fleet's sampler restarts and losses (shared by a sweep's arms)."""
    return {**arm.faults.metrics(), "fault/sampler_restarts": fleet.sampler_restarts,
            "fault/samplers_lost": fleet.samplers_lost, "fault/resampled_groups": fleet.resampled_groups}


def stop_if_failed(arm: ArmRun, step: int, learn_metrics: dict, sweep: bool):
    """learner.max_skipped_steps non-finite steps in a row stop a run; in a sweep they stop
    the arm alone (its error in arms/<name>/failed.json) and the others go on."""
    try:
        arm.faults.stop_if_too_many_skipped(step, learn_metrics, arm.run_dir / "checkpoints")
    except FloatingPointError as e:
        if not sweep:
            raise
        arm.error = str(e)
        (arm.run_dir / "failed.json").write_text(json.dumps({"step": step, "error": arm.error}, indent=1))
        print(f"\narm {arm.name} stopped at step {step}: {arm.error}", flush=True)


class BestAdapter:
    """The adapter with the best eval.best_metric so far, kept in run_dir/best_adapter with
    best.json ({"step", "metric", "value"})."""

    def __init__(self, metric: str, run_dir: Path, arm: str = ""):
        self.metric, self.run_dir, self.arm, self.last = metric, run_dir, arm, float("nan")
        saved, self.value = run_dir / "best_adapter" / "best.json", float("-inf")
        try:
            self.value = float(json.loads(saved.read_text())["value"]) if saved.exists() else self.value
        except (OSError, ValueError, TypeError, KeyError) as e:  # torn or edited: the next evaluation sets the bar
            logging.getLogger(__name__).warning("ignoring %s (%s: %s): the next evaluation's adapter becomes "
                                                "the best", saved, e.__class__.__name__, e)

    def update(self, step: int, metrics: dict, learner):
        from rl.fleet import write_adapter

        if self.metric not in metrics:
            raise ConfigError(f"eval.best_metric={self.metric!r} is not an evaluation metric; these are: "
                              + ", ".join(k for k in metrics if k.startswith("eval/")))
        self.last = metrics.get("eval/accuracy", self.last)
        if metrics[self.metric] > self.value:
            self.value = metrics[self.metric]
            out = write_adapter(learner, self.run_dir, "best_adapter", self.arm)
            (out / "best.json").write_text(json.dumps({"step": step, "metric": self.metric, "value": self.value}))


def restore(arm: ArmRun, path: Path, learner, fleet: Faults) -> int:
    """Put an arm's checkpoint back: learner state, data position, fault counters (the
    fleet's too); drop later metrics. Returns the checkpoint's step."""
    import ray

    from rl import checkpoint

    files, state = checkpoint.read(path)
    ray.get(learner.load_state_files.remote(files, arm.name))
    arm.train.restore(state["data"])
    arm.faults.restore(state["faults"])
    fleet.sampler_restarts = state["faults"]["fault/sampler_restarts"]
    fleet.resampled_groups = state["faults"]["fault/resampled_groups"]
    fleet.samplers_lost = state["faults"].get("fault/samplers_lost", 0)
    for logged in (arm.run_dir / "metrics.jsonl", arm.run_dir / "samples.jsonl"):
        checkpoint.truncate_metrics(logged, state["step"])
    print(f"resumed from {path} (step {state['step']})", flush=True)
    return state["step"]


def save(arm: ArmRun, step: int, learner, data: dict, faults: dict) -> Path:
    """A checkpoint of the arm's state after `step` (rl/checkpoint.py says what it holds)."""
    import ray

    from rl import checkpoint

    start = time.perf_counter()
    files = {f"learner/{k}": v for k, v in ray.get(learner.state_files.remote(arm.name)).items()}
    files.update({f"adapter/{k}": v for k, v in ray.get(learner.adapter_files.remote(arm.name)).items()})
    config = to_dict(arm.cfg)
    state = {"step": step, "version": step, "data": data, "faults": faults,
             "config": config, "config_hash": checkpoint.config_hash(config), "time": time.time()}
    path = checkpoint.write(arm.run_dir / "checkpoints", step, files, state, arm.cfg.run.keep_checkpoints)
    logging.getLogger(__name__).info("checkpoint %s: %.2f MB in %.0f ms", path, sum(map(len, files.values())) / 1e6,
                                     1e3 * (time.perf_counter() - start))
    return path


class StopSignal:
    """SIGTERM or SIGINT (Ctrl-C): finish the step, checkpoint, stop. A second Ctrl-C stops at once."""

    def __init__(self):
        self.signal: signal.Signals | None = None
        self._before = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def restore(self):
        """Put back the handlers that were there before."""
        for signum, handler in self._before.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum)
        print(f"\n{self.signal.name}: stopping after this step, with a checkpoint", flush=True)


def parse_args(argv: list[str]) -> Config:
    """[CONFIG.yaml] [dotted.key=value ...] [--print-config] | --help"""
    flags = {a for a in argv if a.startswith("-")}
    args = [a for a in argv if not a.startswith("-")]
    if flags & {"-h", "--help"}:
        print(__doc__)
        print("Config keys (set in YAML or as dotted.key=value):\n  " + "\n  ".join(describe()))
        raise SystemExit(0)
    if flags - {"--print-config"}:
        raise SystemExit(f"unknown option {sorted(flags - {'--print-config'})[0]}; see --help")
    path = args[0] if args and "=" not in args[0] else None
    try:
        cfg = load_config(path, args[1:] if path else args)
    except (ConfigError, OSError) as e:
        raise SystemExit(f"config error: {e}")
    if "--print-config" in flags:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        raise SystemExit(0)
    return cfg


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main(sys.argv[1:])
