"""Sync against async sampling on the default task: steps per minute and held-out accuracy.

    python benchmarks/async.py [--steps 100] [--max-staleness 1] [dotted.key=value ...]

Runs the default job twice in this process, run.mode=sync then run.mode=async, with the same
seed, steps and data, each on fresh actors. Both modes get the same fixed resources: the
sampler (its actor and vLLM's processes) is pinned to CPU 0 and the learner to CPU 1, one
core each, as they would each hold their own GPU on a cluster. Steps per minute are taken
over steps 2..N (step 1 pays DeepSpeed's first backward), evaluation time left out; accuracy
is the greedy held-out accuracy after the last step. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/ (Ray hands it to workers), where learner.py would shadow the package

from rl.run import main  # noqa: E402

PINNED = ["rollout.cpu_cores=0", "learner.cpu_cores=1", "rollout.num_cpus=1", "learner.num_cpus=1"]


def run(mode: str, steps: int, max_staleness: int, extra: list[str], out: str) -> dict:
    run_dir = main([str(ROOT / "configs/default.yaml"), f"run.mode={mode}", f"run.steps={steps}", "run.eval_every=0",
                    f"rollout.max_staleness={max_staleness}", f"run.output_dir={out}", f"run.name={mode}",
                    "run.progress=false", *PINNED, *extra])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = rows[2:]
    seconds = sum(r["time/step"] - r.get("time/eval", 0.0) for r in timed)

    def mean(key: str) -> float:
        return round(statistics.fmean(r[key] for r in timed), 4)

    return {
        "steps_per_min": round(60 * len(timed) / seconds, 2),
        "accuracy_before": rows[0]["eval/accuracy"],
        "accuracy": rows[-1]["eval/accuracy"],
        "staleness_mean": mean("rollout/staleness_mean"),
        "sampler_idle_s": mean("time/sampler_idle"),
        "learner_idle_s": mean("time/learner_idle"),
        "sample_s": mean("time/sample"),
        "learn_s": mean("time/learn"),
        "mismatch_kl": mean("learner/mismatch_kl"),
        "ratio_ess": mean("learner/ratio_ess"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--max-staleness", type=int, default=1, help="for the async run (sync uses 0)")
    args, extra = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as out:
        sync = run("sync", args.steps, 0, extra, out)
        print("sync:", json.dumps(sync), flush=True)
        async_ = run("async", args.steps, args.max_staleness, extra, out)
        print("async:", json.dumps(async_), flush=True)
    print(json.dumps({
        "steps": args.steps,
        "max_staleness": args.max_staleness,
        "sync_steps_per_min": sync["steps_per_min"],
        "async_steps_per_min": async_["steps_per_min"],
        "speedup": round(async_["steps_per_min"] / sync["steps_per_min"], 3),
        "sync_accuracy": sync["accuracy"],
        "async_accuracy": async_["accuracy"],
        "accuracy_before": sync["accuracy_before"],
        "sync": sync,
        "async": async_,
    }))
