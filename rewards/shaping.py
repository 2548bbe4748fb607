r"""Optional reward shaping, off by default; each term is added to the graded reward.

* Format (`reward.format_weight` w): + w when the completion puts an answer in a balanced
  `\boxed{...}`, the form the grader reads first; an empty (or blank) box is no answer and earns nothing. It rewards the form, not the content, so
  keep w well below the reward for a correct answer (e.g. 0.1): a policy can collect it
  while answering wrongly. Off (0) by default, since a correct answer already needs a box
  or an answer marker.
* Overlong (`reward.overlong_buffer` L, `reward.overlong_penalty` p, DAPO's soft overlong
  punishment): with `max_tokens` M, a completion of n tokens gets 0 when n <= M - L, a
  penalty growing linearly from 0 to -p over the last L tokens before M, and -p when it was
  cut at M without finishing. It discourages rambling up to the limit without the cliff of
  scoring every truncated completion 0. Off (L = 0) by default.

Reported as `reward/format` and `reward/overlong` (means over the batch) when enabled.
"""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\boxed\s*\{")


def format_score(text: str) -> float:
    """1.0 if the completion has a `\\boxed{...}` whose braces close around something other
    than blanks and braces, else 0.0."""
    match = _BOXED.search(text)
    if match is None:
        return 0.0
    depth, start = 0, match.end() - 1
    for i, ch in enumerate(text[start:], start):  # from the box's "{": linear, stops at the first close
        depth += (ch == "{") - (ch == "}")
        if depth == 0:
            return 1.0 if text[start + 1:i].strip("{} \t\n") else 0.0  # braces and blanks alone: no answer
    return 0.0


def overlong_penalty(num_tokens: int, finished: bool, max_tokens: int, buffer: int, penalty: float) -> float:
    """DAPO's soft overlong punishment, in [-penalty, 0]; 0 when buffer is 0 (off)."""
    if buffer <= 0:
        return 0.0
    if not finished and num_tokens >= max_tokens:
        return -penalty
    excess = num_tokens - (max_tokens - buffer)
    return -penalty * min(max(excess, 0), buffer) / buffer
