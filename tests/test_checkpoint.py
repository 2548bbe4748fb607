"""Checkpoint folders: atomic writes, what resume accepts and refuses (no engines).

The learner's side (its state in and out, exact at every ZeRO stage) is tested in
test_integration.py, and a whole job killed and resumed in test_run.py.
"""

import hashlib
import json
import logging
import os
import pickle
import shutil
import signal

import pytest

from rl import checkpoint
from rl.config import ConfigError, load_config, to_dict

MODEL = "learner/arm.safetensors"


def safetensors(values: list[float], name: str = "weight/w", dtype: str = "F32") -> bytes:
    """A safetensors file of one 1-d tensor, written by hand (the format: a little-endian
    header length, the JSON header, the data)."""
    import struct

    data = struct.pack(f"<{len(values)}f", *values) if dtype == "F32" else struct.pack(f"<{len(values)}d", *values)
    header = json.dumps({name: {"dtype": dtype, "shape": [len(values)], "data_offsets": [0, len(data)]}}).encode()
    return len(header).to_bytes(8, "little") + header + data


def rng_json() -> bytes:
    """learner/rng-rank0.json as learner.rng_states writes it (torch's state: any bytes here)."""
    import random

    import numpy as np

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return json.dumps({"python": [version, list(internal), gauss],
                       "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                       "torch": [0] * 16, "cuda": []}).encode()


def files(step: int) -> dict[str, bytes]:
    """What a checkpoint holds: the learner's state, its RNG states and the adapter, each in
    its format (the tensors' values stand for the step)."""
    meta = {"arm": "", "step": step, "version": step, "engine": {"global_steps": step}}
    return {MODEL: safetensors([float(step)] * 250), "learner/arm.json": json.dumps(meta).encode(),
            "learner/rng-rank0.json": rng_json(), "adapter/adapter_config.json": b"{}",
            "adapter/adapter_model.safetensors": safetensors([float(step)] * 2, "lora_A.weight")}


def state(cfg, step: int) -> dict:
    return {"step": step, "version": step, "config": to_dict(cfg), "data": {"position": 8 * step, "seed": 0, "size": 64},
            "faults": {"fault/skipped_steps": 0, "fault/resumes": 0, "fault/sampler_restarts": 0,
                       "fault/resampled_groups": 0}}


def test_write_keeps_the_newest_k_and_reads_back(tmp_path):
    cfg = load_config()
    root = tmp_path / "run" / "checkpoints"
    for step in (10, 20, 30):
        checkpoint.write(root, step, files(step), state(cfg, step), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000020", "step-000030"]
    learner_files, saved = checkpoint.read(root / "step-000030")
    assert learner_files == {k.removeprefix("learner/"): v for k, v in files(30).items() if k.startswith("learner/")}
    assert saved["step"] == 30
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
    model = root / "step-000040" / MODEL
    model.write_bytes(model.read_bytes()[:500])
    assert "wrong size" in checkpoint.problem(root / "step-000040")
    checkpoint.write(root, 50, files(50), state(cfg, 50), keep=4)
    flipped = bytearray(files(50)[MODEL])
    flipped[7] ^= 1
    (root / "step-000050" / MODEL).write_bytes(bytes(flipped))
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


@pytest.mark.parametrize("tail", [b'{"step": 7, "reward/me', b"\0" * 300, b'{"step": 7, "x": "\xc3', b"[7]\n",
                                  b"\0\0\0\n" + json.dumps({"step": 3}).encode() + b"\n"])
def test_a_torn_or_nul_filled_line_is_dropped_with_a_warning(tmp_path, caplog, tail):
    """metrics.jsonl is flushed, never fsynced: a crash can leave a line cut short (even inside
    a UTF-8 character) or a block of NULs where the file system had not written the data."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b"".join(json.dumps({"step": s}).encode() + b"\n" for s in range(7)) + tail)
    with caplog.at_level(logging.WARNING):
        checkpoint.truncate_metrics(path, 5)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [0, 1, 2, 3, 4, 5] + (
        [3] if tail.endswith(b'3}\n') else [])
    assert f"{path} line 8: dropped" in caplog.text


def rehash(path):
    """Make manifest.json list every file under `path` with its true size and hash, as someone
    with write access to the run directory could."""
    listed = {f.relative_to(path).as_posix(): f.read_bytes() for f in path.rglob("*")
              if f.is_file() and f.name != "manifest.json"}
    (path / "manifest.json").write_text(json.dumps(
        {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in listed.items()}))


class RunsCode:
    """Unpickling this makes a folder: the marker that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def test_a_pickle_in_a_checkpoint_is_never_loaded(tmp_path):
    """A checkpoint in DeepSpeed's own format (learner/deepspeed/*.pt, which DeepSpeed loads with
    torch.load(weights_only=False)), or a pickle put in place of the learner's safetensors, with
    the manifest made to match: refused or rejected as data, and the pickle's code never runs."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    cfg = load_config()
    root = tmp_path / "run" / "checkpoints"
    marker = tmp_path / "code-ran"
    forged = pickle.dumps(RunsCode(marker))
    checkpoint.write(root, 10, files(10), state(cfg, 10), keep=3)

    # The old format, newest: refused with the reason, on auto-resume as with run.resume=PATH.
    old = checkpoint.write(root, 20, files(20), state(cfg, 20), keep=3)
    for name in (MODEL, "learner/arm.json"):
        (old / name).unlink()
    (old / "learner" / "deepspeed").mkdir()
    (old / "learner" / "deepspeed" / "mp_rank_00_model_states.pt").write_bytes(forged)
    rehash(old)
    assert "DeepSpeed's own format" in checkpoint.problem(old) and "never loaded" in checkpoint.problem(old)
    with pytest.raises(ConfigError, match="step-000020: written by an earlier version"):
        checkpoint.resume_point(cfg, tmp_path / "run")
    with pytest.raises(ConfigError, match="not a complete checkpoint: written by an earlier version"):
        checkpoint.resume_point(load_config(None, [f"run.resume={old}"]), tmp_path / "elsewhere")
    with pytest.raises(checkpoint.CheckpointError, match="DeepSpeed's own format"):
        checkpoint.read(old)

    # A pickle as the learner's safetensors, the manifest made to match: its header is checked
    # before any actor starts (the checkpoint is skipped), and its bytes are only ever parsed
    # as safetensors (the learner's load), which rejects them too.
    shutil.rmtree(old)
    (root / "step-000010" / MODEL).write_bytes(forged)
    rehash(root / "step-000010")
    assert "learner/arm.safetensors: a safetensors header of" in checkpoint.problem(root / "step-000010")
    assert checkpoint.resume_point(cfg, tmp_path / "run") is None
    with pytest.raises(SafetensorError):
        load((root / "step-000010" / MODEL).read_bytes())
    assert not marker.exists()


def test_a_file_the_manifest_does_not_list_makes_a_checkpoint_incomplete(tmp_path, caplog):
    cfg = load_config()
    root = tmp_path / "run" / "checkpoints"
    checkpoint.write(root, 10, files(10), state(cfg, 10), keep=3)
    newer = checkpoint.write(root, 20, files(20), state(cfg, 20), keep=3)
    (newer / "learner" / "rng-rank1.json").write_text("{}")
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resume_point(cfg, tmp_path / "run") == root / "step-000010"
    assert "learner/rng-rank1.json is not listed in manifest.json" in caplog.text
    with pytest.raises(ConfigError, match="learner/rng-rank1.json is not listed in manifest.json"):
        checkpoint.resume_point(load_config(None, [f"run.resume={newer}"]), tmp_path / "elsewhere")
    # Listed, but no file of a checkpoint; and a name outside the folder.
    (newer / "learner" / "rng-rank1.json").unlink()
    (newer / "learner" / "extra.bin").write_bytes(b"x")
    rehash(newer)
    assert checkpoint.problem(newer) == "manifest.json lists learner/extra.bin, not a file a checkpoint holds"
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest.pop("learner/extra.bin")
    manifest["../../../etc/hostname"] = manifest["state.json"]
    (newer / "manifest.json").write_text(json.dumps(manifest))
    assert "not a file of the checkpoint" in checkpoint.problem(newer)
    assert checkpoint.resume_point(cfg, tmp_path / "run") == root / "step-000010"


@pytest.mark.parametrize("manifest, why", [
    ({}, "manifest.json is dict {}, not an object naming the checkpoint's files"),
    (["state.json"], "manifest.json is list"),
    ({"state.json": "abc"}, "the entry for 'state.json' is not"),
    ({"state.json": {"bytes": "12", "sha256": "0" * 64}}, "the entry for 'state.json' is not"),
    ("drop learner/arm.json", "manifest.json does not list learner/arm.json"),
    ("drop adapter/adapter_model.safetensors", "does not list adapter/"),
    ("drop state.json", "does not list state.json"),
])
def test_a_malformed_manifest_is_skipped_with_a_warning_and_never_raises(tmp_path, caplog, manifest, why):
    """In a newer folder, it stops neither a resume (the good older checkpoint is used) nor
    the pruning of a running job's checkpoints; pruning leaves that folder alone."""
    cfg = load_config()
    root = tmp_path / "run" / "checkpoints"
    checkpoint.write(root, 10, files(10), state(cfg, 10), keep=2)
    bad = checkpoint.write(root, 20, files(20), state(cfg, 20), keep=2)
    if isinstance(manifest, str):  # a manifest (with its file removed) that misses a file every checkpoint has
        name = manifest.split()[1]
        (bad / name).unlink()
        rehash(bad)
    else:
        (bad / "manifest.json").write_text(json.dumps(manifest))
    with caplog.at_level(logging.WARNING):
        assert why in checkpoint.problem(bad)
        assert checkpoint.complete(root) == [root / "step-000010"]
        assert checkpoint.resume_point(cfg, tmp_path / "run") == root / "step-000010"
        for step in (30, 40):  # pruning at the next checkpoints, keep=2
            checkpoint.write(root, step, files(step), state(cfg, step), keep=2)
    assert f"ignoring checkpoint {bad}: " in caplog.text and why in caplog.text
    assert sorted(p.name for p in root.iterdir()) == ["step-000020", "step-000030", "step-000040"]


def test_only_exactly_named_folders_are_checkpoints(tmp_path):
    """An operator's copy step-000020-before-fix is neither resumed from (it was taken as the
    newest) nor deleted by pruning (which then deleted the real step-000020)."""
    cfg = load_config()
    root = tmp_path / "run" / "checkpoints"
    checkpoint.write(root, 10, files(10), state(cfg, 10), keep=2)
    real = checkpoint.write(root, 20, files(20), state(cfg, 20), keep=2)
    shutil.copytree(real, root / "step-000020-before-fix")
    shutil.copytree(real, root / "step-0000020")
    assert checkpoint.resume_point(cfg, tmp_path / "run") == real
    checkpoint.write(root, 30, files(30), state(cfg, 30), keep=2)
    assert {p.name for p in root.iterdir()} == {"step-000020", "step-0000020", "step-000020-before-fix", "step-000030"}
    assert checkpoint.step_of(root / "step-1000000") == 1000000  # past six digits, still in step order
    checkpoint.write(root, 1000000, files(40), state(cfg, 1000000), keep=2)
    assert checkpoint.complete(root) == [root / "step-000030", root / "step-1000000"]
    # A state.json of another step than the folder's name (a renamed copy) is not a checkpoint.
    os.rename(root / "step-000030", root / "step-000035")
    assert checkpoint.problem(root / "step-000035") == "state.json is of step 30, not of the folder's step 35"


@pytest.mark.integration
def test_a_relaunch_without_a_checkpoint_logs_each_step_once(tmp_path):
    """An attempt that dies before its first checkpoint leaves metrics, samples and a best
    adapter: the relaunch, which starts at step 0, moves them to previous-attempt-1 (saying
    so), logs steps 0..N once, and keeps its own best adapter, not the dead attempt's."""
    import ray

    from rl.arms import ArmRun
    from rl.faults import Faults
    from rl.samplers import Samplers
    from rl.run import rl_loop
    from rl.splits import Split
    from tests.fakes import FakeLearner, FakeRewards, FakeSampler

    class DiesAfter:
        """The process dies once `step` is logged, before any checkpoint (run.checkpoint_every=0)."""

        def __init__(self, step):
            self.step = step

        @property
        def signal(self):
            if len((tmp_path / "metrics.jsonl").read_text().splitlines()) > self.step:
                raise SystemExit("killed")

    class NoSignal:
        signal = None

    def loop(stop):
        cfg = load_config(None, ["run.steps=4", "rollout.prompts_per_step=4", "rollout.group_size=2",
                                 "sync.probe_every=-1", "run.checkpoint_every=0", "logging.samples_every=1"])
        fakes = [ray.remote(FakeSampler).remote(0)]
        learner = ray.remote(FakeLearner).remote(fakes)
        train = Split([{"prompt_ids": [i], "answer": "1", "prompt": str(i)} for i in range(50)])
        evals = {"eval": Split([{"prompt_ids": [i], "answer": "1", "prompt": str(i)} for i in range(4)])}
        samplers = Samplers(fakes, faults=Faults(cfg.learner.max_skipped_steps))
        arm = ArmRun("", cfg, tmp_path, train, FakeRewards(), samplers.faults)
        return rl_loop(cfg, learner, samplers, FakeRewards(), [arm], evals, {}, samplers.faults, stop)

    def steps(name):
        return [json.loads(line)["step"] for line in (tmp_path / name).read_text().splitlines()]

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        with pytest.raises(SystemExit, match="killed"):
            loop(DiesAfter(2))
        assert steps("metrics.jsonl") == [0, 1, 2] and steps("samples.jsonl") == [1, 2]
        best = tmp_path / "best_adapter" / "best.json"
        best.write_text(json.dumps({**json.loads(best.read_text()), "value": 2.0}))  # a bar no attempt can pass
        assert not (tmp_path / "checkpoints").exists()
        assert loop(NoSignal()) == 4
    finally:
        ray.shutdown()
    assert steps("metrics.jsonl") == [0, 1, 2, 3, 4] and steps("samples.jsonl") == [1, 2, 3, 4]
    assert json.loads(best.read_text())["value"] == 0.5  # this attempt's (FakeRewards: every other one right)
    aside = tmp_path / "previous-attempt-1"
    assert sorted(p.name for p in aside.iterdir()) == ["best_adapter", "metrics.jsonl", "samples.jsonl"]
    assert [json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


@pytest.mark.parametrize("text", ["", '{"step": 4, "metric": "eval/accuracy", "va', "[]", '{"value": "high"}'])
def test_a_malformed_best_json_is_ignored_with_a_warning(tmp_path, caplog, text):
    """A torn or edited best_adapter/best.json does not stop a resume: it is named in a
    warning and the next evaluation's adapter becomes the best."""
    from rl.run import BestAdapter

    (tmp_path / "best_adapter").mkdir()
    (tmp_path / "best_adapter" / "best.json").write_text(text)
    with caplog.at_level(logging.WARNING):
        best = BestAdapter("eval/accuracy", tmp_path)
    assert best.value == float("-inf")
    assert "best.json" in caplog.text and "the next evaluation's adapter becomes the best" in caplog.text
    (tmp_path / "best_adapter" / "best.json").write_text('{"step": 4, "metric": "eval/accuracy", "value": 0.25}')
    assert BestAdapter("eval/accuracy", tmp_path).value == 0.25


def test_no_code_of_the_project_unpickles():
    """torch.load (pickle underneath) and pickle.load appear nowhere in the project's code."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    folders = ("rl", "learner", "rollout", "rewards", "common", "benchmarks", "demo")
    found = [f"{path.relative_to(root)}:{n}" for folder in folders for path in (root / folder).rglob("*.py")
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if any(call in line for call in ("torch.load(", "pickle.load", "weights_only=False"))]
    assert found == []


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


def _forge_meta(**changes) -> bytes:
    meta = {"arm": "", "step": 20, "version": 20, "engine": {"global_steps": 20}}
    return json.dumps({**meta, **changes}).encode()


@pytest.mark.parametrize("name, forged, why", [
    ("learner/arm.json", _forge_meta(engine={"optimizer": None}), "learner/arm.json is not"),
    ("learner/arm.json", _forge_meta(engine={"global_steps": "20"}), "engine.global_steps is '20', not an integer"),
    ("learner/arm.json", _forge_meta(step=20.5), "learner/arm.json: step is 20.5, not an integer"),
    ("learner/arm.json", _forge_meta(step=10**9), "learner/arm.json: step is 1000000000, not an integer >= 0 and <= 20"),
    ("learner/arm.json", _forge_meta(lr=1.0), "learner/arm.json is not"),
    (MODEL, safetensors([20.0] * 250, dtype="F64"), "tensor 'weight/w' is F64; the learner's state is float32"),
    (MODEL, (1 << 40).to_bytes(8, "little") + b"{}", "a safetensors header of 1099511627776 bytes in a file of 10"),
    (MODEL, safetensors([20.0] * 250)[:-8], "tensor 'weight/w' has no valid dtype, shape and byte range"),
    ("adapter/adapter_model.safetensors", b"\x08" + bytes(7) + b'{"a": 1}' + bytes(8), "tensor 'a' has no valid"),
    ("learner/rng-rank0.json", b'{"python": [3, [], null], "numpy": [], "torch": [], "cuda": []}',
     "learner/rng-rank0.json is not the RNG states"),
    ("state.json", "data", "state.json: data.position is -1, not an integer >= 0"),
    ("state.json", "faults", "state.json: faults is not an object of the counters"),
])
def test_a_checkpoint_whose_contents_break_their_schema_is_skipped_for_the_previous_one(tmp_path, caplog, name,
                                                                                        forged, why):
    """Issue 30, item 5: with the manifest re-hashed to match, a checkpoint could set any
    DeepSpeed engine attribute and a non-integer step through arm.json, load weights of
    another dtype (cast silently), or carry a safetensors header that stopped the run once
    every actor had started, naming no file. Each value is checked before any actor now, and a
    checkpoint that fails is skipped like a torn one, naming the file: the previous good one
    resumes."""
    cfg = load_config()
    root = tmp_path / "run" / "checkpoints"
    checkpoint.write(root, 10, files(10), state(cfg, 10), keep=3)
    bad = checkpoint.write(root, 20, files(20), state(cfg, 20), keep=3)
    if name == "state.json":
        saved = json.loads((bad / name).read_text())
        saved[forged] = {"position": -1, "seed": 0, "size": 64} if forged == "data" else {"lr": 1.0}
        forged = json.dumps(saved).encode()
    (bad / name).write_bytes(forged)
    rehash(bad)
    with caplog.at_level(logging.WARNING, logger="rl.checkpoint"):
        assert checkpoint.resume_point(cfg, tmp_path / "run") == root / "step-000010"
    assert f"ignoring checkpoint {bad}: " in caplog.text and why in caplog.text


def test_a_checkpoint_of_a_step_beyond_run_steps_is_skipped(tmp_path, caplog):
    """Issue 30, item 5: a folder named step-1000000000 declaring step 10**9 made every
    relaunch train nothing and exit 0."""
    cfg = load_config(None, ["run.steps=100"])
    root = tmp_path / "run" / "checkpoints"
    checkpoint.write(root, 10, files(10), state(cfg, 10), keep=3)
    far = checkpoint.write(root, 10**9, files(10), state(cfg, 10**9), keep=3)
    with caplog.at_level(logging.WARNING, logger="rl.checkpoint"):
        assert checkpoint.resume_point(cfg, tmp_path / "run") == root / "step-000010"
    assert f"ignoring checkpoint {far}: state.json is of step 1000000000, beyond run.steps=100" in caplog.text


def test_the_learner_weights_expected_from_the_model_are_the_ones_peft_makes():
    """The driver's expectation of a checkpoint's weights (rl/checkpoint.py `learner_weights`,
    from the model's safetensors headers alone, before any actor) against the names and shapes
    PEFT gives the learner's trainable weights on the same model (learner/learner.py's
    LoraConfig; names as PEFT saves them)."""
    import torch  # noqa: F401  (PEFT's import needs it first)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from demo.tiny_model import build_tiny_model

    path = build_tiny_model()
    for rank, targets in ((1, None), (4, ["q_proj", "down_proj"])):
        cfg = load_config(None, [f"lora.rank={rank}"] + ([f"lora.target_modules={targets}"] if targets else []))
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), LoraConfig(
            r=rank, lora_alpha=32, target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
        made = {n.replace(".default.", "."): list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        assert checkpoint.learner_weights(cfg, checkpoint.model_weights(path)) == made
    # Full fine-tuning (lora.rank 0): every parameter of the model, some of its saved tensors.
    full = checkpoint.learner_weights(load_config(None, ["lora.rank=0"]), checkpoint.model_weights(path))
    params = {n: list(p.shape) for n, p in AutoModelForCausalLM.from_pretrained(path).named_parameters()}
    assert params.items() <= full.items()


def safetensors_of(tensors: dict[str, list[int]]) -> bytes:
    """A float32 safetensors file of zeros with these names and shapes."""
    import math

    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return len(raw).to_bytes(8, "little") + raw + bytes(offset)


def test_a_checkpoint_whose_weights_are_not_the_models_is_skipped_before_any_actor(tmp_path, caplog):
    """Issue 30, item 5: the weights' names and shapes against the model (its local
    safetensors headers), before any actor starts: a checkpoint of another rank is skipped
    like a torn one, and the previous good one resumes."""
    from demo.tiny_model import build_tiny_model

    model = build_tiny_model()
    cfg = load_config(None, ["lora.rank=1"])
    root = tmp_path / "run" / "checkpoints"
    for step, rank in ((10, 1), (20, 2)):
        weights = checkpoint.learner_weights(load_config(None, [f"lora.rank={rank}"]), checkpoint.model_weights(model))
        tensors = {f"{kind}/{n}": shape for n, shape in weights.items() for kind in ("weight", "exp_avg")}
        checkpoint.write(root, step, {**files(step), MODEL: safetensors_of(tensors)}, state(cfg, step), keep=3)
    assert checkpoint.resume_point(cfg, tmp_path / "run") == root / "step-000020"  # no model given: not checked
    with caplog.at_level(logging.WARNING, logger="rl.checkpoint"):
        assert checkpoint.resume_point(cfg, tmp_path / "run", model) == root / "step-000010"
    assert ("step-000020: learner/arm.safetensors: 56 weights are not the model's for this config" in caplog.text
            and "lora_A.weight [2, 512] (the model's: [1, 512])" in caplog.text)  # 4 layers x 7 modules x A, B
