"""The Sampler actor: one vLLM engine with LoRA, fed adapters by the learner over ZeroMQ.

It generates G completions per prompt and returns, per completion, the token ids, the
sampler's per-token log-probs in vLLM's processed mode (after temperature, as the learner
computes them) and the adapter version that produced them.

Each adapter version is a new vLLM LoRA identity (name `v{version}`, id `version + 1`):
vLLM caches adapters by id and its prefix cache by name, so reusing either would serve a
stale adapter silently. `max_staleness + 1` versions stay resident (vLLM's `max_loras`);
older ones are removed, with their files, once no request uses them. The engine is not
thread-safe, so the receiver thread and `generate` take turns under one lock.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from common.cpus import pin_cpus
from common.records import Completion, Rollout, Sampling
from common.specs import SamplerSpec
from rollout.channel import Adapter, AdapterReceiver

log = logging.getLogger(__name__)

CPU_MAX_SEQS = 256  # vLLM-CPU's default for max_num_seqs


def node_ip() -> str:
    """This node's address as Ray knows it: the channel binds there, never to all interfaces."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def adapter_dir() -> Path:
    """A fresh folder for this process's adapter files, in RAM where there is /dev/shm.

    The name carries the pid: folders left by samplers that died without `close` (a killed
    actor, an OOM kill) are removed here, since /dev/shm holds RAM until the files go.
    """
    root = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    for old in root.glob("rl-lora-adapters-*-*"):
        pid = old.name.split("-")[3]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"rl-lora-adapters-{os.getpid()}-", dir=root))


class Sampler:
    def __init__(self, spec: SamplerSpec, secret: bytes, manifest: dict, host: str = ""):
        """spec: what this sampler is built from (common/specs.py, made by rl/fleet.py);
        secret and manifest: the adapter channel's key and the tensors every message must hold."""
        from vllm import LLM

        self.spec = spec
        options = {}
        if spec.cpu_cores:  # this actor and vLLM's processes (which inherit it), on these cores only
            pin_cpus(spec.cpu_cores)
        cores = sorted(os.sched_getaffinity(0))
        if spec.separate_engine:
            # vLLM's engine core and worker in processes of their own (vLLM's default). vLLM-CPU's
            # "auto" binding then gives the worker all cores but one per rank (here: core 0,
            # with core 1 "reserved" for the engine's scheduler process): bind it to every core
            # this actor may use instead.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
        else:
            # The engine and its worker inside this process: no inter-process hops per decoding
            # step. vLLM binds no threads then (and disables torch.set_num_threads once its
            # worker starts), and Ray started this actor with OMP_NUM_THREADS = num_cpus.
            import torch

            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
            options["distributed_executor_backend"] = "uni"
            torch.set_num_threads(len(cores))
        if not spec.on_gpu:
            # vLLM-CPU crashes ("CPU Generator does not use offset") when it splits the prefill of
            # a seeded request: it rewinds the request's RNG with a CUDA-only call. A token budget
            # that holds every running sequence's whole context means no prefill is ever split.
            options.update(max_num_seqs=CPU_MAX_SEQS, max_num_batched_tokens=CPU_MAX_SEQS * spec.max_model_len)
        self.llm = LLM(
            model=spec.model_path,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            seed=spec.seed,
            enable_lora=True,
            max_lora_rank=spec.max_lora_rank,
            max_loras=spec.resident_adapters,
            logprobs_mode="processed_logprobs",
            kv_cache_memory_bytes=spec.kv_cache_bytes or None,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            enforce_eager=spec.enforce_eager,
            tensor_parallel_size=spec.tensor_parallel_size,
            enable_prefix_caching=True,
            worker_extension_cls="rollout.vllm_ext.InMemoryAdapters",
            **options,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self._closing = threading.Event()
        threading.Thread(target=self._watch_engine, name="engine-watchdog", daemon=True).start()
        self.lock = threading.Lock()
        self.adapters: OrderedDict[int, tuple] = OrderedDict()  # version -> (LoRARequest, digest), oldest first
        self.adapter_dir = adapter_dir()
        self.receiver = AdapterReceiver(host or node_ip(), secret, manifest, spec.max_message_bytes, self._load)

    def _watch_engine(self):
        """vLLM's client waits forever for the outputs of an engine process that was killed
        (an OOM kill): leave with it, so that Ray restarts this sampler with a new engine."""
        import psutil

        engines = [p for p in psutil.Process().children() if p.name().startswith("VLLM::")]
        while not self._closing.wait(1.0):
            if any(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in engines):
                log.error("the vLLM engine process died; exiting so that Ray restarts this sampler")
                os._exit(1)

    def endpoint(self) -> str:
        return self.receiver.endpoint

    def version(self) -> int:
        return self.receiver.version

    def refused(self) -> list[str]:
        return list(self.receiver.refused)

    def _load(self, adapter: Adapter):
        """Called by the receiver thread for each valid message; returns once vLLM serves it.

        The weights go to vLLM's worker from memory (rollout/vllm_ext.py); the adapter's folder
        holds only its adapter_config.json.
        """
        from vllm.lora.request import LoRARequest

        path = self.adapter_dir / f"v{adapter.version}"
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({**adapter.peft_config,
                                                              "base_model_name_or_path": self.spec.model_path}))
        request = LoRARequest(f"v{adapter.version}", adapter.version + 1, str(path))
        with self.lock:
            loaded = self.llm.collective_rpc("add_adapter_from_memory", args=(
                request.lora_name, request.lora_int_id, str(path), adapter.tensors, adapter.payload))
            if not all(loaded):
                raise RuntimeError(f"vLLM did not load adapter version {adapter.version}")
            self.adapters[adapter.version] = (request, adapter.digest)
            # Requests run under the lock, so none uses an evicted version.
            while len(self.adapters) > self.spec.resident_adapters:
                _, (old, _) = self.adapters.popitem(last=False)
                self.llm.collective_rpc("remove_adapter_from_memory", args=(old.lora_int_id, old.lora_path))
                shutil.rmtree(old.lora_path, ignore_errors=True)

    def generate(self, prompt_ids_P: list[list[int]], sampling: Sampling) -> Rollout:
        """sampling.n completions per prompt on the newest adapter, whose version and payload
        digest the Rollout names."""
        from vllm import SamplingParams
        from vllm.v1.engine.exceptions import EngineDeadError

        # detokenize=False: vLLM's incremental detokenization runs at every decoding step; the
        # texts are decoded once below instead (a fifth of a default-job batch's time on CPU).
        params = SamplingParams(n=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                max_tokens=sampling.max_tokens, logprobs=0, seed=sampling.seed, detokenize=False)
        with self.lock:
            if not self.adapters:
                raise RuntimeError("no adapter loaded yet: the learner publishes version 0 first")
            version = next(reversed(self.adapters))
            request, digest = self.adapters[version]
            try:
                outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompt_ids_P], params,
                                            lora_request=request, use_tqdm=False)
            except EngineDeadError:
                # vLLM's engine process is gone (OOM-killed, crashed): end this actor too, so that
                # Ray restarts it with a new engine and the driver samples these prompts again.
                log.exception("the vLLM engine died; exiting so that Ray restarts this sampler")
                os._exit(1)
        texts = iter(self.tokenizer.batch_decode([c.token_ids for out in outputs for c in out.outputs],
                                                 skip_special_tokens=True))
        completions_P_G = [[Completion(list(c.token_ids), [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)],
                                       next(texts), c.finish_reason == "stop") for c in out.outputs]
                           for out in outputs]
        return Rollout(version, digest, completions_P_G)

    def close(self):
        """Stop the receiver and the engine's processes; remove the adapter files."""
        self._closing.set()
        self.receiver.close()
        self.llm.llm_engine.engine_core.shutdown()
        shutil.rmtree(self.adapter_dir, ignore_errors=True)
