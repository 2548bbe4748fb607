"""Checkpoint folders: atomic writes, what resume accepts and refuses (no Ray, no engines).

The learner's side (DeepSpeed state in and out) is tested in test_integration.py, and a
whole job killed and resumed in test_run.py.
"""

import json
import os

import pytest

from rl import checkpoint
from rl.config import ConfigError, load_config, to_dict


def files(step: int) -> dict[str, bytes]:
    return {"learner/deepspeed/model.pt": bytes([step]) * 1000, "adapter/adapter_config.json": b"{}"}


def state(cfg, step: int) -> dict:
    return {"step": step, "config": to_dict(cfg)}


def test_write_keeps_the_newest_k_and_reads_back(tmp_path):
    cfg = load_config()
    root = tmp_path / "run" / "checkpoints"
    for step in (10, 20, 30):
        checkpoint.write(root, step, files(step), state(cfg, step), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000020", "step-000030"]
    learner_files, saved = checkpoint.read(root / "step-000030")
    assert learner_files == {"deepspeed/model.pt": bytes([30]) * 1000} and saved["step"] == 30
    assert checkpoint.resume_point(cfg, tmp_path / "run") == root / "step-000030"


def test_a_checkpoint_interrupted_mid_write_is_ignored(tmp_path, monkeypatch):
    cfg = load_config()
    root = tmp_path / "run" / "checkpoints"
    checkpoint.write(root, 10, files(10), state(cfg, 10), keep=3)

    # The process dies after the first file of step 20: a temporary folder is all that is left.
    written = []

    def dies_after_one_file(path, data):
        if written:
            raise SystemExit("killed")
        written.append(path)
        real_write(path, data)

    real_write = checkpoint._write
    monkeypatch.setattr(checkpoint, "_write", dies_after_one_file)
    with pytest.raises(SystemExit):
        checkpoint.write(root, 20, files(20), state(cfg, 20), keep=3)
    monkeypatch.undo()
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp-step-000020")]

    # Folders that look like checkpoints but are not complete: no manifest; a file cut short.
    checkpoint.write(root, 30, files(30), state(cfg, 30), keep=3)
    (root / "step-000030" / "manifest.json").unlink()
    checkpoint.write(root, 40, files(40), state(cfg, 40), keep=3)
    model = root / "step-000040" / "learner" / "deepspeed" / "model.pt"
    model.write_bytes(model.read_bytes()[:500])
    assert "wrong size" in checkpoint.problem(root / "step-000040")
    checkpoint.write(root, 50, files(50), state(cfg, 50), keep=4)
    flipped = bytearray(files(50)["learner/deepspeed/model.pt"])
    flipped[7] ^= 1
    (root / "step-000050" / "learner" / "deepspeed" / "model.pt").write_bytes(bytes(flipped))
    assert "SHA-256" in checkpoint.problem(root / "step-000050")

    assert checkpoint.resume_point(cfg, tmp_path / "run") == root / "step-000010"
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]  # the leftover is removed


def test_a_changed_config_is_refused_with_the_keys_named(tmp_path):
    cfg = load_config(None, ["learner.lr=0.001", "rollout.group_size=8"])
    checkpoint.write(tmp_path / "checkpoints", 5, files(5), state(cfg, 5), keep=1)
    changed = load_config(None, ["learner.lr=0.002", "rollout.group_size=4", "run.steps=500",
                                 "rollout.num_cpus=2", "reward.num_workers=4", "eval.extra={gsm8k: /data/t.jsonl}",
                                 "logging.tensorboard=true", "rollout.resources={sampler_node: 1}"])
    with pytest.raises(ConfigError) as refused:
        checkpoint.resume_point(changed, tmp_path)
    message = str(refused.value)
    assert "learner.lr: 0.001 -> 0.002" in message and "rollout.group_size: 8 -> 4" in message
    # Keys that only change where and how long the run goes are free.
    assert "run.steps" not in message and "num_cpus" not in message and "num_workers" not in message
    assert "eval" not in message and "logging" not in message and "resources" not in message
    allowed = load_config(None, ["learner.lr=0.002", "rollout.group_size=4",
                                 "run.resume_allow=[learner.lr, rollout.group_size]"])
    assert checkpoint.resume_point(allowed, tmp_path) is not None
    with pytest.raises(ConfigError, match="rollout.group_size"):
        checkpoint.resume_point(load_config(None, ["learner.lr=0.002", "rollout.group_size=4",
                                                   "run.resume_allow=[learner.lr]"]), tmp_path)
    assert checkpoint.resume_point(load_config(None, ["learner.lr=0.5", "run.resume_allow=[all]"]), tmp_path)
    # The hash ignores the free keys and sees the others.
    assert checkpoint.config_hash(to_dict(cfg)) == checkpoint.config_hash(
        to_dict(load_config(None, ["learner.lr=0.001", "run.steps=7", "sync.ack_timeout_s=5"])))
    assert checkpoint.config_hash(to_dict(cfg)) != checkpoint.config_hash(to_dict(changed))


def test_resume_never_and_an_explicit_folder(tmp_path):
    cfg = load_config()
    path = checkpoint.write(tmp_path / "checkpoints", 5, files(5), state(cfg, 5), keep=1)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        checkpoint.resume_point(load_config(None, ["run.resume=never"]), tmp_path)
    assert checkpoint.resume_point(load_config(None, [f"run.resume={path}"]), tmp_path / "elsewhere") == path
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoint.resume_point(load_config(None, [f"run.resume={tmp_path}/nothing"]), tmp_path)
    assert checkpoint.resume_point(cfg, tmp_path / "fresh") is None


def test_metrics_after_the_checkpoint_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "x": s}) + "\n" for s in range(7)))
    checkpoint.truncate_metrics(path, 4)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4]
    assert not os.path.exists(tmp_path / "metrics.tmp")


def test_rng_states_round_trip_through_json():
    import random

    import numpy as np
    import torch

    from learner.learner import rng_states, set_rng_states

    saved = json.loads(json.dumps(rng_states()))  # as the checkpoint stores them: no pickle

    def draw():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    first = draw()
    draw()
    set_rng_states(saved)
    assert draw() == first
