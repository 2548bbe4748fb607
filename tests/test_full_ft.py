"""Full fine-tuning (lora.rank 0) on the real stack: the learner trains every weight and
ships them to a running vLLM engine in chunks over the authenticated channel.

One learner and one sampler are shared by the module (a vLLM engine takes about a minute
to start here). Each test also passes run alone.
"""

import json
import secrets

import pytest

ray = pytest.importorskip("ray")

from common.records import Datum, Sampling  # noqa: E402
from demo.tiny_model import TEMPLATE, build_tiny_model  # noqa: E402
from rl.config import load_config  # noqa: E402
from rollout.channel import encode, parse_endpoint  # noqa: E402
from tests.agreement import LOGPROB_TOL, logit_scale, logprob_gap  # noqa: E402
from tests.test_integration import PROMPTS, send  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack():
    from transformers import AutoTokenizer

    from rl.fleet import build_actors, shutdown

    model_path = build_tiny_model()
    # lr 1e-3 moves every weight visibly in two steps; chunks of 0.5 MiB cut the tiny model's
    # 4.47 MB into 9 messages at least (11: whole tensors of 256 KB fill them unevenly).
    cfg = load_config(None, ["lora.rank=0", "learner.lr=1e-3", "sync.chunk_mb=0.5", "rollout.prompts_per_step=2",
                             "rollout.group_size=8", "learner.micro_batch_size=8", "rollout.num_cpus=0.5",
                             "learner.num_cpus=0.5"])
    ray.init(num_cpus=2, include_dashboard=False)
    secret = secrets.token_bytes(32)
    learners, samplers = build_actors(cfg, model_path, secret)
    (published,) = ray.get(learners[0].publish.remote())
    tok = AutoTokenizer.from_pretrained(model_path)
    prompt_ids = [tok(TEMPLATE.format(prompt=p))["input_ids"] for p in PROMPTS]
    yield {"learner": learners[0], "sampler": samplers[0], "secret": secret, "prompt_ids": prompt_ids,
           "published": published}
    shutdown(learners, samplers)


def generate(stack, n=8, temperature=1.0, seed=1):
    return ray.get(stack["sampler"].generate.remote(stack["prompt_ids"], Sampling(n, temperature, 40, seed=seed)))


def gap_to_learner(stack, out) -> float:
    """The largest |learner - sampler| log-prob over the logits' scale (tests/agreement.py)."""
    seqs = [Datum(p, c.tokens) for p, g in zip(stack["prompt_ids"], out.completions_P_G) for c in g]
    learner_lp = ray.get(stack["learner"].logprobs.remote(seqs))
    scale = ray.get(stack["learner"].__ray_call__.remote(lambda learner: logit_scale(learner.engine.module, seqs)))
    return logprob_gap(learner_lp, [c.logprobs for g in out.completions_P_G for c in g], scale)


def train(stack, seed: int):
    """One real step on the sampler's completions (boxed answers rewarded), then the sync."""
    out = generate(stack, seed=seed)
    batch = [Datum(p, c.tokens, c.logprobs, 1.0 if "boxed" in c.text else -1.0)
             for p, g in zip(stack["prompt_ids"], out.completions_P_G) for c in g]
    metrics = ray.get(stack["learner"].train_step.remote(batch))[""]
    (sync,) = ray.get(stack["learner"].publish.remote())
    return metrics, sync


def test_full_weights_reach_the_engine_in_chunks_and_logprobs_agree(stack):
    """Version 0 is the base model, so the engine and the learner agree; after two steps at
    lr 1e-3 (every weight moved) they still agree within the float32 bound of
    tests/agreement.py, which a stale weight, a stale LM-head packing or a stale prefix
    cache would break by orders of magnitude: the same completions' log-probs moved by more
    than 1e-2 between the versions."""
    chunks = stack["published"].metrics["sync/chunks"]
    assert chunks >= 9 and not stack["published"].missing
    base = generate(stack, seed=7)
    assert (base.version, base.digest) == (0, stack["published"].digest)
    assert gap_to_learner(stack, base) < LOGPROB_TOL
    for seed in (3, 4):
        metrics, sync = train(stack, seed)
        assert metrics["learner/grad_norm"] > 0 and metrics["learner/flops"] > 0 and metrics["learner/peak_mem_gb"] > 0
        assert not sync.missing and sync.metrics["sync/chunks"] == chunks and sync.metrics["sync/bytes"] > 4e6
    after = generate(stack, seed=7)
    assert after.version == 2 and after.digest == sync.digest
    assert gap_to_learner(stack, after) < LOGPROB_TOL
    seqs = [Datum(p, c.tokens) for p, g in zip(stack["prompt_ids"], base.completions_P_G) for c in g]
    moved = ray.get(stack["learner"].logprobs.remote(seqs))
    old = [c.logprobs for g in base.completions_P_G for c in g]
    assert max(abs(a - b) for n, o in zip(moved, old) for a, b in zip(n, o)) > 1e-2


def test_a_bad_weights_chunk_is_refused_and_the_engine_keeps_its_weights(stack):
    """Truncated, forged, misshapen and replayed chunks sent to the sampler's port are
    refused, counted, and change nothing: the same version serves the same greedy tokens,
    still in agreement with the learner."""
    sampler, learner = stack["sampler"], stack["learner"]
    endpoint = ray.get(sampler.endpoint.remote())
    manifest = ray.get(learner.manifest.remote())
    before = generate(stack, n=1, temperature=0.0)
    version, refused_before = before.version, ray.get(sampler.refused.remote())["messages"]
    to = parse_endpoint(endpoint)[1]  # messages name the sampler's incarnation
    first = next(iter(manifest))

    def chunk(shape_of=None, chunk=0, chunks=2, secret=stack["secret"], at=version + 1):
        dtype, shape = manifest[first]
        shape = list(shape)[::-1] + [1] if shape_of else list(shape)
        count = 1
        for d in shape:
            count *= d
        return encode(at, 99, [(first, dtype, shape, bytes(4 * count))], {}, secret, "", chunk, chunks, to)

    good = chunk()
    cases = {
        "truncated payload": [good[0], good[1][:-8], good[2]],
        "bad MAC": chunk(secret=b"forged" * 6),
        "does not match the manifest": chunk(shape_of=first),
        "out of order": chunk(chunk=1),
        "replayed": chunk(at=version),
    }
    for reason, frames in cases.items():
        reply = send(endpoint, frames, stack["secret"])
        assert reply["ok"] is False and reason in reply["reason"], (reason, reply)
        assert reply["version"] == version
    assert ray.get(sampler.refused.remote())["messages"] == refused_before + len(cases)
    after = generate(stack, n=1, temperature=0.0)
    assert after.version == version and after.digest == before.digest
    assert [c.tokens for g in after.completions_P_G for c in g] == [c.tokens for g in before.completions_P_G for c in g]
    assert gap_to_learner(stack, generate(stack, seed=11)) < LOGPROB_TOL


def test_the_learner_checkpoint_holds_every_weight(stack):
    """state_files holds every weight of the model with AdamW's two moments and step for each
    (3 x 4.47 MB at least), as safetensors; loaded into a fresh learner it is bit for bit the
    saved state, and the next step is the same step. The saved "adapter" is a model folder
    transformers loads as it is, with the checkpoint's weights."""
    import torch
    from safetensors.torch import load

    from learner.learner import Learner

    train(stack, 5)  # Adam's moments exist once a step ran
    files = ray.get(stack["learner"].state_files.remote())
    assert sorted(files) == ["arm.json", "arm.safetensors", "rng-rank0.json"]
    assert len(files["arm.safetensors"]) > 3 * 4.47e6
    tensors = load(files["arm.safetensors"])
    names = {k.split("/", 1)[1] for k in tensors}
    assert set(tensors) == {f"{kind}/{n}" for kind in ("weight", "exp_avg", "exp_avg_sq", "step") for n in names}
    model_files = ray.get(stack["learner"].adapter_files.remote())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(model_files)
    assert json.loads(model_files["config.json"])["model_type"] == "qwen2"
    model = load(model_files["model.safetensors"])
    assert set(model) <= names and all(torch.equal(model[k], tensors[f"weight/{k}"]) for k in model)

    spec = ray.get(stack["learner"].__ray_call__.remote(lambda learner: learner.spec))
    fresh = ray.remote(num_cpus=0)(Learner).remote(spec, b"k" * 32)
    try:
        assert ray.get(fresh.load_state_files.remote(files))["step"] == json.loads(files["arm.json"])["step"]
        again = load(ray.get(fresh.state_files.remote())["arm.safetensors"])
        assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
        out = generate(stack, seed=6)
        batch = [Datum(p, c.tokens, c.logprobs, 1.0 if "boxed" in c.text else -1.0)
                 for p, g in zip(stack["prompt_ids"], out.completions_P_G) for c in g]
        ray.get([x.train_step.remote(batch) for x in (stack["learner"], fresh)])
        one, two = (ray.get(x.adapter_files.remote())["model.safetensors"] for x in (stack["learner"], fresh))
        assert one == two
        ray.get(stack["learner"].publish.remote())  # the module's sampler serves the learner's weights again
    finally:
        ray.kill(fresh)
