"""RL post-training of a rank-1 LoRA adapter: the driver loop.

    python rl/run.py [CONFIG.yaml] [dotted.key=value ...]
    ray job submit --working-dir . -- python rl/run.py configs/<recipe>.yaml key=value ...

Each step: sample G completions for P prompts on the vLLM samplers -> score them with
math-verify -> group-centred advantages -> one learner step (importance-corrected policy
gradient) -> publish the adapter to every sampler and wait for their acknowledgements ->
log one flat dict of metrics. With run.mode=async the sampling and scoring of the next
batches runs ahead, while the learner trains, at most rollout.max_staleness adapter versions
behind (rl/rollouts.py); the loop below is the same. The held-out split is evaluated
greedily before training, every `run.eval_every` steps and at the end.

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
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python rl/run.py` from anywhere

from rl.config import Config, ConfigError, describe, load_config, to_dict  # noqa: E402


def main(argv: list[str]) -> Path:
    cfg = parse_args(argv)
    import ray

    from rewards.pool import RewardPool
    from rl.setup import (build_actors, dead_actors, load_splits, make_run_dir, placement, resolve_model, shutdown,
                          write_adapter)

    ray.init()  # joins RAY_ADDRESS's cluster, or the job's; else starts a local instance
    run_dir = make_run_dir(cfg)
    print(f"run directory: {run_dir}", flush=True)
    model_path = resolve_model(cfg)
    train, evals = load_splits(cfg, model_path)
    secret = secrets.token_bytes(32)  # the adapter channel's key, handed out through Ray only
    learners, samplers = build_actors(cfg, model_path, secret)  # learners[0]: rank 0, the learner we talk to
    try:
        (run_dir / "placement.json").write_text(json.dumps(placement(learners, samplers), indent=1))
        with RewardPool(cfg.reward.fn, cfg.reward.num_workers, cfg.reward.timeout_s) as rewards:
            before, after = rl_loop(cfg, learners[0], samplers, rewards, train, evals, run_dir / "metrics.jsonl")
        adapter = write_adapter(learners[0], run_dir)
    except Exception as e:
        dead = dead_actors(learners, samplers)  # the root cause when an actor, or its node, went away
        if dead:
            raise RuntimeError(f"run stopped: {' and '.join(dead)} died (see the error above)") from e
        raise
    finally:
        shutdown(learners, samplers)
    print(f"eval/accuracy: {before:.3f} before training, {after:.3f} after {cfg.run.steps} steps")
    print(f"adapter: {adapter}\nrun directory: {run_dir}", flush=True)
    return run_dir


def rl_loop(cfg: Config, learner, samplers, rewards, train, evals, metrics_path: Path) -> tuple[float, float]:
    """The loop; returns held-out accuracy before and after training."""
    import ray
    import torch
    from tqdm import tqdm

    from learner.loss import group_advantages
    from rl.probe import run_probe
    from rl.rollouts import AsyncBatches, Batches

    sync = ray.get(learner.publish.remote())  # version 0, the zero adapter: samplers serve it from the start
    published = {0: sync["sync/digest"]}  # version -> payload digest; rollouts must match one of these
    probe_prompts = [row["prompt_ids"] for row in evals.rows[:4]]
    with open(metrics_path, "a") as sink:
        metrics = {"step": 0, "data/skipped_rows": train.skipped + evals.skipped,
                   **evaluate(samplers, rewards, evals, cfg.rollout.max_tokens)}
        sink.write(json.dumps(metrics) + "\n")
        before = last_acc = metrics["eval/accuracy"]
        print(f"eval/accuracy before training: {before:.3f}", flush=True)
        make_batches = AsyncBatches if cfg.run.mode == "async" else Batches
        bar = tqdm(range(1, cfg.run.steps + 1), disable=not cfg.run.progress, desc="rl", dynamic_ncols=True)
        with make_batches(cfg, samplers, rewards, train, published) as batches:
            for step in bar:
                t0 = time.perf_counter()
                groups, sample_metrics = batches.next(step)  # sync: sampled now; async: sampled ahead
                rewards_P_G = torch.tensor([g["rewards"] for g in groups])
                advantages_P_G = group_advantages(rewards_P_G, cfg.loss.std_normalize).tolist()
                batch_B = [
                    {"prompt_ids": g["row"]["prompt_ids"], "tokens": c["tokens"], "sampler_logprobs": c["logprobs"],
                     "advantage": a}
                    for g, adv_G in zip(groups, advantages_P_G)
                    for c, a in zip(g["completions"], adv_G)
                ]
                learn_metrics = ray.get(learner.train_step.remote(batch_B))
                sync_metrics = ray.get(learner.publish.remote())  # returns once every sampler serves it
                batches.publish(step, sync_metrics.pop("sync/digest"))
                every = cfg.sync.probe_every
                if step == 1 and every >= 0 or every > 0 and step % every == 0:
                    sync_metrics.update(run_probe(learner, samplers, probe_prompts, cfg))
                metrics = {"step": step, **sample_metrics, **learn_metrics, **sync_metrics,
                           "time/sync": sync_metrics["sync/latency_ms"] / 1e3}
                if step == cfg.run.steps or (cfg.run.eval_every and step % cfg.run.eval_every == 0):
                    metrics.update(evaluate(samplers, rewards, evals, cfg.rollout.max_tokens))
                    last_acc = metrics["eval/accuracy"]
                metrics["time/step"] = time.perf_counter() - t0
                sink.write(json.dumps(metrics) + "\n")
                sink.flush()
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", eval_acc=f"{last_acc:.3f}")
    return before, last_acc


def evaluate(samplers, rewards, evals, max_tokens: int) -> dict:
    """Greedy (temperature 0) accuracy on the held-out split."""
    from rl.rollouts import fields, sample

    start = time.perf_counter()
    greedy = sample(samplers, [row["prompt_ids"] for row in evals.rows], 1, 0.0, 1.0, max_tokens, seed=0)
    scores, _ = rewards.score([(g["completions"][0]["text"], fields(row)) for row, g in zip(evals.rows, greedy)])
    return {"eval/accuracy": sum(scores) / len(scores), "time/eval": time.perf_counter() - start}


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
