"""Stand-ins for the actors, shared by the tests of the driver's parts (window, faults, evaluation).

Each plays its real part's interface with no model behind it; the real parts are tested on the
real stack in test_integration.py and test_run.py.
"""

import json
import math
import os
import random
import time

import ray

from common.records import Completion, Published, Rollout, Streamed


class FakeSampler:
    """Serves `version` (set by the test's learner) after a random delay, like a busy engine.
    lengths: completion i of each prompt has lengths[i % len(lengths)] tokens (cut at the
    request's max_tokens when it reaches it); default 2, finished."""

    def __init__(self, seed, digest_prefix="d", lengths=(2,)):
        self.version, self.rng, self.prefix, self.lengths = 0, random.Random(seed), digest_prefix, lengths

    def load(self, version):
        self.version = version

    def generate(self, prompt_ids, sampling):
        return self.generate_many([(prompt_ids, sampling)])[0]

    def generate_many(self, requests):
        version = self.version  # the adapter a real sampler takes at the start of generate
        time.sleep(self.rng.uniform(0.0, 0.05))

        def completion(i, max_tokens):
            n = self.lengths[i % len(self.lengths)]
            return Completion(list(range(1, n + 1)), [-0.1 * (k + 1) for k in range(n)], "x", n < max_tokens)

        return [Rollout(sampling.arm, version, f"{self.prefix}{version}",
                        [[completion(i, sampling.max_tokens) for i in range(sampling.n)] for _ in prompt_ids])
                for prompt_ids, sampling in requests]


class FakeRewards:
    def score(self, items):
        return [float(i % 2) for i in range(len(items))], {}


class FakeLearner:
    """Publishes versions to the fake samplers; its loss is NaN at the given steps (of arm
    `nan_arm` only, in a learner of several arms)."""

    def __init__(self, samplers, nan_steps=(), arms=("",), nan_arm=""):
        self.samplers, self.nan_steps, self.nan_arm, self.version = samplers, set(nan_steps), nan_arm, 0
        self.arms = list(arms)

    def publish(self, arms=None):
        ray.get([s.load.remote(self.version) for s in self.samplers])
        return [Published(arm, self.version, f"d{self.version}",
                          metrics={"sync/latency_ms": 1.0, "sync/bytes": 1, "sync/version": self.version})
                for arm in (self.arms if arms is None else arms)]

    def disconnect(self, endpoint):
        pass

    def catch_up(self, endpoint, arms=None):
        """A restarted sampler is brought to the newest version (the real one sends it the adapter)."""
        ray.get([s.load.remote(self.version) for s in self.samplers])
        return {}

    def train_step(self, batch, arms=None):
        self.version += 1
        out = {}
        for arm in dict.fromkeys([d.arm for d in batch] + list(arms or ())):
            bad = arm == self.nan_arm and self.version in self.nan_steps
            out[arm] = {"learner/loss": math.nan if bad else 0.1, "learner/grad_norm": math.nan if bad else 1.0,
                        "learner/skipped": int(bad), "time/learn": 0.0}
        return out

    def state_files(self, arm=""):
        """The real learner's files, in their formats (a checkpoint's contents are checked);
        the version as the state."""
        meta = {"arm": arm, "step": self.version, "version": self.version, "engine": {}}
        return {"arm.safetensors": one_tensor(self.version), "arm.json": json.dumps(meta).encode()}

    def load_state_files(self, files, arm=""):
        self.version = json.loads(files["arm.json"])["version"]
        return {"step": self.version, "version": self.version}

    def adapter_files(self, arm=""):
        return {"adapter_config.json": b"{}", "adapter_model.safetensors": one_tensor(self.version)}


def one_tensor(value: float) -> bytes:
    """A safetensors file holding one float32 tensor [value], written by hand."""
    import struct

    header = json.dumps({"weight/w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return len(header).to_bytes(8, "little") + header + struct.pack("<f", value)


class FakeStreamSampler:
    """A streaming sampler (Sampler.exchange) with no engine: each group it is sent finishes
    `delay` + up to 50 ms later on the version it was sent on; loading a version aborts the
    groups that leave the resident window (max_staleness + 1 versions), as the real one does.
    `endpoint` names this incarnation (Ray restarts it with a new one)."""

    def __init__(self, seed, delay=0.0, max_staleness=0):
        self.version, self.rng, self.delay, self.resident = 0, random.Random(seed), delay, max_staleness + 1
        self.running, self.aborted, self.busy, self.served = {}, [], 0.0, 0
        self.incarnation = f"fake-{os.getpid()}-{random.random()}"

    def endpoint(self):
        return self.incarnation

    def arms(self):
        return [""]

    def load(self, version):
        self.version = version
        for key in [k for k, (_, v, _) in self.running.items() if v <= version - self.resident]:
            del self.running[key]
            self.aborted.append(key)

    def exchange(self, requests, wait_s):
        now = time.monotonic()
        for key, _, sampling in requests:
            self.running[key] = (now + self.delay + self.rng.uniform(0.0, 0.05), self.version, sampling)
        deadline = now + wait_s
        while True:
            done = [k for k, (at, _, _) in self.running.items() if at <= time.monotonic()]
            if done or self.aborted or time.monotonic() >= deadline:
                break
            time.sleep(0.002)
        if self.running:
            self.busy += time.monotonic() - now
        finished = []
        for key in done:
            _, version, sampling = self.running.pop(key)
            completions = [Completion([1, 2], [-0.1, -0.2], "x", True)] * sampling.n
            finished.append((key, Rollout(sampling.arm, version, f"d{version}", [completions])))
        self.served += len(finished)
        aborted, self.aborted = self.aborted, []
        return Streamed(finished, aborted, self.busy, len(self.running))

    def stop_stream(self):
        self.running.clear()

    def groups_served(self):
        return self.served

    def running_count(self):
        return len(self.running)


class FlatRewards:
    """Every completion of a row whose answer is "flat" scores 0 (a group with no signal);
    the others alternate 0, 1."""

    def score(self, items):
        return [0.0 if sample["answer"] == "flat" else float(i % 2) for i, (_, sample) in enumerate(items)], {}
