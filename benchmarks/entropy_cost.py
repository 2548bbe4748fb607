"""What learner/entropy costs: the chunked LM head's forward and backward with and without it.

    python benchmarks/entropy_cost.py [--tokens 512] [--repeats 5]

At Qwen2.5-0.5B's head shapes (hidden 896, vocabulary 151,936, float32), random weights, one
chunk of --tokens completion tokens (learner.logprob_chunk's default 512): the median time of
ChunkedTokenLogprobs' forward and backward with the entropy (learner/logprobs.py `_entropy`) and
with it replaced by zeros, the two interleaved. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    import learner.logprobs as logprobs

    torch.manual_seed(0)
    hidden = torch.randn(args.tokens, 896, requires_grad=True)
    weight, targets = torch.randn(151_936, 896) * 0.02, torch.randint(0, 151_936, (args.tokens,))

    entropy, no_entropy = logprobs._entropy, (lambda logits, lse: torch.zeros_like(lse))

    def step() -> float:
        start = time.perf_counter()
        lp, _ = logprobs.ChunkedTokenLogprobs.apply(hidden, weight, None, targets, 1.0, args.tokens)
        lp.sum().backward()
        return time.perf_counter() - start

    times = {True: [], False: []}
    for i in range(args.repeats + 1):  # interleaved, so that the machine's load falls on both; the first warms up
        for on in (True, False):
            logprobs._entropy = entropy if on else no_entropy
            elapsed = step()
            if i:
                times[on].append(elapsed)
    with_entropy, without = statistics.median(times[True]), statistics.median(times[False])
    print(f"with the entropy {with_entropy:.3f} s, without {without:.3f} s", flush=True)
    print(json.dumps({"tokens": args.tokens, "with_entropy_s": with_entropy, "without_s": without,
                      "overhead": with_entropy / without - 1, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
