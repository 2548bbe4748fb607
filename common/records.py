"""Records that cross files and the actor boundary: plain frozen dataclasses, no torch (light module).

`Sampling` is what every caller of a sampler asks for (the actor's `Sampler.generate` and the
driver's `Samplers.generate` take the same one) and `Rollout` what one sampler call returns:
`Completion`s per prompt and the adapter that made them. The driver turns them into `Group`s
(one prompt's completions with their scores and rewards) and those into the learner's `Datum`s
(one completion with its advantage). `Published` is what the learner's `publish` returns: the
version and digest the driver tracks, the samplers that missed it, and metrics that are only
metrics. Token and log-prob sequences are lists, as vLLM and torch hand them over.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sampling:
    """n completions per prompt; temperature 0 is greedy.

    Seeds: completion i of a prompt whose seed is s draws from its own random stream, seeded
    s + i (as vLLM seeds the children of a request of n). `seeds` gives each prompt's s; without
    it, prompt p's s is seed + p * n, so that no two completions of a request share a stream;
    seed None (and no seeds): unseeded."""

    n: int
    temperature: float
    max_tokens: int
    top_p: float = 1.0
    seed: int | None = None
    arm: str = ""  # whose adapter samples (rl/arms.py; "" in a run without arms)
    length_profile: str = ""  # benchmarks: each completion's length forced (rollout/lengths.py); "": the model's
    seeds: tuple[int, ...] = ()  # one per prompt of the request, when given

    def prompt_seeds(self, count: int) -> list[int | None]:
        """The seed s of each of `count` prompts (see the class doc)."""
        if self.seeds:
            if len(self.seeds) != count:
                raise ValueError(f"{len(self.seeds)} seeds for {count} prompts")
            return list(self.seeds)
        return [None if self.seed is None else self.seed + p * self.n for p in range(count)]


@dataclass(frozen=True)
class Completion:
    tokens: list[int]
    logprobs: list[float]  # the sampler's, per token, after temperature (vLLM's processed log-probs)
    text: str
    finished: bool  # ended by EOS, not cut at max_tokens


@dataclass(frozen=True)
class Rollout:
    """One sampler request: completions_P_G[p] are prompt p's completions, all by one adapter."""

    arm: str
    version: int
    digest: str  # the payload digest of the adapter version that produced every completion
    completions_P_G: list[list[Completion]]


@dataclass(frozen=True)
class Streamed:
    """What a streaming sampler hands back (Sampler.exchange): groups finished since the last
    call, each a one-prompt Rollout under the driver's key; keys of groups aborted because
    their adapter version left the resident window; the engine's busy seconds so far; and
    the groups still running."""

    finished: list[tuple[str, Rollout]]
    aborted: list[str]
    busy_s: float
    running: int


@dataclass(frozen=True)
class Group:
    """One prompt's G completions, the adapter that produced them, and (once scored) the
    grader's scores and the rewards trained on (scores plus optional shaping)."""

    row: dict  # the prompt row: prompt, answer, prompt_ids and the source's other fields
    completions: list[Completion]
    version: int
    digest: str
    # Per completion; None where its grading timed out (no grade: left out of the loss and the means).
    scores: list[float | None] = field(default_factory=list)
    rewards: list[float | None] = field(default_factory=list)
    arm: str = ""  # whose adapter produced them
    position: int = -1  # the prompt's draw in its train split (rl/splits.py); -1: not a training prompt


@dataclass(frozen=True)
class Datum:
    """One completion as the learner scores and trains on it (log-probs need only the ids)."""

    prompt_ids: list[int]
    tokens: list[int]
    sampler_logprobs: list[float] = field(default_factory=list)
    advantage: float = 0.0
    arm: str = ""  # whose adapter scores and trains on it
    lag: int = 0  # adapter versions between the one that sampled it and the learner's (0: the learner's own)


@dataclass(frozen=True)
class Published:
    """One adapter version as the learner published it."""

    arm: str
    version: int
    digest: str  # SHA-256 of the payload: a rollout's digest must match its version's
    missing: tuple[str, ...] = ()  # endpoints of samplers that did not acknowledge it in time
    metrics: dict[str, float] = field(default_factory=dict)  # sync/bytes, sync/latency_ms, ...
