"""A real two-node Ray cluster on this machine, started with `ray start`, and the default job
submitted to it with `ray job submit`, as a user launches on a cluster.

The head offers a custom resource `learner_node` and the worker `sampler_node`; the job asks
for them, so the learner and the sampler must land on different nodes (the adapter channel
then crosses nodes through the address each sampler binds). Token authentication is on:
every node and the job client read the token from a file only the owner can read.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster(tmp_path):
    # Short temp dirs (Ray's socket paths must stay under ~107 characters), one per node: nodes
    # sharing one would delete each other's unpacked job packages.
    temp_dirs = [tempfile.mkdtemp(prefix="rlc-", dir="/tmp") for _ in range(2)]
    token = tmp_path / "ray-token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # As on a real node: this environment's python first on PATH, token auth on, the token's path.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token)}
    port, dashboard = free_port(), free_port()

    def common():  # two nodes on one address: each needs its own ports for its agents
        return ["--block", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]

    head = subprocess.Popen(
        [RAY, "start", "--head", f"--port={port}", f"--temp-dir={temp_dirs[0]}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard}", "--include-dashboard=true", '--resources={"learner_node": 1}', *common()],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nodes = [head]
    try:
        wait_for(lambda: job_api_up(dashboard, env), 120, "the head's job API")
        worker = subprocess.Popen(
            [RAY, "start", f"--address=127.0.0.1:{port}", f"--temp-dir={temp_dirs[1]}",
             '--resources={"sampler_node": 1}', *common()],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        nodes.append(worker)
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "gcs": f"127.0.0.1:{port}"}
    finally:
        for node in reversed(nodes):  # the processes we started, by id; --block stops their children
            node.terminate()
        for node in nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)


def job_api_up(dashboard: int, env: dict) -> bool:
    out = subprocess.run([RAY, "job", "list", "--address", f"http://127.0.0.1:{dashboard}"], env=env,
                         capture_output=True, text=True)
    return out.returncode == 0


def wait_for(ready, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while not ready():
        if time.time() > deadline:
            raise TimeoutError(f"{what} not up after {timeout_s} s")
        time.sleep(1)


def alive_nodes(cluster) -> int:
    out = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address='{cluster['gcs']}'); "
                          "print(sum(n['Alive'] for n in ray.nodes()))"],
                         env=cluster["env"], capture_output=True, text=True, timeout=120)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else 0


def submit(cluster, args: list[str]) -> subprocess.CompletedProcess:
    """`ray job submit ... -- args`, waiting for the job; retried while the head's job agent starts."""
    deadline = time.time() + 120
    while True:
        job = subprocess.run([RAY, "job", "submit", "--address", cluster["address"], "--working-dir", str(ROOT),
                              "--", *args], env=cluster["env"], capture_output=True, text=True, timeout=1500)
        if "No available agent" not in job.stdout + job.stderr or time.time() > deadline:
            return job
        time.sleep(2)


def test_default_job_on_a_two_node_cluster(cluster, tmp_path):
    wait_for(lambda: alive_nodes(cluster) == 2, 120, "the worker node")
    # Without the token, the cluster refuses the client.
    no_token = {k: v for k, v in cluster["env"].items() if not k.startswith("RAY_AUTH_TOKEN")}
    refused = subprocess.run([RAY, "job", "list", "--address", cluster["address"]], env=no_token,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    steps = 30
    job = submit(cluster, ["python", "rl/run.py", "configs/default.yaml", f"run.steps={steps}", "run.eval_every=0",
                           "rollout.resources={sampler_node: 1}", "learner.resources={learner_node: 1}",
                           f"run.output_dir={tmp_path}", "run.name=cluster", "run.progress=false"])
    print(job.stdout[-6000:], job.stderr[-3000:])
    assert job.returncode == 0, "the job failed: its log is printed above"
    run_dir = tmp_path / "cluster"
    where = json.loads((run_dir / "placement.json").read_text())
    assert where["learner"]["node_id"] != where["sampler-0"]["node_id"], where
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(steps + 1))
    assert rows[-1]["eval/accuracy"] > rows[0]["eval/accuracy"], (rows[0]["eval/accuracy"], rows[-1]["eval/accuracy"])
