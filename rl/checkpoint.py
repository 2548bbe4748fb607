"""Checkpoints: what a run saves, how a crash never leaves a half checkpoint that looks
whole, and how a run picks up from the newest complete one.

    run_dir/checkpoints/step-000050/
        adapter/       the adapter in PEFT layout (loadable by PeftModel and vLLM); with full
                       fine-tuning the model folder
        learner/       arm.safetensors: the trainable weights (float32 master copies where
                       DeepSpeed keeps them) and AdamW's moments and step, gathered whatever the
                       ZeRO stage and learner ranks; arm.json: the arm's and DeepSpeed's step
                       counters; rng-rank<N>.json: each learner rank's RNG states
        state.json     step, adapter version and digest, train-data position, fault counters,
                       the resolved config and its hash
        manifest.json  size and SHA-256 of every other file; written last

No file of a checkpoint is ever unpickled (unpickling runs code: a checkpoint from a shared
folder or from elsewhere, run.resume=PATH, must not): tensors are safetensors, the rest JSON.
A checkpoint of an earlier version in DeepSpeed's own format (learner/deepspeed/*.pt, pickle)
is refused, never loaded.

A checkpoint is written to checkpoints/.tmp-step-000050-<pid>, each file fsynced, the
manifest last, then renamed to step-000050 (one atomic rename). Only folders named exactly so
are checkpoints (an operator's copy step-000050-before-fix is neither resumed from nor pruned).
A folder without a valid manifest, with a file that does not match it or that it does not
list, or without the files every checkpoint has, is not a checkpoint: resuming skips it with
a warning (run.resume=PATH refuses it, naming the file), and pruning leaves it alone.

Sampling needs no saved RNG: each step's sampling seed comes from run.seed and the step, the
engines are seeded from run.seed, and the train split's order from the seed and the epoch,
so the data position is the whole data state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path, PurePosixPath
from typing import IO

from rl.config import FREE_ON_RESUME, Config, ConfigError, to_dict

log = logging.getLogger(__name__)

# Keys that change where and how fast a run goes, or what it reports, not what it computes,
# are marked free on their config field (`doc(..., free=True)`, whole sections for eval and
# logging) and may differ on resume. (Each prompt's seed travels with it, so more samplers
# draw the same completions up to their batches' float sums; how the learner groups and chunks
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


STEP_NAME = re.compile(r"step-(\d{6,})")
LEARNER_FILE = re.compile(r"arm\.safetensors|arm\.json|rng-rank\d+\.json")  # what the learner's state_files writes
REQUIRED = ("state.json", "learner/arm.safetensors", "learner/arm.json")
# The adapter folder: PEFT's files, or with full fine-tuning a model folder (one or more shards).
ADAPTER_FILES = ({"adapter/adapter_config.json", "adapter/adapter_model.safetensors"},
                 {"adapter/config.json", "adapter/model.safetensors"},
                 {"adapter/config.json", "adapter/model.safetensors.index.json"})
LEGACY = "learner/deepspeed/"  # DeepSpeed's own checkpoint (torch.save pickles), written before


class CheckpointError(ConfigError):
    """A folder that is not a complete checkpoint, or whose files changed after it was checked."""


def step_of(path: Path) -> int | None:
    """The step of a checkpoint folder's name: only names `write` gives (step-000020), not an
    operator's copy (step-000020-before-fix); None for any other name."""
    m = STEP_NAME.fullmatch(path.name)
    return int(m.group(1)) if m and path.name == f"step-{int(m.group(1)):06d}" else None


def step_folders(root: Path) -> list[Path]:
    """The folders under `root` named as checkpoints, oldest first (complete or not)."""
    found = [p for p in root.iterdir() if step_of(p) is not None and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=step_of)


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
    for old in complete(root)[:-keep]:  # complete ones only: a folder it cannot read is left alone
        shutil.rmtree(old, ignore_errors=True)
    return final


# -- reading ----------------------------------------------------------------------------
def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _manifest(path: Path) -> dict[str, dict]:
    """The checked manifest of `path` (name -> {"bytes", "sha256"}); raises CheckpointError
    saying what is wrong with it."""
    try:
        manifest = json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"no readable manifest.json ({e.__class__.__name__}): written only in part")
    if not isinstance(manifest, dict) or not manifest:
        raise CheckpointError(f"manifest.json is {type(manifest).__name__} {json.dumps(manifest)[:40]}, "
                              "not an object naming the checkpoint's files")
    for name, entry in manifest.items():
        if not (isinstance(entry, dict) and type(entry.get("bytes")) is int and entry["bytes"] >= 0
                and isinstance(entry.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"])):
            raise CheckpointError(f"manifest.json: the entry for {name!r} is not {{\"bytes\": size, \"sha256\": hex}}")
        parts = PurePosixPath(name).parts
        if name.startswith("/") or ".." in parts or "\\" in name or name == "manifest.json":
            raise CheckpointError(f"manifest.json lists {name!r}, not a file of the checkpoint")
    if any(name.startswith(LEGACY) for name in manifest):
        raise CheckpointError(f"written by an earlier version in DeepSpeed's own format ({LEGACY}*.pt, pickle "
                              "files), which is never loaded: unpickling a file runs code. Resume with the version "
                              "that wrote it, or start again (another run.name)")
    for name in manifest:
        folder, _, rest = name.partition("/")
        if name != "state.json" and not (folder == "adapter" and rest) and not (
                folder == "learner" and LEARNER_FILE.fullmatch(rest)):
            raise CheckpointError(f"manifest.json lists {name}, not a file a checkpoint holds")
    missing = [name for name in REQUIRED if name not in manifest]
    if not any(files <= manifest.keys() for files in ADAPTER_FILES):
        missing.append("adapter/ (adapter_config.json and adapter_model.safetensors, or a model folder)")
    if missing:
        raise CheckpointError("manifest.json does not list " + ", ".join(missing))
    return manifest


def _verified(path: Path, name: str, entry: dict) -> bytes:
    """A listed file's bytes, checked against its manifest entry."""
    data = (path / name).read_bytes()
    if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CheckpointError(f"{path / name} does not match the manifest (changed since the checkpoint was checked?)")
    return data


@dataclasses.dataclass(frozen=True)
class Expected:
    """What a checkpoint must hold beyond its own consistency, from the config and the model:
    a step within run.steps, and the learner's weights with these names and shapes (as PEFT
    saves them; None: not known here, the learner checks them as it loads)."""

    max_step: int | None = None
    weights: dict[str, list[int]] | None = None
    full: bool = False  # full fine-tuning: the weights are some of the model's own


def expected(cfg: Config, model_path: str | None) -> Expected:
    """Expected of cfg's run, with the weights' names and shapes from the model's local
    safetensors headers (none for a hub name: its actors fetch it)."""
    return Expected(cfg.run.steps, learner_weights(cfg, model_weights(model_path)), cfg.lora.rank == 0)


def model_weights(model_path: str | None) -> dict[str, list[int]] | None:
    """name -> shape of a local model folder's safetensors files, from their headers; None when
    model_path is not such a folder."""
    folder = Path(model_path) if model_path else None
    files = sorted(folder.glob("*.safetensors")) if folder and folder.is_dir() else []
    shapes = {}
    for file in files:
        header = _safetensors_header(file, str(file), float32=False)
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes or None


def learner_weights(cfg: Config, model: dict[str, list[int]] | None) -> dict[str, list[int]] | None:
    """The learner's trainable weights for cfg, as PEFT saves them: each target module's
    lora_A [rank, in] and lora_B [out, rank]; with full fine-tuning the model's own."""
    if model is None or cfg.lora.rank == 0:
        return model
    r, targets, out = cfg.lora.rank, set(cfg.lora.target_modules), {}
    for name, shape in model.items():
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 2 and module.rpartition(".")[2] in targets:
            out[f"base_model.model.{module}.lora_A.weight"] = [r, shape[1]]
            out[f"base_model.model.{module}.lora_B.weight"] = [shape[0], r]
    return out


def _check(path: Path, expect: Expected = Expected()):
    """Raise CheckpointError unless `path` is a complete checkpoint whose contents have their
    schema and what `expect` says."""
    manifest = _manifest(path)
    for name, entry in manifest.items():
        file = path / name
        if file.is_symlink():
            raise CheckpointError(f"{name} is a symbolic link")
        if not file.is_file() or file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{name} is missing or has the wrong size")
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{name} does not match its SHA-256 in the manifest")
    for file in sorted(path.rglob("*")):
        name = file.relative_to(path).as_posix()
        if not file.is_dir() and name != "manifest.json" and name not in manifest:
            raise CheckpointError(f"{name} is not listed in manifest.json")
    state = json.loads((path / "state.json").read_text())  # its hash matched: written by write()
    if not (isinstance(state, dict) and type(state.get("step")) is int and isinstance(state.get("config"), dict)):
        raise CheckpointError("state.json has no integer step and config")
    if step_of(path) not in (None, state["step"]):
        raise CheckpointError(f"state.json is of step {state['step']}, not of the folder's step {step_of(path)}")
    if expect.max_step is not None and state["step"] > expect.max_step:
        raise CheckpointError(f"state.json is of step {state['step']}, beyond run.steps={expect.max_step}: resumed, "
                              "the run would train nothing")
    _check_contents(path, manifest, state, expect)


# What the learner's arm.json holds: DeepSpeed's step counters are the only engine attributes set.
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")
FAULT_COUNTERS = ("fault/skipped_steps", "fault/resumes", "fault/sampler_restarts", "fault/resampled_groups",
                  "fault/samplers_lost")  # the last absent from checkpoints written before it was counted
# safetensors dtypes and their sizes; the learner's own state is all float32 (its master copies).
SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "BF16": 2, "F16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                      "BOOL": 1}
MAX_SAFETENSORS_HEADER = 100 << 20  # the safetensors library's own limit


def _check_contents(path: Path, manifest: dict, state: dict, expect: Expected):
    """Every value the resume reads from the checkpoint has its schema's type and range, before
    any actor starts (a forged checkpoint needs only a re-hashed manifest): state.json's data
    position and fault counters, the learner's arm.json and RNG states, and the header of each
    safetensors file (valid, within its file, float32 for the learner's state; the tensors'
    names and shapes against the model's where it is a local folder, else the learner's to
    check as it loads them)."""
    step = state["step"]
    _int(step, "state.json: step", 0)
    _int(state.get("version", step), "state.json: version", 0)
    data = state.get("data")
    if not isinstance(data, dict):
        raise CheckpointError("state.json: data is not an object (the training order's position)")
    _int(data.get("position"), "state.json: data.position", 0)
    _int(data.get("seed"), "state.json: data.seed")
    _int(data.get("size"), "state.json: data.size", 1)
    redraw = data.get("redraw", [])
    if not (isinstance(redraw, list) and all(type(p) is int and 0 <= p < data["position"] for p in redraw)
            and len(set(redraw)) == len(redraw)):
        raise CheckpointError("state.json: data.redraw is not a list of distinct positions already drawn")
    faults = state.get("faults")
    if not (isinstance(faults, dict) and set(FAULT_COUNTERS[:4]) <= set(faults) <= set(FAULT_COUNTERS)):
        raise CheckpointError(f"state.json: faults is not an object of the counters {list(FAULT_COUNTERS)}")
    for key, value in faults.items():
        _int(value, f"state.json: faults.{key}", 0)
    meta = json.loads(_verified(path, "learner/arm.json", manifest["learner/arm.json"]))
    if not (isinstance(meta, dict) and set(meta) == {"arm", "step", "version", "engine"} and isinstance(meta["arm"], str)
            and isinstance(meta["engine"], dict) and set(meta["engine"]) <= set(ENGINE_COUNTERS)):
        raise CheckpointError("learner/arm.json is not {\"arm\": name, \"step\", \"version\", \"engine\": "
                              f"{{{', '.join(ENGINE_COUNTERS)}}}}}")
    _int(meta["step"], "learner/arm.json: step", 0, step)
    _int(meta["version"], "learner/arm.json: version", 0, step)
    for key, value in meta["engine"].items():
        _int(value, f"learner/arm.json: engine.{key}", 0)
    for name in manifest:
        if re.fullmatch(r"learner/rng-rank\d+\.json", name):
            _check_rng(name, json.loads(_verified(path, name, manifest[name])))
        if name.endswith(".safetensors"):
            header = _safetensors_header(path / name, name, float32=name.startswith("learner/"))
            if name == "learner/arm.safetensors" and expect.weights is not None:
                _check_weights(name, header, expect)


def _check_weights(name: str, header: dict, expect: Expected):
    """The learner's state against the weights it trains: weight/<name> for each (with full
    fine-tuning, some of the model's), AdamW's exp_avg/ and exp_avg_sq/ of the same shapes,
    step/ scalars."""
    tensors = {k: v["shape"] for k, v in header.items() if k != "__metadata__"}
    weights = {k.partition("/")[2]: v for k, v in tensors.items() if k.startswith("weight/")}
    if expect.full:
        wrong = sorted(n for n, shape in weights.items() if expect.weights.get(n) != shape)
    else:
        wrong = sorted(set(weights) ^ set(expect.weights)) or sorted(
            n for n, shape in weights.items() if expect.weights[n] != shape)
    if wrong:
        shown = ", ".join(f"{n} {weights.get(n, '(absent)')} (the model's: {expect.weights.get(n, 'none')})"
                          for n in wrong[:3])
        raise CheckpointError(f"{name}: {len(wrong)} weights are not the model's for this config (lora.rank, "
                              f"lora.target_modules): {shown}")
    for key, shape in tensors.items():
        kind, _, weight = key.partition("/")
        ok = (kind == "weight" or (kind in ("exp_avg", "exp_avg_sq") and shape == weights.get(weight))
              or (kind == "step" and shape == [] and weight in weights))
        if not ok:
            raise CheckpointError(f"{name}: tensor {key!r} {shape} is none of the learner's state")


def _int(value, what: str, low: int | None = None, high: int | None = None):
    if type(value) is not int or (low is not None and value < low) or (high is not None and value > high):
        bounds = " and ".join(f"{op} {b}" for op, b in ((">=", low), ("<=", high)) if b is not None)
        raise CheckpointError(f"{what} is {value!r}, not an integer{' ' + bounds if bounds else ''}")


def _check_rng(name: str, states) -> None:
    """learner/rng-rank<N>.json as `learner.rng_states` writes it."""
    def words(xs, n, bits):
        return isinstance(xs, list) and (n is None or len(xs) == n) and all(
            type(x) is int and 0 <= x < 1 << bits for x in xs)

    ok = isinstance(states, dict) and set(states) == {"python", "numpy", "torch", "cuda"}
    if ok:
        py, np_, torch_, cuda = states["python"], states["numpy"], states["torch"], states["cuda"]
        ok = (isinstance(py, list) and len(py) == 3 and type(py[0]) is int and words(py[1], 625, 32)
              and (py[2] is None or isinstance(py[2], float))
              and isinstance(np_, list) and len(np_) == 5 and np_[0] == "MT19937" and words(np_[1], 624, 32)
              and type(np_[2]) is int and 0 <= np_[2] <= 624 and np_[3] in (0, 1) and isinstance(np_[4], (int, float))
              and words(torch_, None, 8) and isinstance(cuda, list) and all(words(c, None, 8) for c in cuda))
    if not ok:
        raise CheckpointError(f"{name} is not the RNG states the learner writes (python, numpy, torch, cuda)")


def _safetensors_header(file: Path, name: str, float32: bool) -> dict:
    """A safetensors file's header, checked: its length within the file and the library's
    limit, JSON, and each tensor's dtype, shape and byte range consistent and inside the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_SAFETENSORS_HEADER):
            raise CheckpointError(f"{name}: a safetensors header of {n} bytes in a file of {size}")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{name}: the safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: the safetensors header is not an object")
    end_of_data = size - 8 - n
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        ok = (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES
              and isinstance(entry.get("shape"), list) and all(type(d) is int and d >= 0 for d in entry["shape"])
              and isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2
              and all(type(o) is int for o in entry["data_offsets"]))
        if ok:
            begin, end = entry["data_offsets"]
            count = math.prod(entry["shape"])
            ok = 0 <= begin <= end <= end_of_data and end - begin == count * SAFETENSORS_DTYPES[entry["dtype"]]
        if not ok:
            raise CheckpointError(f"{name}: tensor {key!r} has no valid dtype, shape and byte range in the file")
        if float32 and entry["dtype"] != "F32":
            raise CheckpointError(f"{name}: tensor {key!r} is {entry['dtype']}; the learner's state is float32 "
                                  "(it would be cast silently)")
    return header


def problem(path: Path, expect: Expected = Expected()) -> str | None:
    """Why `path` is not a complete checkpoint (holding what `expect` says), or None if it is.
    Never raises."""
    try:
        _check(path, expect)
    except CheckpointError as e:
        return str(e)
    except (OSError, ValueError) as e:  # unreadable files, state.json not JSON
        return f"{e.__class__.__name__}: {e}"
    return None


def complete(root: Path, expect: Expected = Expected()) -> list[Path]:
    """The complete checkpoints under `root` (holding what `expect` says), oldest first;
    others are skipped with a warning."""
    found = []
    for path in step_folders(root):
        why = problem(path, expect)
        if why:
            log.warning("ignoring checkpoint %s: %s", path, why)
        else:
            found.append(path)
    return found


def make_run_dir(cfg: Config, model_path: str | None = None) -> tuple[Path, Path | None, IO]:
    """The run directory, locked for this process (`lock_run_dir`: keep the returned file
    open while the run lives), and the checkpoint this launch resumes from (run.resume),
    whose config is checked before this launch's config.yaml is written."""
    import yaml

    name = cfg.run.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.run.output_dir).expanduser().resolve() / name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_run_dir(run_dir)
    except OSError as e:  # read-only, full, or not ours: before any actor starts, not a traceback
        raise ConfigError(f"run.output_dir={cfg.run.output_dir}: cannot write the run directory {run_dir} "
                          f"({e.strerror or e}{': ' + e.filename if e.filename else ''})") from None
    try:
        resume = resume_point(cfg, run_dir, model_path)
        try:
            (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        except OSError as e:
            raise ConfigError(f"run.output_dir={cfg.run.output_dir}: cannot write in {run_dir} "
                              f"({e.strerror or e}{': ' + e.filename if e.filename else ''})") from None
    except BaseException:
        lock.close()
        raise
    return run_dir, resume, lock


LOCK = "run.lock"


def lock_run_dir(run_dir: Path) -> IO:
    """One live run per run directory: an exclusive flock on run_dir/run.lock, held by the
    returned open file (the lock goes with it: when it is closed, or the process ends however
    it ends, SIGKILL included, so a dead run's lock never blocks a relaunch). The file names
    the holder (host, pid, start time) for the refusal a second launch gets.

    What this relies on: flock(2) on the run directory's filesystem. Local filesystems have
    it; on NFS, Linux maps it to NFS byte-range locks, held for as long as the holder's host
    renews its lease (a host that vanishes releases them when the lease expires, 90 s by
    default); a filesystem without locks (Lustre mounted without -o flock, some FUSE mounts)
    gets a warning and no lock."""
    import fcntl
    import socket

    path = run_dir / LOCK
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "a process that has not written its name yet"
        f.close()
        raise ConfigError(f"{run_dir} is in use by a live run ({holder}; it holds {path}): give this run another "
                          "run.name, or stop that one first") from None
    except OSError as e:
        log.warning("%s: cannot lock %s (%s): this filesystem has no flock, so nothing stops a second launch with "
                    "the same run.name from writing into this run", run_dir, path, e)
        return f
    f.truncate(0)
    f.write(f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    return f


def arm_runs(cfg: Config, run_dir: Path, resume: Path | None, model_path: str | None = None
             ) -> tuple[list, dict[str, Path]]:
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
            resume_point(arm_cfg, arm.run_dir, model_path)  # checks the arm's config against its newest checkpoint
            found[name] = {step_of(p): p for p in complete(arm.run_dir / "checkpoints", expected(arm_cfg, model_path))}
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


def resume_point(cfg: Config, run_dir: Path, model_path: str | None = None) -> Path | None:
    """The checkpoint this launch continues from (run.resume), checked against the config and
    the model at model_path (`expected`)."""
    expect = expected(cfg, model_path)
    root = run_dir / "checkpoints"
    if root.is_symlink() and not root.is_dir():  # it would read as "no checkpoint", then refuse the first write
        raise ConfigError(f"{root} is a symbolic link to {os.readlink(root)}, which is not a folder (a storage "
                          "volume not mounted?): mount it, or remove the link to start without checkpoints")
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is not a folder: the run's checkpoints go there")
    for tmp in root.glob(".tmp-step-*") if root.is_dir() else []:
        log.warning("removing %s: a checkpoint whose writing was interrupted", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    if cfg.run.resume in ("auto", "never"):
        found = complete(root, expect)
        if found and cfg.run.resume == "never":
            raise ConfigError(f"run.resume=never but {run_dir} already holds checkpoints ({found[-1].name}); "
                              "choose another run.name, or resume")
        path = found[-1] if found else None
        newer = [p for p in step_folders(root) if path is None or step_of(p) > step_of(path)]
        why = problem(newer[-1]) if newer else None
        if why and why.startswith("written by an earlier version"):  # not skipped: its steps would be run again
            raise ConfigError(f"{newer[-1]}: {why}")
    else:
        path = Path(cfg.run.resume).expanduser().resolve()
        why = problem(path, expect)
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
    """(the learner's files, by their name under learner/; state.json): only the files the
    manifest lists, with the learner's names, each checked against it as it is read."""
    manifest = _manifest(path)
    files = {name.removeprefix("learner/"): _verified(path, name, entry) for name, entry in manifest.items()
             if name.startswith("learner/")}
    return files, json.loads(_verified(path, "state.json", manifest["state.json"]))


def truncate_metrics(metrics_path: Path, step: int):
    """Drop the lines of a step-keyed JSONL file (metrics, samples) after `step`: a resumed
    run logs those steps again. The file is flushed but never fsynced, so a crash can leave a
    torn or NUL-filled line: such a line is dropped with a warning."""
    if not metrics_path.exists():
        return
    kept = []
    for number, raw in enumerate(metrics_path.read_bytes().split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode())
            if not (isinstance(row, dict) and type(row.get("step")) is int):
                raise ValueError("no integer step")
        except ValueError as e:  # UnicodeDecodeError and JSONDecodeError too
            log.warning("%s line %d: dropped, not a JSON object with a step (%s: %s), likely cut short by a crash",
                        metrics_path, number, e.__class__.__name__, e)
            continue
        if row["step"] <= step:
            kept.append(raw.decode())
    tmp = metrics_path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, metrics_path)


# What a run writes in its run directory as it goes, besides checkpoints and config.yaml.
ATTEMPT_OUTPUTS = ("metrics.jsonl", "samples.jsonl", "best_adapter", "tensorboard", "wandb", "adapter", "report.md",
                   "plots")


def set_aside(run_dir: Path) -> Path | None:
    """Move what an earlier attempt wrote in `run_dir` (ATTEMPT_OUTPUTS) into
    run_dir/previous-attempt-<N>, and say so: a launch that starts at step 0 although the run
    directory holds logs (an attempt that stopped before its first checkpoint) would log its
    steps a second time after the old ones and keep the old best adapter as the bar to beat.
    Returns the folder, or None when there was nothing to move."""
    present = [run_dir / name for name in ATTEMPT_OUTPUTS if (run_dir / name).exists()]
    if not present:
        return None
    n = 1
    while (run_dir / f"previous-attempt-{n}").exists():
        n += 1
    aside = run_dir / f"previous-attempt-{n}"
    aside.mkdir()
    for path in present:
        os.rename(path, aside / path.name)
    print(f"{run_dir} holds the output of an earlier attempt with no checkpoint to resume from: moved "
          f"{', '.join(p.name for p in present)} to {aside}; this attempt starts at step 0", flush=True)
    return aside
