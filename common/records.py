"""Records that cross the actor boundary: plain frozen dataclasses, no torch (light module).

`Sampling` is what every caller of a sampler asks for (the actor's `Sampler.generate` and the
driver's `Samplers.generate` take the same one); `Published` is what the learner's `publish`
returns: the version and digest the driver tracks, the samplers that missed it, and metrics
that are only metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampling:
    """n completions per prompt; temperature 0 is greedy; seed None: unseeded."""

    n: int
    temperature: float
    max_tokens: int
    top_p: float = 1.0
    seed: int | None = None


@dataclass(frozen=True)
class Published:
    """One adapter version as the learner published it."""

    version: int
    digest: str  # SHA-256 of the payload: a rollout's digest must match its version's
    missing: tuple[str, ...] = ()  # endpoints of samplers that did not acknowledge it in time
    metrics: dict[str, float] = field(default_factory=dict)  # sync/bytes, sync/latency_ms, ...
