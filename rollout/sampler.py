"""The Sampler actor: one vLLM engine with LoRA, fed adapters by the learner over ZeroMQ.

It generates G completions per prompt and returns, per completion, the token ids, the
sampler's per-token log-probs in vLLM's processed mode (after temperature, as the learner
computes them) and the adapter version that produced them.

Each adapter version is a new vLLM LoRA identity (name `v{version}`, or `<arm>/v{version}`
with arms, and an id never used before): vLLM caches adapters by id and its prefix cache by
name, so reusing either would serve a stale adapter silently. Each arm (rl/arms.py) keeps
`max_staleness + 1` versions resident (vLLM's `max_loras` holds every arm's); older ones are
removed, with their files, once no request uses them. `generate_many` sends the requests of
many arms to the engine as one batch, each prompt with its arm's newest adapter, so vLLM
batches them together (multi-LoRA). The engine is not thread-safe, so the receiver thread and
generation take turns under one lock; with run.mode=stream, `exchange` hands the engine to a
thread of its own instead (rollout/stream.py), which adds groups as they come, streams them back
as they finish and loads adapters between two decoding steps.

With full fine-tuning (lora.rank 0) the engine runs without LoRA and the learner's messages
are chunks of the model's weights, loaded into the running engine from memory as they
arrive (rollout/vllm_ext.py, vLLM's in-place reload); requests wait while a version is
incomplete, and each version drops vLLM's prefix cache (computed with the old weights).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from pathlib import Path

from common.cpus import pin_cpus
from common.records import Completion, Rollout, Sampling, Streamed
from common.specs import SamplerSpec
from rollout.channel import Adapter, AdapterReceiver, raise_fd_limit
from rollout.lengths import forced_length
from rollout.stream import EngineLoop, Running

log = logging.getLogger(__name__)

WEIGHTS_WAIT_S = 600.0  # how long a request waits for a version of full weights to complete
TRIM_EVERY_S = 10.0  # how often a sampler hands freed heap memory back to the OS (FreedMemory)


class FreedMemory:
    """glibc keeps the heap at its peak: memory that generation frees (batches of different
    sizes, evaluations) stays in the process and its RSS only climbs (a soak measured the
    sampler at +823 MB per 1,000 steps, of which malloc_trim(0) gave back 335 MB at once;
    benchmarks/soak.py). `trim` returns it to the OS, at most once per TRIM_EVERY_S; a no-op
    where the C library is not glibc."""

    def __init__(self):
        import ctypes
        import ctypes.util

        try:
            self._trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            self._trim = None
        self._last = time.monotonic()

    def trim(self):
        if self._trim is not None and time.monotonic() - self._last >= TRIM_EVERY_S:
            self._last = time.monotonic()
            self._trim(0)


def node_ip() -> str:
    """This node's address as Ray knows it: the channel binds there, never to all interfaces."""
    import ray

    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


def adapter_dir() -> Path:
    """A fresh folder for this process's adapter files, in RAM where there is /dev/shm.

    The name carries the pid: folders left by samplers that died without `close` (a killed
    actor, an OOM kill) are removed here, since /dev/shm holds RAM until the files go, and
    with them the shared memory their engine held (`release_engine_shm`).
    """
    root = Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())
    for old in root.glob("rl-lora-adapters-*-*"):
        pid = old.name.split("-")[3]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            release_engine_shm(old)
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"rl-lora-adapters-{os.getpid()}-", dir=root))


# vLLM's engine in processes of its own (rollout.separate_engine) shares its message queues
# through Python's shared memory (/dev/shm/psm_*) and makes a multiprocessing lock (sem.mp-*).
# A sampler killed (an OOM kill, Ray killing the actor and its children) leaves them in RAM for
# good, and the lock was seen left even after a clean close under Ray. The sampler lists them in
# its adapter folder, where `close` and, if it died, the next sampler on the node (adapter_dir)
# find them.
ENGINE_SHM = ".engine-shm.json"
ENGINE_SHM_PREFIXES = ("psm_", "sem.mp-")


def shm_files() -> set[str]:
    """The names in /dev/shm that vLLM's engine processes may leave there (ENGINE_SHM_PREFIXES)."""
    with contextlib.suppress(OSError):
        return {n for n in os.listdir("/dev/shm") if n.startswith(ENGINE_SHM_PREFIXES)}
    return set()


def held_shm(pids) -> set[str]:
    """The ENGINE_SHM_PREFIXES names in /dev/shm that these processes have mapped or open."""
    paths = set()
    for pid in pids:
        with contextlib.suppress(OSError):  # gone meanwhile, or not ours to read
            paths.update(line.split(None, 5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
                         if line.count(" ") >= 5 and "/dev/shm/" in line)
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    paths.add(os.readlink(fd))
    names = {path.strip().removesuffix(" (deleted)").removeprefix("/dev/shm/") for path in paths
             if path.startswith("/dev/shm/")}
    return {n for n in names if n.startswith(ENGINE_SHM_PREFIXES) and "/" not in n}


def engine_shm_files(pid: int, before: set[str]) -> list[str]:
    """The engine's /dev/shm files, once it has started: those process pid and the processes
    below it have mapped or open, and those that appeared since `before` (shm_files() taken
    before the engine started) that no other process holds. The latter catch what nobody maps
    any more but nobody unlinked either (vLLM's executor's multiprocessing lock, sem.mp-*)."""
    import psutil

    try:
        tree = {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}
    except psutil.NoSuchProcess:
        return []
    others = {int(p) for p in os.listdir("/proc") if p.isdigit()} - tree
    return sorted(held_shm(tree) | (shm_files() - before - held_shm(others)))


def release_engine_shm(folder: Path) -> list[str]:
    """Unlink the /dev/shm files a sampler's engine held, as listed in its adapter folder;
    returns those that were still there."""
    try:
        names = json.loads((folder / ENGINE_SHM).read_text())
    except (OSError, ValueError):
        return []
    removed = []
    for name in names if isinstance(names, list) else []:
        # Only names this module lists: a file in the folder cannot point anywhere else.
        if isinstance(name, str) and name.startswith(ENGINE_SHM_PREFIXES) and "/" not in name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(Path("/dev/shm") / name)
                removed.append(name)
    return removed


def engine_processes(parent) -> list:
    """The children of `parent` (a psutil.Process) that are vLLM's engine core: named
    VLLM::EngineCore, or, as was seen twice in CI with the name missing (plain "python"), the
    child with a child of its own (the worker), which the resource tracker beside it is not.
    A child that exits while it is looked at is not counted (the lookup runs after the engine
    started: one that exits then is a helper, or the engine already dead, which the caller's
    check for an engine catches)."""
    import psutil

    found = []
    for p in parent.children():
        try:
            if p.name().startswith("VLLM::") or p.children():
                found.append(p)
        except psutil.NoSuchProcess:
            continue
    return found


class Sampler:
    def __init__(self, spec: SamplerSpec, secret: bytes, manifests: dict[str, dict], host: str = ""):
        """spec: what this sampler is built from (common/specs.py, made by rl/fleet.py);
        secret and manifests: the adapter channel's key and, per arm, the tensors its messages
        must hold; host: where the channel binds, instead of the spec's (benchmarks)."""
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
            options.update(max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_seqs * spec.max_model_len)
        shm_before = shm_files()
        self.llm = LLM(
            model=spec.model_path,
            dtype=spec.dtype,
            max_model_len=spec.max_model_len,
            seed=spec.seed,
            **({} if spec.full_weights else {"enable_lora": True, "max_lora_rank": spec.max_lora_rank,
                                             "max_loras": spec.resident_adapters * len(spec.arms)}),
            logprobs_mode="processed_logprobs",
            kv_cache_memory_bytes=spec.kv_cache_bytes or None,
            gpu_memory_utilization=spec.gpu_memory_utilization,
            enforce_eager=spec.enforce_eager,
            tensor_parallel_size=spec.tensor_parallel_size,
            enable_prefix_caching=True,
            worker_extension_cls="rollout.vllm_ext.InMemoryAdapters",
            **options,
        )
        self._engine_shm = engine_shm_files(os.getpid(), shm_before)  # released by close, or by a successor
        self.tokenizer = self.llm.get_tokenizer()
        self._closing = threading.Event()
        threading.Thread(target=self._watch_engine, name="engine-watchdog", daemon=True).start()
        self.lock = threading.Lock()
        self.ready = threading.Condition(self.lock)  # full weights: notified when a version completes
        self.updating: int | None = None  # full weights: the version whose chunks are loading
        # Several full fine-tuning arms: each one's newest weights (chunks) and what the engine holds.
        self.swapping = spec.full_weights and len(spec.arms) > 1
        self.stored: dict[str, list] = {}
        self.incoming: dict[str, list] = {}
        self.in_engine: tuple[str, int] | None = None
        # arm -> {version -> (LoRARequest, digest)}, oldest first (full weights: (None, digest), the newest only)
        self.adapters: dict[str, OrderedDict[int, tuple]] = {arm: OrderedDict() for arm in spec.arms}
        self._ids = itertools.count(1)  # vLLM LoRA ids, never reused
        self._calls = itertools.count()  # keys of blocking calls' groups in the engine loop
        self.loop: EngineLoop | None = None  # streaming: the thread that drives the engine (rollout/stream.py)
        self.adapter_dir = adapter_dir()
        self.freed = FreedMemory()  # freed heap back to the OS now and then
        self._list_engine_shm()
        raise_fd_limit()  # vLLM, Ray and the channel's connections share this process's descriptors
        # The channel binds 127.0.0.1 in a single-node job (spec.channel_host), else this node's address.
        self.receiver = AdapterReceiver(host or spec.channel_host or node_ip(), secret, manifests,
                                        spec.max_message_bytes, self._load, on_load_error=self._load_failed)

    def _watch_engine(self):
        """vLLM's client waits forever for the outputs of an engine process that was killed
        (an OOM kill): leave with it, so that Ray restarts this sampler with a new engine.

        The watchdog cannot die silently: anything it did not expect (psutil racing a process
        that exits) ends this sampler too, since a sampler without its watchdog could hang."""
        import psutil

        try:
            engines = engine_processes(psutil.Process())
            if self.spec.separate_engine and not engines:
                raise RuntimeError("no vLLM engine process among this sampler's children")
            while not self._closing.wait(1.0):
                if any(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in engines):
                    log.error("the vLLM engine process died; exiting so that Ray restarts this sampler")
                    os._exit(1)
        except Exception as e:  # psutil.NoSuchProcess: the engine exited between two calls
            log.error("the engine watchdog failed (%r); exiting so that Ray restarts this sampler", e)
            os._exit(1)

    def endpoint(self) -> str:
        """The channel's address, this process's incarnation and CURVE key (rollout/channel.py):
        a restarted sampler's differs."""
        return self.receiver.endpoint

    def version(self, arm: str = "") -> int:
        return self.receiver.versions[arm]

    def refused(self) -> dict:
        """The channel's refusals: counts of messages and connections, by kind, and the last reasons."""
        return self.receiver.refusals()

    def _load_failed(self, error: Exception):
        """A valid version failed to load (vLLM refused it, or this process ran out of file
        descriptors or memory): what this sampler serves is in doubt. Exit, so that Ray restarts
        it; the learner, missing its ack, counts it missing and the driver catches it up."""
        log.error("loading an adapter failed (%r); exiting so that Ray restarts this sampler", error)
        os._exit(1)

    def _load(self, adapter: Adapter):
        """Called by the receiver thread for each valid message; returns once vLLM serves it.

        The weights go to vLLM's worker from memory (rollout/vllm_ext.py); the adapter's folder
        holds only its adapter_config.json.
        """
        from vllm.lora.request import LoRARequest

        if self.spec.full_weights:
            return self._load_weights(adapter)
        name = f"{adapter.arm}/v{adapter.version}" if adapter.arm else f"v{adapter.version}"
        path = self.adapter_dir / name
        path.mkdir(parents=True)
        (path / "adapter_config.json").write_text(json.dumps({**adapter.peft_config,
                                                              "base_model_name_or_path": self.spec.model_path}))
        request = LoRARequest(name, next(self._ids), str(path))
        with self.lock:
            loop = self.loop
            if loop is None:
                return self._add_adapter(adapter, request)
        return loop.call(lambda: self._add_adapter(adapter, request))  # between two decoding steps

    def _add_adapter(self, adapter: Adapter, request):
        """Under the lock, or in the engine loop when streaming: the version into vLLM, and the
        arm's oldest out once more than the resident window are loaded (streaming: after
        aborting the groups still running on it, which are too stale to train on)."""
        loaded = self.llm.collective_rpc("add_adapter_from_memory", args=(
            request.lora_name, request.lora_int_id, request.lora_path, adapter.tensors, adapter.payload))
        if not all(loaded):
            raise RuntimeError(f"vLLM did not load adapter version {adapter.version}")
        versions = self.adapters[adapter.arm]
        versions[adapter.version] = (request, adapter.digest)
        while len(versions) > self.spec.resident_adapters:
            _, (old, _) = versions.popitem(last=False)
            if self.loop is not None:
                self.loop.abort_version(old.lora_int_id)
            self.llm.collective_rpc("remove_adapter_from_memory", args=(old.lora_int_id, old.lora_path))
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def _load_weights(self, chunk: Adapter):
        """One chunk of a version of full weights, validated by the receiver (rollout/channel.py):
        into the engine at once; the last one completes the version. Serving several full
        fine-tuning arms (a sweep on a small model), the sampler keeps each arm's newest
        weights instead and swaps them into the engine when its requests come (`_swap_in`)."""
        with self.lock:
            if self.swapping:
                if chunk.chunk == 0:
                    self.incoming[chunk.arm] = []
                self.incoming[chunk.arm].append((chunk.tensors, bytes(chunk.payload)))
                if chunk.complete:
                    self.stored[chunk.arm] = self.incoming.pop(chunk.arm)
                    self.adapters[chunk.arm] = OrderedDict({chunk.version: (None, chunk.digest)})
                    self.ready.notify_all()
                return
            if chunk.chunk == 0:
                self.updating = chunk.version
                self.llm.collective_rpc("begin_weights")
            self._load_chunk(chunk.tensors, chunk.payload)
            if chunk.complete:
                self._finish_weights()
                self.adapters[chunk.arm] = OrderedDict({chunk.version: (None, chunk.digest)})
                self.updating = None
                self.ready.notify_all()

    def _load_chunk(self, layout: list[dict], payload: bytes):
        self.llm.collective_rpc("load_weights_from_memory", args=(layout, payload))

    def _finish_weights(self):
        self.llm.collective_rpc("finish_weights")
        self.llm.reset_prefix_cache()  # cached prompts' KV came from the old weights

    def _swap_in(self, arm: str):
        """Under the lock: the engine holds arm's newest weights (loaded now unless it already did)."""
        version = next(reversed(self.adapters[arm]))
        if self.in_engine != (arm, version):
            self.llm.collective_rpc("begin_weights")
            for layout, payload in self.stored[arm]:
                self._load_chunk(layout, payload)
            self._finish_weights()
            self.in_engine = (arm, version)

    def _wait_for_weights(self, arm: str):
        """Full weights, under the lock: until no version is half loaded and one is complete.

        Versions load in place, so a half-loaded one (its next chunk refused, or never sent)
        leaves the engine with a mix of two versions: there is no last complete version to
        serve. The learner's catch-up sends the version again from its first chunk; if none
        comes within WEIGHTS_WAIT_S, this sampler exits, so that Ray restarts it on the base
        weights and the driver catches it up like any restarted sampler."""
        deadline = time.monotonic() + WEIGHTS_WAIT_S
        while self.updating is not None or not self.adapters.get(arm):
            left = deadline - time.monotonic()
            if left <= 0 and self.updating is not None:
                self._load_failed(RuntimeError(f"version {self.updating} of the weights half loaded for "
                                               f"{WEIGHTS_WAIT_S:g} s: the engine holds no complete version"))
            if left <= 0:
                raise RuntimeError(f"no complete version of the weights within {WEIGHTS_WAIT_S:g} s")
            self.ready.wait(left)

    def generate(self, prompt_ids_P: list[list[int]], sampling: Sampling) -> Rollout:
        """sampling.n completions per prompt on the newest adapter of sampling.arm, whose
        version and payload digest the Rollout names."""
        return self.generate_many([(prompt_ids_P, sampling)])[0]

    def generate_many(self, requests: list[tuple[list[list[int]], Sampling]]) -> list[Rollout]:
        """One Rollout per (prompts, sampling) request, all generated in one engine call: each
        prompt on the newest adapter of its request's arm (full weights: one call per arm,
        each on that arm's weights). While streaming, they join the running groups instead."""
        batches = []  # (request indices, vLLM's completions per prompt, who served them)
        with self.lock:
            loop = self.loop
            if loop is None and not self.spec.full_weights:
                batches.append((range(len(requests)), *self._generate(requests)))
            for arm in dict.fromkeys(sampling.arm for _, sampling in requests) if self.spec.full_weights else ():
                mine = [i for i, (_, sampling) in enumerate(requests) if sampling.arm == arm]
                self._wait_for_weights(arm)
                if self.swapping:
                    self._swap_in(arm)
                batches.append((mine, *self._generate([requests[i] for i in mine])))
        if loop is not None:
            batches.append((range(len(requests)), *self._generate_streaming(loop, requests)))
        done = [None] * len(requests)
        for mine, outputs, served in batches:  # decoded outside the lock: adapters may load meanwhile
            for i, out in zip(mine, self._rollouts(outputs, served)):
                done[i] = out
        self.freed.trim()
        return done

    def _newest(self, arm: str) -> tuple:
        """The newest version of arm's adapter: (LoRARequest or None, version, digest)."""
        if not self.adapters.get(arm):
            raise RuntimeError(f"no adapter loaded yet{' for arm ' + repr(arm) if arm else ''}"
                               ": the learner publishes version 0 first")
        version = next(reversed(self.adapters[arm]))
        request, digest = self.adapters[arm][version]
        return request, version, digest

    def _params(self, prompt_ids: list[int], sampling: Sampling, seed: int | None, split: bool) -> list:
        """vLLM's sampling parameters for one prompt's sampling.n completions, whose seed is
        `seed`: one request of n, or (split, or lengths forced by rollout.length_profile) n
        requests of one, the i-th seeded seed + i as vLLM seeds the children of a request of n."""
        from vllm import SamplingParams

        # detokenize=False: vLLM's incremental detokenization runs at every decoding step;
        # the texts are decoded once in _rollouts instead (a fifth of a default-job batch on CPU).
        base = dict(temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                    logprobs=0, detokenize=False)
        if not split and not sampling.length_profile:
            return [SamplingParams(n=sampling.n, seed=seed, **base)]
        params = []
        for i in range(sampling.n):
            if sampling.length_profile:  # a benchmark's: exactly this many tokens (no EOS before)
                base["max_tokens"] = base["min_tokens"] = forced_length(prompt_ids, i, sampling.max_tokens,
                                                                        sampling.length_profile)
            params.append(SamplingParams(n=1, seed=None if seed is None else seed + i, **base))
        return params

    def _generate(self, requests: list[tuple[list[list[int]], Sampling]]) -> tuple[list, list]:
        """Under the lock: vLLM's completions per prompt for the requests, and who served each
        request (arm, version, digest, prompts)."""
        from vllm.v1.engine.exceptions import EngineDeadError

        prompts, params, loras, served, per_prompt = [], [], [], [], []
        for prompt_ids_P, sampling in requests:
            request, version, digest = self._newest(sampling.arm)
            served.append((sampling.arm, version, digest, len(prompt_ids_P)))
            for ids, seed in zip(prompt_ids_P, sampling.prompt_seeds(len(prompt_ids_P))):
                ps = self._params(ids, sampling, seed, split=False)
                per_prompt.append(len(ps))
                prompts += [{"prompt_token_ids": ids}] * len(ps)
                params += ps
                loras += [request] * len(ps)
        try:
            outputs = self.llm.generate(prompts, params, lora_request=None if self.spec.full_weights else loras,
                                        use_tqdm=False)
        except EngineDeadError:
            # vLLM's engine process is gone (OOM-killed, crashed): end this actor too, so that
            # Ray restarts it with a new engine and the driver samples these prompts again.
            log.exception("the vLLM engine died; exiting so that Ray restarts this sampler")
            os._exit(1)
        outputs = iter(outputs)
        return [[c for _ in range(k) for c in next(outputs).outputs] for k in per_prompt], served

    def _generate_streaming(self, loop: EngineLoop, requests: list[tuple[list[list[int]], Sampling]]
                            ) -> tuple[list, list]:
        """_generate's result with the engine loop running: each prompt joins the running groups
        (an evaluation while the driver streams), and this call waits for them."""
        groups, served = [], []

        def add():
            for prompt_ids_P, sampling in requests:
                _, version, digest = self._newest(sampling.arm)  # the one every group below runs on
                served.append((sampling.arm, version, digest, len(prompt_ids_P)))
                seeds = sampling.prompt_seeds(len(prompt_ids_P))  # each prompt a group: its own seed travels with it
                groups.extend(self._add_group(loop, f"call-{next(self._calls)}", ids,
                                              dataclasses.replace(sampling, seed=seed, seeds=()), Future())
                              for ids, seed in zip(prompt_ids_P, seeds))

        loop.call(add)
        return [g.done.result() for g in groups], served

    def _add_group(self, loop: EngineLoop, key: str, prompt_ids: list[int], sampling: Sampling,
                   done: Future | None = None) -> Running:
        """In the engine loop: one prompt's sampling.n completions on its arm's newest adapter
        (done: a blocking caller's, which the loop resolves; None: streamed back by `take`)."""
        request, version, digest = self._newest(sampling.arm)
        group = Running(key, sampling.n, request.lora_int_id, (sampling.arm, version, digest), done=done)
        (seed,) = sampling.prompt_seeds(1)
        loop.add(group, prompt_ids, self._params(prompt_ids, sampling, seed, split=True), request)
        return group

    def _rollouts(self, completions_P: list[list], served: list) -> list[Rollout]:
        """vLLM's completions per prompt as Rollouts, one per request (served: who served it)."""
        texts = iter(self.tokenizer.batch_decode([c.token_ids for cs in completions_P for c in cs],
                                                 skip_special_tokens=True))
        prompts = iter([[Completion(list(c.token_ids), [step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)],
                                    next(texts), c.finish_reason == "stop") for c in cs] for cs in completions_P])
        return [Rollout(arm, version, digest, list(itertools.islice(prompts, count)))
                for arm, version, digest, count in served]

    def exchange(self, requests: list[tuple[str, list[int], Sampling]], wait_s: float) -> Streamed:
        """Streaming (run.mode=stream; rl/stream.py): add each (key, prompt ids, sampling) as one
        group on its arm's newest adapter, then wait up to wait_s for groups to finish. Returns
        the groups finished and the keys aborted since the last call. The first call starts the
        engine loop (rollout/stream.py), which drives the engine from then on."""
        if self.spec.full_weights:
            raise RuntimeError("streaming needs LoRA: full weights load in place, under running requests")
        with self.lock:
            if self.loop is None:
                self.loop = EngineLoop(self.llm.llm_engine)
        loop = self.loop

        if requests:
            loop.call(lambda: [self._add_group(loop, key, ids, sampling) for key, ids, sampling in requests])
        finished, aborted, busy_s = loop.take(wait_s)
        rollouts = self._rollouts([completions for _, completions in finished],
                                  [(*g.served, 1) for g, _ in finished])
        self.freed.trim()
        return Streamed([(g.key, r) for (g, _), r in zip(finished, rollouts)], aborted, busy_s, loop.running())

    def stop_stream(self):
        """Abort every streamed group (the driver's stream ended); the engine loop stays."""
        if self.loop is not None:
            self.loop.stop()

    def arms(self) -> list[str]:
        """The arms this sampler serves."""
        return list(self.spec.arms)

    def close(self):
        """Stop the receiver and the engine's processes; remove the adapter files."""
        self._closing.set()
        self.receiver.close()
        if self.loop is not None:
            self.loop.close()
        self._list_engine_shm()
        self.llm.llm_engine.engine_core.shutdown()
        left = release_engine_shm(self.adapter_dir)  # what the engine's processes did not unlink
        if left:
            log.info("removed %d shared-memory file(s) vLLM's engine left in /dev/shm", len(left))
        shutil.rmtree(self.adapter_dir, ignore_errors=True)

    def _list_engine_shm(self):
        """The engine's shared-memory files, into the adapter folder (ENGINE_SHM), where the
        next sampler on this node finds them if this one dies."""
        self._engine_shm = sorted(set(self._engine_shm) | held_shm([os.getpid(), *self._engine_pids()]))
        (self.adapter_dir / ENGINE_SHM).write_text(json.dumps(self._engine_shm))

    @staticmethod
    def _engine_pids() -> list[int]:
        import psutil

        return [p.pid for p in psutil.Process().children(recursive=True)]
