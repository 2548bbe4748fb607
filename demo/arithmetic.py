"""The default task: procedurally generated arithmetic word problems.

Problems add a one-digit number to, or subtract it from, a two-digit one inside a handful of story templates. The train
and eval splits are disjoint by construction: a problem belongs to the eval split exactly
when a hash of its text falls in one bucket of ten, so no eval problem is ever trained on.

`sft_target` writes the supervised warm-start targets. The working (`a + b = c.`) is always
there; the final `\\boxed{c}` that the grader requires is given with a probability that
depends on the template (`BOX_PROB`). The warm-started model thus knows the arithmetic but
boxes its answer for some question types and not others: its first greedy accuracy is well
above zero and far from perfect, and RL has a real signal to learn from (format compliance
and sharpening, as in early real math RL; README.md's "What the default job shows" has the curve).
"""

from __future__ import annotations

import hashlib
import random

NAMES = ("Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo")
ITEMS = ("apples", "books", "coins", "shells", "stamps", "pens", "cards", "eggs")

# (template, operator); {n} name, {i} item, {a} and {b} the numbers.
TEMPLATES = (
    ("{n} has {a} {i} and gets {b} more. How many {i} does {n} have now?", "+"),
    ("A box holds {a} {i} and another holds {b}. How many {i} are there in total?", "+"),
    ("{n} collected {a} {i} on Monday and {b} on Tuesday. How many {i} in all?", "+"),
    ("{n} had {a} {i} and gave away {b}. How many {i} are left?", "-"),
    ("There were {a} {i} on a shelf. {n} took {b}. How many {i} remain?", "-"),
    ("{n} needs {a} {i} and already has {b}. How many more {i} are needed?", "-"),
)
# Probability that a warm-start target ends with \boxed{}; one per template.
BOX_PROB = (0.85, 0.15, 0.7, 0.1, 0.8, 0.2)


def make_problem(rng: random.Random) -> dict:
    """One problem: {"prompt", "answer", "template", "a", "b", "op"}."""
    t = rng.randrange(len(TEMPLATES))
    template, op = TEMPLATES[t]
    a, b = rng.randint(10, 99), rng.randint(2, 9)
    text = template.format(n=rng.choice(NAMES), i=rng.choice(ITEMS), a=a, b=b)
    answer = a + b if op == "+" else a - b
    return {"prompt": text, "answer": str(answer), "template": t, "a": a, "b": b, "op": op}


def is_eval(problem: dict) -> bool:
    digest = hashlib.sha256(problem["prompt"].encode()).digest()
    return digest[0] % 10 == 0


def problems(split: str, count: int, seed: int) -> list[dict]:
    """`count` distinct problems of the "train" or "eval" split."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be train or eval, got {split!r}")
    rng = random.Random(f"{split}-{seed}")
    seen, out = set(), []
    while len(out) < count:
        p = make_problem(rng)
        if is_eval(p) == (split == "eval") and p["prompt"] not in seen:
            seen.add(p["prompt"])
            out.append(p)
    return out


def sft_target(problem: dict, rng: random.Random) -> str:
    """A warm-start completion: the working, then \\boxed{answer} with BOX_PROB."""
    work = f" {problem['a']} {problem['op']} {problem['b']} = {problem['answer']}."
    if rng.random() < BOX_PROB[problem["template"]]:
        work += f" The answer is \\boxed{{{problem['answer']}}}."
    return work
