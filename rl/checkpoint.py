"""Checkpoints: what a run saves, how a crash never leaves a half checkpoint that looks
whole, and how a run picks up from the newest complete one.

    run_dir/checkpoints/step-000050/
        adapter/       the adapter in PEFT layout (loadable by PeftModel and vLLM)
        learner/       DeepSpeed's checkpoint: trainable weights, optimiser and scheduler state
                       (no frozen base weights), and each learner rank's RNG states
        state.json     step, adapter version and digest, train-data position, fault counters,
                       the resolved config and its hash
        manifest.json  size and SHA-256 of every other file; written last

A checkpoint is written to checkpoints/.tmp-step-000050-<pid>, each file fsynced, the
manifest last, then renamed to step-000050 (one atomic rename). A folder without a manifest,
or whose files do not match it, is not a checkpoint: resuming skips it with a warning.

Sampling needs no saved RNG: each step's sampling seed comes from run.seed and the step, the
engines are seeded from run.seed, and the train split's order from the seed and the epoch,
so the data position is the whole data state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from rl.config import FREE_ON_RESUME, Config, ConfigError, to_dict

log = logging.getLogger(__name__)

# Keys that change where and how fast a run goes, or what it reports, not what it computes,
# are marked free on their config field (`doc(..., free=True)`, whole sections for eval and
# logging) and may differ on resume. (More samplers split the prompts differently, so other
# random completions are drawn, from the same distribution; how the learner groups and chunks
# its work changes only the order of float sums.) Any other difference needs run.resume_allow.
FREE_KEYS = FREE_ON_RESUME
FREE_SECTIONS = frozenset(f.name for f in dataclasses.fields(Config) if f.metadata["free"])


def run_keys(config: dict) -> dict:
    """The config as {"section.key": value}, without the keys that are free on resume."""
    return {f"{section}.{key}": value for section, fields in config.items() if section not in FREE_SECTIONS
            for key, value in fields.items() if f"{section}.{key}" not in FREE_KEYS}


def config_hash(config: dict) -> str:
    """SHA-256 of the keys that change what a run computes."""
    return hashlib.sha256(json.dumps(run_keys(config), sort_keys=True).encode()).hexdigest()


def changed_keys(saved: dict, current: dict) -> list[str]:
    """'key: old -> new' for each key that changes the run and differs."""
    a, b = run_keys(saved), run_keys(current)
    return [f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# -- writing ----------------------------------------------------------------------------
def _write(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write(root: Path, step: int, files: dict[str, bytes], state: dict, keep: int) -> Path:
    """Write files (relative name -> bytes) and state.json as checkpoint `step`, atomically;
    then delete all but the newest `keep` checkpoints."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    files = {**files, "state.json": json.dumps(state, indent=1).encode()}
    for name, data in files.items():
        _write(tmp / name, data)
    manifest = {name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()} for name, data in files.items()}
    _write(tmp / "manifest.json", json.dumps(manifest, indent=1).encode())
    for folder in {(tmp / name).parent for name in files}:
        _fsync_dir(folder)
    if final.exists():  # the same step written again (a resumed run that stopped where it started)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(root)
    for old in complete(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- reading ----------------------------------------------------------------------------
def problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None if it is."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        return f"no readable manifest.json ({e.__class__.__name__}): written only in part"
    for name, entry in manifest.items():
        file = path / name
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            return f"{name} is missing or has the wrong size"
        if hashlib.sha256(file.read_bytes()).hexdigest() != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def complete(root: Path) -> list[Path]:
    """The complete checkpoints under `root`, oldest first; others are skipped with a warning."""
    found = []
    for path in sorted(root.glob("step-*")) if root.is_dir() else []:
        why = problem(path)
        if why:
            log.warning("ignoring checkpoint %s: %s", path, why)
        else:
            found.append(path)
    return found


def make_run_dir(cfg: Config) -> tuple[Path, Path | None]:
    """The run directory, and the checkpoint this launch resumes from (run.resume), whose
    config is checked before this launch's config.yaml is written."""
    import yaml

    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir).expanduser().resolve() / name
    run_dir.mkdir(parents=True, exist_ok=True)
    resume = resume_point(cfg, run_dir)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return run_dir, resume


def arm_runs(cfg: Config, run_dir: Path, resume: Path | None) -> tuple[list, dict[str, Path]]:
    """The run's arms (rl/arms.py) and the checkpoint each resumes from (arm -> path).

    Without an arms section: one arm, "", in run_dir, from `resume`. A sweep's arms live in
    run_dir/arms/<name>/, each with its config.yaml and checkpoints; they step together, so
    they resume at one step: the newest at which every arm still running has a complete
    checkpoint (an arm that failed, with failed.json, stays stopped)."""
    from rl.arms import ArmRun, expand

    arms = expand(cfg)
    if len(arms) == 1 and arms[0][0] == "":
        return [ArmRun("", cfg, run_dir)], {"": resume} if resume else {}
    if cfg.run.resume not in ("auto", "never"):
        raise ConfigError("run.resume must be auto or never in a sweep: each arm resumes from its own checkpoints")
    import yaml

    runs, found = [], {}
    for name, arm_cfg in arms:
        arm = ArmRun(name, arm_cfg, run_dir / "arms" / name)
        arm.run_dir.mkdir(parents=True, exist_ok=True)
        failed = arm.run_dir / "failed.json"
        if failed.exists():
            arm.error = json.loads(failed.read_text())["error"]
        else:
            resume_point(arm_cfg, arm.run_dir)  # checks the arm's config against its newest checkpoint
            found[name] = {int(p.name.split("-")[1]): p for p in complete(arm.run_dir / "checkpoints")}
        (arm.run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(arm_cfg), sort_keys=False))
        runs.append(arm)
    if not any(found.values()):
        return runs, {}
    common = set.intersection(*(set(steps) for steps in found.values()))
    if not common:
        raise ConfigError(f"the arms in {run_dir / 'arms'} have no checkpoint step in common: "
                          + "; ".join(f"{name}: {sorted(steps) or 'none'}" for name, steps in found.items()))
    step = max(common)
    return runs, {name: steps[step] for name, steps in found.items()}


def resume_point(cfg: Config, run_dir: Path) -> Path | None:
    """The checkpoint this launch continues from (run.resume), checked against the config."""
    root = run_dir / "checkpoints"
    for tmp in root.glob(".tmp-step-*") if root.is_dir() else []:
        log.warning("removing %s: a checkpoint whose writing was interrupted", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    if cfg.run.resume in ("auto", "never"):
        found = complete(root)
        if found and cfg.run.resume == "never":
            raise ConfigError(f"run.resume=never but {run_dir} already holds checkpoints ({found[-1].name}); "
                              "choose another run.name, or resume")
        path = found[-1] if found else None
    else:
        path = Path(cfg.run.resume).expanduser().resolve()
        why = problem(path)
        if why:
            raise ConfigError(f"run.resume={cfg.run.resume}: not a complete checkpoint: {why}")
    if path is not None:
        saved = json.loads((path / "state.json").read_text())["config"]
        allowed = set(cfg.run.resume_allow)
        changes = [c for c in changed_keys(saved, to_dict(cfg)) if "all" not in allowed
                   and c.split(":")[0] not in allowed]
        if changes:
            raise ConfigError(f"{path} was made with another config; these keys change the run: "
                              + "; ".join(changes) + ". Put them in run.resume_allow to resume anyway, "
                              "or start another run (run.name)")
    return path


def read(path: Path) -> tuple[dict[str, bytes], dict]:
    """(files under learner/, by their name there; state.json)."""
    files = {str(p.relative_to(path / "learner")): p.read_bytes() for p in (path / "learner").rglob("*")
             if p.is_file()}
    return files, json.loads((path / "state.json").read_text())


def truncate_metrics(metrics_path: Path, step: int):
    """Drop the lines of a step-keyed JSONL file (metrics, samples) after `step`: a resumed
    run logs those steps again."""
    if not metrics_path.exists():
        return
    lines = [line for line in metrics_path.read_text().splitlines() if line.strip()]
    kept = [line for line in lines if json.loads(line)["step"] <= step]
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, metrics_path)
