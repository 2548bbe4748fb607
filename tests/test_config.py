"""The config tree: recipes load, bad keys and types are named, light modules stay light."""

import subprocess
import sys
from pathlib import Path

import pytest

from rl.config import Config, ConfigError, describe, load_config

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
    (["loss.normalizer=mean"], "loss.normalizer must be"),
    (["rollout.group_size=1"], "rollout.group_size must be >= 2"),
    (["learner.lr"], "expected dotted.key=value"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(None, override)


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
    code = ("import sys; import rl.config, demo.arithmetic, rl.data, rewards.math, rewards.pool, rollout.channel; "
            "heavy = [m for m in ('torch', 'vllm', 'deepspeed', 'ray', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
