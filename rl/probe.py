"""The log-prob probe: do the samplers serve exactly the adapter the learner holds?

After a sync, each sampler generates completions for a fixed probe batch and the learner
scores the same tokens. The importance ratio absorbs a small sampler/learner gap, but a
large one means the samplers are not sampling the policy being trained: the probe stops the
run and names the likely cause. Causes it tells apart:

* temperature: the learner's log-probs at some other temperature match the sampler's far
  better than at the configured one (the two sides scale logits differently);
* top-p / top-k truncation: the sampler renormalises over a truncated vocabulary, so its
  processed log-probs sit above the learner's;
* dtype: reduced-precision weights or adapter on the wire give a gap of ~1e-3..1e-2 nats;
* otherwise: the adapter reached the sampler with the wrong modules or scaling.
"""

from __future__ import annotations

import logging

from common.records import Datum, Sampling

log = logging.getLogger(__name__)

CANDIDATE_TEMPERATURES = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.5, 2.0)


class ProbeError(RuntimeError):
    """The samplers' log-probs disagree with the learner's beyond the tolerance."""


def mean_gap(a: list[list[float]], b: list[list[float]]) -> tuple[float, float]:
    """Mean and max absolute difference over all tokens."""
    diffs = [abs(x - y) for xs, ys in zip(a, b) for x, y in zip(xs, ys)]
    return sum(diffs) / max(len(diffs), 1), max(diffs, default=0.0)


def run_probe(learner, samplers, prompt_ids_P: list[list[int]], cfg, temperature: float | None = None,
              arm: str = "") -> dict:
    """Compare every sampler with the learner on `arm`'s adapter (cfg: the arm's config);
    raise ProbeError with a diagnosis, or return metrics.

    temperature: what the samplers are asked to sample at (the run's, unless a test
    deliberately makes the two sides differ).
    """
    import ray

    r = cfg.rollout
    temperature = r.temperature if temperature is None else temperature
    worst, compared = (0.0, 0.0), 0
    for i, sampler in enumerate(samplers):
        try:
            out = ray.get(sampler.generate.remote(prompt_ids_P, Sampling(2, temperature, r.max_tokens, r.top_p, 12345,
                                                                         arm)))
        except ray.exceptions.RayActorError as e:  # the next rollout restarts it, or drops it with its node
            log.warning("probe: sampler %d died before it answered (%s); it is not compared this time", i,
                        e.__class__.__name__)
            continue
        seqs = [Datum(p, c.tokens, arm=arm) for p, g in zip(prompt_ids_P, out.completions_P_G) for c in g]
        sampler_lp = [c.logprobs for g in out.completions_P_G for c in g]
        learner_lp = ray.get(learner.logprobs.remote(seqs))
        gap = mean_gap(sampler_lp, learner_lp)
        if gap[0] > cfg.sync.probe_tolerance:
            raise ProbeError(f"sampler {i} ({'arm ' + arm + ', ' if arm else ''}adapter version {out.version}): mean |log-prob gap| {gap[0]:.2e} "
                             f"(max {gap[1]:.2e}) exceeds sync.probe_tolerance={cfg.sync.probe_tolerance:g}; "
                             + diagnose(learner, seqs, sampler_lp, gap[0], cfg))
        worst, compared = max(worst, gap), compared + 1
    return {"sync/probe_gap_mean": worst[0], "sync/probe_gap_max": worst[1]} if compared else {}


def diagnose(learner, seqs: list[Datum], sampler_lp: list[list[float]], gap: float, cfg) -> str:
    import ray

    r = cfg.rollout
    tried = {t: mean_gap(sampler_lp, ray.get(learner.logprobs.remote(seqs, t)))[0] for t in CANDIDATE_TEMPERATURES}
    best = min(tried, key=tried.get)
    if tried[best] < gap / 10:
        return (f"likely cause: temperature. The sampler's log-probs match the learner's at temperature {best} "
                f"(gap {tried[best]:.1e}), not at rollout.temperature={r.temperature}.")
    if r.top_p < 1.0:
        return f"likely cause: top-p truncation (rollout.top_p={r.top_p}) renormalises the sampler's log-probs."
    if cfg.model.dtype != "float32" or cfg.sync.wire_dtype != "float32":
        return (f"likely cause: reduced precision (model.dtype={cfg.model.dtype}, sync.wire_dtype="
                f"{cfg.sync.wire_dtype}); raise sync.probe_tolerance if this gap is expected.")
    return "likely cause: the adapter reached the sampler with the wrong modules or scaling (lora.alpha / rank)."
