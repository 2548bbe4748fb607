"""The one typed config tree of a run.

Every field carries a one-line doc (units, and what 0 or None means). YAML files in
`configs/` set only what differs from these defaults; the command line adds dotted
`key=value` overrides on top. Unknown keys and values of the wrong type raise a
`ConfigError` that names the key. Light module: no torch, vLLM, DeepSpeed or Ray.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the config tree."""


def doc(default, text: str, **kw):
    """A dataclass field with its one-line doc kept in the field's metadata."""
    if isinstance(default, list):
        raise TypeError("use a tuple for sequence defaults")
    if isinstance(default, dict):  # a fresh (empty) mapping per instance
        return field(default_factory=lambda: dict(default), metadata={"doc": text}, **kw)
    return field(default=default, metadata={"doc": text}, **kw)


@dataclass(frozen=True)
class ModelConfig:
    path: str = doc("tiny", 'HF model path or hub id; "tiny" builds (and caches) the local CPU model.')
    dtype: str = doc("float32", "Weights dtype for sampler and learner: float32 | bfloat16 | float16.")
    max_model_len: int = doc(256, "Longest prompt + completion, in tokens.")
    cache_dir: str = doc("", 'Where the "tiny" model is cached; "" means ~/.cache/rl-lora.')


@dataclass(frozen=True)
class LoraConfig:
    rank: int = doc(1, "LoRA rank r.")
    alpha: float = doc(32.0, "LoRA alpha; the update is scaled by alpha / rank.")
    target_modules: tuple[str, ...] = doc(
        ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        "Linear layers that get an adapter (attention and MLP by default).",
    )


@dataclass(frozen=True)
class DataConfig:
    train: str = doc("arithmetic", 'Training prompts: "arithmetic" (generated), a .jsonl/.parquet file or a '
                                   "Hugging Face datasets folder (save_to_disk, or a snapshot of .parquet/.jsonl files).")
    eval: str = doc("arithmetic", 'Held-out prompts: "arithmetic" (a disjoint generated split) or a path.')
    train_split: str = doc("train", "The split read from a datasets folder for data.train.")
    eval_split: str = doc("test", "The split read from a datasets folder for data.eval.")
    prompt_key: str = doc("prompt", "Field of a file row that holds the problem text.")
    answer_key: str = doc("answer", "Field of a file row that holds the gold answer.")
    template: str = doc("Question: {prompt}\nAnswer:", "Prompt template; {prompt} is the problem text.")
    chat_template: bool = doc(False, "Wrap the templated prompt as a user turn in the tokenizer's chat template.")
    on_bad_row: str = doc("error", "A row with a missing or wrong-typed field: error (naming file, row, key) | skip "
                                   "(counted and logged).")
    eval_size: int = doc(200, "Held-out prompts per evaluation; 0 means all of the eval split.")


@dataclass(frozen=True)
class RolloutConfig:
    num_samplers: int = doc(1, "Sampler actors, each owning one vLLM engine.")
    prompts_per_step: int = doc(8, "Prompts (groups) per training step.")
    group_size: int = doc(8, "Completions sampled per prompt (G).")
    temperature: float = doc(1.0, "Sampling temperature; the learner divides its logits by the same value.")
    top_p: float = doc(1.0, "Nucleus sampling; < 1 truncates the sampler distribution (the ratio corrects it).")
    max_tokens: int = doc(48, "Longest completion, in tokens.")
    kv_cache_gb: float = doc(0.25, "KV cache per sampler in GiB; 0 means vLLM sizes it from gpu_memory_utilization.")
    gpu_memory_utilization: float = doc(0.9, "vLLM's share of GPU memory (used when kv_cache_gb is 0).")
    enforce_eager: bool = doc(True, "Run vLLM eagerly: no torch.compile or CUDA graphs (fast start, slower steps).")
    num_cpus: float = doc(1.0, "CPUs reserved in Ray for each sampler actor.")
    num_gpus: float = doc(0.0, "GPUs per sampler actor (0 on CPU); more than 1 means vLLM tensor parallelism.")
    resources: dict[str, float] = doc({}, 'Custom Ray resources per sampler, e.g. {"sampler_node": 1}, to place them.')
    max_staleness: int = doc(0, "Adapter versions a rollout may lag the learner; versions kept resident = this + 1.")
    on_stale: str = doc("drop", "A group from outside the window: drop | regenerate (sample it again); counted.")
    cpu_cores: str = doc("", 'CPU ids for each sampler and its vLLM threads, e.g. "0" or "0-3"; "" = every core it '
                             "may use (split with the learner in async mode).")
    separate_engine: bool | None = doc(None, "Run vLLM's engine core and worker in processes of their own (vLLM's "
                                             "default); null: on GPUs only (on CPUs the engine runs inside the sampler, "
                                             "with no inter-process hop per decoding step).")
    max_restarts: int = doc(3, "Times Ray restarts a sampler that died; its lost groups are sampled again. 0: a death "
                               "ends the run.")
    restart_timeout_s: float = doc(600.0, "How long to wait for a restarted sampler to come back (its engine starts).")


@dataclass(frozen=True)
class LossConfig:
    ratio_cap: float | None = doc(None, "Truncate the importance ratio at this value (TIS, e.g. 2.0); None: no cap.")
    clip_eps: float | None = doc(None, "PPO-style clipping of the ratio to [1-eps, 1+eps]; None: no clipping.")
    std_normalize: bool = doc(False, "Divide group-centred advantages by the group's reward std.")
    normalizer: str = doc(
        "sequences",
        "Divisor of the token sum: sequences (number of completions) | tokens (number of tokens) | none.",
    )


@dataclass(frozen=True)
class LearnerConfig:
    lr: float = doc(1e-3, "Adam learning rate (LoRA wants ~10x the full fine-tuning rate).")
    weight_decay: float = doc(0.0, "AdamW weight decay.")
    grad_clip: float = doc(1.0, "Clip the global gradient norm to this; 0 means no clipping.")
    micro_batch_size: int = doc(16, "Most completions per forward/backward pass; the step accumulates over all.")
    max_tokens_per_micro: int = doc(8192, "Most padded tokens (prompt + completion, x completions) per micro-batch; "
                                          "completions go longest first; a longer one goes alone. 0: "
                                          "micro_batch_size completions in batch order.")
    logprob_chunk: int = doc(512, "Tokens per block of the LM head and logsumexp, applied only where completion "
                                  "tokens are predicted; 0: full logits at every position (V floats per token).")
    gradient_checkpointing: bool = doc(True, "Recompute each layer's activations in backward instead of keeping "
                                             "them (~1/3 more compute, a fraction of the memory per token).")
    zero_stage: int = doc(0, "DeepSpeed ZeRO stage (0, 1 or 2).")
    num_cpus: float = doc(1.0, "CPUs reserved in Ray for the learner actor.")
    num_gpus: float = doc(0.0, "GPUs per learner rank (0 on CPU).")
    world_size: int = doc(1, "Data-parallel learner ranks (one DeepSpeed group); the batch is split across them.")
    resources: dict[str, float] = doc({}, "Custom Ray resources per learner rank, to place them.")
    cpu_cores: str = doc("", 'CPU ids the learner is pinned to, e.g. "1" or "4-7", one torch thread each; "" = every '
                             "core it may use (split with the samplers in async mode).")
    max_skipped_steps: int = doc(3, "A step with a non-finite loss or gradient is skipped (counted); this many in a "
                                    "row end the run with an error, after a checkpoint of the last good state.")


@dataclass(frozen=True)
class RewardConfig:
    fn: str = doc("rewards.math:reward", 'Reward fn(completion, sample) -> float | dict of components, as '
                                         '"module:function" or "path/to/file.py:function".')
    num_workers: int = doc(2, "Grader processes.")
    timeout_s: float = doc(5.0, "Hard deadline per completion; a late grade scores 0 and is counted.")
    format_weight: float = doc(0.0, "Shaping: + this much for an answer in a balanced \\boxed{} (rewards/shaping.py).")
    overlong_buffer: int = doc(0, "Shaping: penalise the last N tokens before rollout.max_tokens linearly; 0 = off.")
    overlong_penalty: float = doc(1.0, "Shaping: the overlong penalty at max_tokens (and for a cut completion).")


@dataclass(frozen=True)
class SyncConfig:
    max_message_mb: float = doc(256.0, "Largest adapter message a sampler accepts, in MiB.")
    ack_timeout_s: float = doc(60.0, "How long the learner waits for every sampler to acknowledge a version.")
    wire_dtype: str = doc("float32", "Adapter dtype on the wire: float32 | bfloat16 (half the bytes, ~1e-3 log-prob drift).")
    probe_every: int = doc(0, "Run the log-prob probe after the first sync and every N syncs; 0: first sync only; -1: never.")
    probe_tolerance: float = doc(1e-3, "Largest mean |sampler - learner| log-prob gap the probe accepts, in nats.")


@dataclass(frozen=True)
class EvalConfig:
    extra: dict[str, str] = doc({}, "More held-out sets, name -> path (read like data.eval), logged as eval/<name>/*.")
    samples: int = doc(4, "Completions per prompt at rollout.temperature for pass@k and mean@n; 0: greedy only.")
    k: int = doc(4, "k of pass@k, estimated without bias from eval.samples completions (k <= samples).")
    best_metric: str = doc("eval/accuracy", "The metric (higher is better) whose best value's adapter is kept "
                                            "in run_dir/best_adapter.")


@dataclass(frozen=True)
class LogConfig:
    tensorboard: bool = doc(False, "Also write TensorBoard event files to run_dir/tensorboard.")
    wandb: bool = doc(False, "Also log to Weights & Biases (pip install .[loggers]).")
    wandb_project: str = doc("rl-lora", "W&B project.")
    wandb_mode: str = doc("online", "W&B mode: online | offline (no network; `wandb sync` later).")
    samples_every: int = doc(25, "Log a table of sample completions (prompt, completion, reward, advantage) every "
                                 "N steps; 0: never.")
    samples: int = doc(8, "Completions in each sample table.")


@dataclass(frozen=True)
class RunConfig:
    steps: int = doc(60, "RL steps (one optimiser step each).")
    placement: str = doc("pack", "Ray placement of learner ranks and samplers: pack (fill nodes; colocate when "
                                 "they fit) | spread (one per node where possible).")
    placement_timeout_s: float = doc(300.0, "How long to wait for the cluster to place every actor.")
    mode: str = doc("sync", "sync: sample, train, publish in turn | async: samplers generate the next batches "
                            "while the learner trains, at most rollout.max_staleness versions behind.")
    seed: int = doc(0, "Seed for data order, sampling and initialisation.")
    eval_every: int = doc(0, "Evaluate every N steps; 0 means only before and after training.")
    output_dir: str = doc("runs", "Parent folder of run directories.")
    name: str = doc("", 'Run directory name under output_dir; "" means a timestamp.')
    progress: bool = doc(True, "Show a progress bar with the current reward.")
    checkpoint_every: int = doc(50, "Checkpoint every N steps (also at the end and on SIGTERM/SIGINT); 0: only then.")
    keep_checkpoints: int = doc(2, "Newest complete checkpoints kept in run_dir/checkpoints; older ones are deleted.")
    resume: str = doc("auto", "auto: continue from the run directory's newest complete checkpoint, if any | never: "
                              "refuse a run directory that has checkpoints | a checkpoint folder to start from.")
    resume_allow: tuple[str, ...] = doc((), "Config keys that may differ from the checkpoint's (e.g. [learner.lr]); "
                                            '["all"] allows any change.')


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
    eval: EvalConfig = doc(EvalConfig(), "Held-out evaluation (every run.eval_every steps).")
    logging: LogConfig = doc(LogConfig(), "Where metrics go besides metrics.jsonl.")
    run: RunConfig = doc(RunConfig(), "The loop and the run directory.")

    def __post_init__(self):
        check(self.lora.rank >= 1, "lora.rank must be >= 1")
        check(self.model.dtype in ("float32", "bfloat16", "float16"), "model.dtype must be float32|bfloat16|float16")
        check(self.rollout.group_size >= 2, "rollout.group_size must be >= 2 (advantages are group-centred)")
        check(self.rollout.temperature > 0, "rollout.temperature must be > 0")
        check(0 < self.rollout.top_p <= 1, "rollout.top_p must be in (0, 1]")
        check(self.loss.normalizer in ("sequences", "tokens", "none"), "loss.normalizer must be sequences|tokens|none")
        check(self.loss.ratio_cap is None or self.loss.ratio_cap >= 1, "loss.ratio_cap must be >= 1 or null")
        check(self.loss.clip_eps is None or self.loss.clip_eps > 0, "loss.clip_eps must be > 0 or null")
        check(self.learner.zero_stage in (0, 1, 2), "learner.zero_stage must be 0, 1 or 2")
        check(self.learner.micro_batch_size >= 1, "learner.micro_batch_size must be >= 1")
        check(self.learner.max_tokens_per_micro >= 0, "learner.max_tokens_per_micro must be >= 0 (0: off)")
        check(self.learner.logprob_chunk >= 0, "learner.logprob_chunk must be >= 0 (0: full logits)")
        check(self.sync.wire_dtype in ("float32", "bfloat16"), "sync.wire_dtype must be float32 or bfloat16")
        check(self.rollout.num_samplers >= 1, "rollout.num_samplers must be >= 1")
        check(self.run.steps >= 0, "run.steps must be >= 0")
        check(self.run.mode in ("sync", "async"), "run.mode must be sync or async")
        check(self.run.placement in ("pack", "spread"), "run.placement must be pack or spread")
        check(self.learner.world_size >= 1, "learner.world_size must be >= 1")
        for key, part in ("learner", self.learner), ("rollout", self.rollout):
            check(part.num_cpus > 0 or part.num_gpus > 0 or any(part.resources.values()),
                  f"{key}.num_cpus, num_gpus or resources must reserve something (Ray bundles cannot be empty)")
        check(self.rollout.num_gpus <= 1 or self.rollout.num_gpus == int(self.rollout.num_gpus),
              "rollout.num_gpus above 1 must be a whole number (vLLM's tensor parallel size)")
        check(self.rollout.max_staleness >= 0, "rollout.max_staleness must be >= 0")
        check(self.rollout.separate_engine is not False or self.rollout.num_gpus <= 1,
              "rollout.separate_engine=false runs one engine process: rollout.num_gpus must be <= 1")
        check(self.rollout.on_stale in ("drop", "regenerate"), "rollout.on_stale must be drop or regenerate")
        for key, cores in ("rollout.cpu_cores", self.rollout.cpu_cores), ("learner.cpu_cores", self.learner.cpu_cores):
            check(not cores or re.fullmatch(r"\d+(-\d+)?(,\d+(-\d+)?)*", cores),
                  f'{key} must list CPU ids like "0", "0,2" or "0-3", got {cores!r}')
        check(self.data.eval_size > 0 or self.data.eval != "arithmetic",
              "data.eval_size must be > 0 for the generated arithmetic eval split")
        check(":" in self.reward.fn, 'reward.fn must look like "module:function" or "path/to/file.py:function"')
        check(self.data.on_bad_row in ("error", "skip"), "data.on_bad_row must be error or skip")
        check(self.eval.samples == 0 or 0 < self.eval.k <= self.eval.samples,
              "eval.k must be between 1 and eval.samples")
        check(self.logging.wandb_mode in ("online", "offline"), "logging.wandb_mode must be online or offline")
        check(self.run.checkpoint_every >= 0, "run.checkpoint_every must be >= 0")
        check(self.run.keep_checkpoints >= 1, "run.keep_checkpoints must be >= 1")
        check(self.rollout.max_restarts >= 0, "rollout.max_restarts must be >= 0")
        check(self.learner.max_skipped_steps >= 1, "learner.max_skipped_steps must be >= 1")
        check(0 <= self.reward.overlong_buffer < self.rollout.max_tokens,
              "reward.overlong_buffer must be >= 0 and < rollout.max_tokens")


def pin_cpus(spec: str) -> int:
    """Pin every thread of this process (and the processes it starts) to the CPU ids in a
    `cpu_cores` value ("0", "0,2", "0-3"); returns how many."""
    import os

    cores = set()
    for part in spec.split(","):
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    for tid in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(tid), cores)
    return len(cores)


def check(ok: bool, message: str):
    if not ok:
        raise ConfigError(message)


def _coerce(value, tp, key: str):
    """Return value as type tp, or raise ConfigError naming the key."""
    origin = typing.get_origin(tp)
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


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults, then the YAML file, then `key=value` overrides (values parsed as YAML)."""
    tree: dict = {}
    if path is not None:
        text = Path(path).read_text()
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw.strip() else "")
    where = f" (config {path}{' + command-line overrides' if overrides else ''})" if path else ""
    try:
        return _build(Config, tree)
    except ConfigError as e:
        raise ConfigError(f"{e}{where}") from None


def to_dict(cfg: Config) -> dict:
    """The resolved config as plain YAML-able data."""

    def plain(x):
        if isinstance(x, tuple):
            return [plain(v) for v in x]
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        return x

    return plain(dataclasses.asdict(cfg))


def describe(cls=Config, prefix: str = "") -> list[str]:
    """One line per leaf field: key, type, default and doc (for --help)."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines += describe(tp, prefix + f.name + ".")
        else:
            type_name = getattr(tp, "__name__", str(tp).replace("typing.", ""))
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{prefix}{f.name} ({type_name}, default {default!r}): {f.metadata['doc']}")
    return lines
