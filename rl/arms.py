"""Arms: many experiments in one job, one adapter each, on one sampler fleet and one learner.

    arms:
      grid: {learner.lr: [3e-4, 1e-3], lora.rank: [1, 4]}    # every combination: 4 arms
      list: [{name: control, learner.lr: 0.0}, {loss.clip_eps: 0.2}]

`arms.grid` maps dotted keys to lists of values and its product is taken; `arms.list` is a
list of arms, each a mapping of dotted keys to values with an optional `name`. With both,
each list entry is combined with every grid point. Each arm is a full experiment, with its
own config (the run's, with the arm's values), adapter, optimiser state, data order, version
stream, metrics and checkpoints in RUN_DIR/arms/<name>/, laid out like a run directory.

Only what an adapter, its optimiser, its data or its rollouts own may vary (`VARIES`); the
model and the fleet are shared, so any other key is an error naming it. Arm names come from
the values that differ between arms (`lr=3e-4,rank=4`), or from `name`. Light module.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rl.config import ArmsConfig, Config, ConfigError, with_values
from rl.faults import Faults

# Keys an arm may set: those of its adapter, optimiser, objective, reward, sampling and data.
VARIES = frozenset({"lora.rank", "lora.alpha", "lora.target_modules", "learner.lr", "learner.weight_decay",
                    "learner.grad_clip", "run.seed", "rollout.temperature", "data.train"})
VARIES_SECTIONS = ("loss.", "reward.")  # every key in these
SHORT = {"learner.lr": "lr", "lora.rank": "rank", "lora.alpha": "alpha", "run.seed": "seed",
         "lora.target_modules": "targets", "learner.weight_decay": "wd", "rollout.temperature": "temp"}


def may_vary(key: str) -> bool:
    return key in VARIES or key.startswith(VARIES_SECTIONS)


def expand(cfg: Config) -> list[tuple[str, Config]]:
    """The arms of a run as (name, config) pairs; a run without an arms section is one arm
    named "" with the run's config."""
    grid, listed = cfg.arms.grid, cfg.arms.list
    if not grid and not listed:
        return [("", cfg)]
    if cfg.learner.world_size != 1 or cfg.learner.zero_stage != 0:
        raise ConfigError("arms train every adapter in one learner process: learner.world_size must be 1 and "
                          "learner.zero_stage 0 (a rank-1 adapter's optimiser state is megabytes; ZeRO shards "
                          "nothing worth it)")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"arms.grid.{key}: expected a non-empty list of values, got {values!r}")
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    entries = []  # (where, its name or None, its values)
    for i, entry in enumerate(listed or [{}]):
        if not isinstance(entry, dict):
            raise ConfigError(f"arms.list[{i}]: expected a mapping of dotted keys to values, got {entry!r}")
        entries.append((f"arms.list[{i}]", entry.get("name"), {k: v for k, v in entry.items() if k != "name"}))
    arms = [(where, name, {**values, **point}) for (where, name, values), point in itertools.product(entries, points)]
    for where, _, values in arms:
        for key in values:
            if not may_vary(key):
                raise ConfigError(f"{'arms.grid' if key in grid else where}: {key} cannot vary between arms (the "
                                  "model, the fleet and the loop are shared); these may: "
                                  + ", ".join(sorted(VARIES)) + ", loss.*, reward.*")
    configs = [with_values(without_arms(cfg), values, f"{where}: ") for where, _, values in arms]
    full = [where for (where, _, _), c in zip(arms, configs) if c.lora.rank == 0]
    if full and len(configs) > 1 and cfg.model.dtype != "float32":
        raise ConfigError(f"{full[0]}: a full fine-tuning arm (lora.rank 0) in a sweep with model.dtype="
                          f"{cfg.model.dtype} would step {cfg.model.dtype} weights (updates below a weight's "
                          "last bit, ~0.4% in bfloat16, round away): a sweep's learner keeps no float32 master "
                          "copy; run it alone (DeepSpeed keeps one) or with model.dtype=float32")
    return list(zip(names([name for _, name, _ in arms], configs, sorted(grid)), configs))


def without_arms(cfg: Config) -> Config:
    """The run's config with no arms section: what each arm's own config starts from."""
    return dataclasses.replace(cfg, arms=ArmsConfig())


def names(given: list[str | None], configs: list[Config], grid_keys: list[str]) -> list[str]:
    """Each arm's folder name: the values that differ between arms, as `lr=3e-4,rank=4`, after
    the arm's `name` when it has one (a named list entry keeps only the grid's part); unique
    (a repeat gets -2, -3, ...) and safe as a folder name."""
    from rl.config import to_dict

    flat = [flatten(to_dict(c)) for c in configs]
    differ = [k for k in sorted(flat[0]) if len({repr(f[k]) for f in flat}) > 1]
    out, seen = [], {}
    for name, f in zip(given, flat):
        if name is not None and not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=,+-]*", name)):
            raise ConfigError(f"arm name {name!r}: use letters, digits and . _ = , + - (a folder name)")
        shown = [f"{label(k, differ)}={show(f[k])}" for k in differ if name is None or k in grid_keys]
        name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(([name] if name else []) + shown) or "arm")
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}-{seen[name]}")
    return out


def flatten(tree: dict) -> dict[str, Any]:
    return {f"{section}.{key}": value for section, fields in tree.items() for key, value in fields.items()}


def label(key: str, keys: list[str]) -> str:
    """The short name of a varied key, unless another varied key would share it."""
    short = SHORT.get(key, key.rsplit(".", 1)[-1])
    clash = [k for k in keys if SHORT.get(k, k.rsplit(".", 1)[-1]) == short]
    return short if len(clash) == 1 else key


def show(value) -> str:
    """A value as it reads in a name: 3e-4, 1, q_proj+v_proj, true."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value and not 1e-2 <= abs(value) < 1e5:
            mantissa, exponent = f"{value:.6e}".split("e")
            return f"{float(mantissa):g}e{int(exponent)}"
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "+".join(map(show, value))
    return str(value)


@dataclass
class ArmRun:
    """One arm as the driver runs it: its config, folder, data, reward, counters and the
    versions of its adapter (a run without arms is one, named "", in the run directory)."""

    name: str
    cfg: Config
    run_dir: Path
    train: Any = None  # its training Split (rl/splits.py)
    rewards: Any = None  # its RewardPool (shared by arms with the same reward.fn, workers and timeout)
    faults: Faults = field(default_factory=Faults)
    published: dict[int, str] = field(default_factory=dict)  # version -> payload digest
    error: str = ""  # why it stopped before the run's end ("" while it runs)
