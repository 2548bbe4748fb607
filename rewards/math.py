r"""Math answer grading: 1.0 when a completion's final answer equals the gold answer, else 0.0.

Which answer is graded (`extract_answer`):

1. the content of the last `\boxed{...}` / `\fbox{...}` whose braces balance ("last" = the
   one that closes last; escaped `\{ \}` do not count as braces);
2. otherwise, the text after the last "answer is" / "answer:" / "####" marker (any case,
   e.g. "The answer is 5", "Final answer: 5"), up to the end of that line;
3. otherwise there is no answer, and the score is 0.

Only the last `MAX_COMPLETION_CHARS` characters of a completion are read: the final answer
sits at the end, and a degenerate multi-megabyte completion would otherwise cost the scan
(and any later parse) time proportional to its size.

Equality is math-verify's (`parse` + `verify`): `\frac{1}{2}` = `0.5` = `1/2`, `1,234` =
`1234`, `−5` (Unicode minus) = `-5`, `5\text{ cm}` = `5`, `30^\circ` = `30`, `x=2` = `2`,
`(1, 3]` = `\left( 1, 3 \right]`, `\{2, 1\}` = `\{1, 2\}`, `y=2x+3` = `y - 2x = 3`.

Percentages: a gold written as a percent is graded as its number (`25\%`, `25 percent` ->
25), so `25` and `25\%` match it and `0.25` does not (it would say 0.25 percent); a
candidate written as a percent matches its number or its value (math-verify's rule: `25\%`
matches a gold of 25 and a gold of 0.25).

Guards on top of math-verify, for cases it gets wrong:

* several answers in one box (`2, 3`, `2 \text{ or } 3`, `\pm 2`) score 0 against a
  single-number gold, even when the set contains the gold or collapses to it (`2, 2`);
* digit groups separated by a space or a LaTeX thin space (`10\,000`) are joined first:
  math-verify reads `10\,000` as `10*0 = 0`;
* answers longer than `MAX_ANSWER_CHARS` score 0 without parsing (no gold is that long;
  deeply nested input only costs parse time);
* the candidate is parsed as LaTeX only: with math-verify's default plain-expression
  fallback, `x^2 + \left( 4` matched a gold of 4;
* a text command that starts with a number is read as the number plus a text label
  (`\text{5 apples}`, `\mbox{5 cm}` -> `5\text{ apples}`): math-verify reads `5apples`;
* `°` is read as `^\circ`: math-verify does not parse `30°`;
* a number followed by plain words (`18 dollars`, `#### 18 (after tax)`: letters, spaces and
  `.'()` only; the first word has 3+ letters and is not `and`/`or`/`percent` or a function
  name like `sin`) is the number: math-verify reads `18 dollars` as a product of symbols;
* an answer ending in a lone letter (`2t`, `x + s`) is parsed without math-verify's unit
  stripping, which drops the letters c d g h l m o s t there as units (`2t` matched 2,
  `x + s` matched `x + t`); a bare one-letter unit (`5 m`) is thus a variable: write
  `5\text{ m}`;
* when only one side is an equation, it stands for its right side only if its left side is
  a single variable, a function value or a number (`x = 2`, `f(x) = 2x`, `3 + 4 = 7`):
  math-verify also matched `3x = 7` and `x^2 = 4` to 7 and 4, and 1 to a gold `x + y = 1`.

An empty last box (`\boxed{5} ... \boxed{}`) is no answer, like any last box: an earlier
box does not count.

`math_reward` is total (never raises; 0.0 for bad input). `math_reward_or_raise` is the same
grading but raises on bad input or an internal failure, so `rewards.pool.RewardPool` can count
errors apart from wrong answers; `reward(completion, sample)` is it in the pool's calling
convention (the default `reward.fn`). math-verify's own timeouts
(`signal.alarm`) are disabled: they fail off the main thread and cannot stop C-level work,
so the pool enforces the deadline. Do not call these in a thread that must not hang:
`\boxed{10^{10^{10}}}` runs until killed.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
from sympy import And, Eq, Symbol
from sympy.core.function import AppliedUndef

__all__ = ["extract_answer", "gold_answer", "math_reward", "math_reward_or_raise", "reward", "MAX_COMPLETION_CHARS",
           "MAX_ANSWER_CHARS"]

MAX_COMPLETION_CHARS = 20_000
MAX_ANSWER_CHARS = 1_000

_BOX_OPEN = re.compile(r"\\(?:boxed|fbox)\s*\{")
# An escaped character (\{, \}, \\) or a brace; escapes are consumed so they never count.
_BRACE_TOKEN = re.compile(r"\\.|[{}]", re.DOTALL)
_MARKER = re.compile(r"answer\s+is|answer\s*:|####", re.IGNORECASE)
# A separator between digit groups: "10\,000", "10 000", "10{,}000" -> "10000".
_GROUP_SEP = re.compile(r"(?<=\d)(?:\\[,;:! ]|\{,\}|~| )(?=\d{3}(?!\d))")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_SEVERAL = re.compile(r"[,;]|\\pm|\\mp|±|\bor\b|\band\b")
_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:\\?%)?")
_GOLD_PERCENT = re.compile(r"\\?%|percent(?:age)?")
# \text{...} / \mbox{...} without nested braces; its content is checked by _NUMBER_THEN_TEXT.
_TEXT_GROUP = re.compile(r"\\(?:text(?:bf|rm|it|normal)?|mbox)\s*\{([^{}]*)\}")
_NUMBER_THEN_TEXT = re.compile(r"\s*([-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))(?=\s|$)(\D*)")
_NUMBER_THEN_WORDS = re.compile(
    r"(\\?\$?[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+))\s+"
    r"(?!(?:and|or|percent|percentage|pct|sinh?|cosh?|tanh?|cot|sec|csc|log|exp|sqrt)\b)"
    r"(\(?[A-Za-z]{3}[A-Za-z\s.'()]*)"
)
_LONE_LETTER_END = re.compile(r"(?<![\\A-Za-z])[A-Za-z]\Z")


def _latex_config(units: bool, **kwargs) -> LatexExtractionConfig:
    config = LatexExtractionConfig(**kwargs)
    return dataclasses.replace(
        config, normalization_config=dataclasses.replace(config.normalization_config, units=units)
    )


# Indexed by "keep math-verify's unit stripping" (see `_LONE_LETTER_END`).
_GOLD_CONFIG = {units: [_latex_config(units), ExprExtractionConfig()] for units in (True, False)}
_CANDIDATE_CONFIG = {units: [_latex_config(units, boxed_match_priority=0)] for units in (True, False)}


class _DropTimeoutDisabledWarning(logging.Filter):
    """math-verify warns once per process that its timeouts are off; here that is deliberate."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropTimeoutDisabledWarning())


def extract_answer(completion: str) -> str | None:
    """The answer a completion commits to (rule in the module docstring), or None."""
    text = completion[-MAX_COMPLETION_CHARS:]
    boxed = _last_boxed(text)
    if boxed is not None:
        return _clean(boxed)
    markers = list(_MARKER.finditer(text))
    if not markers:
        return None
    line = text[markers[-1].end():].split("\n", 1)[0]
    return _clean(line.lstrip(" :"))


def gold_answer(answer: str) -> str:
    """Reduce a dataset answer to its final answer.

    GSM8K style ("...reasoning... #### 72") -> the text after the last "####"; MATH style (a
    solution containing `\\boxed{...}`) -> the last boxed content; anything else as it is.
    """
    if "####" in answer:
        return _clean(answer.rsplit("####", 1)[1].strip().split("\n", 1)[0]) or ""
    boxed = _last_boxed(answer)
    return _clean(boxed if boxed is not None else answer) or ""


def reward(completion: str, sample: dict) -> float:
    """The default `reward.fn`: `math_reward_or_raise` against the sample's gold answer."""
    return math_reward_or_raise(completion, sample["answer"])


def math_reward(completion: str, answer: str) -> float:
    """1.0 if the completion's final answer equals the gold `answer`, else 0.0. Never raises."""
    try:
        return math_reward_or_raise(completion, answer)
    except Exception:
        return 0.0


def math_reward_or_raise(completion: str, answer: str) -> float:
    """`math_reward`, but raises on non-string input, an unparseable gold, or a math-verify failure."""
    if not isinstance(completion, str) or not isinstance(answer, str):
        raise TypeError(
            f"completion and answer must be str, got {type(completion).__name__} and {type(answer).__name__}"
        )
    gold = _GOLD_PERCENT.sub("", _normalize(_join_digit_groups(gold_answer(answer)))).strip()
    if not gold:
        raise ValueError(f"empty gold answer in {answer[:200]!r}")
    candidate = extract_answer(completion)
    if candidate is None or len(candidate) > MAX_ANSWER_CHARS:
        return 0.0
    candidate = _join_digit_groups(candidate)
    if _is_plain_number(gold) and _has_several_answers(candidate):
        return 0.0
    candidate = _normalize(candidate)
    gold_parsed = _parse(gold, _GOLD_CONFIG)
    if not gold_parsed:
        raise ValueError(f"gold answer {gold!r} does not parse")
    candidate_parsed = _parse(candidate, _CANDIDATE_CONFIG)
    if not candidate_parsed:
        return 0.0
    if _is_equation(gold_parsed[0]) != _is_equation(candidate_parsed[0]):
        one_sided = gold_parsed[0] if _is_equation(gold_parsed[0]) else candidate_parsed[0]
        if not _names_a_value(one_sided):
            return 0.0
    return 1.0 if verify(gold_parsed, candidate_parsed, timeout_seconds=None, raise_on_error=True) else 0.0


def _parse(answer: str, configs: dict[bool, list]) -> list:
    units = _LONE_LETTER_END.search(answer) is None
    return parse(
        "\\boxed{" + answer + "}", extraction_config=configs[units], parsing_timeout=None, raise_on_error=True
    )


def _normalize(answer: str) -> str:
    """The rewrites named in the module docstring: `°`, a number in `\\text{}`, words after a number."""
    answer = answer.replace("°", "^{\\circ}")
    answer = _TEXT_GROUP.sub(_number_out_of_text, answer)
    words = _NUMBER_THEN_WORDS.fullmatch(answer)
    return words.group(1) if words else answer


def _number_out_of_text(match: re.Match) -> str:
    inner = _NUMBER_THEN_TEXT.fullmatch(match.group(1))
    if inner is None:
        return match.group(0)
    number, rest = inner.groups()
    return number + ("\\text{" + rest + "}" if rest.strip() else "")


def _is_equation(expr) -> bool:
    return isinstance(expr, Eq) or (isinstance(expr, And) and all(isinstance(a, Eq) for a in expr.args))


def _names_a_value(equation) -> bool:
    """Whether each left side is a single variable, a function value like f(x), or a number."""
    relations = equation.args if isinstance(equation, And) else (equation,)
    return all(isinstance(r.lhs, (Symbol, AppliedUndef)) or not r.lhs.free_symbols for r in relations)


def _last_boxed(text: str) -> str | None:
    """Content of the box whose closing brace comes last, or None. Linear in len(text)."""
    box_contents = {m.end() for m in _BOX_OPEN.finditer(text)}  # index just after a box's "{"
    if not box_contents:
        return None
    open_braces: list[int] = []  # indices just after each unclosed "{"
    last: tuple[int, int] | None = None
    for m in _BRACE_TOKEN.finditer(text):
        token = m.group()
        if token == "{":
            open_braces.append(m.end())
        elif token == "}" and open_braces:
            start = open_braces.pop()
            if start in box_contents:
                last = (start, m.start())
    return text[last[0]:last[1]] if last else None


def _clean(answer: str) -> str | None:
    """Strip whitespace, a trailing period and wrapping `$` / markdown `**`; None if empty."""
    answer = answer.strip().rstrip(".").strip().strip("$*").strip().rstrip(".").strip()
    return answer or None


def _join_digit_groups(text: str) -> str:
    return _GROUP_SEP.sub("", text)


def _is_plain_number(text: str) -> bool:
    text = _THOUSANDS_COMMA.sub("", text.replace("\\$", "").replace(" ", ""))
    return _PLAIN_NUMBER.fullmatch(text) is not None


def _has_several_answers(candidate: str) -> bool:
    return _SEVERAL.search(_THOUSANDS_COMMA.sub("", candidate.replace("{,}", ""))) is not None
