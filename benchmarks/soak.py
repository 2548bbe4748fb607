"""A soak: does anything grow with the number of steps (adapter versions)?

    python benchmarks/soak.py [--steps 1000] [--every 50] [--warmup 200] [--modes sync,async]
                              [--out DIR] [dotted.key=value ...]

Runs the default job (configs/default.yaml, evaluation at its default cadence) as a user
would, `python rl/run.py` in a subprocess that starts a local Ray, once per mode
(run.mode=sync, and run.mode=async with rollout.max_staleness=1 unless given: async with 0
is the sync loop, and 1 keeps two adapter versions resident). Every `--every` steps (the job's step, followed in its
metrics.jsonl) it samples:

* the resident memory (RSS) of every process of the job, grouped: driver (`rl/run.py`),
  learner and sampler (the actors' processes, from placement.json; a restarted sampler's new
  pid comes from the sampler itself), vllm_engine and vllm_worker (vLLM's engine core and
  worker processes below the sampler: they exist only with rollout.separate_engine; on a CPU
  machine vLLM's engine and worker run inside the sampler's process by default, and both
  groups are reported as null), reward_workers (the reward pool's spawned processes and
  multiprocessing's resource tracker) and ray_system (GCS, raylet, dashboard, idle workers);
* the open file descriptors of those processes (ray_system left out of the total);
* /dev/shm: what the job holds there (files its processes have open or mapped, and the
  sampler's adapter folder) and the whole filesystem's use (other users of the machine too);
* the resident adapters, asked from the sampler through Ray (a short-lived client that
  joins the job's cluster): the versions the sampler keeps, the LoRAs vLLM's worker holds
  and the payloads rollout/vllm_ext.py keeps for them.

After the warm-up (steps before --warmup are left out) each quantity gets a least-squares
slope per 1,000 steps, its standard error and the residuals' standard deviation (the noise);
a quantity grows when its slope is more than 3 standard errors above zero. After the job
exits, /dev/shm entries that it left behind are listed. Every sample is written to
DIR/<mode>-samples.jsonl. Last line: one JSON object, per mode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")
STARTS = 5  # launches of a job whose local Ray failed to start
GROUPS = ("driver", "learner", "sampler", "vllm_engine", "vllm_worker", "reward_workers", "ray_system")
PROJECT = GROUPS[:-1]  # the processes the project starts (ray_system is Ray's own)
RAY_SYSTEM = ("gcs_server", "raylet", "site-packages/ray/", "ray::")  # Ray's binaries, its Python modules, its workers
GROUP_NOTES = {
    "driver": "the `python rl/run.py` process",
    "learner": "the learner actor's process (DeepSpeed, rank 0) and anything below it",
    "sampler": "the sampler actor's process; with rollout.separate_engine false (the CPU default) vLLM's "
               "engine core and worker run inside it",
    "vllm_engine": "vLLM's engine-core process below the sampler (rollout.separate_engine only; null: none exists)",
    "vllm_worker": "vLLM's worker process below the engine core (rollout.separate_engine only; null: none exists)",
    "reward_workers": "the driver's other children: the reward pool's spawned workers and multiprocessing's "
                      "resource tracker",
    "ray_system": "Ray's own processes started by the driver (GCS, raylet, dashboard, idle workers)",
}

# Run in a fresh interpreter that joins the job's cluster: the sampler's pid and resident
# adapters. A client of its own so that this process never holds a connection to a cluster
# that ends with its job.
QUERY = r'''
import json, os, sys
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
names = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == "sampler-0"]
sampler = ray.get_actor("sampler-0", namespace=names[0]["namespace"])

def resident(self):
    def counts(worker):
        from rollout import vllm_ext
        return [len(worker.list_loras()), len(vllm_ext._resident)]
    out = {"pid": os.getpid(), "sampler_versions": sum(len(v) for v in self.adapters.values())}
    if self.loop is None and not self.spec.full_weights:
        with self.lock:
            out["vllm_loras"], out["vllm_payloads"] = self.llm.collective_rpc(counts)[0]
    return out

print(json.dumps(ray.get(sampler.__ray_call__.remote(resident), timeout=120)))
'''


def mb(n: float) -> float:
    return n / 2**20


def gcs_address(driver) -> str | None:
    """The GCS address of the local Ray instance the driver started (its gcs_server child)."""
    for p in driver.children(recursive=True):
        try:
            if p.name() == "gcs_server":
                args = dict(a.lstrip("-").split("=", 1) for a in p.cmdline() if a.startswith("--") and "=" in a)
                port = args.get("gcs_server_port", "0")
                if port == "0":  # a port of its choosing, written to the session folder
                    port = next(Path(args["session-dir"]).glob("gcs_server_port_*")).read_text().strip()
                return f"{args.get('node-ip-address', '127.0.0.1')}:{port}"
        except Exception:
            pass
    return None


def query(address: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.setdefault("RAY_AUTH_MODE", "token")
    try:
        out = subprocess.run([sys.executable, "-c", QUERY, address], capture_output=True, text=True, timeout=180,
                             env=env, cwd=ROOT)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def shm_paths(pid: int) -> set[str]:
    """The /dev/shm files a process has open or mapped."""
    paths = set()
    try:
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
                paths.add(parts[5].removesuffix(" (deleted)"))
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("/dev/shm/"):
                paths.add(target.removesuffix(" (deleted)"))
    except OSError:
        pass
    return paths


def disk_bytes(path: Path) -> int:
    """Bytes a /dev/shm file or folder really holds (allocated blocks)."""
    try:
        if path.is_dir():
            return sum(p.lstat().st_blocks * 512 for p in path.rglob("*"))
        return path.lstat().st_blocks * 512
    except OSError:
        return 0


def group_of(p, learner: int | None, sampler: int | None) -> str:
    """Which group a descendant of the driver belongs to."""
    chain = [p.pid] + [a.pid for a in p.parents()]
    if learner in chain:
        return "learner"
    if sampler in chain:
        if p.pid == sampler:
            return "sampler"
        name = p.name()
        if name.startswith("VLLM::Worker") or p.ppid() != sampler:  # the engine core's child
            return "vllm_worker"
        if name.startswith("VLLM::") or p.children():
            return "vllm_engine"
        return "sampler"  # a helper below the sampler (multiprocessing's resource tracker)
    text = " ".join(p.cmdline()) or p.name()
    return "ray_system" if any(s in text for s in RAY_SYSTEM) else "reward_workers"


def sample(driver, learner: int | None, sampler: int | None) -> dict:
    import psutil

    rss, fds, count = dict.fromkeys(GROUPS, 0), dict.fromkeys(GROUPS, 0), dict.fromkeys(GROUPS, 0)
    held = set()
    procs = [(driver, "driver")]
    for p in driver.children(recursive=True):
        try:
            procs.append((p, group_of(p, learner, sampler)))
        except psutil.Error:
            pass
    for p, group in procs:
        try:
            rss[group] += p.memory_info().rss
            fds[group] += p.num_fds()
            count[group] += 1
            if group != "ray_system":
                held |= shm_paths(p.pid)
        except psutil.Error:
            pass
    job_shm = {Path(h) for h in held if os.path.exists(h)}
    if sampler:
        job_shm |= set(SHM.glob(f"rl-lora-adapters-{sampler}-*"))
    fs = os.statvfs(SHM)
    return {
        "rss_mb": {g: round(mb(rss[g]), 2) if count[g] else None for g in GROUPS},
        "fds": {g: fds[g] if count[g] else None for g in GROUPS},
        "processes": count,
        "fds_total": sum(fds[g] for g in PROJECT),
        "shm_job_mb": round(mb(sum(disk_bytes(p) for p in job_shm)), 3),
        "shm_job_files": sorted(str(p) for p in job_shm),
        "shm_total_mb": round(mb((fs.f_blocks - fs.f_bfree) * fs.f_frsize), 3),
    }


def last_step(metrics: Path) -> int | None:
    """The newest step in metrics.jsonl (a half-written last line is skipped)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 65536))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue
    return None


def fit(xs: list[float], ys: list[float]) -> dict | None:
    """Least-squares slope per 1,000 steps, its standard error and the residuals' std."""
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    n = len(pts)
    if n < 3:
        return None
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    res = [y - my - slope * (x - mx) for x, y in pts]
    sd = math.sqrt(sum(r * r for r in res) / (n - 2))
    se = sd / math.sqrt(sxx)
    return {"per_1k": round(1000 * slope, 3), "se_per_1k": round(1000 * se, 3), "resid_sd": round(sd, 3),
            "grows": bool(slope > 3 * se and slope > 0), "n": n}


def run_mode(mode: str, args, extra: list[str], out: Path) -> dict:
    import psutil

    name = f"soak-{mode}"
    run_dir = out / name
    shm_before = set(os.listdir(SHM))
    cmd = [sys.executable, "rl/run.py", "configs/default.yaml", f"run.mode={mode}", f"run.steps={args.steps}",
           f"run.output_dir={out}", f"run.name={name}", "run.progress=false", *extra]
    if mode == "async" and not any(a.startswith("rollout.max_staleness=") for a in extra):
        cmd.append("rollout.max_staleness=1")  # async with 0 is the sync loop (rl/rollouts.py)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # Ray's workers import this tree, not an installed copy
    print(f"{mode}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    samples_file = open(out / f"{mode}-samples.jsonl", "w")
    samples = []
    log = open(out / f"{name}.log", "w")
    for attempt in range(STARTS):
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        driver = psutil.Process(proc.pid)
        nxt, address, placed = 0, None, {}
        while proc.poll() is None:
            time.sleep(1.0)
            if not placed and (run_dir / "placement.json").exists():
                try:
                    placed = {k: v["pid"] for k, v in json.loads((run_dir / "placement.json").read_text()).items()}
                except (OSError, ValueError):
                    continue
                address = gcs_address(driver)
            step = last_step(run_dir / "metrics.jsonl")
            if not placed or step is None or step < nxt:
                continue
            resident = query(address) if address else {"error": "no GCS address"}
            sampler = resident.get("pid", placed.get("sampler-0"))
            row = {"step": step, "t": round(time.monotonic() - start, 1), **sample(driver, placed.get("learner"), sampler),
                   "adapters": resident}
            samples.append(row)
            samples_file.write(json.dumps(row) + "\n")
            samples_file.flush()
            print(f"{mode} step {step}: rss {row['rss_mb']} fds {row['fds_total']} shm {row['shm_job_mb']} MB "
                  f"adapters {resident}", flush=True)
            nxt = (step // args.every + 1) * args.every
        log.flush()
        # Ray gives its raylet 30 s to start (not configurable): on a loaded machine that can
        # fail before the job starts; the same command then starts a fresh job.
        if proc.returncode == 0 or samples or "timed out during startup" not in (out / f"{name}.log").read_text()[-5000:]:
            break
        print(f"{mode}: Ray did not start (attempt {attempt + 1} of {STARTS}); starting the job again", flush=True)
        time.sleep(10)
    log.close()
    samples_file.close()
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed ({proc.returncode}); see {out / f'{name}.log'}:\n"
                         + (out / f"{name}.log").read_text()[-3000:])
    time.sleep(2.0)  # the job's processes are gone: what stays in /dev/shm is left behind
    left = sorted(set(os.listdir(SHM)) - shm_before)
    return {**summarize(samples, args.warmup), "wall_s": round(time.monotonic() - start, 1),
            "shm_left_after_exit": left}


def whole(row: dict) -> bool:
    """Whether a sample saw the whole job: one taken while it shuts down (its last step logged,
    the actors gone) or while a sampler restarts would read as a fall of every group's memory
    and descriptors, and is left out."""
    return bool(row.get("processes", {}).get("learner")) and bool(row.get("processes", {}).get("sampler"))


def summarize(samples: list[dict], warmup: int) -> dict:
    """The fits over the samples from step `warmup` on (see the module's docstring)."""
    samples = [s for s in samples if whole(s)]
    kept = [s for s in samples if s["step"] >= warmup]
    xs = [s["step"] for s in kept]

    def fit_of(values):
        return fit(xs, values)

    rss = {g: fit_of([s["rss_mb"][g] for s in kept]) for g in GROUPS}
    adapters = {k: fit_of([s["adapters"].get(k) for s in kept]) for k in ("sampler_versions", "vllm_loras", "vllm_payloads")}
    fits = {"fds": fit_of([s["fds_total"] for s in kept]), "shm_job_mb": fit_of([s["shm_job_mb"] for s in kept]),
            "shm_total_mb": fit_of([s["shm_total_mb"] for s in kept]), **{f"rss_mb/{g}": f for g, f in rss.items()},
            **{f"adapters/{k}": f for k, f in adapters.items()}}

    def slope(f):
        return None if f is None else f["per_1k"]

    def resident_range(key):
        vals = [s["adapters"][key] for s in samples if key in s["adapters"]]
        return [min(vals), max(vals)] if vals else None

    return {
        "steps": samples[-1]["step"] if samples else 0,
        "samples": len(samples), "fitted_from_step": warmup, "fitted_samples": len(kept),
        "rss_mb_per_1k_steps": {g: slope(f) for g, f in rss.items()},
        "fds_per_1k_steps": slope(fits["fds"]),
        "shm_mb_per_1k_steps": slope(fits["shm_job_mb"]),
        "shm_total_mb_per_1k_steps": slope(fits["shm_total_mb"]),
        "adapters_per_1k_steps": {k: slope(f) for k, f in adapters.items()},
        "noise": {k: None if f is None else {"se_per_1k": f["se_per_1k"], "resid_sd": f["resid_sd"]}
                  for k, f in fits.items()},
        "grows": sorted(k for k, f in fits.items() if f and f["grows"]),
        "first": {"step": samples[0]["step"], "rss_mb": samples[0]["rss_mb"], "fds": samples[0]["fds_total"]}
        if samples else None,
        "last": {"step": samples[-1]["step"], "rss_mb": samples[-1]["rss_mb"], "fds": samples[-1]["fds_total"],
                 "shm_job_mb": samples[-1]["shm_job_mb"], "shm_job_files": samples[-1]["shm_job_files"]}
        if samples else None,
        "resident_adapters": {k: resident_range(k) for k in ("sampler_versions", "vllm_loras", "vllm_payloads")},
        "processes": samples[-1]["processes"] if samples else None,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=50, help="sample every N steps")
    parser.add_argument("--warmup", type=int, default=200, help="steps left out of the fits")
    parser.add_argument("--modes", default="sync,async")
    parser.add_argument("--parallel", action="store_true",
                        help="run the modes' jobs at the same time (/dev/shm left behind is then the modes' together)")
    parser.add_argument("--analyze", default="", metavar="DIR",
                        help="print the fits of the samples already in DIR (a soak's --out) and exit")
    parser.add_argument("--out", default="", help="run directories and samples (default: a temporary folder)")
    args, extra = parser.parse_known_args()
    if args.every <= 0 or args.steps <= 0 or not 0 <= args.warmup < args.steps:
        parser.error("--steps and --every must be positive and 0 <= --warmup < --steps")
    if args.analyze:  # the fits of the samples a soak (maybe still running) has written so far
        rows = {p.name.removesuffix("-samples.jsonl"): [json.loads(line) for line in p.read_text().splitlines()]
                for p in sorted(Path(args.analyze).glob("*-samples.jsonl"))}
        print(json.dumps({mode: summarize(samples, args.warmup) for mode, samples in rows.items()}))
        return
    out = Path(args.out or tempfile.mkdtemp(prefix="soak-")).resolve()
    out.mkdir(parents=True, exist_ok=True)
    print(f"soak: {args.steps} steps, a sample every {args.every}, fits from step {args.warmup}; files in {out}",
          flush=True)
    modes = args.modes.split(",")
    if args.parallel:  # the modes' jobs at once (a shared machine: two jobs get more of its CPUs than one)
        with ThreadPoolExecutor(len(modes)) as pool:
            result = dict(zip(modes, pool.map(lambda mode: run_mode(mode, args, extra, out), modes)))
    else:
        result = {mode: run_mode(mode, args, extra, out) for mode in modes}
    result["parallel"] = args.parallel
    result["groups"] = GROUP_NOTES
    result["growth_rule"] = ("least-squares slope over the samples from --warmup on; grows: slope > 3 standard "
                             "errors (noise: se_per_1k, and resid_sd, the residuals' standard deviation)")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
