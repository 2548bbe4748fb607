"""The fleet: the learner's ranks and the samplers as Ray actors, from placement to shutdown.

`build_actors` places the actors (`place_actors`: the learner's ranks in one placement group,
each sampler in one of its own), derives each actor's spec from the config (common/specs.py;
printed once) and starts them; `rl/samplers.py` holds them as one handle that survives a
sampler's death.
`add_sampler` and `remove_sampler` change the fleet of a running job; `dead_actors` names
what went away; `shutdown` stops the engines and the actors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from common.specs import AdapterSpec, LearnerSpec, LoraSpec, Objective, SamplerSpec
from rl.arms import expand
from rl.config import Config, ConfigError

VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # what vLLM's max_lora_rank accepts
CPU_MAX_SEQS = 256  # vLLM-CPU's default for max_num_seqs


def resolve_model(cfg: Config) -> str:
    """The path the actors load the model from: model.path, or the built tiny model for "tiny"."""
    if cfg.model.path != "tiny":
        return cfg.model.path
    from demo.tiny_model import build_tiny_model

    return build_tiny_model(cfg.model.cache_dir)


def sampler_kinds(cfg: Config) -> list[bool]:
    """Per sampler, whether it serves full fine-tuning arms (full weights) or adapters:
    rollout.num_samplers samplers for the adapters, and in a sweep that also has full
    fine-tuning arms one more for those (its engine cannot share weights with adapters; it
    swaps the arms' weights in turn). Without adapters, rollout.num_samplers for full weights."""
    ranks = [arm.lora.rank for _, arm in expand(cfg)]
    lora, full = any(r > 0 for r in ranks), any(r == 0 for r in ranks)
    return [False] * (cfg.rollout.num_samplers if lora else 0) + [True] * (1 if lora and full else
                                                                           cfg.rollout.num_samplers if full else 0)


def bundles(cfg: Config) -> list[dict[str, float]]:
    """Ray resources per actor: one bundle per learner rank, then one per sampler."""
    def bundle(cpus: float, gpus: float, custom: dict) -> dict[str, float]:
        return {k: v for k, v in {"CPU": cpus, "GPU": gpus, **custom}.items() if v}

    lr, ro = cfg.learner, cfg.rollout
    return ([bundle(lr.num_cpus, lr.num_gpus, lr.resources)] * lr.world_size
            + [bundle(ro.num_cpus, ro.num_gpus, ro.resources)] * len(sampler_kinds(cfg)))


def place(cfg: Config):
    """A placement group for every actor, or an error naming the resources the cluster lacks."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    wanted, need = bundles(cfg), {}
    for bundle in wanted:
        for key, amount in bundle.items():
            need[key] = need.get(key, 0.0) + amount
    have = ray.cluster_resources()
    missing = [f"{key} {amount:g} (the cluster has {have.get(key, 0):g})" for key, amount in sorted(need.items())
               if amount > have.get(key, 0.0) + 1e-9]
    if missing:
        raise ConfigError(f"the Ray cluster lacks resources for learner.world_size={cfg.learner.world_size} and "
                          f"{len(sampler_kinds(cfg))} sampler(s) (rollout.num_samplers={cfg.rollout.num_samplers}, "
                          "one more for a sweep's full fine-tuning arms): needs " + ", ".join(missing))
    group = placement_group(wanted, strategy="PACK" if cfg.run.placement == "pack" else "SPREAD")
    try:
        ray.get(group.ready(), timeout=cfg.run.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(f"Ray could not place the actors {wanted} within run.placement_timeout_s="
                           f"{cfg.run.placement_timeout_s:g}; free now: {ray.available_resources()}") from None
    return group


NODE_LABEL = "ray.io/node-id"  # the label Ray gives every node: its id


@dataclasses.dataclass
class Placement:
    """Where the actors run: `learners`, a placement group whose bundle r holds learner rank r
    on its node; `samplers`, one placement group of one bundle per sampler; `nodes`, the node
    of each (learner ranks, then samplers)."""

    learners: Any
    samplers: list
    nodes: list[str]


def place_actors(cfg: Config) -> Placement:
    """Place every actor at once (`place`: the resource check and run.placement's pack or
    spread decide the nodes), then hold each sampler's bundle in a placement group of its own.

    Why: a sampler lost with its node is dropped (Samplers), and its group removed with it.
    In one group for all, Ray keeps trying to re-place the lost bundle, which it cannot do
    on a cluster without spare capacity, and Ray 2.60's GCS does that in a busy loop
    (ray-project/ray#65007: a quarter of a core here, and a learner step ten times slower).
    A sampler's group asks for its node softly: where that node is gone and another has room,
    Ray restarts the sampler there. The learner's ranks are held on their nodes (a learner
    lost with its node stops the run)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group, world = place(cfg), cfg.learner.world_size
    table = ray.util.placement_group_table(group)["bundles_to_node_id"]
    wanted = bundles(cfg)
    nodes = [table[i] for i in range(len(wanted))]
    remove_placement_group(group)
    learners = placement_group(wanted[:world], strategy="PACK",
                               bundle_label_selector=[{NODE_LABEL: node} for node in nodes[:world]])
    samplers = [placement_group([bundle], strategy="STRICT_PACK", _soft_target_node_id=node)
                for bundle, node in zip(wanted[world:], nodes[world:])]
    try:
        ray.get([g.ready() for g in [learners, *samplers]], timeout=cfg.run.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        for g in [learners, *samplers]:
            remove_placement_group(g)
        raise RuntimeError(f"Ray could not hold the placed actors {wanted} on their nodes within "
                           f"run.placement_timeout_s={cfg.run.placement_timeout_s:g} (another job took the "
                           f"resources meanwhile?); free now: {ray.available_resources()}") from None
    return Placement(learners, samplers, nodes)


def _in_bundle(group, index: int) -> dict:
    """Actor options that put it in bundle `index` of the placement group."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}


def split_cores(node_of_bundle: list[str], cpus: list[float], node_cpus: dict[str, int]) -> list[str]:
    """Disjoint CPU ids ("0", "1-3") for the actors (bundles) that share a node, in proportion
    to their num_cpus and in bundle order, at least one each; "" for an actor alone on its
    node, or on a node with fewer cores than actors."""
    cores = [""] * len(node_of_bundle)
    for node in set(node_of_bundle):
        here = [i for i, n in enumerate(node_of_bundle) if n == node]
        free, total = node_cpus.get(node, 0), sum(cpus[i] for i in here) or 1.0
        if len(here) < 2 or free < len(here):
            continue
        first = 0
        for k, i in enumerate(here):
            later = len(here) - k - 1  # actors still to place, one core each at least
            count = free - first if not later else max(1, min(round(free * cpus[i] / total), free - first - later))
            cores[i] = str(first) if count == 1 else f"{first}-{first + count - 1}"
            first += count
    return cores


def actor_cores(cfg: Config, nodes: list[str]) -> list[str]:
    """The CPU ids of each actor (learner ranks, then samplers, on `nodes`): the config's, except
    in run.mode async or stream on CPUs with neither cpu_cores set, where the learner and the samplers run
    at once: those that share a node get disjoint cores (split_cores) rather than contend."""
    import ray

    cores = [cfg.learner.cpu_cores] * cfg.learner.world_size + [cfg.rollout.cpu_cores] * len(sampler_kinds(cfg))
    on_cpu = not (cfg.learner.num_gpus or cfg.rollout.num_gpus)
    if (cfg.run.mode == "sync" or not on_cpu or cfg.learner.cpu_cores or cfg.rollout.cpu_cores
            or cfg.learner.world_size > 1):
        return cores
    node_cpus = {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]}
    cores = split_cores(nodes, [b.get("CPU", 0.0) for b in bundles(cfg)], node_cpus)
    print(f"run.mode={cfg.run.mode}: learner on CPUs {cores[0] or 'all'}, samplers on {[c or 'all' for c in cores[1:]]}",
          flush=True)
    return cores


def adapter_spec(arm: str, cfg: Config) -> AdapterSpec:
    """One arm's adapter, from the arm's config (rl/arms.py)."""
    return AdapterSpec(arm=arm, lora=LoraSpec(cfg.lora.rank, cfg.lora.alpha, tuple(cfg.lora.target_modules)),
                       seed=cfg.run.seed, lr=cfg.learner.lr, weight_decay=cfg.learner.weight_decay,
                       grad_clip=cfg.learner.grad_clip, temperature=cfg.rollout.temperature, objective=objective(cfg))


def objective(cfg: Config) -> Objective:
    """The loss section as the learner takes it (clip_eps_high unset: clip_eps on both sides)."""
    lo = cfg.loss
    return Objective(normalizer=lo.normalizer, ratio_level=lo.ratio_level, ratio_cap=lo.ratio_cap, clip_low=lo.clip_eps,
                     clip_high=lo.clip_eps if lo.clip_eps_high is None else lo.clip_eps_high, dual_clip=lo.dual_clip,
                     ratio_mask=lo.ratio_mask, mask_level=lo.mask_level)


def learner_spec(cfg: Config, model_path: str, cpu_cores: str | None = None) -> LearnerSpec:
    lr, ro = cfg.learner, cfg.rollout
    per_rank = -(-ro.prompts_per_step * ro.group_size // lr.world_size)
    return LearnerSpec(
        model_path=model_path, dtype=cfg.model.dtype, seed=cfg.run.seed, world_size=lr.world_size,
        adapters=tuple(adapter_spec(name, arm) for name, arm in expand(cfg)), zero_stage=lr.zero_stage,
        micro_batch_size=lr.micro_batch_size, max_tokens_per_micro=lr.max_tokens_per_micro,
        accumulation_steps=-(-per_rank // lr.micro_batch_size), logprob_chunk=lr.logprob_chunk,
        gradient_checkpointing=lr.gradient_checkpointing, cpu_cores=lr.cpu_cores if cpu_cores is None else cpu_cores,
        kl_base_every=lr.kl_base_every,
        wire_dtype=cfg.sync.wire_dtype, ack_timeout_s=cfg.sync.ack_timeout_s,
        chunk_bytes=int(cfg.sync.chunk_mb * 2**20))


def sampler_spec(cfg: Config, model_path: str, index: int, cpu_cores: str | None = None,
                 full: bool | None = None, channel_host: str = "") -> SamplerSpec:
    """Sampler `index`'s spec; full: whether it serves the full fine-tuning arms (full
    weights) or the adapters (sampler_kinds says which); channel_host: where its adapter
    channel binds (`channel_bind_host`)."""
    kinds = sampler_kinds(cfg)
    full = (kinds[index] if index < len(kinds) else kinds[0]) if full is None else full  # a joining sampler: kinds[0]
    ro, arms = cfg.rollout, [(name, arm) for name, arm in expand(cfg) if (arm.lora.rank == 0) == full]
    return SamplerSpec(
        model_path=model_path, dtype=cfg.model.dtype, max_model_len=cfg.model.max_model_len, seed=cfg.run.seed + index,
        max_lora_rank=vllm_lora_rank(max(arm.lora.rank for _, arm in arms)), arms=tuple(name for name, _ in arms),
        full_weights=full,
        resident_adapters=ro.max_staleness + 1,
        # On CPUs (GPUs keep vLLM's default) a step's completions of every arm in one wave (a
        # sweep of 8 default-job arms: 2.6 s, against 3.0 s in two waves of 256).
        max_num_seqs=max(CPU_MAX_SEQS, len(arms) * ro.prompts_per_step * ro.group_size),
        kv_cache_bytes=int(ro.kv_cache_gb * 2**30), gpu_memory_utilization=ro.gpu_memory_utilization,
        enforce_eager=ro.enforce_eager, tensor_parallel_size=max(1, int(ro.num_gpus)), on_gpu=bool(ro.num_gpus),
        separate_engine=bool(ro.num_gpus) if ro.separate_engine is None else ro.separate_engine,
        cpu_cores=ro.cpu_cores if cpu_cores is None else cpu_cores,
        max_message_bytes=int(cfg.sync.max_message_mb * 2**20), channel_host=channel_host)


def channel_bind_host() -> str:
    """Where samplers bind the adapter channel: 127.0.0.1 when the Ray cluster has a single
    alive node (the learner is on it too: nothing off this machine needs the port), else ""
    for each sampler's own node's address (ray.util.get_node_ip_address). Never every interface."""
    import ray

    return "127.0.0.1" if sum(1 for node in ray.nodes() if node["Alive"]) == 1 else ""


def vllm_lora_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds `rank`."""
    for r in VLLM_LORA_RANKS:
        if r >= rank:
            return r
    raise ConfigError(f"lora.rank={rank} is above vLLM's largest max_lora_rank ({VLLM_LORA_RANKS[-1]})")


def arms_text(adapters) -> str:
    """", 40 arms (30 adapters, 10 full models)": what the learner trains, one entry per arm."""
    full = sum(1 for a in adapters if a.lora.rank == 0)
    return f", {len(adapters)} arms ({len(adapters) - full} adapters, {full} full models)"


def describe_specs(learner: LearnerSpec, sampler: SamplerSpec) -> str:
    """The values the driver derived for the actors, as printed at start."""
    engine = "in separate processes" if sampler.separate_engine else "inside each sampler"
    return (f"learner: {learner.world_size} rank(s), micro-batches of <= {learner.micro_batch_size} completions"
            + (f" and <= {learner.max_tokens_per_micro} padded tokens" if learner.max_tokens_per_micro else "")
            + f" ({learner.accumulation_steps} per rank by count)"
            + (arms_text(learner.adapters) if len(learner.adapters) > 1 else "")
            + ("; full fine-tuning: samplers load full weights (no LoRA)" if sampler.full_weights else
               f"; samplers: vLLM max_lora_rank {sampler.max_lora_rank}, max_loras "
               f"{sampler.resident_adapters * len(sampler.arms)} ({sampler.resident_adapters} resident version(s)"
               + (f" x {len(sampler.arms)} arms" if len(sampler.arms) > 1 else "") + ")")
            + f", engine {engine}")


def build_actors(cfg: Config, model_path: str, secret: bytes) -> tuple[list, list]:
    """The learner's ranks, then the samplers (which need the learner's manifest), placed and connected."""
    import ray

    placed = place_actors(cfg)
    cores, world = actor_cores(cfg, placed.nodes), cfg.learner.world_size
    spec = learner_spec(cfg, model_path, cores[0])
    host = channel_bind_host()
    specs = [sampler_spec(cfg, model_path, i, cores[world + i], channel_host=host)
             for i in range(len(sampler_kinds(cfg)))]
    print(describe_specs(spec, specs[0]), flush=True)
    if specs[-1].full_weights and not specs[0].full_weights:
        print(f"sampler-{len(specs) - 1}: the {len(specs[-1].arms)} full fine-tuning arm(s), whose weights it "
              "swaps in turn", flush=True)
    learners = start_learners(cfg, spec, secret, placed.learners)
    manifests = ray.get(learners[0].manifests.remote())
    samplers = [start_sampler(cfg, s, secret, {arm: manifests[arm] for arm in s.arms}, i, _in_bundle(group, 0))
                for i, (s, group) in enumerate(zip(specs, placed.samplers))]
    ray.get(learners[0].connect.remote(ray.get([s.endpoint.remote() for s in samplers]), [s.arms for s in specs]))
    return learners, samplers


def start_learners(cfg: Config, spec: LearnerSpec, secret: bytes, group, name: str = "learner") -> list:
    """Learner ranks 0..N-1 in bundles 0..N-1, named `name`, `name`-1, ...; rank 0's node
    address and a free port there, found by a task in rank 0's bundle, are the rendezvous."""
    import ray

    from learner.learner import Learner, rendezvous

    lr, world = cfg.learner, cfg.learner.world_size
    master = None
    if world > 1:
        master = ray.get(ray.remote(rendezvous).options(num_cpus=0, **_in_bundle(group, 0)).remote())
    actor = ray.remote(Learner)
    ranks = [actor.options(name=name if r == 0 else f"{name}-{r}", num_cpus=lr.num_cpus, num_gpus=lr.num_gpus,
                           resources=dict(lr.resources), **_in_bundle(group, r))
             .remote(spec, secret, r, master) for r in range(world)]
    if world > 1:
        ray.get(ranks[0].attach_peers.remote(ranks[1:]))
    return ranks


def start_sampler(cfg: Config, spec: SamplerSpec, secret: bytes, manifests: dict[str, dict], index: int,
                  bundle: dict | None = None):
    import ray

    from rollout.sampler import Sampler

    r = cfg.rollout
    # Ray restarts a sampler that dies (the same arguments, so the same seed); its calls are
    # not retried: the driver samples its lost groups again once it serves the newest adapter.
    actor = ray.remote(Sampler).options(name=f"sampler-{index}", num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                                         resources=dict(r.resources), max_restarts=r.max_restarts,
                                         max_task_retries=0, **(bundle or {}))
    return actor.remote(spec, secret, manifests)


def add_sampler(cfg: Config, model_path: str, secret: bytes, learner, index: int):
    """A sampler that joins a running job: it serves the learner's latest adapter before it gets prompts."""
    import ray

    spec = sampler_spec(cfg, model_path, index, channel_host=channel_bind_host())
    manifests = ray.get(learner.manifests.remote())
    sampler = start_sampler(cfg, spec, secret, {arm: manifests[arm] for arm in spec.arms}, index)
    ray.get(learner.catch_up.remote(ray.get(sampler.endpoint.remote()), list(spec.arms)))
    return sampler


def remove_sampler(learner, sampler):
    """Take a sampler out of the job: the learner stops publishing to it, its engine stops."""
    import ray

    ray.get(learner.disconnect.remote(ray.get(sampler.endpoint.remote())))
    ray.get(sampler.close.remote())
    ray.kill(sampler)


def write_adapter(learner, run_dir: Path, name: str = "adapter", arm: str = "") -> Path:
    """Fetch an arm's adapter PEFT files from the learner (maybe on another node) into
    run_dir/name, replacing what was there only once all files are written."""
    import shutil

    import ray

    out, tmp = run_dir / name, run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for file, data in ray.get(learner.adapter_files.remote(arm)).items():
        (tmp / file).write_bytes(data)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def actor_names(learners, samplers) -> dict:
    return {**{"learner" if r == 0 else f"learner-{r}": a for r, a in enumerate(learners)},
            **{f"sampler-{i}": s for i, s in enumerate(samplers)}}


def placement(learners, samplers) -> dict[str, dict]:
    """Where each actor runs: {name: {"node_id", "ip", "pid"}} (written to the run directory)."""
    import os

    import ray

    def where(self):
        return {"node_id": ray.get_runtime_context().get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid()}

    actors = actor_names(learners, samplers)
    return dict(zip(actors, ray.get([a.__ray_call__.remote(where) for a in actors.values()])))


def dead_actors(learners, samplers, where: dict[str, dict] | None = None, dropped: set[int] = frozenset()) -> list[str]:
    """The actors that are gone (killed, crashed, or lost with their node), each named with
    its node's address when Ray declared that node dead (`where`: placement's answer at the
    start); samplers `dropped` from the fleet (lost with their node, the run went on) are left out."""
    import ray

    actors = {name: a for name, a in actor_names(learners, samplers).items()
              if name not in {f"sampler-{i}" for i in dropped}}
    pings = {name: actor.__ray_call__.remote(lambda self: None) for name, actor in actors.items()}
    alive = {n["NodeID"]: n["Alive"] for n in ray.nodes()}
    dead = []
    for name, ping in pings.items():
        try:
            ray.get(ping, timeout=30)
        except ray.exceptions.RayActorError:
            node = (where or {}).get(name, {})
            gone = node and not alive.get(node["node_id"], False)
            dead.append(f"{name} (with its node {node['ip']}, which Ray declared dead)" if gone else name)
        except ray.exceptions.GetTimeoutError:  # busy, not dead
            pass
    return dead


def shutdown(learners, samplers):
    """Stop the vLLM engines (and their processes) and the actors, then leave Ray."""
    import ray

    for actor in [*samplers, *learners]:
        try:
            ray.get(actor.close.remote(), timeout=60)
        except Exception:  # an actor that already died has nothing left to close
            pass
        ray.kill(actor)
    ray.shutdown()
