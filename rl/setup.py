"""What the driver builds before its loop: run directory, model, data splits and actors."""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rl import arithmetic
from rl.config import Config, ConfigError, to_dict

log = logging.getLogger(__name__)


def make_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """The run directory, and the checkpoint this launch resumes from (run.resume), whose
    config is checked before this launch's config.yaml is written."""
    from rl.checkpoint import resume_point

    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir).expanduser().resolve() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = resume_point(cfg, run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir, resume


def resolve_model(cfg: Config) -> str:
    if cfg.model.path != "tiny":
        return cfg.model.path
    from rl.tiny_model import build_tiny_model

    return build_tiny_model(cfg.model.cache_dir)


@dataclass
class Split:
    """Prompt rows ({"prompt", "answer", "prompt_ids", ...}) and a seeded, resumable epoch order.

    Each epoch's order depends only on the seed and the epoch, so `state()` (rows handed out
    so far) is the exact position, and `restore(state)` resumes it.
    """

    rows: list[dict]
    seed: int = 0
    position: int = 0  # rows handed out so far, across epochs
    skipped: int = 0  # bad source rows left out (data.on_bad_row=skip)
    _order: list[int] = field(default_factory=list)

    def state(self, position: int | None = None) -> dict:
        """The order's state after `position` rows (default: all handed out so far)."""
        return {"position": self.position if position is None else position, "seed": self.seed,
                "size": len(self.rows)}

    def restore(self, state: dict):
        if (state["seed"], state["size"]) != (self.seed, len(self.rows)):
            raise ValueError(f"cannot resume a split of {state['size']} rows with seed {state['seed']} "
                             f"on {len(self.rows)} rows with seed {self.seed}: the data or the seed changed")
        self.position, self._order = state["position"], []

    def next_batch(self, n: int) -> list[dict]:
        batch = []
        for _ in range(n):
            epoch, i = divmod(self.position, len(self.rows))
            if i == 0 or not self._order:
                self._order = list(range(len(self.rows)))
                random.Random(self.seed * 1_000_003 + epoch).shuffle(self._order)
            batch.append(self.rows[self._order[i]])
            self.position += 1
        return batch


ARITHMETIC_TRAIN_SIZE = 5000  # distinct generated training problems


def _rows(source: str, role: str, count: int, cfg: Config) -> tuple[list[dict], int]:
    """The train or eval rows: generated, or of a file or datasets folder (count 0: all of
    it), and how many bad rows were skipped."""
    if source == "arithmetic":
        problems = arithmetic.problems(role, count, cfg.run.seed)
        return [{"prompt": p["prompt"], "answer": p["answer"]} for p in problems], 0
    from rl.data import load_rows

    split = cfg.data.train_split if role == "train" else cfg.data.eval_split
    rows, skipped = load_rows(source, cfg.data.prompt_key, cfg.data.answer_key, split, cfg.data.on_bad_row)
    if skipped:
        log.warning("%s: skipped %d bad rows (data.on_bad_row=skip); first: %s", source, len(skipped), skipped[0])
    return (rows[:count] if count else rows), len(skipped)


def tokenize_prompt(tokenizer, cfg: Config, prompt: str) -> list[int]:
    """The template applied, then the tokenizer's chat template around it if data.chat_template."""
    text = cfg.data.template.format(prompt=prompt)
    if not cfg.data.chat_template:
        return tokenizer(text)["input_ids"]
    if tokenizer.chat_template is None:
        raise ConfigError("data.chat_template is true but the model's tokenizer has no chat template")
    return list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                              tokenize=True)["input_ids"])


def load_splits(cfg: Config, model_path: str) -> tuple[Split, dict[str, Split]]:
    """The train split and the held-out sets ("eval": data.eval, then eval.extra by name),
    with prompts rendered by the template and tokenized once."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_size = ARITHMETIC_TRAIN_SIZE if cfg.data.train == "arithmetic" else 0
    train, train_skipped = _rows(cfg.data.train, "train", train_size, cfg)
    held_out = {name: _rows(path, "eval", cfg.data.eval_size, cfg)
                for name, path in {"eval": cfg.data.eval, **cfg.eval.extra}.items()}
    every = train + [row for rows, _ in held_out.values() for row in rows]
    for row in every:
        row["prompt_ids"] = tokenize_prompt(tokenizer, cfg, row["prompt"])
    too_long = [r for r in every if len(r["prompt_ids"]) + cfg.rollout.max_tokens > cfg.model.max_model_len]
    if too_long:
        raise ValueError(f"{len(too_long)} prompts exceed model.max_model_len - rollout.max_tokens "
                         f"({cfg.model.max_model_len} - {cfg.rollout.max_tokens}), e.g. {too_long[0]['prompt'][:80]!r}")
    return (Split(train, seed=cfg.run.seed, skipped=train_skipped),
            {name: Split(rows, skipped=skipped) for name, (rows, skipped) in held_out.items()})


def bundles(cfg: Config) -> list[dict[str, float]]:
    """Ray resources per actor: one bundle per learner rank, then one per sampler."""
    def bundle(cpus: float, gpus: float, custom: dict) -> dict[str, float]:
        return {k: v for k, v in {"CPU": cpus, "GPU": gpus, **custom}.items() if v}

    lr, ro = cfg.learner, cfg.rollout
    return ([bundle(lr.num_cpus, lr.num_gpus, lr.resources)] * lr.world_size
            + [bundle(ro.num_cpus, ro.num_gpus, ro.resources)] * ro.num_samplers)


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
                          f"rollout.num_samplers={cfg.rollout.num_samplers}: needs " + ", ".join(missing))
    group = placement_group(wanted, strategy="PACK" if cfg.run.placement == "pack" else "SPREAD")
    try:
        ray.get(group.ready(), timeout=cfg.run.placement_timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(f"Ray could not place the actors {wanted} within run.placement_timeout_s="
                           f"{cfg.run.placement_timeout_s:g}; free now: {ray.available_resources()}") from None
    return group


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


def actor_configs(cfg: Config, group) -> list[Config]:
    """The config of each bundle's actor (learner ranks, then samplers): cfg itself, except in
    run.mode=async on CPUs with neither cpu_cores set, where the learner and the samplers run
    at once: those that share a node get disjoint cores (split_cores) rather than contend."""
    import dataclasses

    import ray

    configs = [cfg] * len(bundles(cfg))
    on_cpu = not (cfg.learner.num_gpus or cfg.rollout.num_gpus)
    if (cfg.run.mode != "async" or not on_cpu or cfg.learner.cpu_cores or cfg.rollout.cpu_cores
            or cfg.learner.world_size > 1):
        return configs
    table = ray.util.placement_group_table(group)["bundles_to_node_id"]
    node_cpus = {n["NodeID"]: int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n["Alive"]}
    cores = split_cores([table[i] for i in range(len(configs))], [b.get("CPU", 0.0) for b in bundles(cfg)], node_cpus)
    print(f"run.mode=async: learner on CPUs {cores[0] or 'all'}, samplers on {[c or 'all' for c in cores[1:]]}",
          flush=True)
    return ([dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, cpu_cores=cores[0]))]
            + [dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, cpu_cores=c)) for c in cores[1:]])


def build_actors(cfg: Config, model_path: str, secret: bytes) -> tuple[list, list]:
    """The learner's ranks, then the samplers (which need the learner's manifest), placed and connected."""
    import ray

    group = place(cfg)
    configs, world = actor_configs(cfg, group), cfg.learner.world_size
    learners = start_learners(configs[0], model_path, secret, group)
    manifest = ray.get(learners[0].manifest.remote())
    samplers = [start_sampler(configs[world + i], model_path, secret, manifest, i, _in_bundle(group, world + i))
                for i in range(cfg.rollout.num_samplers)]
    ray.get(learners[0].connect.remote(ray.get([s.endpoint.remote() for s in samplers])))
    return learners, samplers


def start_learners(cfg: Config, model_path: str, secret: bytes, group, name: str = "learner") -> list:
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
             .remote(model_path, to_dict(cfg), secret, cfg.run.seed, r, master) for r in range(world)]
    if world > 1:
        ray.get(ranks[0].attach_peers.remote(ranks[1:]))
    return ranks


def start_sampler(cfg: Config, model_path: str, secret: bytes, manifest: dict, index: int,
                  bundle: dict | None = None):
    import ray

    from rollout.sampler import Sampler

    r = cfg.rollout
    # Ray restarts a sampler that dies (the same arguments, so the same seed); its calls are
    # not retried: the driver samples its lost groups again once it serves the newest adapter.
    actor = ray.remote(Sampler).options(name=f"sampler-{index}", num_cpus=r.num_cpus, num_gpus=r.num_gpus,
                                         resources=dict(r.resources), max_restarts=r.max_restarts,
                                         max_task_retries=0, **(bundle or {}))
    return actor.remote(model_path, to_dict(cfg), secret, manifest, cfg.run.seed + index)


def add_sampler(cfg: Config, model_path: str, secret: bytes, learner, index: int):
    """A sampler that joins a running job: it serves the learner's latest adapter before it gets prompts."""
    import ray

    sampler = start_sampler(cfg, model_path, secret, ray.get(learner.manifest.remote()), index)
    ray.get(learner.catch_up.remote(ray.get(sampler.endpoint.remote())))
    return sampler


def remove_sampler(learner, sampler):
    """Take a sampler out of the job: the learner stops publishing to it, its engine stops."""
    import ray

    ray.get(learner.disconnect.remote(ray.get(sampler.endpoint.remote())))
    ray.get(sampler.close.remote())
    ray.kill(sampler)


def write_adapter(learner, run_dir: Path, name: str = "adapter") -> Path:
    """Fetch the adapter's PEFT files from the learner (maybe on another node) into
    run_dir/name, replacing what was there only once all files are written."""
    import shutil

    import ray

    out, tmp = run_dir / name, run_dir / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for file, data in ray.get(learner.adapter_files.remote()).items():
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


def dead_actors(learners, samplers) -> list[str]:
    """Names of the actors that are gone (killed, crashed, or lost with their node)."""
    import ray

    actors = actor_names(learners, samplers)
    pings = {name: actor.__ray_call__.remote(lambda self: None) for name, actor in actors.items()}
    dead = []
    for name, ping in pings.items():
        try:
            ray.get(ping, timeout=30)
        except ray.exceptions.RayActorError:
            dead.append(name)
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
