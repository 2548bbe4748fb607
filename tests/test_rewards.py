"""Math grading and the reward process pool.

The grading table is checked in-process and again through `RewardPool` from a non-main
thread, as training uses it. Pool tests use `tests.reward_fns`, whose functions hang, spin,
raise or exit on request, and assert scores, timings and the timeout/error fractions.
"""

import logging
import os
import subprocess
import sys
import threading
import time

import pytest

from rewards.math import MAX_COMPLETION_CHARS, extract_answer, gold_answer, math_reward
from rewards.pool import RewardPool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GSM8K_GOLD = "Natalia sold 48/2 = 24 clips in May.\nShe sold 48+24 = 72 clips altogether.\n#### 72"
MATH_GOLD = r"We have $\frac{2}{4} = \boxed{\frac{1}{2}}$, so the probability is one half."

# (completion, gold answer, expected score)
GRADING_TABLE = [
    # integers, signs, separators
    (r"\boxed{72}", "72", 1.0),
    (r"\boxed{71}", "72", 0.0),
    (r"\boxed{-3}", "-3", 1.0),
    (r"\boxed{3}", "-3", 0.0),
    (r"\boxed{- 3}", "-3", 1.0),
    (r"\boxed{1,234}", "1234", 1.0),
    (r"\boxed{1234}", "1,234", 1.0),
    (r"\boxed{1{,}234}", "1234", 1.0),
    (r"\boxed{10\,000}", "10000", 1.0),
    (r"\boxed{10\,000}", "0", 0.0),
    (r"\boxed{3,000}", "3", 0.0),
    (r"\boxed{1,000,000}", "1000000", 1.0),
    (r"\boxed{1 000 000}", "1,000,000", 1.0),
    (r"\boxed{100,000}", "1,000,000", 0.0),
    (r"\boxed{1,23}", "123", 0.0),
    ("\\boxed{\u22125}", "-5", 1.0),  # Unicode minus
    ("\\boxed{\u22125}", "5", 0.0),
    (r"\boxed{(-5)}", "-5", 1.0),
    (r"\boxed{-5}", "5", 0.0),
    # decimals and fractions
    (r"\boxed{2.0}", "2", 1.0),
    (r"\boxed{2.00001}", "2", 0.0),
    (r"\boxed{3.14159}", "3.14", 0.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{1/2}", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{1}{2}}", "0.5", 1.0),
    (r"\boxed{\frac{-1}{2}}", r"-\frac{1}{2}", 1.0),
    (r"\boxed{1\frac{1}{2}}", "1.5", 1.0),
    (r"\boxed{0.333}", r"\frac{1}{3}", 0.0),
    (r"\boxed{.5}", "0.5", 1.0),
    (r"\boxed{0.50}", ".5", 1.0),
    (r"\boxed{-.25}", r"-\frac{1}{4}", 1.0),
    (r"\boxed{0.25}", "-0.25", 0.0),
    (r"\boxed{\tfrac{3}{4}}", r"\dfrac{3}{4}", 1.0),
    (r"\boxed{-3/4}", r"-\frac{3}{4}", 1.0),
    (r"\boxed{\frac{3}{-4}}", "-0.75", 1.0),
    (r"\boxed{\frac{6}{8}}", r"\frac{3}{4}", 1.0),
    (r"\boxed{\frac{4}{3}}", r"\frac{3}{4}", 0.0),
    (r"\boxed{\frac{3}{4}}", r"-\frac{3}{4}", 0.0),
    (r"\boxed{3/5}", "3/4", 0.0),
    # percentages: a percent gold is its number; a percent candidate is its number or its value
    (r"\boxed{25\%}", "25", 1.0),
    (r"\boxed{25}", r"25\%", 1.0),
    (r"\boxed{25\%}", r"25\%", 1.0),
    (r"\boxed{0.25}", r"25\%", 0.0),
    (r"\boxed{25\%}", "0.25", 1.0),
    (r"\boxed{0.25}", "25", 0.0),
    (r"\boxed{1\%}", "1", 1.0),
    (r"\boxed{0.01}", r"1\%", 0.0),
    (r"\boxed{25 percent}", "0.25", 1.0),
    # units and text
    (r"\boxed{5\text{ cm}}", "5", 1.0),
    (r"\boxed{\$18}", "18", 1.0),
    (r"\boxed{7 \text{ apples}}", "7", 1.0),
    (r"\boxed{\text{5 apples}}", "5", 1.0),
    (r"\boxed{\textbf{5}}", "5", 1.0),
    (r"\boxed{\mbox{5 cm}}", "5", 1.0),
    (r"\boxed{3 \text{ m}}", "3", 1.0),
    (r"\boxed{30^\circ}", "30", 1.0),
    ("\\boxed{30\u00b0}", "30", 1.0),
    (r"\boxed{60^\circ}", "30", 0.0),
    (r"\boxed{\text{6 apples}}", "5", 0.0),
    (r"\boxed{\text{5 or 6}}", "5", 0.0),
    # intervals
    (r"\boxed{(1,3]}", "(1, 3]", 1.0),
    (r"\boxed{\left( 1, 3 \right]}", "(1, 3]", 1.0),
    (r"\boxed{[1,3]}", "(1, 3]", 0.0),
    (r"\boxed{(1,3)}", "(1, 3]", 0.0),
    (r"\boxed{(3, \infty) \cup (-\infty, 1)}", r"(-\infty,1)\cup(3,\infty)", 1.0),
    (r"\boxed{(-\infty, 1] \cup (3, \infty)}", r"(-\infty,1)\cup(3,\infty)", 0.0),
    # sets (unordered) and tuples (ordered)
    (r"\boxed{\{2, 1\}}", r"\{1,2\}", 1.0),
    (r"\boxed{{2,1}}", r"\{1,2\}", 1.0),
    (r"\boxed{\{1, 3\}}", r"\{1,2\}", 0.0),
    (r"\boxed{\{1, 2, 3\}}", r"\{1,2\}", 0.0),
    (r"\boxed{(1, 2)}", "(1,2)", 1.0),
    (r"\boxed{\left(1, 2\right)}", "(1, 2)", 1.0),
    (r"\boxed{(2, 1)}", "(1, 2)", 0.0),
    (r"\boxed{(1, 2, 3)}", "(1, 2)", 0.0),
    (r"\boxed{(5, 1)}", "(3, 1)", 0.0),
    # equations
    (r"\boxed{y=2x+3}", "y = 2x + 3", 1.0),
    (r"\boxed{y - 2x = 3}", "y = 2x + 3", 1.0),
    (r"\boxed{y = 3x + 2}", "y = 2x + 3", 0.0),
    (r"\boxed{x - y = 1}", "x + y = 1", 0.0),
    (r"\boxed{3 + 4 = 7}", "7", 1.0),
    (r"\boxed{1}", "x + y = 1", 0.0),
    (r"\boxed{3x = 7}", "7", 0.0),
    (r"\boxed{x^2 = 4}", "4", 0.0),
    # symbolic
    (r"\boxed{\frac{\sqrt2}{2}}", r"\sqrt{2}/2", 1.0),
    (r"\boxed{1+x^2}", "x^2+1", 1.0),
    (r"\boxed{4!}", "24", 1.0),
    (r"\boxed{x=2}", "2", 1.0),
    # false positives math-verify must not give
    (r"\boxed{4\sqrt{2}}", "4", 0.0),
    (r"\boxed{2^{10}}", "2", 0.0),
    (r"\boxed{5x}", "5", 0.0),
    (r"\boxed{x^2 + \left( 4}", "4", 0.0),
    (r"\boxed{2x}", "2", 0.0),
    (r"\boxed{2\pi}", "2", 0.0),
    (r"\boxed{10^2}", "10", 0.0),
    (r"\boxed{10^2}", "100", 1.0),
    # a lone letter is a variable, not a unit
    (r"\boxed{2t}", "2", 0.0),
    (r"\boxed{2}", "2t", 0.0),
    (r"\boxed{x + s}", "x + t", 0.0),
    (r"\boxed{t + x}", "x + t", 1.0),
    # several answers in one box against a single number
    (r"\boxed{2, 3}", "2", 0.0),
    (r"\boxed{2 \text{ or } 3}", "2", 0.0),
    (r"\boxed{2, 2}", "2", 0.0),
    (r"\boxed{\pm 2}", "2", 0.0),
    (r"\boxed{(1, 2)}", "1", 0.0),
    (r"\boxed{1, 2, 3, 4, 5}", "3", 0.0),
    (r"\boxed{3 \text{ or } 4}", "3", 0.0),
    (r"\boxed{x = 3 \text{ or } x = 4}", "3", 0.0),
    # ... but sets are fine when the gold is a set
    (r"\boxed{2, 1}", "1,2", 1.0),
    # which answer is graded
    (r"First \boxed{3}, then on reflection \boxed{5}.", "5", 1.0),
    (r"First \boxed{5}, then on reflection \boxed{3}.", "5", 0.0),
    (r"\boxed{5} and a truncated \boxed{3", "5", 1.0),
    (r"\fbox{9}", "9", 1.0),
    (r"\boxed{\boxed{5}}", "5", 1.0),
    (r"\boxed{7.}", "7", 1.0),
    (r"\boxed{5} and finally \boxed{}", "5", 0.0),
    (r"\boxed{3}" + "x" * MAX_COMPLETION_CHARS, "3", 0.0),
    ("x" * MAX_COMPLETION_CHARS + r"\boxed{3}", "3", 1.0),
    # gold formats
    (r"so \boxed{72}", GSM8K_GOLD, 1.0),
    (r"so \boxed{24}", GSM8K_GOLD, 0.0),
    (r"\boxed{0.5}", MATH_GOLD, 1.0),
    (r"so \boxed{1234}", "She earns 617 * 2 = 1,234 dollars.\n#### 1,234", 1.0),
    (r"so \boxed{1243}", "She earns 617 * 2 = 1,234 dollars.\n#### 1,234", 0.0),
    (r"\boxed{0.75}", r"The ratio is $\frac{6}{8} = \boxed{\dfrac{3}{4}}$.", 1.0),
    (r"\boxed{\frac{4}{3}}", r"The ratio is $\frac{6}{8} = \boxed{\dfrac{3}{4}}$.", 0.0),
    (r"\boxed{18}", "She pays 18 dollars.\n#### 18 dollars", 1.0),
    (r"\boxed{19}", "She pays 18 dollars.\n#### 18 dollars", 0.0),
    (r"\boxed{18}", "#### 18 (after tax)", 1.0),
    # fallbacks without a box
    ("3 + 2 = 5. The answer is 5.", "5", 1.0),
    ("The answer is 4.\nNo wait, the answer is $5$.", "5", 1.0),
    ("**Final answer:** 12", "12", 1.0),
    ("Adding gives 72.\n#### 72", "72", 1.0),
    ("The answer is 4", "5", 0.0),
    ("The answer is 18 dollars.", "18", 1.0),
    ("The answer is 5 and six", "5", 0.0),
    # no answer at all
    ("I think it is 5", "5", 0.0),
    ("", "5", 0.0),
    (r"\boxed{}", "5", 0.0),
]


@pytest.mark.parametrize("completion, answer, expected", GRADING_TABLE)
def test_grading_table(completion, answer, expected):
    assert math_reward(completion, answer) == expected


def test_table_is_big_and_balanced():
    assert len(GRADING_TABLE) >= 80
    assert 15 <= sum(expected for _, _, expected in GRADING_TABLE) <= len(GRADING_TABLE) - 15


def test_extract_answer_rule():
    assert extract_answer(r"a \boxed{1} b \boxed{\frac{1}{2}} c") == r"\frac{1}{2}"
    assert extract_answer(r"\boxed{\{1, 2\}}") == r"\{1, 2\}"
    assert extract_answer("The answer is: 42.\nThanks") == "42"
    assert extract_answer("no answer here") is None
    # Only the tail is read: a box before the last MAX_COMPLETION_CHARS characters is unseen.
    assert extract_answer(r"\boxed{1}" + "x" * MAX_COMPLETION_CHARS) is None
    assert extract_answer("x" * (2 * MAX_COMPLETION_CHARS) + r"\boxed{1}") == "1"


def test_gold_answer_forms():
    assert gold_answer(GSM8K_GOLD) == "72"
    assert gold_answer(MATH_GOLD) == r"\frac{1}{2}"
    assert gold_answer(" 17 ") == "17"


def test_math_reward_is_total():
    assert math_reward(None, "5") == 0.0
    assert math_reward(r"\boxed{5}", 5) == 0.0
    assert math_reward(r"\boxed{5}", "") == 0.0


def test_light_imports():
    code = (
        "import sys, rewards.math, rewards.pool, rl.data; "
        "heavy = [m for m in ('torch', 'vllm', 'ray', 'deepspeed') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)


@pytest.fixture(scope="module")
def math_pool():
    with RewardPool("rewards.math:math_reward_or_raise", num_workers=2, timeout_s=3.0) as pool:
        yield pool


@pytest.fixture(scope="module")
def behave_pool():
    with RewardPool("tests.reward_fns:behave", num_workers=2, timeout_s=1.0) as pool:
        yield pool


def _in_thread(fn):
    """Run fn() in a fresh non-main thread and return its result (or re-raise its exception)."""
    out = {}

    def target():
        try:
            out["value"] = fn()
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(timeout=300)
    assert not t.is_alive(), "scoring thread did not finish"
    if "error" in out:
        raise out["error"]
    return out["value"]


def test_table_through_pool_from_thread(math_pool):
    items = [(completion, answer) for completion, answer, _ in GRADING_TABLE]
    scores, metrics = _in_thread(lambda: math_pool.score(items))
    assert scores == [expected for _, _, expected in GRADING_TABLE]
    assert scores == [math_reward(c, a) for c, a in items]
    assert metrics == {"reward/timeout_frac": 0.0, "reward/error_frac": 0.0, "reward/stray_frac": 0.0}


def test_pathological_completions_finish_at_deadline(math_pool):
    math_pool.score([(r"\boxed{1}", "1")])  # workers started and warm
    items = [
        ("1" * 1_000_000, "5"),
        (r"\boxed{" + "1" * 1_000_000 + "}", "5"),
        (r"\boxed{" + "{" * 10_000 + "5" + "}" * 10_000 + "}", "5"),
        (r"\boxed{" + "{" * 10_000 + "5", "5"),
        (r"\boxed{" + "(" * 2_000 + "5" + ")" * 2_000 + "}", "5"),
        (r"\boxed{9^{9^{9^{9^9}}}}", "5"),
        (r"\boxed{10^{10^{10}}}", "5"),
        # Invalid UTF-8 as a decoder hands it over: lone surrogates, replacement characters.
        (b"\\boxed{5\xff\xfe}".decode("utf-8", "surrogateescape"), "5"),
        ("\ufffd" * 100_000 + "\\boxed{\ufffd5}", "5"),
    ]
    towers = [5, 6]  # the two that hang in sympy
    t0 = time.monotonic()
    math_pool.score([item for i, item in enumerate(items) if i not in towers])
    others = time.monotonic() - t0  # what the rest costs on this machine now (1 MB strings to move)
    t0 = time.monotonic()
    with RewardPool("rewards.math:math_reward_or_raise", num_workers=1, timeout_s=3.0) as fresh:
        fresh.score([("\\boxed{5}", "5")])
    startup = time.monotonic() - t0  # a new worker's start (spawn, import math-verify) on this machine now
    t0 = time.monotonic()
    scores, metrics = _in_thread(lambda: math_pool.score(items))
    elapsed = time.monotonic() - t0
    assert scores == [None if i in towers else 0.0 for i in range(len(items))]  # no grade for the two cut off
    # Each tower's deadline starts when a worker takes it, after at most all the other items; the
    # two run at once on the two workers and are cut at timeout_s; the items queued behind them
    # then wait for the replacement workers to start. So the batch ends within the others' time +
    # one timeout + one worker start-up + 1 s to kill workers and move the strings (the bound was
    # others + timeout_s + 1 s, which missed by 0.07 s when a replacement's start-up took longer
    # than that second). Towers not cut off would take forever; scored one after the other,
    # 2 x timeout_s (6 s), above this bound while a worker starts in under 2 s.
    assert elapsed < others + math_pool.timeout_s + startup + 1.0, (elapsed, others, startup)
    # The two towers hang in sympy and are cut off; the rest are rejected without parsing
    # (only the tail is read, unbalanced boxes are no answer, long answers score 0).
    assert metrics["reward/timeout_frac"] == pytest.approx(2 / len(items))
    assert metrics["reward/error_frac"] == 0.0
    assert math_pool.score([(r"\boxed{72}", "72"), (r"\boxed{7}", "72")])[0] == [1.0, 0.0]


def test_hanging_fn_is_cut_off_and_pool_recovers():
    with RewardPool("tests.reward_fns:hang", num_workers=1, timeout_s=1.0) as pool:
        assert pool.score([]) == ([], {"reward/timeout_frac": 0.0, "reward/error_frac": 0.0, "reward/stray_frac": 0.0})
        t0 = time.monotonic()
        scores, metrics = _in_thread(lambda: pool.score([("anything", "1")]))
        elapsed = time.monotonic() - t0
        assert scores == [None]  # no grade: the driver leaves it out of the loss
        assert metrics == {"reward/timeout_frac": 1.0, "reward/error_frac": 0.0, "reward/stray_frac": 0.0}
        assert 1.0 <= elapsed < 1.0 + 3.0, elapsed


def test_mixed_failures_in_one_batch(behave_pool, caplog):
    behave_pool.score([("ok", "0")])  # workers started
    items = [("ok", "1"), ("hang", ""), ("ok", "2"), ("raise", "x"), ("exit", ""),
             ("ok", "3"), ("spin", ""), ("ok", "4")]
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="rewards.pool"):
        scores, metrics = _in_thread(lambda: behave_pool.score(items))
    elapsed = time.monotonic() - t0
    assert scores == [1.0, None, 2.0, 0.0, 0.0, 3.0, None, 4.0]  # timeouts (hang, spin): none; errors: 0
    assert metrics == {"reward/timeout_frac": 2 / 8, "reward/error_frac": 2 / 8, "reward/stray_frac": 0.0}
    assert elapsed < 2 * behave_pool.timeout_s + 3.0, elapsed
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "boom on 'x'" in messages  # the first error, with its exception text
    assert "2/8 items timed out" in messages
    # Every worker was replaced as needed: the next batch is complete and in order.
    scores, metrics = behave_pool.score([("ok", str(i)) for i in range(40)])
    assert scores == [float(i) for i in range(40)]
    assert metrics == {"reward/timeout_frac": 0.0, "reward/error_frac": 0.0, "reward/stray_frac": 0.0}


def test_exit_and_raise_alone_count_as_errors(behave_pool):
    scores, metrics = behave_pool.score([("exit", ""), ("ok", "5"), ("raise", "")])
    assert scores == [0.0, 5.0, 0.0]
    assert metrics == {"reward/timeout_frac": 0.0, "reward/error_frac": pytest.approx(2 / 3), "reward/stray_frac": 0.0}


def test_bad_specs():
    with pytest.raises(ValueError, match="package.module:function"):
        RewardPool("tests.reward_fns.behave")
    with RewardPool("tests.reward_fns:no_such_fn", num_workers=1) as pool:
        with pytest.raises(RuntimeError, match="no_such_fn"):
            pool.score([("ok", "1")])
    pool = RewardPool("tests.reward_fns:behave", num_workers=1)
    pool.close()
    pool.close()
    with pytest.raises(RuntimeError, match="after close"):
        pool.score([("ok", "1")])


def test_a_reward_that_forks_cannot_stop_the_run_and_leaves_no_process(tmp_path, caplog):
    """Issue 30, item 3: the forked child answers as the worker would, a second answer on
    the worker's pipe. It used to raise AssertionError out of `score` (the driver's end), and
    the forked children outlived the pool. Each item is settled by its first answer; a stray
    one is refused, counted, and its worker replaced with its process group."""
    items = [("x", str(tmp_path))] * 8
    with caplog.at_level(logging.WARNING, logger="rewards.pool"):
        with RewardPool("tests.reward_fns:fork", num_workers=2, timeout_s=5.0) as pool:
            first, m1 = pool.score(items)
            second, m2 = pool.score(items)
    assert first == second == [1.0] * 8
    assert m1["reward/error_frac"] == m2["reward/error_frac"] == 0.0
    # The first item's second answer reaches the pool in this batch or, at the latest, when
    # its worker takes a task in the next one.
    assert (m1["reward/stray_frac"] + m2["reward/stray_frac"]) * 8 >= 1
    assert "a stray answer on a worker's pipe" in caplog.text
    forked = [int(p.name) for p in tmp_path.iterdir()]
    assert forked  # the children did run
    deadline = time.monotonic() + 5.0  # SIGKILL is sent; init reaps the orphans
    while time.monotonic() < deadline and any(alive(pid) for pid in forked):
        time.sleep(0.05)
    assert not [pid for pid in forked if alive(pid)]


def alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("what", ["str", "bool", "huge", "inf", "nan", "none"])
@pytest.mark.parametrize("shape", ["score", "part"])
def test_a_reward_must_be_a_finite_real_number(what, shape, caplog):
    """"1.0", True and 1e308 were coerced by float() (1e308 then made non-finite steps and
    "Infinity" in metrics.jsonl); each is an error now, counted and logged with what it was."""
    with RewardPool("tests.reward_fns:value", num_workers=1, timeout_s=5.0) as pool:
        with caplog.at_level(logging.WARNING, logger="rewards.pool"):
            scores, metrics = pool.score([(what, shape), ("int", shape), ("float", shape), ("negative", shape)])
    assert scores == [0.0, 1.0, 0.5, -2.0] and metrics["reward/error_frac"] == 0.25
    assert repr(__import__("tests.reward_fns", fromlist=["VALUES"]).VALUES[what]) in caplog.text
