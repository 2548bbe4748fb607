"""RL post-training of a rank-1 LoRA adapter: the driver loop.

    python rl/run.py [CONFIG.yaml] [dotted.key=value ...]
    ray job submit --working-dir . -- python rl/run.py configs/<recipe>.yaml key=value ...

Each step: sample G completions for P prompts on the vLLM samplers -> score them with
math-verify -> group-centred advantages -> one learner step (importance-corrected policy
gradient) -> publish the adapter to every sampler and wait for their acknowledgements ->
log one flat dict of metrics. The held-out split is evaluated greedily before training,
every `run.eval_every` steps and at the end. Departures from GRPO, as DESIGN.md says: the
advantage is not divided by the group std, there is no KL penalty and no ratio clipping by
default, and the importance ratio uses the sampler's own log-probs (not a recomputed "old"
policy), which also corrects the sampler/learner numeric mismatch.

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
    from rl.setup import build_actors, load_splits, make_run_dir, resolve_model, shutdown, write_adapter

    ray.init()  # joins RAY_ADDRESS's cluster, or the job's; else starts a local instance
    run_dir = make_run_dir(cfg)
    print(f"run directory: {run_dir}", flush=True)
    model_path = resolve_model(cfg)
    train, evals = load_splits(cfg, model_path)
    secret = secrets.token_bytes(32)  # the adapter channel's key, handed out through Ray only
    learner, samplers = build_actors(cfg, model_path, secret)
    try:
        with RewardPool(cfg.reward.fn, cfg.reward.num_workers, cfg.reward.timeout_s) as rewards:
            before, after = rl_loop(cfg, learner, samplers, rewards, train, evals, run_dir / "metrics.jsonl")
        adapter = write_adapter(learner, run_dir)
    finally:
        shutdown(learner, samplers)
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

    r = cfg.rollout
    sync = ray.get(learner.publish.remote())  # version 0, the zero adapter: samplers serve it from the start
    published = {0: sync["sync/digest"]}  # version -> payload digest; rollouts must match one of these
    probe_prompts = [row["prompt_ids"] for row in evals.rows[:4]]
    with open(metrics_path, "a") as sink:
        metrics = {"step": 0, **evaluate(samplers, rewards, evals, r.max_tokens)}
        sink.write(json.dumps(metrics) + "\n")
        before = last_acc = metrics["eval/accuracy"]
        print(f"eval/accuracy before training: {before:.3f}", flush=True)
        bar = tqdm(range(1, cfg.run.steps + 1), disable=not cfg.run.progress, desc="rl", dynamic_ncols=True)
        for step in bar:
            t0 = time.perf_counter()
            rows_P = train.next_batch(r.prompts_per_step)
            rollouts = sample(samplers, [row["prompt_ids"] for row in rows_P], r.group_size, r.temperature, r.top_p,
                              r.max_tokens, seed=cfg.run.seed * 100_003 + step)
            rows_P, rollouts, refused = keep_in_window(rows_P, rollouts, published, step - 1, r.max_staleness)
            t1 = time.perf_counter()
            rewards_P_G, reward_metrics = score(rewards, rollouts, rows_P)
            advantages_P_G = group_advantages(torch.tensor(rewards_P_G), cfg.loss.std_normalize).tolist()
            t2 = time.perf_counter()
            batch_B = [
                {"prompt_ids": row["prompt_ids"], "tokens": c["tokens"], "sampler_logprobs": c["logprobs"],
                 "advantage": a}
                for row, group, adv_G in zip(rows_P, rollouts["groups"], advantages_P_G)
                for c, a in zip(group, adv_G)
            ]
            learn_metrics = ray.get(learner.train_step.remote(batch_B))
            sync_metrics = ray.get(learner.publish.remote())  # returns once every sampler serves the new version
            published[step] = sync_metrics.pop("sync/digest")
            every = cfg.sync.probe_every
            if step == 1 and every >= 0 or every > 0 and step % every == 0:
                sync_metrics.update(run_probe(learner, samplers, probe_prompts, cfg))
            metrics = {
                "step": step,
                **reward_metrics,
                **rollout_metrics(rollouts, rewards_P_G, t1 - t0),
                "rollout/refused_groups": refused,  # outside the adapter window: never trained on
                **learn_metrics,
                **sync_metrics,
                "time/sample": t1 - t0,
                "time/score": t2 - t1,
                "time/sync": sync_metrics["sync/latency_ms"] / 1e3,
            }
            if step == cfg.run.steps or (cfg.run.eval_every and step % cfg.run.eval_every == 0):
                metrics.update(evaluate(samplers, rewards, evals, r.max_tokens))
                last_acc = metrics["eval/accuracy"]
            metrics["time/step"] = time.perf_counter() - t0
            sink.write(json.dumps(metrics) + "\n")
            sink.flush()
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", eval_acc=f"{last_acc:.3f}")
    return before, last_acc


def sample(samplers, prompt_ids_P: list[list[int]], n: int, temperature: float, top_p: float,
           max_tokens: int, seed: int) -> dict:
    """Split the prompts across samplers: {"groups": P lists of n completions, and per group the
    "versions" and "digests" of the adapter that produced it}."""
    import ray

    shards = [prompt_ids_P[i :: len(samplers)] for i in range(len(samplers))]
    results = ray.get([
        s.generate.remote(shard, n, temperature, max_tokens, top_p, seed + i)
        for i, (s, shard) in enumerate(zip(samplers, shards)) if shard
    ])
    out = {"groups": [None] * len(prompt_ids_P), "versions": [0] * len(prompt_ids_P), "digests": [""] * len(prompt_ids_P)}
    for i, res in enumerate(results):
        out["groups"][i :: len(samplers)] = res["groups"]
        out["versions"][i :: len(samplers)] = [res["version"]] * len(res["groups"])
        out["digests"][i :: len(samplers)] = [res["digest"]] * len(res["groups"])
    return out


def keep_in_window(rows_P: list[dict], rollouts: dict, published: dict[int, str], newest: int,
                   max_staleness: int) -> tuple[list[dict], dict, int]:
    """Drop groups from adapters older than the window, or whose digest is not what was published."""
    keep = [i for i, (v, d) in enumerate(zip(rollouts["versions"], rollouts["digests"]))
            if newest - v <= max_staleness and published.get(v) == d]
    if not keep:
        raise RuntimeError(f"every group came from outside the adapter window (newest version {newest}, "
                           f"max_staleness {max_staleness}, got versions {sorted(set(rollouts['versions']))})")
    kept = {k: [v[i] for i in keep] for k, v in rollouts.items()}
    return [rows_P[i] for i in keep], kept, len(rows_P) - len(keep)


def score(rewards, rollouts: dict, rows_P: list[dict]) -> tuple[list[list[float]], dict]:
    items = [(c["text"], row["answer"]) for row, group in zip(rows_P, rollouts["groups"]) for c in group]
    flat, metrics = rewards.score(items)
    G = len(rollouts["groups"][0])
    rewards_P_G = [flat[i : i + G] for i in range(0, len(flat), G)]
    metrics["reward/mean"] = sum(flat) / len(flat)
    metrics["reward/accuracy"] = sum(x == 1.0 for x in flat) / len(flat)
    return rewards_P_G, metrics


def rollout_metrics(rollouts: dict, rewards_P_G: list[list[float]], seconds: float) -> dict:
    completions = [c for group in rollouts["groups"] for c in group]
    tokens = sum(len(c["tokens"]) for c in completions)
    zero_signal = sum(len(set(group)) == 1 for group in rewards_P_G)
    return {
        "rollout/zero_signal_groups": zero_signal,  # all rewards equal: no learning signal
        "rollout/zero_signal_frac": zero_signal / len(rewards_P_G),
        "rollout/response_len": tokens / len(completions),
        "rollout/truncated_frac": sum(not c["finished"] for c in completions) / len(completions),
        "rollout/tokens_per_s": tokens / seconds,
        "rollout/adapter_version": min(rollouts["versions"]),
    }


def evaluate(samplers, rewards, evals, max_tokens: int) -> dict:
    """Greedy (temperature 0) accuracy on the held-out split."""
    start = time.perf_counter()
    greedy = sample(samplers, [row["prompt_ids"] for row in evals.rows], 1, 0.0, 1.0, max_tokens, seed=0)
    scores, _ = rewards.score([(g[0]["text"], row["answer"]) for row, g in zip(evals.rows, greedy["groups"])])
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
