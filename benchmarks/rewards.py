"""Grading throughput of the reward pool on a realistic mix, and its overhead over in-process calls.

    python benchmarks/rewards.py [--items 600] [--workers 2]

The mix imitates a math RL batch: reasoning followed by a boxed answer (right or wrong,
integers, decimals, fractions, LaTeX), "The answer is ..." endings, rambling with no answer,
completions cut mid-box, and GSM8K-style (#### 72) and MATH-style (boxed in a solution) gold
answers. Times `rewards.math.math_reward` called in this process, then the same items
through `RewardPool` with 1 worker (the like-for-like overhead: pipes, pickling, the
deadline bookkeeping) and with --workers workers. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/: learner.py there would shadow the package


def mix(n: int, seed: int = 0) -> list[tuple[str, dict]]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        a, b = rng.randint(2, 999), rng.randint(2, 99)
        reasoning = " ".join(f"Step {k}: we have {a} and {b}, so we combine them." for k in range(rng.randint(2, 12)))
        gold, right = (f"Natalia had {a} and got {b}.\n#### {a + b}", a + b) if i % 2 else (
            rf"The sum is $\boxed{{\frac{{{a}}}{{{b}}}}}$.", f"\\frac{{{a}}}{{{b}}}")
        kind = i % 8
        if kind in (0, 1):
            text = rf"{reasoning} The answer is \boxed{{{right}}}."
        elif kind == 2:
            text = rf"{reasoning} So we get \boxed{{{a + b + 1}}}."
        elif kind == 3:
            text = f"{reasoning} The answer is {right}."
        elif kind == 4:
            text = reasoning * 4  # rambling, no answer
        elif kind == 5:
            text = rf"{reasoning} Thus \boxed{{\dfrac{{{a}}}{{{b}}}}} and \boxed{{{right}"  # cut mid-box
        elif kind == 6:
            text = rf"{reasoning} \boxed{{{a / b:.4f}}}"
        else:
            text = rf"{reasoning} \boxed{{{right}, {a}}}"  # several answers in one box
        items.append((text, {"prompt": "...", "answer": gold}))
    return items


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from rewards.math import math_reward
    from rewards.pool import RewardPool

    items = mix(args.items)
    for completion, sample in items[:20]:  # warm math-verify's imports and caches
        math_reward(completion, sample["answer"])
    start = time.perf_counter()
    expected = [math_reward(completion, sample["answer"]) for completion, sample in items]
    in_process = time.perf_counter() - start
    result = {"items": len(items), "correct_frac": round(sum(expected) / len(expected), 3),
              "in_process_per_s": round(len(items) / in_process, 1)}
    for workers in sorted({1, args.workers}):
        with RewardPool("rewards.math:reward", num_workers=workers, timeout_s=5.0) as pool:
            pool.score(items[:20])  # workers started and warm
            start = time.perf_counter()
            scores, metrics = pool.score(items)
            seconds = time.perf_counter() - start
        assert scores == expected, "the pool must grade exactly as in-process"
        assert metrics["reward/timeout_frac"] == 0.0 and metrics["reward/error_frac"] == 0.0, metrics
        result[f"pool_{workers}_workers_per_s"] = round(len(items) / seconds, 1)
        if workers == 1:
            result["pool_overhead_ms_per_item"] = round(1e3 * (seconds - in_process) / len(items), 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
