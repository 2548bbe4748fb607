"""What each actor is built from: plain typed values, derived once by the driver.

The driver turns the config tree into one spec per actor (rl/fleet.py), computing there what
the actor would otherwise derive itself (accumulation steps, vLLM's LoRA rank, where vLLM's
engine runs) and printing it; the actors read attributes of their spec, never the config.
Light module: no torch, vLLM, DeepSpeed or Ray.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class Objective:
    """One arm's policy-gradient objective (loss.* in the config; learner/loss.py says what each does)."""

    normalizer: str = "sequences"  # sequences | tokens | sequence_mean | none
    ratio_level: str = "token"  # token | sequence (GSPO)
    ratio_cap: float | None = None  # TIS: coefficient min(ratio, cap)
    clip_low: float | None = None  # PPO: A < 0 and ratio < 1 - clip_low: no gradient
    clip_high: float | None = None  # PPO: A > 0 and ratio > 1 + clip_high: no gradient
    dual_clip: float | None = None  # A < 0 and ratio > dual_clip: no gradient
    ratio_mask: float | None = None  # MIS: ratio outside [1/C, C]: left out
    mask_level: str = "token"  # token | sequence


@dataclass(frozen=True)
class AdapterSpec:
    """One arm's adapter in the learner: its shape, its optimiser and its objective."""

    arm: str  # "" in a run without arms (rl/arms.py)
    lora: LoraSpec  # rank 0: full fine-tuning (no adapter: every weight of the model is trained)
    seed: int  # the adapter's initialisation
    lr: float
    weight_decay: float
    grad_clip: float  # 0: none
    temperature: float
    objective: Objective


@dataclass(frozen=True)
class LearnerSpec:
    model_path: str
    dtype: str  # torch dtype name: float32 | bfloat16 | float16
    adapters: tuple[AdapterSpec, ...]  # one per arm: an adapter on the shared frozen base, or (rank 0) a model copy of its own
    seed: int
    world_size: int  # learner ranks in the process group
    # optimisation
    zero_stage: int
    micro_batch_size: int  # most completions per forward/backward
    max_tokens_per_micro: int  # most padded tokens per micro-batch; 0: by count only
    accumulation_steps: int  # micro-batches of micro_batch_size in one rank's share of a step (DeepSpeed's bookkeeping)
    logprob_chunk: int  # 0: full logits
    gradient_checkpointing: bool
    cpu_cores: str  # "" = every core this process may use
    kl_base_every: int  # every N steps the KL to the base model (adapters disabled); 0: never
    # the adapter channel
    wire_dtype: str  # float32 | bfloat16
    ack_timeout_s: float
    chunk_bytes: int  # full fine-tuning: the most payload bytes per weights message


@dataclass(frozen=True)
class SamplerSpec:
    model_path: str
    dtype: str
    max_model_len: int
    seed: int
    max_lora_rank: int  # the smallest rank vLLM accepts that holds every arm's lora.rank
    full_weights: bool  # full fine-tuning: the learner sends the model's weights, no LoRA
    arms: tuple[str, ...]  # the arms it serves ("" alone in a run without arms)
    resident_adapters: int  # versions kept loaded per arm: max_staleness + 1 (vLLM's max_loras: x arms)
    max_num_seqs: int  # sequences vLLM runs at once (CPU: a step's completions of every arm, at least 256)
    kv_cache_bytes: int  # 0: vLLM sizes it from gpu_memory_utilization
    gpu_memory_utilization: float
    enforce_eager: bool
    tensor_parallel_size: int
    on_gpu: bool
    separate_engine: bool  # vLLM's engine core and worker in processes of their own
    cpu_cores: str  # "" = every core this process may use
    max_message_bytes: int
    # Where the adapter channel binds: "127.0.0.1" when the Ray cluster is one node, "" for the
    # sampler's node's own address (never every interface).
    channel_host: str = ""
