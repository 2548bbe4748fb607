"""CPU pinning for the actors: light, below every package that runs one (no torch, no Ray)."""

from __future__ import annotations

import os


def parse_cpus(spec: str) -> set[int]:
    """The CPU ids of a `cpu_cores` value ("0", "0,2", "0-3")."""
    cores = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


def pin_cpus(spec: str) -> int:
    """Pin every thread of this process (and the processes it starts) to the CPU ids in a
    `cpu_cores` value; returns how many."""
    cores = parse_cpus(spec)
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), cores)
    return len(cores)
