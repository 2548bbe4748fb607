"""Separate hosts on one machine: a Linux network namespace per host (scripts/hosts.py), a Ray
head in one, a worker node in each of two others, and the default job submitted with
`ray job submit` from the head's namespace: the learner on the head (resource head_host), a
sampler on each worker host (sampler_host). A fourth namespace, `client`, is an outsider on
the same network with no Ray token.

One job run proves, in order: each sampler's adapter channel listens on its own host's
address; nothing the project opens listens on every interface; the outsider is refused by
Ray and by the adapter channel (counted, and the run still trains on the learner's adapter);
then a worker host's link goes down mid-run: Ray declares its node dead, the fleet drops that
sampler, its prompts are sampled again on the other, and the run ends with every step's
groups, none lost, none twice. A second job puts the learner on a worker host and loses it:
the run stops naming the learner and its node, and the same command resumes once the host is back.

The fake-sampler tests below cover the same drop for each run.mode's path (sync and async
share Samplers.generate_many; stream has its own pump) without namespaces.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scripts.hosts import PYTHON, RAY, RAY_WORKER_PORTS, Hosts, permitted, wait_for
from tests.fakes import FakeLearner, FakeRewards, FakeSampler, FakeStreamSampler
from tests.test_run import with_descendants

ROOT = Path(__file__).resolve().parents[1]
STEPS, PER_STEP, LOSE_AFTER = 6, 8, 2  # the default job's prompts_per_step; the link goes down once step 2 is logged

FORGE = r"""
import json, sys, time, zmq
ctx = zmq.Context()
sock = ctx.socket(zmq.DEALER)
sock.setsockopt(zmq.LINGER, 0)
sock.setsockopt(zmq.SNDTIMEO, 5000)
sock.connect(sys.argv[1])
header = {"magic": "rl-lora-adapter", "arm": "", "version": 10**6, "step": 10**6, "chunk": 0, "chunks": 1,
          "incarnation": "forged", "peft_config": {}, "payload_bytes": 4, "payload_sha256": "0" * 64, "tensors": []}
try:
    sock.send_multipart([json.dumps(header).encode(), b"\0" * 4, b"\0" * 32])
except zmq.Again:  # refused before it could be queued
    pass
print("reply" if sock.poll(3000) else "no reply", flush=True)
"""


@pytest.fixture(scope="module")
def hosts():
    reason = permitted()
    if reason:
        pytest.skip(f"separate hosts need Linux network namespaces: {reason}")
    h = Hosts(workers=2, prefix="rlt")
    try:
        h.create()
        h.start_ray()
        yield h
    finally:
        h.remove()
        assert not h.left_behind(), h.left_behind()


def wait_for_file(path: Path, job: subprocess.Popen, lines: int = 0, timeout_s: float = 600):
    deadline = time.time() + timeout_s
    while not (path.exists() and path.read_text().count("\n") >= lines):
        assert job.poll() is None, f"the job ended (rc {job.returncode}) before {path} had {lines} lines"
        assert time.time() < deadline, f"{path} did not get {lines} lines in {timeout_s} s"
        time.sleep(0.1)


@pytest.mark.e2e
def test_outsider_without_the_token_is_refused(hosts):
    """A client on the cluster's network, but without the token: no token at all (token auth
    off on the client), or a wrong one. Ray refuses both server-side."""
    env = {k: v for k, v in hosts.env().items() if not k.startswith("RAY_AUTH")}
    bare = hosts.exec("client", [RAY, "job", "list", "--address", hosts.address], env=env, capture_output=True,
                      text=True, timeout=120)
    assert bare.returncode != 0 and "no authentication token was found" in bare.stdout + bare.stderr, bare
    wrong = Path(hosts.token).with_name(Path(hosts.token).name + "-wrong")
    wrong.write_text("0" * 64)
    wrong.chmod(0o600)
    try:
        forged = hosts.exec("client", [RAY, "job", "list", "--address", hosts.address],
                            env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)},
                            capture_output=True, text=True, timeout=120)
    finally:
        wrong.unlink()
    assert forged.returncode != 0 and "token is invalid" in forged.stdout + forged.stderr, forged
    # The cluster's own token works from the head's namespace.
    assert hosts.job_api_up()


@pytest.mark.e2e
def test_default_job_across_hosts_survives_a_lost_node(hosts, tmp_path):
    log_path = tmp_path / "job.log"
    run_dir = tmp_path / "hosts"
    with open(log_path, "w") as log:
        job = hosts.submit(["python", "rl/run.py", "configs/default.yaml", f"run.steps={STEPS}", "run.eval_every=0",
                            "data.eval_size=16", "rollout.num_samplers=2", "rollout.resources={sampler_host: 1}",
                            "learner.resources={head_host: 1}", "sync.ack_timeout_s=10", "run.checkpoint_every=0",
                            f"run.output_dir={tmp_path}", "run.name=hosts", "run.progress=false"],
                           stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_file(run_dir / "placement.json", job)
        where = json.loads((run_dir / "placement.json").read_text())
        host_of = {ip: host for host, ip in hosts.ip.items()}
        assert host_of[where["learner"]["ip"]] == "head", where
        on = {host_of[where[f"sampler-{i}"]["ip"]]: i for i in range(2)}
        assert sorted(on) == ["w1", "w2"], where  # one sampler on each worker host

        # Listening sockets of the project's processes (the actors and what they started), per host.
        # Ray's own in those processes: each worker's gRPC server, on every interface in
        # RAY_WORKER_PORTS. Ray's daemons (gcs_server on *:6379, raylet, the dashboard agent) are
        # not the project's processes and also bind every interface.
        channel = {}
        for host, names in (("head", ["learner"]), ("w1", [f"sampler-{on['w1']}"]), ("w2", [f"sampler-{on['w2']}"])):
            pids = with_descendants({where[name]["pid"] for name in names})
            ours = [s for s in hosts.listeners(host) if set(s["pids"]) & pids
                    and not RAY_WORKER_PORTS[0] <= s["port"] <= RAY_WORKER_PORTS[1]]
            assert ours, f"no listener of {names} in {host}"
            wildcard = [s for s in ours if s["address"] in ("0.0.0.0", "*", "::", "::ffff:0.0.0.0")]
            assert not wildcard, f"{names} on {host} listen on every interface: {wildcard}"
            outside = [s for s in ours if s["address"] not in ("127.0.0.1", "::1")]
            if host == "head":
                assert not outside, outside  # the learner connects out; it listens on loopback alone
            else:  # the sampler's adapter channel: one socket, on its own host's address
                assert [s["address"] for s in outside] == [hosts.ip[host]], outside
                channel[host] = f"tcp://{hosts.ip[host]}:{outside[0]['port']}"

        # A forged adapter message from the outsider to the sampler that stays (w1): refused.
        outsider = {k: v for k, v in hosts.env().items() if not k.startswith("RAY_AUTH")}
        forged = hosts.exec("client", [str(PYTHON), "-c", FORGE, channel["w1"]], env=outsider, capture_output=True,
                            text=True, timeout=60)
        assert forged.returncode == 0, forged.stderr[-2000:]
        assert forged.stdout.strip() == "no reply"  # an unauthenticated peer hears nothing back

        # w2's link goes down once step LOSE_AFTER is logged, as step LOSE_AFTER + 1 samples.
        wait_for_file(run_dir / "metrics.jsonl", job, lines=LOSE_AFTER + 1)
        hosts.link("w2", up=False)
        lost_at = time.time()
        deadline = time.time() + 300
        while "was lost with its node" not in log_path.read_text():
            assert job.poll() is None and time.time() < deadline, log_path.read_text()[-6000:]
            time.sleep(0.5)
        dropped_after = time.time() - lost_at
        # The lost host stays down: the run ends with one sampler. (Each sampler holds a placement
        # group of its own, removed when it is dropped; in one group for all, Ray 2.60's GCS kept
        # trying to re-place the lost bundle in a busy loop, ray-project/ray#65007, and the
        # learner's steps were 10x slower on 2 cores until the host came back.)
        assert job.wait(timeout=600) == 0, log_path.read_text()[-6000:]
    finally:
        if job.poll() is None:
            job.kill()
    output = log_path.read_text()
    print(f"w2's sampler dropped {dropped_after:.0f} s after its link went down; the job ended "
          f"{time.time() - lost_at:.0f} s after it")
    victim = on["w2"]
    assert f"sampler-{victim} was lost with its node" in output, output[-6000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(STEPS + 1))
    # Every step trained on its 8 prompts, drawn in order: none lost with w2, none drawn twice.
    assert [r["data/position"] for r in rows[1:]] == [PER_STEP * s for s in range(1, STEPS + 1)]
    assert all(sum(r["rollout/staleness_hist"]) == PER_STEP for r in rows[1:])
    # Every group trained on came from the adapter the learner published (digests checked).
    assert all(r["rollout/refused_groups"] == 0 for r in rows[1:])
    assert rows[-1]["fault/samplers_lost"] == 1 and rows[-1]["fault/sampler_restarts"] == 0
    assert [r["fault/samplers_lost"] for r in rows[1:LOSE_AFTER + 1]] == [0] * LOSE_AFTER
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    # The forged message never got past the handshake: one refused connection, on a sampler that stayed.
    assert rows[-1]["sync/refused_connections"] >= 1, rows[-1]


@pytest.mark.e2e
def test_a_lost_learner_node_stops_the_run_and_the_same_command_resumes(hosts, tmp_path):
    """The learner on worker w1 and the sampler on the head: once step 2's checkpoint is written,
    w1's link goes down. The run stops with an error that names the learner and its node; w1
    comes back (a new Ray node), and the same command resumes from step-000002 and ends with
    every step logged once."""
    log_path, run_dir = tmp_path / "job.log", tmp_path / "learner-lost"
    command = ["python", "rl/run.py", "configs/default.yaml", "run.steps=4", "run.eval_every=0", "data.eval_size=16",
               "rollout.resources={head_host: 1}", "learner.resources={w1_host: 1}", "run.checkpoint_every=2",
               f"run.output_dir={tmp_path}", "run.name=learner-lost", "run.progress=false"]
    nodes = hosts.alive_nodes()
    with open(log_path, "w") as log:
        job = hosts.submit(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_file(run_dir / "placement.json", job)
        where = json.loads((run_dir / "placement.json").read_text())
        assert where["learner"]["ip"] == hosts.ip["w1"] and where["sampler-0"]["ip"] == hosts.ip["head"], where
        # Down once step 2's checkpoint is complete (its folder appears only then: written aside, renamed).
        wait_for_file(run_dir / "checkpoints" / "step-000002" / "manifest.json", job)
        hosts.link("w1", up=False)
        assert job.wait(timeout=300) != 0
    finally:
        if job.poll() is None:
            job.kill()
    output = log_path.read_text()
    assert (f"run stopped: learner (with its node {hosts.ip['w1']}, which Ray declared dead) died" in output
            and "the same command resumes from step-000002" in output), output[-6000:]

    hosts.rejoin("w1")  # the host comes back: a new node with the learner's resource
    wait_for(lambda: hosts.alive_nodes() == nodes, 180, "w1's node back in the cluster", every_s=2)
    with open(log_path, "w") as log:
        again = hosts.submit(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert again.wait(timeout=600) == 0, log_path.read_text()[-6000:]
        finally:
            if again.poll() is None:
                again.kill()
    assert "resumed from" in log_path.read_text() and "(step 2)" in log_path.read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3, 4]  # a step 3 logged before the loss is dropped, not doubled
    assert [r["data/position"] for r in rows[1:]] == [PER_STEP * s for s in range(1, 5)]


# -- the drop without namespaces: fake samplers, a node declared dead by the test -------------------


class HostSampler(FakeSampler):
    """tests/fakes.py's sampler with an endpoint and arms, as Samplers asks a real one."""

    def endpoint(self):
        return f"fake-{id(self)}"

    def arms(self):
        return [""]


class RecordingLearner(FakeLearner):
    """Records which samplers it was told to stop publishing to."""

    def __init__(self, samplers):
        super().__init__(samplers)
        self.disconnected = []

    def disconnect(self, endpoint):
        self.disconnected.append(endpoint)

    def disconnects(self):
        return self.disconnected


RAY_CPUS = 4  # the local_ray fixture's (tests/conftest.py)


def node_lost(monkeypatch, index: int):
    """Ray declares sampler `index`'s node dead (the real declaration: the namespace test above)."""
    from rl.samplers import Samplers

    monkeypatch.setattr(Samplers, "node_gone", lambda self, i: i == index)
    monkeypatch.setattr(Samplers, "POLL_S", 0.05)


@pytest.mark.integration
def test_a_sampler_lost_with_its_node_is_dropped_and_its_share_sampled_on_the_others(local_ray, monkeypatch):
    """Sampler 1 of 3 is gone (its node dead) when a request comes: its share (prompts 1, 4, 7)
    goes to the other two, every prompt gets its group once, the learner stops publishing to
    it, its placement group (one of its own, as place_actors gives) is removed, and later
    requests skip it. Sync and async rollouts both sample through this call."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table, remove_placement_group

    from common.records import Sampling
    from rl.fleet import _in_bundle
    from rl.samplers import Samplers

    held = [placement_group([{"CPU": 0.1}]) for _ in range(3)]
    ray.get([g.ready() for g in held], timeout=60)
    actors = [ray.remote(HostSampler).options(num_cpus=0.1, **_in_bundle(g, 0)).remote(i) for i, g in enumerate(held)]
    learner = ray.remote(RecordingLearner).remote(actors)
    samplers = Samplers(actors, learner)
    lost_endpoint = samplers.endpoints[1]
    node_lost(monkeypatch, 1)
    ray.kill(actors[1], no_restart=True)
    prompts = [[k] for k in range(9)]
    groups = samplers.generate(prompts, Sampling(2, 1.0, 4, seed=0))
    assert len(groups) == 9 and all(g is not None and len(g.completions) == 2 for g in groups)
    assert samplers.dropped == {1} and samplers.live() == [0, 2] and list(samplers) == [actors[0], actors[2]]
    assert samplers.faults.samplers_lost == 1 and samplers.faults.resampled_groups == 3
    assert samplers.faults.sampler_restarts == 0
    assert ray.get(learner.disconnects.remote()) == [lost_endpoint]
    again = samplers.generate(prompts, Sampling(2, 1.0, 4, seed=0))  # no sampler-1 in the split any more
    assert all(g is not None for g in again) and samplers.faults.resampled_groups == 3
    # A publish that sampler 1 missed (it was listed as missing) does not bring it back.
    samplers.recover_missing((lost_endpoint,))
    assert samplers.faults.samplers_lost == 1 and samplers.dropped == {1}
    # The removal is asynchronous (the GCS's); 30 s is far above its milliseconds.
    deadline = time.time() + 30
    while placement_group_table(held[1])["state"] != "REMOVED" and time.time() < deadline:
        time.sleep(0.1)
    assert [placement_group_table(g)["state"] for g in held] == ["CREATED", "REMOVED", "CREATED"]
    for g in (held[0], held[2]):
        remove_placement_group(g)


@pytest.mark.integration
def test_the_last_sampler_of_an_arm_is_not_dropped(local_ray, monkeypatch):
    """Alone, a lost sampler cannot be dropped: the run stops with an error that says why."""
    import ray

    from common.records import Sampling
    from rl.samplers import Samplers

    actors = [ray.remote(HostSampler).remote(0)]
    samplers = Samplers(actors, ray.remote(RecordingLearner).remote(actors))
    node_lost(monkeypatch, 0)
    ray.kill(actors[0], no_restart=True)
    with pytest.raises(RuntimeError, match="no other sampler serves its arms"):
        samplers.generate([[1], [2]], Sampling(2, 1.0, 4, seed=0))
    assert samplers.faults.samplers_lost == 0


@pytest.mark.integration
@pytest.mark.parametrize("mode", ["async", "stream"])
def test_async_and_stream_rollouts_go_on_without_a_lost_sampler(local_ray, monkeypatch, mode):
    """Sampler 1 of 2 is killed at step 3 with its node declared dead: every step still gets
    its 4 groups, each prompt drawn once and trained once (async: positions in order; stream:
    every drawn prompt trained or still pending), and it is counted as lost, not restarted."""
    import ray

    from rl.arms import ArmRun
    from rl.config import load_config
    from rl.samplers import Samplers
    from rl.rollouts import AsyncBatches
    from rl.splits import Split
    from rl.stream import StreamBatches

    per_step, steps = 4, 8
    if mode == "stream":  # each group takes 0.3 s on sampler 1: it has groups running when it goes
        actors = [ray.remote(FakeStreamSampler).remote(i, d, 1) for i, d in enumerate([0.0, 0.3])]
    else:
        actors = [ray.remote(HostSampler).remote(i) for i in range(2)]
    learner = ray.remote(RecordingLearner).remote(actors)
    samplers = Samplers(actors, learner)
    node_lost(monkeypatch, 1)
    cfg = load_config(None, [f"run.mode={mode}", f"run.steps={steps}", f"rollout.max_staleness={int(mode != 'sync')}",
                             f"rollout.prompts_per_step={per_step}", "rollout.group_size=2"])
    rows = [{"prompt_ids": [i], "answer": "1", "i": i} for i in range(200)]
    train = Split(rows)
    arm = ArmRun("", cfg, Path("."), train, FakeRewards(), published={0: "d0"})
    trained = []
    make = StreamBatches if mode == "stream" else AsyncBatches
    with make(cfg, samplers, [arm]) as batches:
        for step in range(1, steps + 1):
            ((groups, metrics),) = batches.next(step).values()
            assert len(groups) == per_step, (step, len(groups))
            trained += [g.row["i"] for g in groups]
            if step == 3:
                ray.kill(actors[1], no_restart=True)
            for i in samplers.live():  # the learner's publish, to the samplers it still publishes to
                try:
                    ray.get(actors[i].load.remote(step))
                except ray.exceptions.RayActorError:  # missed it: as rl/run.py's publish, recover (here: drop)
                    samplers.recover_missing((samplers.endpoints[i],))
            batches.publish("", step, f"d{step}")
        state = batches.state("")
    assert len(trained) == len(set(trained)) == per_step * steps
    if mode == "async":
        assert trained == [row["i"] for row in Split(rows).next_batch(per_step * steps)]  # the split's order
    else:
        pending = {train.row_at(p)["i"] for p in state.get("redraw", [])}
        assert not pending & set(trained)
        assert len(trained) + len(pending) == state["position"]
    assert samplers.dropped == {1} and samplers.faults.samplers_lost == 1
    assert samplers.faults.sampler_restarts == 0


@pytest.mark.integration
def test_a_sampler_lost_during_the_probe_is_skipped_not_fatal(local_ray, caplog):
    """The probe (step 1, then every sync.probe_every) asks each sampler directly: one that died
    meanwhile is left out with a warning (the next rollout restarts or drops it), the others
    are compared; with none left the probe reports nothing rather than a gap of 0."""
    import logging

    import ray

    from rl.config import load_config
    from rl.probe import run_probe

    class ProbeLearner(FakeLearner):
        def logprobs(self, seqs, temperature=None):
            return [[-0.1, -0.2] for _ in seqs]  # FakeSampler's log-probs: a gap of 0

    actors = [ray.remote(HostSampler).remote(i) for i in range(2)]
    learner = ray.remote(ProbeLearner).remote(actors)
    ray.kill(actors[1], no_restart=True)
    cfg = load_config(None, [])
    with caplog.at_level(logging.WARNING):
        assert run_probe(learner, actors, [[1], [2]], cfg) == {"sync/probe_gap_mean": 0.0, "sync/probe_gap_max": 0.0,
                                                               "sync/probe_tolerance": 1e-3}
    assert "probe: sampler 1 died before it answered" in caplog.text
    ray.kill(actors[0], no_restart=True)
    assert run_probe(learner, actors, [[1], [2]], cfg) == {}
