"""N experiments in one job against N jobs: what a sweep of rank-1 arms saves.

    python benchmarks/arms.py [--arms 8] [--steps 20] [dotted.key=value ...]

Runs the default job (configs/default.yaml, evaluation before and after only) twice as a
user would, each as its own `python rl/run.py` process: `solo`, one arm alone (run.seed 0);
`shared`, N rank-1 arms in one job (`arms.grid={run.seed: [0 .. N-1]}`: the default job N
times, each with its own data order and initialisation). Wall time is the whole process,
start-up included (vLLM's engine start, the model's build is cached first); peak memory is
the largest sum of resident memory over the job's processes (driver, Ray, actors, engines,
reward workers), sampled every 0.2 s. Step times are the p50 of time/step from metrics.jsonl
(steps 2..S). speedup = N * solo_wall_s / shared_wall_s. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/ (Ray hands it to workers), where learner.py would shadow the package


def tree_rss(pid: int) -> int:
    """Resident bytes of a process and everything below it."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def job(args: list[str], out: Path, name: str) -> dict:
    """One `python rl/run.py` job: its wall time, peak memory and median step time."""
    cmd = [sys.executable, "rl/run.py", "configs/default.yaml", "run.eval_every=0", "run.progress=false",
           f"run.output_dir={out}", f"run.name={name}", *args]
    start = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        peak, done = [0], threading.Event()

        def watch():
            while not done.wait(0.2):
                peak[0] = max(peak[0], tree_rss(proc.pid))

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        rc = proc.wait()
        done.set()
        watcher.join()
    wall = time.perf_counter() - start
    if rc != 0:
        raise SystemExit(f"{name} failed ({rc}); see {out / f'{name}.log'}:\n" + (out / f"{name}.log").read_text()[-3000:])
    metrics = sorted((out / name).rglob("metrics.jsonl"))
    rows = [json.loads(line) for line in metrics[0].read_text().splitlines()][2:]
    return {"wall_s": round(wall, 1), "peak_rss_gb": round(peak[0] / 2**30, 2),
            "step_s_p50": round(statistics.median(r["time/step"] for r in rows), 3),
            "sample_s_p50": round(statistics.median(r["time/sample"] for r in rows), 3),
            "learn_s_p50": round(statistics.median(r["time/learn"] for r in rows), 3)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arms", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    args, overrides = parser.parse_known_args()
    from demo.tiny_model import build_tiny_model

    build_tiny_model()  # cached: neither job pays for it
    base = [f"run.steps={args.steps}", *overrides]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        solo = job(base, out, "solo")
        print(f"solo: {solo}", flush=True)
        shared = job(base + [f"arms.grid={{run.seed: {list(range(args.arms))}}}"], out, "shared")
        print(f"shared ({args.arms} arms): {shared}", flush=True)
    print(json.dumps({
        "arms": args.arms, "steps": args.steps, "solo_wall_s": solo["wall_s"], "shared_wall_s": shared["wall_s"],
        "speedup": round(args.arms * solo["wall_s"] / shared["wall_s"], 2),
        "solo_step_s_p50": solo["step_s_p50"], "shared_step_s_p50": shared["step_s_p50"],
        "solo_peak_rss_gb": solo["peak_rss_gb"], "shared_peak_rss_gb": shared["peak_rss_gb"],
        "memory_ratio": round(shared["peak_rss_gb"] / solo["peak_rss_gb"], 2),
        "solo_sample_s_p50": solo["sample_s_p50"], "shared_sample_s_p50": shared["sample_s_p50"],
        "solo_learn_s_p50": solo["learn_s_p50"], "shared_learn_s_p50": shared["learn_s_p50"]}))


if __name__ == "__main__":
    main()
