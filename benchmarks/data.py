"""Loading training data at real sizes: rows per second and the driver's peak memory.

    python benchmarks/data.py [--rows 100000 1000000] [--format parquet|jsonl]

For each size, a file of that many ordinary math rows (a ~230-character problem, a numeric
answer and a source field, as GSM8K- or NuminaMath-style sets have) is written once, then
loaded by a fresh process as `rl/run.py` loads data.train: `rl.splits.load_splits` with the
default job's template and the tiny local model's tokenizer (read, check, render, tokenize).
Peak memory is that process's maximum resident set (ru_maxrss) minus what it held before
loading (Python, transformers and the tokenizer imported). Last line: one JSON object,
{"rows", "rows_per_s", "peak_gb"} for the largest size, and each size's figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

PROBLEM = ("Natalia sold clips to {a} of her friends in April, and then she sold half as many clips in May. "
           "Each clip costs {b} cents and she gave away {c} of them. How many clips did Natalia sell altogether "
           "in April and May? (case {i})")


def write(path: Path, rows: int, fmt: str):
    """`rows` ordinary rows, written in batches (the writer's memory is not what is measured)."""
    batch = 50_000

    def records(start):
        return [{"problem": PROBLEM.format(a=7 + i % 90, b=3 + i % 17, c=i % 5, i=i), "answer": str(i % 997),
                 "source": "synthetic"} for i in range(start, min(rows, start + batch))]

    if fmt == "jsonl":
        with open(path, "w") as f:
            for start in range(0, rows, batch):
                f.writelines(json.dumps(r) + "\n" for r in records(start))
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    writer = None
    for start in range(0, rows, batch):
        table = pa.Table.from_pylist(records(start))
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
    writer.close()


def measure(path: Path) -> dict:
    """In this process (run by main in a fresh one): load the file as data.train."""
    import resource

    from demo.tiny_model import build_tiny_model
    from rl.config import load_config
    from rl.splits import load_splits

    model = build_tiny_model()
    cfg = load_config(str(ROOT / "configs/default.yaml"), [f"data.train={path}", "data.eval=arithmetic",
                                                           "data.prompt_key=problem", "data.answer_key=answer"])
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model)  # imported and cached before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    train, _ = load_splits(cfg, model)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20 - before
    return {"rows": len(train.rows), "seconds": round(seconds, 1), "rows_per_s": round(len(train.rows) / seconds),
            "peak_gb": round(peak, 2)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--format", choices=["parquet", "jsonl"], default="parquet")
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: load this file, print the figures
    args = parser.parse_args()
    if args.measure:
        return print(json.dumps(measure(Path(args.measure))))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.rows:
            path = Path(tmp) / f"rows-{n}.{args.format}"
            write(path, n, args.format)
            out = subprocess.run([sys.executable, __file__, "--measure", str(path)], check=True, capture_output=True,
                                 text=True).stdout.splitlines()[-1]
            results[n] = json.loads(out)
            print(n, results[n], flush=True)
    largest = results[max(results)]
    print(json.dumps({"rows": largest["rows"], "rows_per_s": largest["rows_per_s"], "peak_gb": largest["peak_gb"],
                      "format": args.format, "by_size": results}))


if __name__ == "__main__":
    main()
