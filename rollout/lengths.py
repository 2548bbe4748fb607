"""Completion lengths forced per completion, for benchmarks (rollout.length_profile).

Reasoning traces are heavy-tailed: most stop early, a few run to max_tokens. "longtail" is
log-normal with median max_tokens / 8 and 5% at max_tokens (ln 8 = 1.645 sigma), clipped to
[1, max_tokens]. A completion's length is a function of its prompt's token ids and its index
in the group only, so every mode, and a group sampled again, does exactly the same work.
"""

from __future__ import annotations

import hashlib
import math
from statistics import NormalDist

PROFILES = ("", "longtail")
_SIGMA = math.log(8) / NormalDist().inv_cdf(0.95)


def forced_length(prompt_ids: list[int], index: int, max_tokens: int, profile: str) -> int:
    if profile != "longtail":
        raise ValueError(f"unknown length profile {profile!r}; known: {', '.join(p for p in PROFILES if p)}")
    digest = hashlib.sha256(repr((list(prompt_ids), index)).encode()).digest()
    u = (int.from_bytes(digest[:8], "big") + 0.5) / 2**64  # uniform in (0, 1)
    length = (max_tokens / 8) * math.exp(_SIGMA * NormalDist().inv_cdf(u))
    return max(1, min(max_tokens, round(length)))
