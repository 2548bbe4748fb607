"""The Learner actor: transformers + PEFT LoRA inside a DeepSpeed engine.

It trains the adapter with the importance-corrected policy gradient (learner/loss.py) and,
after each optimiser step, ships the adapter's tensors to every sampler as one versioned,
authenticated message (rollout/channel.py), returning once all of them acknowledged. With
lora.rank 0 it trains every weight of the model instead (full fine-tuning, the baseline
LoRA is measured against) and ships the full weights, in chunks of sync.chunk_mb.
DeepSpeed runs with the gloo backend on CPU (NCCL on GPU); the optimiser is torch's AdamW
handed to DeepSpeed, which avoids compiling DeepSpeed's own CPU Adam op.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import socket
import tempfile
import time
from pathlib import Path

import torch

from common.cpus import pin_cpus
from common.records import Datum, Published
from common.specs import AdapterSpec, LearnerSpec
from learner.flops import Shape
from learner.logprobs import micro_batches, output_head, sequence_logprobs
from learner.loss import STAT_KEYS, denominator, k3, policy_gradient_loss
from rollout.channel import AdapterSender, Unacknowledged, encode, version_digest

ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def release_stale_build_locks(root: Path | None = None, min_age_s: float = 60.0) -> list[Path]:
    """Remove torch's extension build locks that no process on this machine holds.

    DeepSpeed builds its ops with torch's cpp_extension, which takes <build dir>/lock by
    creating it and holding it open for the build; every other process waits, for ever, while
    the file exists. A builder killed mid-build (an OOM kill) leaves the file, and every later
    learner on the machine hangs at start. A lock that is min_age_s old and that no process
    here has open is such a leftover: removed, and named. (A build directory shared with other
    machines would hide their holders: set TORCH_EXTENSIONS_DIR to a local path there.)"""
    from torch.utils.cpp_extension import get_default_build_root

    root = (root or Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())).resolve()
    locks = [p for p in root.glob("**/lock") if time.time() - p.stat().st_mtime >= min_age_s] if root.is_dir() else []
    if not locks:
        return []
    held = set()
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        try:
            held.add(os.readlink(fd))
        except OSError:  # the process or descriptor went away, or is not ours to read
            pass
    removed = []
    for lock in locks:
        if str(lock) not in held:
            lock.unlink(missing_ok=True)
            removed.append(lock)
            print(f"removed {lock}: a build lock that no process holds (its builder was killed); "
                  "it would make this learner wait for ever", flush=True)
    return removed


def rank_store(address: str, port: int, rank: int, world_size: int) -> torch.distributed.Store:
    """The ranks' rendezvous store: torch's TCPStore, whose server (in rank 0) listens on
    `address` alone. Given only a port, torch's server binds every interface; given a socket
    bound here, it listens on that one (tests/test_integration.py checks rank 0's listeners)."""
    if rank:
        return torch.distributed.TCPStore(address, port, world_size, is_master=False)
    listener = socket.create_server((address, port), family=socket.AF_INET6 if ":" in address else socket.AF_INET)
    return torch.distributed.TCPStore(address, port, world_size, is_master=True, wait_for_workers=False,
                                      master_listen_fd=listener.detach())  # torch owns the socket from here


def rendezvous() -> tuple[str, int]:
    """This node's address and a free port on it: run as a Ray task where rank 0 will live."""
    import ray

    address = ray.util.get_node_ip_address()
    return address, _free_port(address)


def encode_tensors(version: int, step: int, named: list[tuple[str, torch.Tensor]], config: dict,
                   secret: bytes, arm: str = "", chunk: int = 0, chunks: int = 1) -> list[bytes]:
    """Channel frames for named CPU tensors (their raw bytes, dtype kept)."""
    tensors = [(k, ST_DTYPES[v.dtype], tuple(v.shape), v.contiguous().view(torch.uint8).numpy().tobytes())
               for k, v in named]
    return encode(version, step, tensors, config, secret, arm, chunk, chunks)


def weight_chunks(named: list[tuple[str, torch.Tensor]], chunk_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive tensors (model order: vLLM loads a layer once all its weights arrived) in
    groups of at most chunk_bytes; a bigger tensor goes alone."""
    chunks, size = [[]], 0
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if chunks[-1] and size + nbytes > chunk_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append((name, t))
        size += nbytes
    return chunks


def reset_peak_memory():
    """Start a new high-water mark: the GPU allocator's, or on CPU the process's resident set's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
    except OSError:
        pass  # elsewhere the mark runs from the process's start


def peak_memory_gb() -> float:
    """The high-water mark since reset_peak_memory: on GPUs the tensors allocated (weights,
    gradients, optimiser state, activations); on CPU the whole process's resident memory."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def disable_dropout(model: torch.nn.Module) -> int:
    """Dropout off in every module, for good: RL's log-probs are the policy's, and the ratio and
    the probe compare them with the sampler's, which has none. Training mode turns dropout on
    (and HF's checkpointing needs training mode), so the rates themselves go to 0: nn.Dropout's
    p, and the float *dropout* attributes attention modules read in training mode
    (`attention_dropout`). Returns how many were non-zero."""
    changed = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p:
            module.p, changed = 0.0, changed + 1
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and value:
                setattr(module, name, 0.0)
                changed += 1
    return changed


def by_arm(seqs: list[Datum]) -> dict[str, list[int]]:
    """Arm -> the indices of its completions, arms in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, s in enumerate(seqs):
        out.setdefault(s.arm, []).append(i)
    return out


class SkippableAdamW(torch.optim.AdamW):
    """AdamW whose next step can be skipped entirely: a step on zeroed gradients would still
    decay Adam's moments and count towards its bias correction."""

    skip = False

    def step(self, closure=None):
        return None if self.skip else super().step(closure)


def merge_metrics(results: list[dict]) -> dict:
    """The step's metrics from each rank's sums (`Learner.train_shard`)."""
    totals = {k: sum(r["totals"][k] for r in results) for k in results[0]["totals"]}
    totals["ratio_max"] = max(r["totals"]["ratio_max"] for r in results)
    tokens, sq, seconds = max(totals["tokens"], 1), totals["ratio_sq_sum"], max(r["seconds"] for r in results)
    # The sampler/learner mismatch split by cause: on groups of the learner's own version it is
    # numerics alone (dtypes, kernels); on stale groups numerics and the versions' lag.
    split = {f"learner/mismatch_kl_{part}": totals[f"kl_{part}_sum"] / totals[f"tokens_{part}"]
             for part in ("current", "stale") if totals[f"tokens_{part}"]}
    if totals["kl_base_tokens"]:
        split["learner/kl_base"] = totals["kl_base_sum"] / totals["kl_base_tokens"]
    return {**split,
        "learner/loss": totals["loss"] / len(results),  # each rank's loss is scaled by the world size
        "learner/ratio_mean": totals["ratio_sum"] / tokens,
        "learner/ratio_max": totals["ratio_max"],
        # Effective sample size of the token ratios as a fraction of the tokens: 1 when on-policy.
        "learner/ratio_ess": totals["ratio_sum"] ** 2 / (tokens * sq) if sq else 1.0,
        "learner/mismatch_kl": totals["kl_sum"] / tokens,  # KL(sampler || learner) per token, k3 estimator
        "learner/entropy": totals["entropy_sum"] / tokens,  # of the policy, per token, at the temperature
        # Tokens whose coefficient an objective option changed (learner/loss.py), by option and side.
        **{f"learner/{k}_frac": totals[k] / tokens for k in ("capped", "clipped_low", "clipped_high", "dual_clipped",
                                                             "masked_low", "masked_high")},
        # The share of padding in the forward passes (prompt and completion positions).
        "learner/pad_frac": 1 - totals["positions"] / totals["padded"] if totals["padded"] else 0.0,
        "learner/grad_norm": results[0]["grad_norm"],  # before clipping; gradients are averaged over ranks
        "learner/tokens_per_s": totals["tokens"] / seconds,
        "learner/peak_mem_gb": max(r["peak_mem_gb"] for r in results),
        "learner/skipped": int(results[0]["skipped"]),  # a non-finite loss or gradient: no update this step
        "time/learn": seconds,
    }


def rng_states() -> dict:
    """This process's RNG states as plain JSON data (no pickle in checkpoints)."""
    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": torch.get_rng_state().tolist(),
            "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def set_rng_states(states: dict):
    import numpy as np

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(states["torch"], dtype=torch.uint8))
    if states["cuda"]:
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in states["cuda"]])


class Arm:
    """One adapter of the learner (or, with lora.rank 0, the whole model): its spec, PEFT
    name, parameters and version stream."""

    def __init__(self, spec: AdapterSpec, peft_name: str, named: list[tuple[str, torch.nn.Parameter]], model=None):
        self.spec, self.peft_name, self.model = spec, peft_name, model  # model: the one its forward runs
        self.full = spec.lora.rank == 0
        self.names = [n if self.full else n.replace(f".{peft_name}.", ".") for n, _ in named]  # as PEFT saves them
        self.params = [p for _, p in named]
        self.version = 0
        self.step = 0
        self.frames: list[bytes] = []  # the last published version, for catch-up (LoRA)
        self.published = -1  # the last version published


class Learner:
    """One rank of the learner. Rank 0 is the learner the driver talks to: it splits each
    step's batch across its peers (`attach_peers`), trains its own share, merges the metrics,
    and alone publishes the adapter. DeepSpeed averages the gradients across ranks.

    It trains one adapter per arm (rl/arms.py; one, arm "", in a run without arms) on one
    frozen copy of the base model: PEFT holds them side by side and each forward activates
    one. An arm with lora.rank 0 has no adapter: every weight of a model of its own trains
    (a copy of the base, made before PEFT wraps it; in a sweep as many copies as such arms).
    The optimiser has one parameter group per arm (its learning rate and weight decay; Adam's
    state is per parameter, so the arms' updates are independent). With several arms,
    gradient clipping and the skip of a non-finite step are per arm: a skipped arm's gradients
    are dropped, and AdamW leaves a parameter without a gradient untouched (state included).
    """

    def __init__(self, spec: LearnerSpec, secret: bytes, rank: int = 0, master: tuple[str, int] | None = None):
        """spec: what this learner is built from (common/specs.py, made by rl/fleet.py);
        secret: the run's adapter-channel key, handed out by the driver through Ray;
        master: rank 0's (node address, port) for the process group, found through Ray
        (`rl/fleet.py`); None for a single rank on this node."""
        release_stale_build_locks()  # before DeepSpeed builds or loads its ops
        import deepspeed
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        self.spec, self.secret = spec, secret
        # Ray starts an actor with OMP_NUM_THREADS = its num_cpus (1 here), which would leave the
        # other cores idle while the sampler waits in the sync loop: one torch thread per core
        # this process may run on (learner.cpu_cores pins it to fewer).
        torch.set_num_threads(pin_cpus(spec.cpu_cores) if spec.cpu_cores else len(os.sched_getaffinity(0)))
        torch.manual_seed(spec.seed)
        dtype = getattr(torch, spec.dtype)
        model = AutoModelForCausalLM.from_pretrained(spec.model_path, dtype=dtype)
        model.config.use_cache = False  # the learner scores whole sequences: no KV cache
        if disable_dropout(model):
            print("learner: the model's dropout is off (the policy's log-probs have none)", flush=True)
        if spec.logprob_chunk:
            output_head(model)  # refuses a model whose logits are transformed after its head, now
        if spec.gradient_checkpointing:
            # Non-reentrant: reentrant checkpointing needs an input that requires grad, and with
            # adapters the embeddings are frozen.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.shape = Shape.of(model)  # for learner/flops
        lora, full = [a for a in spec.adapters if a.lora.rank > 0], [a for a in spec.adapters if a.lora.rank == 0]
        arms: dict[str, Arm] = {}
        for k, a in enumerate(full):  # the loaded model itself serves one when no adapter needs it frozen
            own = model if k == 0 and not lora else copy.deepcopy(model)
            arms[a.arm] = Arm(a, "", list(own.named_parameters()), own)
        for i, a in enumerate(lora):
            name = "default" if i == 0 else f"arm{i}"  # PEFT's names; an arm's name need not be an identifier
            config = LoraConfig(r=a.lora.rank, lora_alpha=a.lora.alpha, target_modules=list(a.lora.target_modules),
                                lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
            torch.manual_seed(a.seed)  # each adapter's initialisation depends on its own seed only
            if i == 0:
                model = get_peft_model(model, config)
            else:
                model.add_adapter(name, config)
            arms[a.arm] = Arm(a, name, [(n, p) for n, p in model.named_parameters() if f".{name}." in n])
        for a in lora:
            arms[a.arm].model = model  # PEFT's, with every adapter
        self.arms = {a.arm: arms[a.arm] for a in spec.adapters}  # in the spec's order
        # DeepSpeed's engine holds the adapters' model (or the one full fine-tuning model);
        # other models of full fine-tuning arms train beside it with the same optimiser.
        self.model, self._active = model if lora else arms[full[0].arm].model, None
        self._activate(next(iter(self.arms)))
        # One process group for the learner's ranks (each rank sees one GPU, as Ray assigns them).
        self.rank, self.world_size = rank, spec.world_size if master else 1
        address, port = master or ("127.0.0.1", _free_port())
        os.environ.update(MASTER_ADDR=address, MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK="0",
                          WORLD_SIZE=str(self.world_size))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        # One rank needs no rendezvous: an in-memory store, nothing listens (tests/test_hosts.py).
        store = rank_store(address, port, rank, self.world_size) if master else torch.distributed.HashStore()
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=self.world_size)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # joins the group made above
        self.peers: list = []  # ranks 1.. (rank 0 only)
        groups = [{"params": arm.params, "lr": arm.spec.lr, "weight_decay": arm.spec.weight_decay}
                  for arm in self.arms.values()]
        self.optimizer = SkippableAdamW(groups, lr=spec.adapters[0].lr)
        one = len(self.arms) == 1
        ds_config = {
            "train_micro_batch_size_per_gpu": spec.micro_batch_size,
            # Only sizes DeepSpeed's batch bookkeeping: each step marks its last micro-batch as the
            # boundary itself (train_shard), since their number varies with the lengths.
            "gradient_accumulation_steps": spec.accumulation_steps,
            # One arm: DeepSpeed clips (it holds the gradients under ZeRO 1/2 and bf16). Several
            # (ZeRO 0): each arm's gradient is clipped alone (train_shard).
            "gradient_clipping": spec.adapters[0].grad_clip if one else 0.0,
            "zero_optimization": {"stage": spec.zero_stage},
            "zero_allow_untested_optimizer": True,  # ZeRO knows AdamW by exact type; ours only adds the skip
            # Several arms: no DeepSpeed bf16 optimizer (its fp32 copies own the gradients); PEFT
            # keeps adapters in float32 over a bf16 base, and AdamW steps them directly.
            "bf16": {"enabled": dtype == torch.bfloat16 and one},
            "steps_per_print": 10**9,
        }
        self.engine, *_ = deepspeed.initialize(model=self.model, optimizer=self.optimizer, config=ds_config)
        self.sender = AdapterSender(secret)  # CURVE-authenticated; its key is derived from the secret
        self.serving: dict[str, set[str]] = {}  # endpoint -> the arms its sampler serves

    def _mode(self, train: bool):
        """Training or evaluation mode for DeepSpeed's model and every full fine-tuning arm's."""
        self.engine.train(train)
        for arm in self.arms.values():
            arm.model.train(train)

    def _activate(self, arm: str):
        """Make `arm`'s adapter the one forward passes use (and the only one with gradients)."""
        if self._active != arm and not self.arms[arm].full:
            self.model.set_adapter(self.arms[arm].peft_name)
            self._active = arm

    # -- the adapter ------------------------------------------------------------------
    def _adapter_tensors(self, arm: str) -> list[tuple[str, torch.Tensor]]:
        from peft import get_peft_model_state_dict

        if self.arms[arm].full:  # the weights themselves, in the model's order
            return [(n, p.detach().contiguous().cpu()) for n, p in zip(self.arms[arm].names, self.arms[arm].params)]
        state = get_peft_model_state_dict(self.engine.module, adapter_name=self.arms[arm].peft_name)
        return sorted((k, v.detach().contiguous().cpu()) for k, v in state.items())

    def _weight_messages(self, arm: Arm, digests: list[str]):
        """Full fine-tuning: the chunks of the weights' current version, each encoded (in
        sync.wire_dtype) only as it is sent; their payload digests are appended to `digests`."""
        dtype = getattr(torch, self.spec.wire_dtype)
        named = [(n, p.detach()) for n, p in zip(arm.names, arm.params)]
        chunks = weight_chunks(named, self.spec.chunk_bytes * arm.params[0].element_size() // dtype.itemsize)
        for i, part in enumerate(chunks):
            frames = encode_tensors(arm.version, arm.step, [(n, t.to(dtype).cpu()) for n, t in part], {}, self.secret,
                                    arm.spec.arm, i, len(chunks))
            digests.append(json.loads(frames[0])["payload_sha256"])
            yield frames

    def _wire_tensors(self, arm: str) -> list[tuple[str, torch.Tensor]]:
        """The adapter as it travels: in sync.wire_dtype (bfloat16 halves the bytes)."""
        dtype = getattr(torch, self.spec.wire_dtype)
        return [(k, v.to(dtype)) for k, v in self._adapter_tensors(arm)]

    def manifest(self, arm: str = "") -> dict:
        """Tensor name -> [safetensors dtype, shape]: what samplers check an arm's messages against."""
        return {k: [ST_DTYPES[v.dtype], list(v.shape)] for k, v in self._wire_tensors(arm)}

    def manifests(self) -> dict[str, dict]:
        """Every arm's manifest."""
        return {arm: self.manifest(arm) for arm in self.arms}

    def peft_config_dict(self, arm: str = "") -> dict:
        if self.arms[arm].full:
            return {}
        d = self.engine.module.peft_config[self.arms[arm].peft_name].to_dict()
        return {k: (sorted(v) if isinstance(v, set) else v) for k, v in d.items()}

    def connect(self, endpoints: list[str], arms: list[tuple[str, ...]] | None = None):
        """Samplers to publish to; arms: what each serves (a sweep's full fine-tuning arms have
        engines of their own), every arm when not given."""
        self.sender.connect(endpoints)
        for i, endpoint in enumerate(endpoints):
            self.serving[endpoint] = set(arms[i]) if arms else set(self.arms)

    def _endpoints(self, arms: list[Arm]) -> list[str]:
        """The connected samplers that serve any of these arms."""
        names = {a.spec.arm for a in arms}
        return [ep for ep, served in self.serving.items() if served & names]

    def publish(self, arms: list[str] | None = None) -> list[Published]:
        """Send each arm's current adapter (all arms, or `arms`) as its version `arm.version` to
        every sampler that serves it; wait for all acks. A full fine-tuning arm sends its
        weights, in chunks (`_publish_weights`).

        Latency runs from "the learner has new weights" (serialisation included) to "every
        sampler serves them". The adapters' frames are kept for samplers that join later.
        Samplers that did not acknowledge within sync.ack_timeout_s, or failed to load a valid
        version, are listed in `missing` (the driver restarts them and catches them up); the
        metrics include what the samplers refused (sync/refused_messages, sync/refused_connections).
        """
        start = time.perf_counter()
        chosen = [self.arms[a] for a in (self.arms if arms is None else arms)]
        adapters = [arm for arm in chosen if not arm.full]
        out = {}
        if adapters:
            for arm in adapters:
                arm.frames = encode_tensors(arm.version, arm.step, self._wire_tensors(arm.spec.arm),
                                            self.peft_config_dict(arm.spec.arm), self.secret, arm.spec.arm)
            missing: tuple[str, ...] = ()
            try:
                metrics = self.sender.publish([arm.frames for arm in adapters], self.spec.ack_timeout_s,
                                              self._endpoints(adapters))
            except Unacknowledged as e:  # a sampler died (or hangs): the driver restarts it or stops the run
                missing, metrics = tuple(e.missing), {"sync/bytes": sum(len(f) for a in adapters for f in a.frames)}
            metrics["sync/latency_ms"] = 1e3 * (time.perf_counter() - start)
            metrics.update(self.sender.refusals())  # what the samplers refused so far, in every step's metrics
            for arm in adapters:
                arm.published = arm.version
                out[arm.spec.arm] = Published(arm.spec.arm, arm.version, json.loads(arm.frames[0])["payload_sha256"],
                                              missing, {**metrics, "sync/version": arm.version})
        for arm in chosen:
            if arm.full:
                out[arm.spec.arm] = self._publish_weights(arm, time.perf_counter())
        return [out[arm.spec.arm] for arm in chosen]

    def _publish_weights(self, arm: Arm, start: float) -> Published:
        """publish for full fine-tuning: the weights in chunks, one in flight at a time."""
        digests: list[str] = []
        messages = self._weight_messages(arm, digests)
        missing: tuple[str, ...] = ()
        try:
            metrics = self.sender.publish_chunks(messages, self.spec.ack_timeout_s, self._endpoints([arm]))
        except Unacknowledged as e:
            for _ in messages:  # the chunks no sampler got still make the version's digest
                pass
            missing, metrics = tuple(e.missing), {"sync/bytes": sum(p.numel() * p.element_size() for p in arm.params)}
        metrics["sync/latency_ms"] = 1e3 * (time.perf_counter() - start)
        metrics.update(self.sender.refusals())
        arm.published = arm.version
        return Published(arm.spec.arm, arm.version, version_digest(digests), missing,
                         {**metrics, "sync/version": arm.version, "sync/chunks": len(digests)})

    def disconnect(self, endpoint: str):
        self.sender.disconnect(endpoint)
        self.serving.pop(endpoint, None)

    def catch_up(self, endpoint: str, arms: list[str] | None = None) -> dict:
        """Bring a sampler that started late (or restarted) to the latest version of every arm
        it serves (`arms`; all when not given) before it gets prompts."""
        self.connect([endpoint], [tuple(arms if arms is not None else self.arms)])
        chosen = [self.arms[a] for a in (arms if arms is not None else self.arms)]
        frames = [arm.frames for arm in chosen if not arm.full and arm.frames]
        metrics = self.sender.publish(frames, self.spec.ack_timeout_s, [endpoint]) if frames else {}
        for arm in chosen:
            # A full fine-tuning arm's weights are its published version's until the next
            # train_step; after one (the async loop samples beside the learner) they are already
            # the next version's, which the next publish brings to this sampler too: it waits.
            if arm.full and arm.published >= 0 and arm.version == arm.published:
                metrics = self.sender.publish_chunks(self._weight_messages(arm, []), self.spec.ack_timeout_s,
                                                     [endpoint])
        return metrics

    # -- training ---------------------------------------------------------------------
    def logprobs(self, seqs: list[Datum], temperature: float | None = None) -> list[list[float]]:
        """Per-token completion log-probs under each one's arm's current adapter (no grad), at
        the arm's temperature unless another is given (the probe tries others to diagnose a
        mismatch)."""
        self._mode(train=False)
        out: list = [None] * len(seqs)
        with torch.no_grad():
            for arm, indices in by_arm(seqs).items():
                self._activate(arm)
                lp, mask, _ = sequence_logprobs(self.arms[arm].model, [seqs[i] for i in indices],
                                                temperature or self.arms[arm].spec.temperature, self.spec.logprob_chunk)
                for i, row, m in zip(indices, lp, mask):
                    out[i] = row[: int(m.sum())].tolist()
        return out

    def attach_peers(self, peers: list):
        """Rank 0 only: the handles of ranks 1..N-1, in rank order."""
        self.peers = list(peers)

    def train_step(self, seqs: list[Datum], arms: list[str] | None = None) -> dict[str, dict]:
        """One optimiser step over all completions (common/records.py `Datum`s), each on its
        arm's adapter; the metrics of each arm in the batch, and of each arm in `arms` (an arm
        with no completion left, e.g. all of its grades timed out, steps on a zero gradient).

        With peers (one arm only), completion i goes to rank i % world_size; every rank
        normalises by the whole step's size, so the averaged gradient is the one-rank gradient.
        Every rank runs as many micro-batches as the busiest one (ZeRO 2 reduces gradients in
        each backward, collectively), the others padding with empty ones.
        """
        import ray

        shards = [seqs[r::self.world_size] for r in range(self.world_size)]
        counts = {arm: (len(ix), sum(len(seqs[i].tokens) for i in ix)) for arm, ix in by_arm(seqs).items()}
        counts.update({arm: (0, 0) for arm in arms or () if arm not in counts})
        counts = counts or {next(iter(self.arms)): (0, 0)}
        n_micro = max(len(self._micro_batches(shard)) for shard in shards)
        pending = [peer.train_shard.remote(shard, counts, n_micro) for peer, shard in zip(self.peers, shards[1:])]
        results = [self.train_shard(shards[0], counts, n_micro)] + (ray.get(pending) if pending else [])
        out = {arm: merge_metrics([r[arm] for r in results]) for arm in counts}
        for arm, ix in by_arm(seqs).items():  # learner/flops.py has the formula
            lora = self.arms[arm].spec.lora
            lengths = [(len(seqs[i].prompt_ids) + len(seqs[i].tokens), len(seqs[i].tokens)) for i in ix]
            out[arm]["learner/flops"] = self.shape.train(lengths, lora.rank, lora.target_modules)
        for metrics in out.values():
            metrics.setdefault("learner/flops", 0.0)
        return out

    def _micro_batches(self, seqs: list[Datum]) -> list[list[int]]:
        """learner.micro_batch_size completions at most, and learner.max_tokens_per_micro padded
        tokens when set (longest first, so that similar lengths share a micro-batch)."""
        return micro_batches([len(s.prompt_ids) + len(s.tokens) for s in seqs], self.spec.micro_batch_size,
                             self.spec.max_tokens_per_micro)

    def train_shard(self, seqs: list[Datum], counts: dict[str, tuple[int, int]], n_micro: int = 1) -> dict:
        """This rank's share of a step; counts: arm -> (completions, tokens) of the whole step;
        n_micro: the micro-batches every rank runs (at least this rank's own; one arm only)."""
        start = time.perf_counter()
        reset_peak_memory()
        self._mode(train=True)
        # (arm, its completions here, micro-batches as indices into them), the step's arms in order.
        plans = []
        for arm in counts:
            mine = [s for s in seqs if s.arm == arm]
            plans.append((arm, mine, self._micro_batches(mine)))
        if len(plans) == 1:
            plans[0][2].extend([] for _ in range(max(n_micro, 1) - len(plans[0][2])))
        last = sum(len(plan) for _, _, plan in plans) - 1
        totals, i = {}, 0
        for arm, mine, plan in plans:
            totals[arm] = self._accumulate(arm, mine, plan, counts[arm], range(i, i + len(plan)), last)
            i += len(plan)
        norms = {arm: self._grad_norm(self.arms[arm]) for arm in counts}
        skipped = self._non_finite({arm: (totals[arm]["loss"], norms[arm]) for arm in counts})
        for name, arm in self.arms.items():
            if len(self.arms) == 1:
                break  # DeepSpeed clips, and the skip below covers the one arm
            if name not in counts or skipped[name]:
                for p in arm.params:
                    p.grad = None  # AdamW steps no parameter without a gradient: weights and state stay
            elif arm.spec.grad_clip > 0 and norms[name] is not None:
                torch.nn.utils.clip_grad_norm_(arm.params, arm.spec.grad_clip)  # this arm's norm alone
        self.optimizer.skip = all(skipped.values())
        self.engine.step()
        # A skipped step leaves weights and optimiser state as they were (ZeRO 1/2 check their
        # own gradient partitions, and skip, when they hold a NaN or inf).
        applied = self.engine.was_step_applied()
        self.optimizer.skip = False
        for a in self.arms.values():
            if a.model is not self.engine.module:  # DeepSpeed clears the gradients of its own model only
                for p in a.params:
                    p.grad = None
        elapsed = time.perf_counter() - start
        out = {}
        for arm in counts:
            a = self.arms[arm]
            a.step += 1
            a.version += 1  # a skipped step still makes a version (the same weights): versions count steps
            norm = norms[arm] if norms[arm] is not None else self.engine.get_global_grad_norm()  # ZeRO 1/2: partitions
            out[arm] = {"totals": totals[arm], "grad_norm": None if norm is None else float(norm), "seconds": elapsed,
                        "skipped": skipped[arm] or not applied, "peak_mem_gb": peak_memory_gb()}
        return out

    def _accumulate(self, arm: str, seqs: list[Datum], plan: list[list[int]], counts: tuple[int, int],
                    positions: range, last: int) -> dict:
        """Forward and backward of one arm's micro-batches (positions: theirs in the step's
        order; `last` is the step's last, the accumulation boundary); the arm's sums."""
        a = self.arms[arm]
        spec = a.spec
        self._activate(arm)
        # DeepSpeed averages gradients over ranks: scale back up to the step's sum / denominator.
        # Each micro-batch's loss is its share of the step's sum / denominator, so the gradient
        # is the same however the completions are grouped into micro-batches.
        denom = denominator(spec.objective.normalizer, *counts) / self.world_size
        totals = dict.fromkeys(STAT_KEYS + ("loss", "entropy_sum", "kl_current_sum", "tokens_current", "kl_stale_sum",
                                            "tokens_stale", "kl_base_sum", "kl_base_tokens"), 0.0)
        sizes = [len(s.prompt_ids) + len(s.tokens) for s in seqs]
        totals["positions"], totals["padded"] = sum(sizes), sum(len(b) * max(sizes[j] for j in b) for b in plan if b)
        # learner.kl_base_every: this step (a.step + 1, as the driver counts) measures the KL to the base model.
        every = self.spec.kl_base_every
        kl_base = not a.full and every > 0 and (a.step + 1) % every == 0
        for position, indices in zip(positions, plan):
            chunk = [seqs[j] for j in indices]
            # The last micro-batch is the accumulation boundary: gradients are reduced there.
            self.engine.set_gradient_accumulation_boundary(position == last)
            if chunk:
                lp, mask, entropy = sequence_logprobs(a.model, chunk, spec.temperature, self.spec.logprob_chunk)
                T = lp.shape[1]
                old = torch.tensor([list(s.sampler_logprobs) + [0.0] * (T - len(s.sampler_logprobs)) for s in chunk])
                adv = torch.tensor([s.advantage for s in chunk])
                loss, stats = policy_gradient_loss(lp, old, adv, mask, denom, spec.objective)
                totals["ratio_max"] = max(totals["ratio_max"], stats["ratio_max"].item())
                for k in STAT_KEYS:
                    if k != "ratio_max":
                        totals[k] += stats[k].item()
                totals["entropy_sum"] += (entropy * mask).sum().item()
                with torch.no_grad():
                    log_ratio = (lp.detach() - old) * mask
                    kl_B = (k3(log_ratio) * mask).sum(1)
                    current = torch.tensor([s.lag == 0 for s in chunk])
                    for part, rows in (("current", current), ("stale", ~current)):
                        totals[f"kl_{part}_sum"] += kl_B[rows].sum().item()
                        totals[f"tokens_{part}"] += mask[rows].sum().item()
                    if kl_base:
                        totals["kl_base_sum"] += self._kl_to_base(a, chunk, lp.detach(), mask)
                        totals["kl_base_tokens"] += mask.sum().item()
            else:  # no completions for this rank (dropped groups, or a busier peer): a zero gradient
                loss = sum(p.sum() for p in self.arms[arm].params) * 0.0
            # The loss is already normalised over the whole step: no extra 1/GAS scaling.
            self.engine.backward(loss, scale_wrt_gas=False)
            totals["loss"] += loss.item()
        return totals

    def _kl_to_base(self, arm: Arm, chunk: list[Datum], lp_B_T: torch.Tensor, mask_B_T: torch.Tensor) -> float:
        """Sum over the tokens of the k3 estimate of KL(policy || base model), with the adapter
        disabled for one more forward pass (no gradient): rho - 1 - log rho, rho = p_base / p_policy,
        >= 0 per token and unbiased for tokens drawn from the policy (here the sampler's, within
        the mismatch the learner/mismatch_kl metrics measure)."""
        with torch.no_grad(), arm.model.disable_adapter():
            base, _, _ = sequence_logprobs(arm.model, chunk, arm.spec.temperature, self.spec.logprob_chunk)
        log_rho = (base - lp_B_T) * mask_B_T
        return (k3(log_rho) * mask_B_T).sum().item()

    def _non_finite(self, values: dict[str, tuple[float, float | None]]) -> dict[str, bool]:
        """Per arm, whether any rank's loss or the (already averaged) gradient is NaN or infinite."""
        bad = {arm: not math.isfinite(loss) or (norm is not None and not math.isfinite(norm))
               for arm, (loss, norm) in values.items()}
        if self.world_size == 1:
            return bad
        flag = torch.tensor([float(b) for b in bad.values()], device=self.engine.device)  # every rank decides alike
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return {arm: bool(f) for arm, f in zip(bad, flag.tolist())}

    def _grad_norm(self, arm: Arm) -> float | None:
        grads = [p.grad for p in arm.params if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item() if grads else None

    # -- checkpoints ------------------------------------------------------------------
    def state_files(self, arm: str = "") -> dict[str, bytes]:
        """An arm's training state as files (name -> bytes); the driver writes them. No pickle:
        arm.safetensors and arm.json (`_arm_state_files`).

        One arm: gathered by every rank at once (under ZeRO the gather is collective), with
        each rank's RNG states as rng-rank<N>.json. Several arms (one rank, ZeRO 0): each
        arm's own, so that each resumes alone."""
        import ray

        if len(self.arms) > 1:
            return self._arm_state_files(self.arms[arm])
        pending = [peer.state_files.remote() for peer in self.peers]
        (one,) = self.arms.values()
        rng = {f"rng-rank{self.rank}.json": json.dumps(rng_states()).encode()}
        if self.rank > 0:
            self._state_tensors(one)  # takes part in the gather; rank 0 saves what it gathered
            return rng
        files = {**self._arm_state_files(one), **rng}
        for peer_files in ray.get(pending):
            files.update(peer_files)
        return files

    def load_state_files(self, files: dict[str, bytes], arm: str = "") -> dict:
        """Resume an arm from `state_files` (every rank loads the same tensors and its own
        RNG states); returns {"step", "version"}."""
        import ray

        if "arm.safetensors" not in files or any(name.endswith(".pt") for name in files):
            raise ValueError(f"not the learner's state files: {sorted(files)}; a checkpoint in DeepSpeed's own "
                             "format (pickle files) is never loaded")
        if len(self.arms) > 1:
            return self._load_arm_state(self.arms[arm], files)
        pending = [peer.load_state_files.remote(files) for peer in self.peers]
        (one,) = self.arms.values()
        out = self._load_arm_state(one, files)
        rng = files.get(f"rng-rank{self.rank}.json")
        if rng is None:  # saved by fewer ranks (run.resume_allow): training draws no random numbers anyway
            print(f"learner rank {self.rank}: no RNG states in the checkpoint; keeping this process's", flush=True)
        else:
            set_rng_states(json.loads(rng))
        ray.get(pending)
        return out

    def _flat(self, arm: Arm) -> torch.Tensor | None:
        """The float32 tensor the optimiser steps for this arm's parameters where DeepSpeed
        keeps one (ZeRO 1/2 and its bf16 optimizer flatten a parameter group into a master
        copy, a partition of it on each rank), with its AdamW state linked to the parameters
        (`safe_get_full_optimizer_state` reads it through that link, which DeepSpeed makes at
        its first step, and once only: made again here). None where AdamW steps the
        parameters themselves (ZeRO 0 without bf16)."""
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        if not hasattr(arm.params[0], "_hp_mapping"):
            return None
        (flat,) = self.optimizer.param_groups[list(self.arms).index(arm.spec.arm)]["params"]
        if "exp_avg" in self.optimizer.state.get(flat, {}):
            lazy_init_hp_params_optimizer_state(arm.params, flat, self.optimizer.state)
        return flat

    def _stepped(self, arm: Arm) -> list[torch.Tensor]:
        """Outside ZeRO 1/2 (`_flat` is None), for each of the arm's parameters the tensor AdamW
        steps and keys its state by: the parameter itself, or under DeepSpeed's bf16 optimizer at
        ZeRO 0 (FP16_UnfusedOptimizer: bf16 weights and gradients) the float32 master copy it
        keeps in the parameter's place in fp32_groups (safe_get_full_fp32_param knows only
        ZeRO's and BF16_Optimizer's copies: it returns None there)."""
        wrapper = self.engine.optimizer
        if wrapper is self.optimizer or not hasattr(wrapper, "fp32_groups"):
            return list(arm.params)
        group = list(self.arms).index(arm.spec.arm)
        masters = {id(lp): hp for lp, hp in zip(wrapper.fp16_groups[group], wrapper.fp32_groups[group])}
        return [masters.get(id(p), p) for p in arm.params]

    def _state_tensors(self, arm: Arm) -> dict[str, torch.Tensor]:
        """weight/<name>: the trainable weights (DeepSpeed's float32 master copy where it keeps
        one); exp_avg/, exp_avg_sq/ and step/<name>: AdamW's state, absent before a first step.
        Names are as PEFT saves them (the model's with full fine-tuning); every rank calls this."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        flat, tensors = self._flat(arm), {}
        for name, p, stepped in zip(arm.names, arm.params, self._stepped(arm)):
            if flat is None:
                tensors[f"weight/{name}"] = stepped.detach()
                for key, value in self.optimizer.state.get(stepped, {}).items():  # step, exp_avg, exp_avg_sq
                    tensors[f"{key}/{name}"] = value
                continue
            tensors[f"weight/{name}"] = safe_get_full_fp32_param(p)
            if "exp_avg" in self.optimizer.state.get(flat, {}):
                for key in ("exp_avg", "exp_avg_sq"):
                    tensors[f"{key}/{name}"] = safe_get_full_optimizer_state(p, key)
                tensors[f"step/{name}"] = self.optimizer.state[flat]["step"]  # one per group
        return {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}

    def _arm_state_files(self, arm: Arm) -> dict[str, bytes]:
        """arm.safetensors (`_state_tensors`) and arm.json: the arm's step and version, and
        DeepSpeed's step counters (its own checkpoint restored them too)."""
        from safetensors.torch import save

        engine = {k: getattr(self.engine, k) for k in ("global_steps", "global_samples", "skipped_steps")}
        meta = {"arm": arm.spec.arm, "step": arm.step, "version": arm.version, "engine": engine}
        return {"arm.safetensors": save(self._state_tensors(arm)), "arm.json": json.dumps(meta).encode()}

    def _load_arm_state(self, arm: Arm, files: dict[str, bytes]) -> dict:
        """Put back what `_arm_state_files` saved: weights (the model's and DeepSpeed's master
        copy), AdamW's state (AdamW's own start, zero moments at step 0, where none was saved:
        a step from it is the step from no state) and the counters."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
        from safetensors.torch import load

        tensors, meta = load(files["arm.safetensors"]), json.loads(files["arm.json"])
        if sorted(k for k in tensors if k.startswith("weight/")) != sorted(f"weight/{n}" for n in arm.names):
            raise ValueError(f"arm {arm.spec.arm!r}: the checkpoint holds other adapter tensors than this arm's "
                             "(another lora.rank or lora.target_modules?)")
        for key, t in tensors.items():
            kind, _, name = key.partition("/")
            p = arm.params[arm.names.index(name)] if name in arm.names else None
            if p is None or kind not in ("weight", "exp_avg", "exp_avg_sq", "step") or (
                    t.shape != (() if kind == "step" else p.shape)):
                raise ValueError(f"arm {arm.spec.arm!r}: unexpected tensor {key} {list(t.shape)} in arm.safetensors")
        flat = self._flat(arm)
        with torch.no_grad():
            for name, p, stepped in zip(arm.names, arm.params, self._stepped(arm)):
                weight = tensors[f"weight/{name}"]
                p.copy_(weight)  # bf16 under DeepSpeed's bf16 optimizers: rounded as their own steps round it
                if flat is None:
                    stepped.copy_(weight)
                    self.optimizer.state.pop(stepped, None)
                    state = {key: tensors[f"{key}/{name}"] for key in ("step", "exp_avg", "exp_avg_sq")
                             if f"{key}/{name}" in tensors}
                    if state:
                        self.optimizer.state[stepped] = {k: v if k == "step" else v.to(stepped.device, stepped.dtype)
                                                         for k, v in state.items()}
                else:
                    safe_set_full_fp32_param(p, weight.to(flat.device))
            if flat is not None:
                state = self.optimizer.state[flat]
                if "exp_avg" not in state:  # a fresh engine: AdamW makes its state at its first step
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat),
                                 exp_avg_sq=torch.zeros_like(flat))
                flat = self._flat(arm)  # links the parameters to that state
                steps = {tensors[f"step/{n}"].item() for n in arm.names if f"step/{n}" in tensors} or {0.0}
                if len(steps) > 1:
                    raise ValueError(f"arm {arm.spec.arm!r}: AdamW steps differ between parameters: {sorted(steps)}")
                state["step"] = torch.tensor(steps.pop(), dtype=state["step"].dtype, device=state["step"].device)
                for name, p in zip(arm.names, arm.params):
                    for key in ("exp_avg", "exp_avg_sq"):
                        value = tensors.get(f"{key}/{name}", torch.zeros(p.shape))
                        safe_set_full_optimizer_state(p, value.to(flat.device, torch.float32), key)
        for k in ("global_steps", "global_samples", "skipped_steps"):  # DeepSpeed's counters, and nothing else
            if k in meta.get("engine", {}):
                setattr(self.engine, k, int(meta["engine"][k]))
        arm.step, arm.version = meta["step"], meta["version"]
        return {"step": arm.step, "version": arm.version}

    def adapter_files(self, arm: str = "") -> dict[str, bytes]:
        """An arm's adapter in PEFT layout (file name -> bytes), loadable by PeftModel and vLLM;
        with full fine-tuning the whole model (safetensors, config and the base model's
        tokenizer files), loadable by transformers and vLLM as a model."""
        if self.arms[arm].full:
            with tempfile.TemporaryDirectory() as tmp:
                self.arms[arm].model.save_pretrained(tmp, safe_serialization=True)
                files = {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}
            for p in Path(self.spec.model_path).iterdir():  # the tokenizer's files; not the old weights
                if p.is_file() and p.name not in files and not p.name.endswith((".safetensors", ".bin", ".index.json")):
                    files[p.name] = p.read_bytes()
            return files
        name = self.arms[arm].peft_name
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp, selected_adapters=[name])
            folder = Path(tmp) if name == "default" else Path(tmp) / name  # PEFT puts other adapters in subfolders
            return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    def close(self):
        self.sender.close()
