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


def make_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir).expanduser().resolve() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir


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

    def state(self) -> dict:
        return {"position": self.position, "seed": self.seed, "size": len(self.rows)}

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


def load_splits(cfg: Config, model_path: str) -> tuple[Split, Split]:
    """Train and held-out splits with prompts rendered by the template and tokenized once."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_size = ARITHMETIC_TRAIN_SIZE if cfg.data.train == "arithmetic" else 0
    train, train_skipped = _rows(cfg.data.train, "train", train_size, cfg)
    evals, eval_skipped = _rows(cfg.data.eval, "eval", cfg.data.eval_size, cfg)
    for row in train + evals:
        row["prompt_ids"] = tokenize_prompt(tokenizer, cfg, row["prompt"])
    too_long = [r for r in train + evals if len(r["prompt_ids"]) + cfg.rollout.max_tokens > cfg.model.max_model_len]
    if too_long:
        raise ValueError(f"{len(too_long)} prompts exceed model.max_model_len - rollout.max_tokens "
                         f"({cfg.model.max_model_len} - {cfg.rollout.max_tokens}), e.g. {too_long[0]['prompt'][:80]!r}")
    return Split(train, seed=cfg.run.seed, skipped=train_skipped), Split(evals, skipped=eval_skipped)


def build_actors(cfg: Config, model_path: str, secret: bytes):
    """The learner, then the samplers (which need the learner's manifest), connected."""
    import ray

    from learner.learner import Learner

    learner = ray.remote(num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus)(Learner).options(
        name="learner").remote(model_path, to_dict(cfg), secret, cfg.run.seed)
    manifest = ray.get(learner.manifest.remote())
    samplers = [start_sampler(cfg, model_path, secret, manifest, i) for i in range(cfg.rollout.num_samplers)]
    ray.get(learner.connect.remote(ray.get([s.endpoint.remote() for s in samplers])))
    return learner, samplers


def start_sampler(cfg: Config, model_path: str, secret: bytes, manifest: dict, index: int):
    import ray

    from rollout.sampler import Sampler

    actor = ray.remote(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus)(Sampler)
    return actor.options(name=f"sampler-{index}").remote(model_path, to_dict(cfg), secret, manifest,
                                                         cfg.run.seed + index)


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


def write_adapter(learner, run_dir: Path) -> Path:
    """Fetch the adapter's PEFT files from the learner (maybe on another node) into run_dir/adapter."""
    import ray

    out = run_dir / "adapter"
    out.mkdir(exist_ok=True)
    for name, data in ray.get(learner.adapter_files.remote()).items():
        (out / name).write_bytes(data)
    return out


def dead_actors(learner, samplers) -> list[str]:
    """Names of the actors that are gone (killed, crashed, or lost with their node)."""
    import ray

    actors = {"learner": learner, **{f"sampler-{i}": s for i, s in enumerate(samplers)}}
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


def shutdown(learner, samplers):
    """Stop the vLLM engines (and their processes) and the actors, then leave Ray."""
    import ray

    for actor in [*samplers, learner]:
        try:
            ray.get(actor.close.remote(), timeout=60)
        except Exception:  # an actor that already died has nothing left to close
            pass
        ray.kill(actor)
    ray.shutdown()
