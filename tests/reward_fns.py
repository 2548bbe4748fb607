"""Reward functions with chosen failure modes, for exercising `rewards.pool.RewardPool`.

`behave` picks its behaviour from the completion, so one pool can mix every failure mode in
one batch: "hang" sleeps, "spin" busy-loops in Python, "raise" raises, "exit" kills its own
process without cleanup (as a segfault would); anything else scores `float(answer)`.
"""

import os
import time


def behave(completion: str, answer: str) -> float:
    if completion == "hang":
        time.sleep(60)
    elif completion == "spin":
        while True:
            pass
    elif completion == "raise":
        raise RuntimeError(f"boom on {answer!r}")
    elif completion == "exit":
        os._exit(3)
    return float(answer)


def hang(completion: str, answer: str) -> float:
    time.sleep(60)
    return 1.0
