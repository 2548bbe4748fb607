"""The config tree: recipes load, bad keys and types are named, light modules stay light."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rl.config import Config, ConfigError, describe, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads_and_starts_with_its_launch_command(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert "rl/run.py" in path.read_text().split("\n\n")[0]


def test_gpu_recipes_ask_for_gpus():
    for name in ("qwen2.5-math-1.5b-gsm8k.yaml", "qwen3-8b-math.yaml"):
        cfg = load_config(ROOT / "configs" / name)
        assert cfg.rollout.num_gpus >= 1 and cfg.learner.num_gpus >= 1 and cfg.model.dtype == "bfloat16"


def test_overrides_are_typed():
    cfg = load_config(ROOT / "configs/default.yaml", ["learner.lr=1e-2", "loss.ratio_cap=2", "run.name=x",
                                                       "lora.target_modules=[q_proj,v_proj]"])
    assert cfg.learner.lr == 0.01 and cfg.loss.ratio_cap == 2.0 and cfg.run.name == "x"
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert load_config(None, ["loss.ratio_cap=null"]).loss.ratio_cap is None


@pytest.mark.parametrize("override, message", [
    (["rollout.gruop_size=4"], "unknown config key rollout.gruop_size"),
    (["learner.lr=fast"], "learner.lr: expected float"),
    (["rollout.group_size=2.5"], "rollout.group_size: expected int"),
    (["run.progress=3"], "run.progress: expected bool"),
    (["nosuch.key=1"], "unknown config key nosuch"),
    (["rollout=3"], "rollout: expected a mapping"),
    (["loss.normalizer=mean"], "loss.normalizer must be one of sequences | tokens | none, got 'mean'"),
    (["learner.zero_stage=3"], "learner.zero_stage must be one of 0 | 1 | 2, got 3"),
    (["learner.zero_stage='1'"], "learner.zero_stage must be one of 0 | 1 | 2, got '1'"),
    (["run.mode=Async"], "run.mode must be one of sync | async"),
    (["loss.clip_eps=0.2", "loss.ratio_cap=2"], "loss.clip_eps and loss.ratio_cap are two ways"),
    (["rollout.group_size=1"], "rollout.group_size must be >= 2"),
    (["learner.lr"], "expected dotted.key=value"),
    (["lora.rank=-1"], "lora.rank must be >= 1, or 0 for full fine-tuning"),
    (["lora.rank=0", "sync.max_message_mb=16"], "chunks of sync.chunk_mb: it must be > 0 and <= sync.max_message_mb"),
    (["run.mode=stream", "lora.rank=0"], "run.mode=stream needs LoRA (lora.rank >= 1)"),
    (["run.mode=stream", "arms.grid={learner.lr: [1e-3, 1e-4]}"], "run.mode=stream runs one experiment"),
    (["run.mode=async", "rollout.filter_zero_signal=true"], "rollout.filter_zero_signal needs run.mode sync or stream"),
    (["rollout.max_draws_per_step=4"], "rollout.max_draws_per_step must be 0 or >= rollout.prompts_per_step"),
    (["rollout.oversample=-2"], "rollout.oversample must be >= 0, or -1"),
    (["rollout.length_profile=short"], "rollout.length_profile must be one of  | longtail"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, override)


def test_resume_freedom_is_recorded_on_the_fields():
    from rl.checkpoint import run_keys
    from rl.config import free_keys

    free = free_keys()
    assert {"run.steps", "learner.micro_batch_size", "eval.samples", "logging.wandb"} <= free  # eval, logging: whole
    assert not {"learner.lr", "rollout.temperature", "loss.normalizer", "lora.rank", "run.seed"} & free
    keys = run_keys(to_dict(load_config()))
    assert "learner.lr" in keys and not set(keys) & free
    assert all(("Free on resume." in line) == (line.split(" ")[0] in free) for line in describe())


def test_bad_key_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  temprature: 0.5\n")
    with pytest.raises(ConfigError, match=r"rollout\.temprature.*bad\.yaml"):
        load_config(bad)


def test_help_lists_every_field():
    out = subprocess.run([sys.executable, str(ROOT / "rl/run.py"), "--help"], capture_output=True, text=True, check=True)
    keys = [line.split(" ")[0] for line in describe()]
    assert len(keys) > 30
    for key in keys:
        assert f"  {key} (" in out.stdout


def test_print_config_and_config_errors_exit_cleanly():
    out = subprocess.run([sys.executable, str(ROOT / "rl/run.py"), "configs/default.yaml", "run.steps=7",
                          "--print-config"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and "steps: 7" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "rl/run.py"), "run.stpes=7"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode != 0 and "unknown config key run.stpes" in bad.stderr


def test_light_modules_import_without_heavy_dependencies():
    code = ("import sys; import rl.config, demo.arithmetic, rl.data, rewards.math, rewards.pool, rollout.channel, "
            "common.records, common.specs, common.cpus, rl.faults; "
            "heavy = [m for m in ('torch', 'vllm', 'deepspeed', 'ray', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_actor_packages_never_import_the_driver():
    """learner/, rollout/, rewards/ and common/ sit below rl/: none of their modules imports rl."""
    import ast

    upward = []
    for package in ("learner", "rollout", "rewards", "common"):
        for path in (ROOT / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                upward += [f"{path.relative_to(ROOT)}: {n}" for n in names if n == "rl" or n.startswith("rl.")]
    assert not upward, upward
