"""Every GPU recipe in configs/ rehearsed on CPU (rl/rehearse.py): 3 steps, in bfloat16 in the
learner and vLLM-CPU, vLLM's engine core in a process of its own, with only the keys that name
the model, the data, the hardware and the sizes replaced (issue 29). A recipe that cannot pass
its rehearsal is a bug in the recipe or the code; before this test, both recipes would have
stopped at their first probe (a float32 tolerance against bfloat16 numerics)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rl.config import load_config, to_dict
from rl.rehearse import REPLACED, SCALED, names_gpus, rehearsal

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(p.name for p in (ROOT / "configs").glob("*.yaml") if names_gpus(load_config(p)))


def flat(cfg) -> dict:
    return {f"{section}.{key}": value for section, fields in to_dict(cfg).items() for key, value in fields.items()}


def test_there_are_gpu_recipes():
    assert RECIPES == ["qwen2.5-math-1.5b-gsm8k.yaml", "qwen3-8b-math.yaml"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_rehearsal_changes_only_the_listed_keys(recipe):
    """The rehearsal keeps every key but the model, data, hardware and size keys; among those
    kept are the ones a GPU run lives by (mode, staleness, filter, probe, cap, dtype, chunking,
    checkpointing, token budgets)."""
    path = ROOT / "configs" / recipe
    original, (rehearsed, _) = flat(load_config(path)), rehearsal(path)
    changed = {k for k, v in flat(rehearsed).items() if original[k] != v}
    assert changed <= set(REPLACED) | set(SCALED), changed - set(REPLACED) - set(SCALED)
    kept = flat(rehearsed)
    for key in ("run.mode", "rollout.max_staleness", "rollout.filter_zero_signal", "loss.ratio_cap", "model.dtype",
                "learner.logprob_chunk", "learner.gradient_checkpointing", "learner.max_tokens_per_micro",
                "sync.probe_every", "sync.probe_tolerance"):
        assert kept[key] == original[key], key
    assert kept["model.dtype"] == "bfloat16" and kept["rollout.separate_engine"] is True


@pytest.mark.parametrize("recipe", RECIPES)
def test_bf16_streaming_recipes_cap_the_ratio(recipe):
    """Issue 29, item 6: stale groups and bfloat16 numerics make heavy-tailed ratios; a recipe
    that streams in bfloat16 caps them (TIS) or masks them (MIS)."""
    cfg = load_config(ROOT / "configs" / recipe)
    if cfg.model.dtype == "bfloat16" and cfg.rollout.max_staleness > 0:
        assert cfg.loss.ratio_cap is not None or cfg.loss.ratio_mask is not None


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", RECIPES)
def test_a_gpu_recipe_passes_its_rehearsal(recipe, tmp_path):
    """3 steps of the recipe as rehearsed: every step logged, its own mode and loss options at
    work, the log-prob probe passed after the first step within the bfloat16 tolerance, the
    final checkpoint written, and the end-of-run report made."""
    proc = subprocess.run([sys.executable, "rl/rehearse.py", f"configs/{recipe}", f"run.output_dir={tmp_path}",
                           "run.name=rehearsal"], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "engine in separate processes" in proc.stdout + proc.stderr
    run_dir = tmp_path / "rehearsal"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    cfg = load_config(ROOT / "configs" / recipe)
    for r in rows[1:]:
        assert r["rollout/staleness_max"] <= cfg.rollout.max_staleness
        assert "learner/capped_frac" in r and "reward/unfiltered_accuracy" in r and r["learner/entropy"] > 0
        # Real completions, not a model that stops at once (which another model's prompt format
        # made it do: every number above would then hold of one EOS token).
        assert r["rollout/response_len"] > 5
    # The probe compared real bfloat16 numerics (a gap above 0) and found them within tolerance.
    probed = rows[1]
    assert probed["sync/probe_tolerance"] == 5e-2 and 0 < probed["sync/probe_gap_mean"] <= 5e-2
    assert (run_dir / "checkpoints" / "step-000003" / "state.json").exists()
    assert (run_dir / "report.md").exists() and (run_dir / "adapter" / "adapter_model.safetensors").exists()
