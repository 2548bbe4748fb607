"""Heavy-tailed completion lengths: sync, async (a batch at a time) and streaming, same work.

    python benchmarks/longtail.py [--steps 16] [--max-tokens 192] [dotted.key=value ...]

Reasoning traces are heavy-tailed: most stop early, a few run to max_tokens. Each completion's
length here is forced (rollout.length_profile=longtail, rollout/lengths.py: log-normal, median
max_tokens / 8, 5% at max_tokens; exactly that many tokens, a function of the prompt and the
completion's index only), so every mode samples exactly the same tokens for the same prompts.
The default job (tiny model, 8 prompts x 8 completions a step) runs, on fresh actors each time:
run.mode=sync; run.mode=async at rollout.max_staleness 1 and 2; run.mode=stream at 1 and 2.
Every mode gets the same fixed resources, as on a cluster where each holds its own GPU: the
sampler (its actor and vLLM's threads) on CPU 0, the learner on CPU 1.

Samples per second: the steps' completions (P x G each, the same number in every mode) over
the wall time of steps 3..N (steps 1-2 pay vLLM's and DeepSpeed's warm-up), evaluations left
out. The streaming and async figures reported are the better of their two staleness bounds;
each run's are printed as it ends. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/ (Ray hands it to workers), where learner.py would shadow the package

from rl.run import main  # noqa: E402

PINNED = ["rollout.cpu_cores=0", "learner.cpu_cores=1", "rollout.num_cpus=1", "learner.num_cpus=1"]


def run(mode: str, lag: int, steps: int, max_tokens: int, extra: list[str], out: str) -> dict:
    run_dir = main([str(ROOT / "configs/default.yaml"), f"run.mode={mode}", f"run.steps={steps}", "run.eval_every=0",
                    f"rollout.max_staleness={lag}", f"rollout.max_tokens={max_tokens}",
                    "rollout.length_profile=longtail",
                    "data.eval_size=16", "eval.samples=0", "run.checkpoint_every=0",
                    f"run.output_dir={out}", f"run.name={mode}-{lag}", "run.progress=false", *PINNED, *extra])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] >= 3]
    seconds = sum(r["time/step"] - r.get("time/eval", 0.0) for r in timed)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    samples = len(timed) * cfg["rollout"]["prompts_per_step"] * cfg["rollout"]["group_size"]

    def mean(key: str) -> float:
        return round(statistics.fmean(r.get(key, 0.0) for r in timed), 4)

    return {
        "mode": mode, "max_staleness": lag,
        "samples_per_s": round(samples / seconds, 3),
        "s_per_step": round(seconds / len(timed), 3),
        "staleness_max": max(r["rollout/staleness_max"] for r in timed),
        "response_len": mean("rollout/response_len"),
        "response_len_max": max(r["rollout/response_len_max"] for r in timed),
        "learner_idle_frac": round(sum(r["time/learner_idle"] for r in timed) / seconds, 3),
        "sampler_busy_frac": mean("rollout/busy_frac") if mode == "stream" else None,
        "sample_s": mean("time/sample"), "learn_s": mean("time/learn"),
        "in_flight": mean("rollout/in_flight"), "refused_groups": mean("rollout/refused_groups"),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=192, help="with the prompt, within model.max_model_len (256)")
    args, extra = parser.parse_known_args()
    results = []
    with tempfile.TemporaryDirectory() as out:
        for mode, lag in ("sync", 0), ("async", 1), ("async", 2), ("stream", 1), ("stream", 2):
            results.append(run(mode, lag, args.steps, args.max_tokens, extra, out))
            print(f"{mode} (max_staleness {lag}):", json.dumps(results[-1]), flush=True)
    sync = results[0]
    async_ = max(results[1:3], key=lambda r: r["samples_per_s"])
    stream = max(results[3:5], key=lambda r: r["samples_per_s"])
    print(json.dumps({
        "steps": args.steps, "max_tokens": args.max_tokens,
        "sync_samples_per_s": sync["samples_per_s"],
        "async_samples_per_s": async_["samples_per_s"],
        "stream_samples_per_s": stream["samples_per_s"],
        "speedup_vs_sync": round(stream["samples_per_s"] / sync["samples_per_s"], 3),
        "speedup_vs_async": round(stream["samples_per_s"] / async_["samples_per_s"], 3),
        "sampler_busy_frac": stream["sampler_busy_frac"],
        "learner_idle_frac": stream["learner_idle_frac"],
        "staleness_max": stream["staleness_max"],
        "stream_max_staleness": stream["max_staleness"], "async_max_staleness": async_["max_staleness"],
        "runs": results,
    }))
