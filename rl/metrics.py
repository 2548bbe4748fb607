"""Every metric a run logs, with its meaning: the one registry behind docs/metrics.md.

A name with a <placeholder> stands for a family (`eval/<set>/accuracy`). Each step's metrics
pass `check` as they are logged (rl/loggers.py): a name the registry does not know is a
warning, and an error under the tests (RL_STRICT_METRICS=1, tests/conftest.py), so a metric
cannot be added without its line here. `python scripts/docs.py` writes docs/metrics.md from
this file; tests/test_docs.py fails while that page is stale. Light module: no imports
beyond the standard library.
"""

from __future__ import annotations

import os
import re
import warnings

# (section, what the section's metrics describe, [(name, meaning)]), in the page's order.
SECTIONS: list[tuple[str, str, list[tuple[str, str]]]] = [
    ("reward", "The step's training completions as graded (after dynamic sampling left groups out, "
               "if it did). A timed-out grade has no score: left out of these means and of the loss.", [
        ("reward/mean", "Mean reward (the grader's score plus shaping) of the graded completions."),
        ("reward/accuracy", "Share of graded completions the grader scored 1 (right), before shaping."),
        ("reward/timeout_frac", "Share of completions whose grading passed `reward.timeout_s`: no grade."),
        ("reward/error_frac", "Share of completions whose reward function raised or returned a non-number: "
                              "scored 0, the first traceback of the batch logged."),
        ("reward/stray_frac", "Share of completions during whose grading a worker sent an answer for no "
                              "request in flight (a reward function that forked or wrote to its pipe): "
                              "refused, the worker replaced."),
        ("reward/format", "With `reward.format_weight`: mean format bonus (an answer in a balanced \\boxed{})."),
        ("reward/overlong", "With `reward.overlong_buffer`: mean soft overlong penalty (DAPO)."),
        ("reward/unfiltered_mean", "With `rollout.filter_zero_signal`: `reward/mean` over every group the step "
                                   "looked at, before zero-signal groups were left out (what describes the policy)."),
        ("reward/unfiltered_accuracy", "With `rollout.filter_zero_signal`: `reward/accuracy` over every group "
                                       "looked at."),
        ("reward/<component>", "A reward function that returns a dict of named components: each "
                               "component's mean."),
    ]),
    ("eval", "Held-out evaluation, before training (step 0), every `run.eval_every` steps and at "
             "the end.", [
        ("eval/accuracy", "Greedy (temperature 0) accuracy on `data.eval`'s prompts."),
        ("eval/pass@<k>", "Share of prompts with at least one right answer among k, estimated without bias "
                          "from `eval.samples` completions at `rollout.temperature` (1 - C(n-c,k)/C(n,k), "
                          "averaged over prompts)."),
        ("eval/mean@<n>", "Share of right answers among the n = `eval.samples` sampled completions."),
        ("eval/select/<metric>", "With `data.select_size`: the same on the selection set, on which "
                                 "`best_adapter/` (and a sweep's best learning rate) is chosen."),
        ("eval/<set>/<metric>", "The same for each held-out set of `eval.extra`."),
        ("time/eval", "Seconds the evaluation took."),
    ]),
    ("learner", "The learner's step: the objective, the importance ratios p_learner / p_sampler over "
                "the completion tokens, and the cost. docs/objective.md explains the options these "
                "count.", [
        ("learner/loss", "The loss minimised: minus the objective on the batch (its gradient is minus the policy "
                          "gradient)."),
        ("learner/grad_norm", "Global gradient norm before clipping (`learner.grad_clip`)."),
        ("learner/ratio_mean", "Mean importance ratio per token; 1 when the sampler served exactly the "
                               "learner's weights."),
        ("learner/ratio_max", "Largest importance ratio of a token in the batch."),
        ("learner/ratio_ess", "Effective sample size of the token ratios as a fraction, (sum r)^2 / (n "
                              "sum r^2): 1 on-policy; lower when a few tokens carry most of the weight "
                              "(staleness, a bfloat16 wire, a sampler/learner mismatch)."),
        ("learner/mismatch_kl", "KL(sampler || learner) per token, k3 estimator: the gap between the "
                                "distribution sampled and the one trained."),
        ("learner/mismatch_kl_current", "`learner/mismatch_kl` over groups sampled on the learner's own "
                                        "version: numerics alone."),
        ("learner/mismatch_kl_stale", "`learner/mismatch_kl` over older groups: numerics and lag."),
        ("learner/entropy", "The policy's entropy per completion token at the sampling temperature."),
        ("learner/kl_base", "Every `learner.kl_base_every` steps: KL of the policy to the base model per "
                            "token (a forward pass with the adapter disabled)."),
        ("learner/capped_frac", "Share of tokens whose ratio `loss.ratio_cap` capped (TIS)."),
        ("learner/clipped_low_frac", "Share of tokens PPO's clipping stopped below 1 - `loss.clip_eps`."),
        ("learner/clipped_high_frac", "Share of tokens PPO's clipping stopped above 1 + eps (clip-higher's "
                                      "`loss.clip_eps_high`)."),
        ("learner/dual_clipped_frac", "Share of tokens dual-clip (`loss.dual_clip`) stopped."),
        ("learner/masked_low_frac", "Share of tokens `loss.ratio_mask` left out for a ratio below 1/C."),
        ("learner/masked_high_frac", "Share of tokens `loss.ratio_mask` left out for a ratio above C."),
        ("learner/skipped", "1 if this step was skipped for a non-finite loss or gradient (no optimiser "
                            "step), else 0."),
        ("learner/tokens_per_s", "Completion tokens trained per second of the learner's step."),
        ("learner/pad_frac", "Share of padding in the learner's forward passes."),
        ("learner/flops", "The step's forward and backward FLOPs (learner/flops.py: full fine-tuning 3x "
                          "the forward pass, LoRA 2x plus its adapter's terms; recomputation not counted)."),
        ("learner/peak_mem_gb", "The step's memory high-water mark in GB: the GPU allocator's; on CPU the "
                                "learner process's resident memory."),
    ]),
    ("advantage", "The advantages the step trained on (A = reward - mean of its group).", [
        ("advantage/mean", "Mean advantage over the completions (0 unless groups were partly ungraded)."),
        ("advantage/std", "Population std of the completions' advantages."),
        ("advantage/zero_frac", "Share of completion tokens whose advantage is 0 (no gradient: groups "
                                "without signal)."),
    ]),
    ("rollout", "The step's groups as sampled and admitted.", [
        ("rollout/response_len", "Mean completion length in tokens."),
        ("rollout/response_len_p50", "Median completion length."),
        ("rollout/response_len_p90", "90th percentile of completion length."),
        ("rollout/response_len_max", "Longest completion."),
        ("rollout/response_len_right", "Mean length of the completions graded right."),
        ("rollout/response_len_wrong", "Mean length of the completions graded wrong."),
        ("rollout/truncated_frac", "Share of completions cut at `rollout.max_tokens`."),
        ("rollout/ungraded_completions", "Completions whose grading timed out: left out of the loss."),
        ("rollout/zero_signal_groups", "Groups whose rewards are all equal: no learning signal."),
        ("rollout/zero_signal_frac", "The same as a share of the step's groups."),
        ("rollout/adapter_version", "Oldest adapter version that sampled a group of the step."),
        ("rollout/staleness_mean", "Mean versions a group lags the learner."),
        ("rollout/staleness_max", "Most versions a group lags the learner (at most `rollout.max_staleness`)."),
        ("rollout/staleness_hist", "Groups per lag, 0 to `rollout.max_staleness` versions (a list)."),
        ("rollout/refused_groups", "Groups refused by the version window (too stale, or a digest not "
                                   "published): never trained on."),
        ("rollout/regenerated_groups", "Refused groups sampled again on the newest adapter "
                                       "(`rollout.on_stale: regenerate`)."),
        ("rollout/filtered_groups", "With `rollout.filter_zero_signal`: zero-signal groups left out."),
        ("rollout/filter_fill", "Zero-signal groups that filled the step once `rollout.max_draws_per_step` "
                                "groups were looked at."),
        ("rollout/tokens_per_s", "Completion tokens generated per second of sampling."),
        ("rollout/in_flight", "Stream mode: groups running on the samplers at the step."),
        ("rollout/carried_over", "Stream mode: groups drawn but left for later steps (running or waiting)."),
        ("rollout/aborted_groups", "Stream mode: groups aborted because their version left a sampler's "
                                   "window; their prompts are drawn again."),
        ("rollout/busy_frac", "Stream mode: mean share of the step's wall time the samplers had work."),
        ("rollout/busy_frac/sampler-<i>", "Stream mode: the same for sampler i."),
        ("async/queue_depth", "Async mode: scored batches waiting for the learner."),
    ]),
    ("sync", "The adapter channel: the learner's new weights to every sampler.", [
        ("sync/bytes", "Bytes the learner sent in this publish: in a sweep every arm's adapter (each arm logs the "
                        "total); full fine-tuning: every chunk of the version."),
        ("sync/latency_ms", "Milliseconds from \"the learner has new weights\" to \"every sampler serves "
                            "them\" (acknowledged after loading)."),
        ("sync/load_ms", "Milliseconds the samplers took to load the version (the slowest)."),
        ("sync/chunks", "Full fine-tuning: messages per version (`sync.chunk_mb`)."),
        ("sync/version", "The adapter version published."),
        ("sync/refused_messages", "Messages the samplers refused so far (MAC, incarnation, stale, malformed, "
                                  "oversize; not valid versions that failed to load), summed over samplers."),
        ("sync/refused_connections", "Connections refused at the CURVE handshake or dropped unauthenticated "
                                     "so far, summed over samplers."),
        ("sync/probe_gap_mean", "When the log-prob probe ran: mean |sampler - learner| log-prob gap, nats."),
        ("sync/probe_gap_max", "The probe's largest gap on one token."),
        ("sync/probe_tolerance", "The mean gap the probe accepts (rl/probe.py)."),
    ]),
    ("time", "Seconds per phase of the step (in async and stream mode sampling overlaps learning).", [
        ("time/step", "Wall time of the step."),
        ("time/sample", "Sampling: the engines' call (sync), the wait for the batch (async, stream)."),
        ("time/score", "Grading in the reward pool."),
        ("time/learn", "The learner's step."),
        ("time/sync", "Publishing the new version to every sampler."),
        ("time/share/<phase>", "A phase's time (sample, score, learn, sync, eval) as a share of the step's."),
        ("time/sampler_idle", "Seconds the samplers had no work during the step."),
        ("time/learner_idle", "Seconds the learner waited for groups."),
    ]),
    ("fault", "Faults, counted over the whole run (resumes included).", [
        ("fault/skipped_steps", "Steps skipped for a non-finite loss or gradient."),
        ("fault/sampler_restarts", "Samplers Ray restarted after they died."),
        ("fault/samplers_lost", "Samplers dropped with their node."),
        ("fault/resampled_groups", "Groups sampled again after their sampler died."),
        ("fault/resumes", "Times the run resumed from a checkpoint."),
    ]),
    ("data", "The training data.", [
        ("data/position", "Train rows drawn so far, epochs included (the data state a checkpoint keeps)."),
        ("data/skipped_rows", "With `data.on_bad_row: skip`: malformed rows left out at load."),
    ]),
]

METRICS: dict[str, str] = {name: meaning for _, _, rows in SECTIONS for name, meaning in rows}
_FAMILIES = [re.compile(re.sub(r"<[a-z_]+>", "[^/]+", re.escape(name)) + "$") for name in METRICS if "<" in name]


def known(name: str) -> bool:
    """Whether the registry names this metric (itself or its family)."""
    return name in METRICS or any(f.match(name) for f in _FAMILIES)


_warned: set[str] = set()


def check(names) -> None:
    """Warn once per name the registry does not know; raise under RL_STRICT_METRICS=1."""
    unknown = sorted(n for n in names if n not in _warned and not known(n))
    if not unknown:
        return
    message = (f"metrics {unknown} are not in rl/metrics.py's registry: add each with its meaning there, "
               "then run python scripts/docs.py")
    if os.environ.get("RL_STRICT_METRICS") == "1":
        raise ValueError(message)
    _warned.update(unknown)
    warnings.warn(message, stacklevel=3)
