"""RL post-training of a rank-1 LoRA adapter: the driver loop.

    python rl/run.py [CONFIG.yaml] [dotted.key=value ...]
    ray job submit --working-dir . -- python rl/run.py configs/<recipe>.yaml key=value ...

Each step: sample G completions for P prompts on the vLLM samplers -> score them with
math-verify -> group-centred advantages -> one learner step (importance-corrected policy
gradient) -> publish the adapter to every sampler and wait for their acknowledgements ->
log one flat dict of metrics. With run.mode=async the sampling and scoring of the next
batches runs ahead, while the learner trains, at most rollout.max_staleness adapter versions
behind (rl/rollouts.py); the loop below is the same. The held-out sets are evaluated
(greedy accuracy, pass@k and mean@n: rl/evaluate.py) before training, every run.eval_every
steps and at the end. Every run.checkpoint_every steps, at the end and on SIGTERM a
checkpoint is written (rl/checkpoint.py); launching the same command again resumes from the
newest one. Metrics go to metrics.jsonl and the enabled loggers (rl/loggers.py); the end of
the run writes plots and report.md (rl/report.py).

Departures from GRPO, as DESIGN.md says: the advantage is not divided by the group std,
there is no KL penalty and no ratio clipping by default, and the importance ratio uses the
sampler's own log-probs (not a recomputed "old" policy), which also corrects the
sampler/learner numeric mismatch and the lag of stale samples.

It connects to a Ray cluster when RAY_ADDRESS is set or when run as a Ray job, and starts a
local Ray instance otherwise.

Glossary of suffixes: P prompts per step, G completions per prompt, B completions (P*G),
T tokens.
"""

from __future__ import annotations

import json
import logging
import secrets
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python rl/run.py` from anywhere

from common.records import Datum, Group  # noqa: E402
from rl.config import Config, ConfigError, describe, load_config, to_dict  # noqa: E402
from rl.faults import Faults  # noqa: E402


def main(argv: list[str]) -> Path:
    cfg = parse_args(argv)
    import ray

    from rewards.pool import RewardPool
    from rl import report
    from rl.checkpoint import make_run_dir
    from rl.fleet import Samplers, build_actors, dead_actors, placement, resolve_model, shutdown, write_adapter
    from rl.splits import load_splits

    ray.init()  # joins RAY_ADDRESS's cluster, or the job's; else starts a local instance
    try:
        run_dir, resume = make_run_dir(cfg)  # resume: the newest complete checkpoint there (run.resume), or None
    except ConfigError as e:  # a changed config, or run.resume pointing at no checkpoint
        raise SystemExit(f"config error: {e}")
    print(f"run directory: {run_dir}", flush=True)
    model_path = resolve_model(cfg)
    train, evals = load_splits(cfg, model_path)  # evals: name -> held-out split
    secret = secrets.token_bytes(32)  # the adapter channel's key, handed out through Ray only
    learners, actors = build_actors(cfg, model_path, secret)  # learners[0]: rank 0, the learner we talk to
    stop = StopSignal()
    try:
        (run_dir / "placement.json").write_text(json.dumps(placement(learners, actors), indent=1))
        faults = Faults(cfg.learner.max_skipped_steps)
        samplers = Samplers(actors, learners[0], cfg.rollout.restart_timeout_s, faults)
        with RewardPool(cfg.reward.fn, cfg.reward.num_workers, cfg.reward.timeout_s) as rewards:
            step = rl_loop(cfg, learners[0], samplers, rewards, train, evals, run_dir, resume, faults, stop)
        write_adapter(learners[0], run_dir)
    except Exception as e:
        dead = dead_actors(learners, actors)  # the root cause when an actor, or its node, went away
        if dead:
            raise RuntimeError(f"run stopped: {' and '.join(dead)} died (see the error above)") from e
        raise
    finally:
        stop.restore()
        shutdown(learners, actors)
    report.write(run_dir)  # plots/*.png and report.md
    print(report.summary(report.read(run_dir), run_dir), flush=True)
    print(f"run directory: {run_dir}", flush=True)
    if stop.signal:
        print(f"stopped by {stop.signal.name} after step {step}; the same command resumes", flush=True)
        raise SystemExit(128 + stop.signal)
    return run_dir


def rl_loop(cfg: Config, learner, samplers, rewards, train, evals: dict, run_dir: Path, resume: Path | None,
            faults: Faults, stop: StopSignal) -> int:
    """The loop, from step 1 or from the checkpoint `resume`; returns the last step it ran."""
    import ray
    from tqdm import tqdm

    from rl.evaluate import evaluate
    from rl.loggers import Loggers
    from rl.probe import run_probe
    from rl.rollouts import AsyncBatches, Batches

    start = restore(resume, learner, train, faults, run_dir / "metrics.jsonl") if resume else 0
    first = ray.get(learner.publish.remote())  # version `start` (0: the zero adapter): samplers serve it first
    published = {start: first.digest}  # version -> payload digest; rollouts must match one of these
    probe_prompts = [row["prompt_ids"] for row in evals["eval"].rows[:4]]
    best = BestAdapter(cfg.eval.best_metric, run_dir)
    last = cfg.run.steps
    with Loggers(cfg, run_dir, resumed_at=start + 1 if start else None) as log:
        if start == 0:
            metrics = {"data/skipped_rows": train.skipped + sum(e.skipped for e in evals.values()),
                       **evaluate(cfg, samplers, rewards, evals)}
            best.update(0, metrics, learner)
            log.log(0, metrics)
            print(f"eval/accuracy before training: {metrics['eval/accuracy']:.3f}", flush=True)
        make_batches = AsyncBatches if cfg.run.mode == "async" else Batches
        bar = tqdm(range(start + 1, last + 1), disable=not cfg.run.progress, desc="rl", unit="step",
                   initial=start, total=last, dynamic_ncols=True)
        with make_batches(cfg, samplers, rewards, train, published, start + 1) as batches:
            step = start
            for step in bar:
                t0 = time.perf_counter()
                groups, sample_metrics = batches.next(step)  # sample and score (async: sampled ahead)
                batch_B, table = training_batch(groups, cfg.loss.std_normalize)  # group-centred advantages
                learn_metrics = ray.get(learner.train_step.remote(batch_B))  # skipped when not finite
                faults.learner_step(learn_metrics["learner/skipped"])
                sync_metrics = publish(learner, samplers, batches, step)  # returns once every sampler serves it
                if (step == start + 1 and cfg.sync.probe_every >= 0) or due(step, cfg.sync.probe_every):
                    sync_metrics.update(run_probe(learner, samplers, probe_prompts, cfg))
                metrics = {**sample_metrics, **learn_metrics, **sync_metrics, **faults.metrics()}
                if step == last or due(step, cfg.run.eval_every):
                    metrics.update(evaluate(cfg, samplers, rewards, evals))
                    best.update(step, metrics, learner)
                metrics["time/step"] = time.perf_counter() - t0
                metrics.update(phase_shares(metrics))
                log.log(step, metrics)
                if due(step, cfg.logging.samples_every):
                    log.table(step, table[: cfg.logging.samples])
                show_progress(bar, metrics, best)
                if step == last or stop.signal or faults.too_many_skipped or due(step, cfg.run.checkpoint_every):
                    save(cfg, run_dir, step, learner, train.state(batches.consumed), faults)
                faults.stop_if_too_many_skipped(step, learn_metrics, run_dir / "checkpoints")
                if stop.signal:
                    break
    return step


def due(step: int, every: int) -> bool:
    """Whether a cadence of `every` steps falls on `step` (0 or less: never)."""
    return every > 0 and step % every == 0


def publish(learner, samplers, batches, step: int) -> dict:
    """The adapter after `step` to every sampler; a sampler that missed it is restarted and
    caught up; the digest joins the window. Returns the sync metrics."""
    import ray

    out = ray.get(learner.publish.remote())
    samplers.recover_missing(out.missing)
    batches.publish(step, out.digest)
    return {**out.metrics, "time/sync": out.metrics["sync/latency_ms"] / 1e3}


def show_progress(bar, metrics: dict, best: BestAdapter):
    rate = bar.format_dict.get("rate") or 0.0
    bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", eval_acc=f"{best.last:.3f}", steps_per_min=f"{60 * rate:.1f}")


def training_batch(groups: list[Group], std_normalize: bool) -> tuple[list[Datum], list[dict]]:
    """The learner's batch, one entry per completion with its group-centred advantage, and
    the same completions as rows of a sample table."""
    import torch

    from learner.loss import group_advantages

    advantages_P_G = group_advantages(torch.tensor([g.rewards for g in groups]), std_normalize).tolist()
    batch_B, table = [], []
    for g, adv_G in zip(groups, advantages_P_G):
        for c, reward, a in zip(g.completions, g.rewards, adv_G):
            batch_B.append(Datum(g.row["prompt_ids"], c.tokens, c.logprobs, a))
            table.append({"prompt": g.row["prompt"], "completion": c.text, "reward": reward, "advantage": a})
    return batch_B, table


def phase_shares(metrics: dict) -> dict:
    """Each phase's share of the step's wall time (in async mode sampling overlaps learning)."""
    return {f"time/share/{phase}": metrics.get(f"time/{phase}", 0.0) / metrics["time/step"]
            for phase in ("sample", "score", "learn", "sync", "eval")}


class BestAdapter:
    """The adapter with the best eval.best_metric so far, kept in run_dir/best_adapter with
    best.json ({"step", "metric", "value"})."""

    def __init__(self, metric: str, run_dir: Path):
        self.metric, self.run_dir, self.last = metric, run_dir, float("nan")
        saved = run_dir / "best_adapter" / "best.json"
        self.value = json.loads(saved.read_text())["value"] if saved.exists() else float("-inf")

    def update(self, step: int, metrics: dict, learner):
        from rl.fleet import write_adapter

        if self.metric not in metrics:
            raise ConfigError(f"eval.best_metric={self.metric!r} is not an evaluation metric; these are: "
                              + ", ".join(k for k in metrics if k.startswith("eval/")))
        self.last = metrics.get("eval/accuracy", self.last)
        if metrics[self.metric] > self.value:
            self.value = metrics[self.metric]
            out = write_adapter(learner, self.run_dir, "best_adapter")
            (out / "best.json").write_text(json.dumps({"step": step, "metric": self.metric, "value": self.value}))


def restore(path: Path, learner, train, faults: Faults, metrics_path: Path) -> int:
    """Put a checkpoint back: learner state, data position, fault counters; drop later metrics.
    Returns the checkpoint's step."""
    import ray

    from rl import checkpoint

    files, state = checkpoint.read(path)
    ray.get(learner.load_state_files.remote(files))
    train.restore(state["data"])
    faults.restore(state["faults"])
    for logged in (metrics_path, metrics_path.with_name("samples.jsonl")):
        checkpoint.truncate_metrics(logged, state["step"])
    print(f"resumed from {path} (step {state['step']})", flush=True)
    return state["step"]


def save(cfg: Config, run_dir: Path, step: int, learner, data: dict, faults: Faults) -> Path:
    """A checkpoint of the state after `step` (rl/checkpoint.py says what it holds)."""
    import ray

    from rl import checkpoint

    start = time.perf_counter()
    files = {f"learner/{k}": v for k, v in ray.get(learner.state_files.remote()).items()}
    files.update({f"adapter/{k}": v for k, v in ray.get(learner.adapter_files.remote()).items()})
    config = to_dict(cfg)
    state = {"step": step, "version": step, "data": data, "faults": faults.state(),
             "config": config, "config_hash": checkpoint.config_hash(config), "time": time.time()}
    path = checkpoint.write(run_dir / "checkpoints", step, files, state, cfg.run.keep_checkpoints)
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
