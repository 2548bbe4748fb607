"""Where a step's time goes in the default job: sample, score, learn, sync (p50 over steps).

    python benchmarks/step.py [STEPS] [dotted.key=value ...]

Runs the default job (configs/default.yaml) for STEPS steps (default 30) with evaluation
only before and after, then reads its metrics.jsonl. The first step is left out (vLLM's
first generate warms up). Last line: one JSON object.
"""

import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/ (Ray hands it to workers), where learner.py would shadow the package

from rl.run import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    steps = int(args.pop(0)) if args and args[0].isdigit() else 30
    with tempfile.TemporaryDirectory() as out:
        run_dir = main([str(ROOT / "configs/default.yaml"), f"run.steps={steps}", "run.eval_every=0",
                        f"run.output_dir={out}", "run.name=bench", "run.progress=false", *args])
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][2:]
    keys = ["time/step", "time/sample", "time/score", "time/learn", "time/sync", "sync/latency_ms", "sync/load_ms",
            "rollout/tokens_per_s", "learner/tokens_per_s"]
    result = {"steps": len(rows), "sync/bytes": rows[-1]["sync/bytes"]}
    result.update({f"{k}_p50": round(statistics.median(r[k] for r in rows), 4) for k in keys})
    result["sample_share"] = round(result["time/sample_p50"] / result["time/step_p50"], 3)
    print(json.dumps(result))
