"""The sampler/learner log-prob gap by dtype: what the probe's tolerance rests on (rl/probe.py).

    python benchmarks/probe_gap.py [--steps 0,1,5,20] [--lr 3e-3] [--cases float32/float32,...]

For each case (model.dtype / sync.wire_dtype, optionally /separate: vLLM's engine core in a
process of its own), a learner and a sampler on the tiny model are built as a run builds them;
the learner trains on the sampler's completions (reward: a boxed answer) at --lr, publishing
each version, and after each number of steps in --steps the sampler generates 2 completions
for 16 held-out prompts, which the learner scores: the mean and the largest |gap| per token.
Minutes per case on 2 cores. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/ (Ray hands it to workers), where learner.py would shadow the package

CASES = "float32/float32,float32/bfloat16,bfloat16/float32,bfloat16/bfloat16,bfloat16/float32/separate"


def measure(dtype: str, wire: str, separate: bool, steps: list[int], lr: float) -> dict:
    import ray

    from common.records import Datum, Sampling
    from demo.tiny_model import build_tiny_model
    from rl.config import load_config
    from rl.fleet import build_actors, shutdown
    from rl.probe import mean_gap
    from rl.splits import load_splits

    model = build_tiny_model()
    cfg = load_config(None, [f"model.dtype={dtype}", f"sync.wire_dtype={wire}", f"learner.lr={lr}",
                             "rollout.num_cpus=0.5", "learner.num_cpus=0.5", "data.eval_size=32",
                             f"rollout.separate_engine={str(separate).lower()}"])
    _, evals = load_splits(cfg, model)
    prompts = [r["prompt_ids"] for r in evals["eval"].rows[:16]]
    learners, samplers = build_actors(cfg, model, secrets.token_bytes(32))
    learner, sampler = learners[0], samplers[0]
    out, done = {}, 0
    try:
        ray.get(learner.publish.remote())
        for target in steps:
            while done < target:
                batch = ray.get(sampler.generate.remote(prompts[:8], Sampling(8, 1.0, 48, seed=done)))
                data = [Datum(p, c.tokens, c.logprobs, 1.0 if "boxed" in c.text else -1.0)
                        for p, g in zip(prompts, batch.completions_P_G) for c in g]
                ray.get(learner.train_step.remote(data))
                ray.get(learner.publish.remote())
                done += 1
            probe = ray.get(sampler.generate.remote(prompts, Sampling(2, 1.0, 48, seed=12345)))
            seqs = [Datum(p, c.tokens) for p, g in zip(prompts, probe.completions_P_G) for c in g]
            sampler_lp = [c.logprobs for g in probe.completions_P_G for c in g]
            mean, worst = mean_gap(sampler_lp, ray.get(learner.logprobs.remote(seqs)))
            out[str(target)] = {"mean": mean, "max": worst, "tokens": sum(map(len, sampler_lp))}
            print(f"{dtype}/{wire}{'/separate' if separate else ''} after {target} steps: {out[str(target)]}",
                  flush=True)
    finally:
        shutdown(learners, samplers)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="0,1,5,20")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--cases", default=CASES)
    args = parser.parse_args()
    import ray

    steps = [int(s) for s in args.steps.split(",")]
    results = {}
    for case in args.cases.split(","):
        dtype, wire, *rest = case.split("/")
        ray.init(num_cpus=2, include_dashboard=False)
        try:
            results[case] = measure(dtype, wire, rest == ["separate"], steps, args.lr)
        finally:
            ray.shutdown()
    print(json.dumps({"lr": args.lr, "steps": steps, "gaps": results}))


if __name__ == "__main__":
    main()
