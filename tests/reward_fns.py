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


def fork(completion: str, folder: str) -> float:
    """Forks, and both processes answer as the worker would (the child goes on as a second
    worker on the same pipe); the child leaves its pid in `folder`."""
    if os.fork() == 0:
        with open(os.path.join(folder, str(os.getpid())), "w"):
            pass
    return 1.0


VALUES = {"str": "1.0", "bool": True, "huge": 1e308, "inf": float("inf"), "nan": float("nan"), "none": None,
          "int": 1, "float": 0.5, "negative": -2.0}


def value(completion: str, answer: str):
    """Returns VALUES[completion], or a dict with it as its one component when answer is "part"."""
    v = VALUES[completion]
    return {"part": v} if answer == "part" else v
