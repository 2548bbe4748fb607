"""The one typed config tree of a run.

Every field carries a one-line doc (units, and what 0 or None means). YAML files in
`configs/` set only what differs from these defaults; the command line adds dotted
`key=value` overrides on top. Unknown keys, values of the wrong type, numbers outside a
field's bounds (`doc(..., ge=, gt=, le=)`, NaN and infinity included) and a key given twice
in one YAML mapping raise a `ConfigError` that names the key (and the file). Light module: no torch, vLLM, DeepSpeed or Ray.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import re
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from common.cpus import parse_cpus


class ConfigError(ValueError):
    """A config file or override that does not fit the config tree."""


def doc(default, text: str, free: bool = False, ge=None, gt=None, le=None, **kw):
    """A dataclass field with its one-line doc kept in the field's metadata.

    free: the key may differ when a run resumes from a checkpoint (it changes where, how fast
    or what a run reports, not what it computes: rl/checkpoint.py); on a section, every key in it.
    ge, gt, le: bounds of a number (of each value of a mapping; a None value is not checked),
    checked with every float's finiteness by `Config.__post_init__`, so that a value that could
    only fail inside an actor fails when the config loads, naming the key.
    """
    if isinstance(default, list):
        raise TypeError("use a tuple for sequence defaults")
    bounds = tuple((op, b) for op, b in ((">=", ge), (">", gt), ("<=", le)) if b is not None)
    metadata = {"doc": text, "free": free, "bounds": bounds}
    if isinstance(default, dict):  # a fresh (empty) mapping per instance
        return field(default_factory=lambda: dict(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass(frozen=True)
class ModelConfig:
    path: str = doc("tiny", 'HF model path or hub id; "tiny" builds (and caches) the local CPU model.')
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "Weights dtype for sampler and learner "
                                                                     "(float16 is refused: the learner has no loss "
                                                                     "scaling; use bfloat16).")
    max_model_len: int = doc(256, "Longest prompt + completion, in tokens.", ge=1)
    cache_dir: str = doc("", 'Where the "tiny" model is cached; "" means ~/.cache/rl-lora.', free=True)


@dataclass(frozen=True)
class LoraConfig:
    rank: int = doc(1, "LoRA rank r, at most 512 (vLLM's largest max_lora_rank); 0: full fine-tuning (every weight "
                       "trained, full weights synced).", ge=0, le=512)
    alpha: float = doc(32.0, "LoRA alpha; the update is scaled by alpha / rank.", gt=0)
    target_modules: tuple[str, ...] = doc(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "Linear layers that get an adapter (attention and MLP by default).",
    )


@dataclass(frozen=True)
class DataConfig:
    train: str = doc("arithmetic", 'Training prompts: "arithmetic" (generated), a .jsonl/.parquet file or a '
                                   "Hugging Face datasets folder (save_to_disk, or a snapshot of .parquet/.jsonl files).")
    eval: str = doc("arithmetic", 'Held-out prompts: "arithmetic" (a disjoint generated split) or a path.', free=True)
    train_split: str = doc("train", "The split read from a datasets folder for data.train.")
    eval_split: str = doc("test", "The split read from a datasets folder for data.eval.", free=True)
    prompt_key: str = doc("prompt", "Field of a file row that holds the problem text.")
    answer_key: str = doc("answer", "Field of a file row that holds the gold answer.")
    template: str = doc("Question: {prompt}\nAnswer:", "Prompt template; {prompt} is the problem text (its only "
                                                        "field; {{ and }} are literal braces).")
    chat_template: bool = doc(False, "Wrap the templated prompt as a user turn in the tokenizer's chat template.")
    on_bad_row: Literal["error", "skip"] = doc("error", "A row with a missing, empty or wrong-typed field, a line "
                                                         "that is not UTF-8 or JSON, or a prompt longer than "
                                                         "model.max_model_len - rollout.max_tokens: error (naming "
                                                         "file, row, key) | skip (counted and logged).")
    eval_size: int = doc(200, "Held-out prompts per evaluation; 0 means all of the eval split.", free=True, ge=0)
    select_size: int = doc(0, "Prompts of the held-out source set aside as a selection set (eval/select/*), on "
                              "which eval.best_metric picks the best adapter and a sweep's report its best learning "
                              "rate, so that data.eval's own prompts report them unbiased; 0: none (chosen on the "
                              "set they are reported on, and the report says so).", free=True, ge=0)


@dataclass(frozen=True)
class RolloutConfig:
    num_samplers: int = doc(1, "Sampler actors, each owning one vLLM engine.", free=True, ge=1)
    prompts_per_step: int = doc(8, "Prompts (groups) per training step.", ge=1)
    group_size: int = doc(8, "Completions sampled per prompt (G).", ge=2)
    temperature: float = doc(1.0, "Sampling temperature; the learner divides its logits by the same value.", gt=0)
    top_p: float = doc(1.0, "Nucleus sampling; must be 1: below 1 the sampler's log-probs are renormalised over "
                            "the nucleus and the learner's are not, which no ratio corrects.", gt=0, le=1)
    max_tokens: int = doc(48, "Longest completion, in tokens.", ge=1)
    kv_cache_gb: float = doc(0.25, "KV cache per sampler in GiB; 0 means vLLM sizes it from gpu_memory_utilization.", free=True, ge=0)
    gpu_memory_utilization: float = doc(0.9, "vLLM's share of GPU memory (used when kv_cache_gb is 0).", free=True, gt=0, le=1)
    enforce_eager: bool = doc(True, "Run vLLM eagerly: no torch.compile or CUDA graphs (fast start, slower steps).", free=True)
    num_cpus: float = doc(1.0, "CPUs reserved in Ray for each sampler actor.", free=True, ge=0)
    num_gpus: float = doc(0.0, "GPUs per sampler actor (0 on CPU); more than 1 means vLLM tensor parallelism.", free=True, ge=0)
    resources: dict[str, float] = doc({}, 'Custom Ray resources per sampler, e.g. {"sampler_node": 1}, to place them.', free=True, ge=0)
    max_staleness: int = doc(0, "Adapter versions a rollout may lag the learner; versions kept resident = this + 1.", ge=0)
    on_stale: Literal["drop", "regenerate"] = doc("drop", "A group from outside the window: drop | regenerate (sample "
                                                          "it again); counted.")
    cpu_cores: str = doc("", 'CPU ids for each sampler and its vLLM threads, e.g. "0" or "0-3"; "" = every core it '
                             "may use (split with the learner in async mode).", free=True)
    separate_engine: bool | None = doc(None, "Run vLLM's engine core and worker in processes of their own (vLLM's "
                                             "default); null: on GPUs only (on CPUs the engine runs inside the sampler, "
                                             "with no inter-process hop per decoding step).", free=True)
    max_restarts: int = doc(3, "Times Ray restarts a sampler that died; its lost groups are sampled again. 0: a death "
                               "ends the run.", free=True, ge=0)
    restart_timeout_s: float = doc(600.0, "How long to wait for a restarted sampler to come back (its engine starts).", free=True, gt=0)
    oversample: int = doc(-1, "run.mode=stream: groups kept in flight beyond what the window's steps take, so the "
                              "learner never waits on the tail; -1: prompts_per_step / 2.", free=True, ge=-1)
    filter_zero_signal: bool = doc(False, "Dynamic sampling (DAPO): leave out groups whose rewards are all equal "
                                          "and sample more until a step has prompts_per_step groups with signal "
                                          "(run.mode sync or stream).")
    filter_on: Literal["correctness", "reward"] = doc(
        "correctness", "What filter_zero_signal compares within a group: correctness (the grader's scores, before "
                       "reward shaping; DAPO, verl) | reward (the shaped rewards trained on: a group all wrong but of "
                       "different lengths or formats counts as signal).")
    max_draws_per_step: int = doc(0, "With filter_zero_signal: the most finished groups a step looks at; when "
                                     "reached, zero-signal groups fill the step (counted). 0: 4 x prompts_per_step.", ge=0)
    length_profile: Literal["", "longtail"] = doc("", "Benchmarks: force each completion's length (rollout/lengths.py; "
                                                      "longtail: log-normal, median max_tokens/8, 5% at max_tokens) "
                                                      "so that every mode does the same work; '': the model's own.")


@dataclass(frozen=True)
class LossConfig:
    """The objective's options, each off by default and each combinable (learner/loss.py has the
    formulas and their precedence; docs/objective.md the papers and how ours departs)."""

    ratio_cap: float | None = doc(None, "Truncated importance sampling (TIS; Ionides 2008, Yao et al. 2025): each "
                                        "token's coefficient is min(ratio, this), e.g. 2.0; None: no cap.", ge=1)
    clip_eps: float | None = doc(None, "PPO's clipping (Schulman et al. 2017) of the ratio to [1 - eps, 1 + eps]: a "
                                       "token whose ratio is past the bound in its advantage's direction gets no "
                                       "gradient; also the upper eps unless clip_eps_high is set. None: no clipping.",
                                 gt=0, le=1)
    clip_eps_high: float | None = doc(None, "The upper eps alone (DAPO's clip-higher, Yu et al. 2025, e.g. 0.28 with "
                                            "clip_eps 0.2); None: clip_eps.", gt=0)
    dual_clip: float | None = doc(None, "Dual-clip PPO (Ye et al. 2020): a token with a negative advantage and a "
                                        "ratio above this (e.g. 3.0) gets no gradient; None: off.", gt=1)
    ratio_mask: float | None = doc(None, "Masked importance sampling (MIS; Liu, Li et al. 2025): tokens (or "
                                         "sequences: mask_level) whose ratio leaves [1/C, C] are left out of the loss "
                                         "instead of capped, e.g. 2.0; None: off.", gt=1)
    mask_level: Literal["token", "sequence"] = doc("token", "What ratio_mask leaves out: single tokens, or whole "
                                                            "completions by their length-normalised ratio.")
    ratio_level: Literal["token", "sequence"] = doc(
        "token", "token: each token's own ratio | sequence: every token takes its completion's length-normalised "
                 "ratio exp(mean log ratio) (GSPO, Zheng et al. 2025; with normalizer sequence_mean, as GSPO).")
    std_normalize: bool = doc(False, "Divide group-centred advantages by the group's population std (over its G "
                                     "rewards) + 1e-6 (GRPO; an all-equal group stays 0).")
    normalizer: Literal["sequences", "tokens", "sequence_mean", "none"] = doc(
        "sequences",
        "Divisor of the token sum: sequences (number of completions; Dr. GRPO) | tokens (number of tokens; DAPO) | "
        "sequence_mean (each completion's tokens averaged, then / completions; GRPO, GSPO) | none.",
    )


@dataclass(frozen=True)
class LearnerConfig:
    lr: float = doc(1e-3, "Adam learning rate (LoRA wants ~10x the full fine-tuning rate); 0: a frozen control arm.",
                    ge=0)
    weight_decay: float = doc(0.0, "AdamW weight decay.", ge=0)
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 means no clipping.", ge=0)
    micro_batch_size: int = doc(16, "Most completions per forward/backward pass; the step accumulates over all.", free=True, ge=1)
    max_tokens_per_micro: int = doc(8192, "Most padded tokens (prompt + completion, x completions) per micro-batch; "
                                          "completions go longest first; a longer one goes alone. 0: "
                                          "micro_batch_size completions in batch order.", free=True, ge=0)
    logprob_chunk: int = doc(512, "Tokens per block of the LM head and logsumexp, applied only where completion "
                                  "tokens are predicted; 0: full logits at every position (V floats per token).", free=True, ge=0)
    gradient_checkpointing: bool = doc(True, "Recompute each layer's activations in backward instead of keeping "
                                             "them (~1/3 more compute, a fraction of the memory per token).", free=True)
    zero_stage: Literal[0, 1, 2] = doc(0, "DeepSpeed ZeRO stage.")
    num_cpus: float = doc(1.0, "CPUs reserved in Ray for the learner actor.", free=True, ge=0)
    num_gpus: float = doc(0.0, "GPUs per learner rank (0 on CPU).", free=True, ge=0)
    world_size: int = doc(1, "Data-parallel learner ranks (one DeepSpeed group); the batch is split across them.", ge=1)
    resources: dict[str, float] = doc({}, "Custom Ray resources per learner rank, to place them.", free=True, ge=0)
    cpu_cores: str = doc("", 'CPU ids the learner is pinned to, e.g. "1" or "4-7", one torch thread each; "" = every '
                             "core it may use (split with the samplers in async and stream mode on CPUs).", free=True)
    kl_base_every: int = doc(0, "Every N steps, the KL of the policy to the base model (learner/kl_base), from one "
                                "more forward pass of the batch with the adapter disabled; 0: never. LoRA only.",
                             free=True, ge=0)
    max_skipped_steps: int = doc(3, "A step with a non-finite loss or gradient is skipped (counted); this many in a "
                                    "row end the run with an error, after a checkpoint of the last good state.", free=True, ge=1)


@dataclass(frozen=True)
class RewardConfig:
    fn: str = doc("rewards.math:reward", 'Reward fn(completion, sample) -> float | dict of components, as '
                                         '"module:function" or "path/to/file.py:function".')
    num_workers: int = doc(2, "Grader processes.", free=True, ge=1)
    timeout_s: float = doc(5.0, "Hard deadline per completion; a late grade scores 0 and is counted.", free=True, gt=0)
    format_weight: float = doc(0.0, "Shaping: + this much for an answer in a balanced \\boxed{} (rewards/shaping.py).", ge=0)
    overlong_buffer: int = doc(0, "Shaping: penalise the last N tokens before rollout.max_tokens linearly; 0 = off.", ge=0)
    overlong_penalty: float = doc(1.0, "Shaping: the overlong penalty at max_tokens (and for a cut completion).", ge=0)


@dataclass(frozen=True)
class SyncConfig:
    max_message_mb: float = doc(256.0, "Largest adapter message a sampler accepts, in MiB.", free=True, gt=0)
    chunk_mb: float = doc(64.0, "Full fine-tuning: the full weights travel in messages of at most this many MiB "
                                "(a tensor above it alone in one).", free=True, gt=0)
    ack_timeout_s: float = doc(60.0, "How long the learner waits for every sampler to acknowledge a version.",
                               free=True, gt=0)
    wire_dtype: Literal["float32", "bfloat16"] = doc("float32", "Adapter dtype on the wire: bfloat16 halves the bytes "
                                                                "(~1e-3 log-prob drift).")
    probe_every: int = doc(0, "Run the log-prob probe after the first sync and every N syncs; 0: first sync only; "
                              "-1: never.", free=True, ge=-1)
    probe_tolerance: float | None = doc(None, "Largest mean |sampler - learner| log-prob gap the probe accepts, in "
                                              "nats; None: from model.dtype and sync.wire_dtype (rl/probe.py "
                                              "argues the values).", free=True, gt=0)


@dataclass(frozen=True)
class EvalConfig:
    extra: dict[str, str] = doc({}, "More held-out sets, name -> path (read like data.eval), logged as eval/<name>/*.")
    samples: int = doc(4, "Completions per prompt at rollout.temperature for pass@k and mean@n; 0: greedy only.", ge=0)
    k: int = doc(4, "k of pass@k, estimated without bias from eval.samples completions (k <= samples).", ge=1)
    best_metric: str = doc("", "The metric (higher is better) whose best value's adapter is kept in "
                               "run_dir/best_adapter; \"\": eval/select/accuracy with data.select_size, else "
                               "eval/accuracy.")


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = doc(False, "Also write TensorBoard event files to run_dir/tensorboard.")
    wandb: bool = doc(False, "Also log to Weights & Biases (pip install .[loggers]).")
    wandb_project: str = doc("rl-lora", "W&B project.")
    wandb_mode: Literal["online", "offline"] = doc("online", "W&B mode: offline needs no network (`wandb sync` later).")
    samples_every: int = doc(25, "Log a table of sample completions (prompt, completion, reward, advantage) every "
                                 "N steps; 0: never.", ge=0)
    samples: int = doc(8, "Completions in each sample table.", ge=1)


@dataclass(frozen=True)
class RunConfig:
    steps: int = doc(60, "RL steps (one optimiser step each).", free=True, ge=0)
    placement: Literal["pack", "spread"] = doc("pack", "Ray placement of learner ranks and samplers: pack (fill nodes; colocate when "
                                 "they fit) | spread (one per node where possible).", free=True)
    placement_timeout_s: float = doc(300.0, "How long to wait for the cluster to place every actor.", free=True, gt=0)
    mode: Literal["sync", "async", "stream"] = doc(
        "sync", "sync: sample, train, publish in turn | async: samplers generate the next batches while the learner "
                "trains, at most rollout.max_staleness versions behind | stream: groups flow one at a time to "
                "whichever sampler has room and back as they finish; each step trains on the first "
                "prompts_per_step finished inside the window (rl/stream.py).")
    seed: int = doc(0, "Seed for data order, sampling and initialisation.", ge=0)
    eval_every: int = doc(0, "Evaluate every N steps; 0 means only before and after training.", free=True, ge=0)
    output_dir: str = doc("runs", "Parent folder of run directories.", free=True)
    name: str = doc("", 'Run directory name under output_dir; "" means a timestamp.', free=True)
    progress: bool = doc(True, "Show a progress bar with the current reward.", free=True)
    checkpoint_every: int = doc(50, "Checkpoint every N steps (also at the end and on SIGTERM/SIGINT); 0: only then.", free=True, ge=0)
    keep_checkpoints: int = doc(2, "Newest complete checkpoints kept in run_dir/checkpoints; older ones are deleted.", free=True, ge=1)
    resume: str = doc("auto", "auto: continue from the run directory's newest complete checkpoint, if any | never: "
                              "refuse a run directory that has checkpoints | a checkpoint folder to start from.", free=True)
    resume_allow: tuple[str, ...] = doc((), "Config keys that may differ from the checkpoint's (e.g. [learner.lr]); "
                                            '["all"] allows any change.', free=True)


@dataclass(frozen=True)
class ArmsConfig:
    grid: dict[str, typing.Any] = doc({}, "Arms of a sweep: dotted key -> list of values; every combination is an "
                                          "arm (rl/arms.py says what may vary). {}: no grid.")
    list: tuple[dict[str, typing.Any], ...] = doc((), "Arms of a sweep, each a mapping of dotted keys to values "
                                                       "with an optional name; with a grid, each is combined with "
                                                       "every grid point. (): none.")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = doc(ModelConfig(), "The base model.")
    lora: LoraConfig = doc(LoraConfig(), "The trained adapter.")
    data: DataConfig = doc(DataConfig(), "Prompts and gold answers.")
    rollout: RolloutConfig = doc(RolloutConfig(), "Sampling with vLLM.")
    loss: LossConfig = doc(LossConfig(), "The policy-gradient objective.")
    learner: LearnerConfig = doc(LearnerConfig(), "Optimisation with DeepSpeed.")
    reward: RewardConfig = doc(RewardConfig(), "Grading.")
    sync: SyncConfig = doc(SyncConfig(), "The adapter channel.")
    eval: EvalConfig = doc(EvalConfig(), "Held-out evaluation (every run.eval_every steps).", free=True)
    logging: LogConfig = doc(LogConfig(), "Where metrics go besides metrics.jsonl.", free=True)
    run: RunConfig = doc(RunConfig(), "The loop and the run directory.")
    arms: ArmsConfig = doc(ArmsConfig(), "Many experiments in one job: one adapter per arm on one fleet "
                                          "(rl/arms.py); each arm checks its own config on resume.", free=True)

    def __post_init__(self):
        for key, value, metadata in _bounded_leaves(self):
            check_bounds(key, value, metadata)
        check(self.lora.rank > 0 or 0 < self.sync.chunk_mb <= self.sync.max_message_mb,
              "full fine-tuning (lora.rank 0) sends the weights in chunks of sync.chunk_mb: it must be > 0 and <= "
              "sync.max_message_mb")
        check(self.model.dtype != "float16",
              "model.dtype=float16 would train without loss scaling (gradients underflow in float16); use bfloat16, "
              "which has float32's range, or float32")
        check(self.rollout.top_p == 1.0,
              f"rollout.top_p={self.rollout.top_p}: vLLM's log-probs are then renormalised over the nucleus and the "
              "learner's over the whole vocabulary, so every importance ratio is biased (at most 1 on the sampler's "
              "tokens) and no ratio corrects for the tokens the nucleus cut; sample with top_p 1 (the learner "
              "does not compute truncated log-probs)")
        check(self.learner.kl_base_every == 0 or self.lora.rank > 0,
              "learner.kl_base_every needs LoRA (lora.rank >= 1): the KL to the base model comes from disabling the "
              "adapter, and full fine-tuning keeps no copy of the base model")
        check(self.data.select_size == 0 or "select" not in self.eval.extra,
              "eval.extra.select: the name is taken by the selection set of data.select_size")
        check(self.rollout.max_tokens < self.model.max_model_len,
              f"rollout.max_tokens ({self.rollout.max_tokens}) must be < model.max_model_len "
              f"({self.model.max_model_len}): a prompt needs room too")
        for key, part in ("learner", self.learner), ("rollout", self.rollout):
            check(part.num_cpus > 0 or part.num_gpus > 0 or any(part.resources.values()),
                  f"{key}.num_cpus, num_gpus or resources must reserve something (Ray bundles cannot be empty)")
        check(self.rollout.num_gpus <= 1 or self.rollout.num_gpus == int(self.rollout.num_gpus),
              "rollout.num_gpus above 1 must be a whole number (vLLM's tensor parallel size)")
        check(self.rollout.separate_engine is not False or self.rollout.num_gpus <= 1,
              "rollout.separate_engine=false runs one engine process: rollout.num_gpus must be <= 1")
        for key, cores in ("rollout.cpu_cores", self.rollout.cpu_cores), ("learner.cpu_cores", self.learner.cpu_cores):
            check(not cores or re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", cores),
                  f'{key} must list CPU ids like "0", "0,2" or "0-3", got {cores!r}')
        check_template(self.data.template)
        check(self.data.eval_size > 0 or self.data.eval != "arithmetic",
              "data.eval_size must be > 0 for the generated arithmetic eval split")
        check(":" in self.reward.fn, 'reward.fn must look like "module:function" or "path/to/file.py:function"')
        check(self.eval.samples == 0 or self.eval.k <= self.eval.samples,
              "eval.k must be between 1 and eval.samples")
        check(self.eval.samples > 0 or self.eval.k == EvalConfig.k,
              f"eval.k={self.eval.k} with eval.samples=0: pass@k needs sampled completions (eval.samples >= k); "
              "with greedy evaluation only, leave eval.k unset")
        check(self.run.mode != "sync" or self.rollout.max_staleness == 0,
              f"rollout.max_staleness={self.rollout.max_staleness} with run.mode=sync: sync mode samples every "
              "batch on the newest adapter, so it never lags; set run.mode=async or stream for staleness")
        if self.run.mode != "sync" and self.learner.cpu_cores and self.rollout.cpu_cores:
            both = sorted(parse_cpus(self.learner.cpu_cores) & parse_cpus(self.rollout.cpu_cores))
            check(not both, f"learner.cpu_cores ({self.learner.cpu_cores!r}) and rollout.cpu_cores "
                            f"({self.rollout.cpu_cores!r}) share CPUs {both}: in run.mode={self.run.mode} the "
                            "learner and the samplers run at once, and would contend for them")
        check(self.run.mode != "stream" or self.lora.rank > 0,
              "run.mode=stream needs LoRA (lora.rank >= 1): full weights load in place, under running requests")
        check(self.run.mode != "stream" or not (self.arms.grid or self.arms.list),
              "run.mode=stream runs one experiment: an arms section needs run.mode sync or async")
        check(not self.rollout.filter_zero_signal or self.run.mode != "async",
              "rollout.filter_zero_signal needs run.mode sync or stream (async samples whole batches ahead)")
        check(self.rollout.max_draws_per_step == 0 or self.rollout.max_draws_per_step >= self.rollout.prompts_per_step,
              "rollout.max_draws_per_step must be 0 or >= rollout.prompts_per_step")
        check(self.reward.overlong_buffer < self.rollout.max_tokens,
              "reward.overlong_buffer must be < rollout.max_tokens")


def _bounded_leaves(cfg: Config):
    """(dotted key, value, metadata) of every leaf field of the config's sections."""
    for section in dataclasses.fields(cfg):
        part = getattr(cfg, section.name)
        for f in dataclasses.fields(part):
            yield f"{section.name}.{f.name}", getattr(part, f.name), f.metadata


BOUNDS = {">=": operator.ge, ">": operator.gt, "<=": operator.le}


def check_bounds(key: str, value, metadata):
    """A number within its field's declared bounds (each value of a mapping; None passes), and no
    float NaN or infinite anywhere; the ConfigError names the key, the value and the field's doc."""
    bounds = metadata.get("bounds", ())
    items = [(f"{key}.{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)]
    for name, v in items:
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{name} must be a finite number, got {v!r}")
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if number and not all(BOUNDS[op](v, b) for op, b in bounds):
            raise ConfigError(f"{name} must be {' and '.join(f'{op} {b}' for op, b in bounds)}, got {v!r} "
                              f"({metadata['doc']})")


def check_template(template: str):
    """data.template: text with {prompt} (once or more) and no other field; a literal brace is
    written {{ or }} (str.format's rules, which render it)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as e:
        raise ConfigError(f"data.template {template!r}: {e} (write {{{{ and }}}} for a literal brace)") from None
    specs = sorted({"{" + name + ("!" + conv if conv else "") + (":" + spec if spec else "") + "}"
                    for _, name, spec, conv in string.Formatter().parse(template) if name is not None and (spec or conv)})
    check(not specs, f"data.template: {', '.join(specs)} formats the prompt; write it as {{prompt}}, plain (a format "
                     "spec such as {prompt:>3000000} pads or cuts every prompt)")
    others = sorted({"{" + name + "}" for name in fields if name != "prompt"})
    check(not others, f"data.template {template!r} may use only {{prompt}}, the problem text (read from the "
                      f"data.prompt_key field of a file row), not {', '.join(others)}; write {{{{ and }}}} for a "
                      "literal brace")
    check(fields, f"data.template {template!r} must contain {{prompt}}, the problem text")


def check(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def _coerce(value, tp, key: str):
    """Return value as type tp, or raise ConfigError naming the key."""
    if tp is typing.Any:  # checked where it is used (the arms section: rl/arms.py)
        return value
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices or type(value) is not type(choices[0]):
            raise ConfigError(f"{key} must be one of {' | '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key + ".")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp)
        return {_coerce(k, key_type, key): _coerce(v, value_type, f"{key}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, _) = typing.get_args(tp)
        return tuple(_coerce(v, inner, key) for v in value)
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML 1.1 reads "1e-3" as a string
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _build(cls, values: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in values.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value):
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {part} is not a section")
    node[parts[-1]] = value


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's SafeLoader, refusing a key given twice in one mapping (SafeLoader keeps the last
    one silently: a second `learner:` section would replace the first without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges: its keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):  # refused by SafeLoader below
                continue
            if key in seen:
                raise yaml.constructor.ConstructorError("while constructing a mapping", node.start_mark,
                                                        f"found duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(text: str, name: str = "<string>"):
    """One YAML document with UniqueKeyLoader; `name` is the file its error marks name."""
    loader = UniqueKeyLoader(text)
    loader.name = name
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def read_text(path: str | Path) -> str:
    """A UTF-8 file's text; a byte that is not UTF-8 raises a ConfigError naming the file and line."""
    raw = Path(path).read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") \
            from None


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides (values parsed as YAML)."""
    tree: dict = {}
    if path is not None:
        text = read_text(path)
        try:
            tree = load_yaml(text, str(path)) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = load_yaml(raw, f"override {key.strip()}") if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {e}") from None
        _set_dotted(tree, key.strip(), value)
    where = f" (config {path}{' + command-line overrides' if overrides else ''})" if path else ""
    try:
        cfg = _build(Config, tree)
        from rl.arms import expand  # light; imports this module

        expand(cfg)  # each arm's config is checked too, now rather than after Ray starts
        return cfg
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None


def with_values(cfg: Config, values: dict[str, typing.Any], where: str = "") -> Config:
    """cfg with dotted keys set to values, typed and checked as a config file's would be."""
    tree = to_dict(cfg)
    for key, value in values.items():
        section, _, name = key.partition(".")
        if section not in tree or not isinstance(tree[section], dict) or name not in tree[section]:
            raise ConfigError(f"{where}unknown config key {key}")
        tree[section][name] = value
    try:
        return _build(Config, tree)
    except ConfigError as e:
        raise ConfigError(f"{where}{e}") from None


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain YAML-able data."""

    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(cfg))


def free_keys(cls=Config, prefix: str = "", section_free: bool = False) -> frozenset[str]:
    """The dotted keys marked free on resume (`doc(..., free=True)`), a free section's keys included."""
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        free = section_free or f.metadata.get("free", False)
        if dataclasses.is_dataclass(hints[f.name]):
            keys |= free_keys(hints[f.name], prefix + f.name + ".", free)
        elif free:
            keys.add(prefix + f.name)
    return frozenset(keys)


def describe(cls=Config, prefix: str = "") -> list[str]:
    """One line per leaf field: key, type, default and doc (for --help)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, prefix + f.name + ".")
        else:
            if typing.get_origin(tp) is Literal:
                type_name = " | ".join(map(str, typing.get_args(tp)))
            else:
                type_name = getattr(tp, "__name__", str(tp).replace("typing.", ""))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            free = " Free on resume." if prefix + f.name in FREE_ON_RESUME else ""
            bounds = "".join(f", {op} {b}" for op, b in f.metadata.get("bounds", ()))
            lines.append(f"{prefix}{f.name} ({type_name}, default {default!r}{bounds}): {f.metadata['doc']}{free}")
    return lines


FREE_ON_RESUME = free_keys()  # derived once from the fields' metadata
