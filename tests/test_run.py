"""The default job, shortened, end to end: `python rl/run.py` as a user runs it."""

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("reward/mean", "reward/accuracy", "learner/ratio_mean", "learner/ratio_max", "learner/truncated_frac",
        "time/sample", "time/learn", "time/sync", "sync/bytes", "sync/latency_ms", "rollout/tokens_per_s",
        "learner/tokens_per_s", "rollout/zero_signal_groups", "reward/timeout_frac", "reward/error_frac")


def test_default_job_learns(tmp_path):
    steps = 40
    proc = subprocess.run(
        [sys.executable, "rl/run.py", "configs/default.yaml", f"run.steps={steps}", "run.eval_every=20",
         f"run.output_dir={tmp_path}", "run.name=e2e", "run.progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = tmp_path / "e2e"
    assert f"run directory: {run_dir}" in proc.stdout
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(steps + 1))
    for key in KEYS:
        assert all(key in r for r in rows[1:]), key
    before, after = rows[0]["eval/accuracy"], rows[-1]["eval/accuracy"]
    assert after >= before + 0.10, (before, after)
    first = sum(r["reward/mean"] for r in rows[1:11]) / 10
    last = sum(r["reward/mean"] for r in rows[-10:]) / 10
    assert last > first, (first, last)
    # Each step trained on the adapter the previous step published, and every sampler acknowledged it.
    assert [r["rollout/adapter_version"] for r in rows[1:]] == list(range(steps))
    assert all(0.99 < r["learner/ratio_mean"] < 1.01 for r in rows[1:])
    config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 1 and set(config["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (run_dir / "config.yaml").exists()


def test_two_samplers_split_the_prompts(tmp_path):
    """With rollout.num_samplers=2 both engines serve every version and the loop runs."""
    proc = subprocess.run(
        [sys.executable, "rl/run.py", "configs/default.yaml", "run.steps=3", "rollout.num_samplers=2",
         "rollout.num_cpus=0.5", "learner.num_cpus=0.5", "data.eval_size=16", f"run.output_dir={tmp_path}",
         "run.name=two", "run.progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["rollout/adapter_version"] for r in rows[1:]] == [0, 1, 2]
    assert all(r["rollout/refused_groups"] == 0 for r in rows[1:])
    assert rows[1]["sync/probe_gap_mean"] < 1e-4  # both samplers probed after the first trained sync


ASYNC_KEYS = ("rollout/staleness_mean", "rollout/staleness_max", "rollout/staleness_hist", "learner/ratio_ess",
              "learner/mismatch_kl", "async/queue_depth", "time/sampler_idle", "time/learner_idle")


def test_async_job_learns_within_the_staleness_bound(tmp_path):
    steps = 40
    proc = subprocess.run(
        [sys.executable, "rl/run.py", "configs/default.yaml", "run.mode=async", "rollout.max_staleness=1",
         f"run.steps={steps}", "run.eval_every=20", f"run.output_dir={tmp_path}", "run.name=async",
         "run.progress=false"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "async" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(steps + 1))
    for key in KEYS + ASYNC_KEYS:
        assert all(key in r for r in rows[1:]), key
    # Recorded versions, not timing: every group trained at step s came from version s-2 or s-1.
    assert all(s - 2 <= r["rollout/adapter_version"] <= s - 1 for s, r in enumerate(rows[1:], start=1))
    assert all(r["rollout/staleness_max"] <= 1 and r["rollout/refused_groups"] == 0 for r in rows[1:])
    assert sum(r["rollout/staleness_hist"][1] for r in rows[1:]) > 0  # sampling did run ahead
    assert all(r["learner/ratio_ess"] > 0.5 and r["learner/mismatch_kl"] >= 0 for r in rows[1:])
    before, after = rows[0]["eval/accuracy"], rows[-1]["eval/accuracy"]
    assert after >= before + 0.10, (before, after)
    # The run ended cleanly: none of its actor processes is left.
    pids = {a["pid"] for a in json.loads((tmp_path / "async" / "placement.json").read_text()).values()}
    assert len(pids) == 2 and not running(pids)


def with_descendants(pids: set[int]) -> set[int]:
    """pids and every process below them (vLLM's engine core and worker below a sampler)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), list(pids)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def running(pids: set[int]) -> set[int]:
    """The pids that are still processes (zombies excluded)."""
    alive = set()
    for pid in pids:
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.add(pid)
        except OSError:
            pass
    return alive


@pytest.mark.parametrize("mode, victim", [("async", "sampler-0"), ("sync", "learner")])
def test_a_dead_actor_ends_the_run_with_a_clear_error_and_no_leftovers(tmp_path, mode, victim):
    """Kill an actor after step 2 (as a node failure or an OOM kill would): the run stops
    with an error that names it, and no engine or actor process outlives the run."""
    import ray

    from rl.run import main

    run_dir = tmp_path / "dead"
    actors: set[int] = set()  # the run's actor processes and their children, seen before the kill

    def kill_after_step_2():
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().count("\n") >= 3):
            time.sleep(0.2)
        pids = {a["pid"] for a in json.loads((run_dir / "placement.json").read_text()).values()}
        actors.update(with_descendants(pids))
        ray.kill(ray.get_actor(victim))

    killer = threading.Thread(target=kill_after_step_2, daemon=True)
    killer.start()
    with pytest.raises(Exception) as failure:
        main([str(ROOT / "configs/default.yaml"), f"run.mode={mode}", "rollout.max_staleness=1", "run.steps=30",
              "data.eval_size=16", "sync.ack_timeout_s=10", f"run.output_dir={tmp_path}", "run.name=dead",
              "run.progress=false"])
    killer.join(timeout=5)
    assert f"run stopped: {victim} died" in str(failure.value), failure.value
    assert len(actors) >= 4  # learner, sampler, and vLLM's engine core and worker below the sampler
    deadline = time.time() + 30
    while running(actors) and time.time() < deadline:
        time.sleep(0.5)
    assert not running(actors)
