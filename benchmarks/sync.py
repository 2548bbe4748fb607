"""Adapter sync against full-weight sync, into the same running vLLM samplers.

    python benchmarks/sync.py [--versions 20] [--full-versions 20] [--samplers 1,2]

A model with the shapes of Qwen2.5-0.5B (random weights, float32, built here) is served by
1 and then 2 Sampler actors. For each of `--versions` new versions it times "the learner has
new weights" -> "every sampler serves them":

(a) the rank-1 all-linear adapter through our channel (tensors -> one authenticated message,
    CurveZMQ-encrypted on the wire -> every sampler validates it and hands the payload to
    vLLM's worker, which loads it from memory as a new LoRA -> acknowledgement);
(b) full-weight sync of the same model into the same engines: the full state dict as one
    message on the same channel (same validation and digest), written to /dev/shm and loaded
    into the running engine with vLLM's reload_weights, prefix cache reset, acknowledgement.

Also prints the rank-1 adapter sizes of larger models from their published shapes. Last
line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)  # not benchmarks/ (Ray hands it to workers), where learner.py would shadow the package

from rollout.sampler import Sampler  # noqa: E402

QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6,
                  max_position_embeddings=4096)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Published shapes: hidden, layers, attention heads, kv heads, head_dim, MLP width, experts.
PUBLISHED = {
    "Qwen2.5-7B": dict(h=3584, layers=28, heads=28, kv=4, hd=128, mlp=18944, experts=0),
    "Llama-3.1-8B": dict(h=4096, layers=32, heads=32, kv=8, hd=128, mlp=14336, experts=0),
    "Qwen3-30B-A3B": dict(h=2048, layers=48, heads=32, kv=4, hd=128, mlp=768, experts=128),
}


def rank1_adapter(h, layers, heads, kv, hd, mlp, experts) -> dict:
    """Parameters and tensors of a rank-1 adapter on q, k, v, o and every expert's gate, up, down."""
    attention = (h + heads * hd) + 2 * (h + kv * hd) + (heads * hd + h)
    mlp_blocks = max(experts, 1)
    params = layers * (attention + mlp_blocks * 3 * (h + mlp))
    tensors = layers * 2 * (4 + 3 * mlp_blocks)
    return {"params": params, "tensors": tensors, "bf16_MB": round(2 * params / 1e6, 1),
            "fp32_MB": round(4 * params / 1e6, 1)}


class BenchSampler(Sampler):
    """A Sampler that can also take full weights on a second receiver (the baseline only)."""

    def start_full_receiver(self, secret: bytes, manifest: dict, max_bytes: int) -> str:
        from rollout.channel import AdapterReceiver

        self.full_rx = AdapterReceiver("127.0.0.1", secret, {"": manifest}, max_bytes, self._load_full)
        return self.full_rx.endpoint

    def _load_full(self, message):
        from rollout.channel import write_safetensors

        path = self.adapter_dir / f"full-{message.version}"
        path.mkdir()
        write_safetensors(message, path / "model.safetensors")
        with self.lock:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(path)})
            self.llm.reset_prefix_cache()
        shutil.rmtree(path)


def build_model(out: Path) -> str:
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from demo.tiny_model import build_tiny_model

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(torch_dtype="float32", **QWEN25_05B))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(build_tiny_model()).save_pretrained(out)  # any tokenizer will do
    return str(out)


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", type=int, default=20)
    parser.add_argument("--full-versions", type=int, default=20, help="versions timed for full-weight sync")
    parser.add_argument("--samplers", default="1,2")
    # Full-weight sync of a 2 GB fp32 model into 2 samplers at once needs ~2 x 8 GB here (engine,
    # received message, /dev/shm file): on this 24 GiB machine Ray's OOM killer stopped a sampler.
    parser.add_argument("--full-samplers", default="1", help="sampler counts for the full-weight baseline")
    args = parser.parse_args()
    counts = [int(c) for c in args.samplers.split(",")]
    full_counts = {int(c) for c in args.full_samplers.split(",")}

    import ray
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from common.records import Sampling
    from learner.learner import ST_DTYPES, encode_tensors
    from rl.config import load_config
    from rl.fleet import sampler_spec
    from rollout.channel import AdapterSender

    for name, shape in PUBLISHED.items():
        print(f"rank-1 all-linear adapter of {name}: {rank1_adapter(**shape)}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="sync-bench-"))
    model_path = build_model(tmp / "qwen2.5-0.5b-shaped")
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    full = sorted((k, v.detach().contiguous()) for k, v in base.state_dict().items() if k != "lm_head.weight")
    peft_cfg = LoraConfig(r=1, lora_alpha=32, target_modules=list(TARGETS), task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, peft_cfg)
    adapter = sorted((k, torch.randn_like(v) * 0.01) for k, v in get_peft_model_state_dict(peft_model).items())
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_cfg.to_dict().items()}
    manifest = {k: [ST_DTYPES[v.dtype], list(v.shape)] for k, v in adapter}
    full_manifest = {k: [ST_DTYPES[v.dtype], list(v.shape)] for k, v in full}
    full_bytes = sum(v.numel() * v.element_size() for _, v in full)
    del peft_model

    cfg = load_config(None, ["model.max_model_len=512", "rollout.kv_cache_gb=0.25"])
    secret = secrets.token_bytes(32)
    ray.init(num_cpus=2, include_dashboard=False)
    actor = ray.remote(num_cpus=0)(BenchSampler)
    samplers = [actor.remote(sampler_spec(cfg, model_path, i), secret, {"": manifest}, "127.0.0.1")
                for i in range(max(counts))]
    tx, full_tx = AdapterSender(secret), AdapterSender(secret)
    endpoints = ray.get([s.endpoint.remote() for s in samplers])
    full_endpoints = ray.get([s.start_full_receiver.remote(secret, full_manifest, full_bytes + (1 << 20))
                              for s in samplers])
    tx.connect(endpoints)
    full_tx.connect(full_endpoints)
    version = 0

    def sync(sender, targets, tensors, peft_config) -> tuple[float, int]:
        """One new version, from the tensors in the learner's memory to every target's acknowledgement."""
        nonlocal version
        version += 1
        with torch.no_grad():
            for _, v in tensors:  # the learner has new weights (not timed)
                v.add_(1e-4)
        start = time.perf_counter()
        frames = encode_tensors(version, version, tensors, peft_config, secret)
        sender.publish([frames], timeout_s=600, endpoints=targets)
        return 1e3 * (time.perf_counter() - start), sum(len(f) for f in frames)

    result = {}
    for count in counts:
        lat_a, lat_f = [], []
        for _ in range(args.versions):
            ms, adapter_bytes = sync(tx, endpoints[:count], adapter, config)
            lat_a.append(ms)
        print(f"{count} sampler(s): adapter p50 {statistics.median(lat_a):.1f} ms, "
              f"per version {[round(x) for x in lat_a]}", flush=True)
        for _ in range(args.full_versions if count in full_counts else 0):
            ms, _ = sync(full_tx, full_endpoints[:count], full, {})
            lat_f.append(ms)
        served = ray.get([s.generate.remote([[1, 2, 3]], Sampling(1, 0.0, 4)) for s in samplers[:count]])
        assert all(len(out.completions_P_G[0][0].tokens) > 0 for out in served)
        for key, xs in (("adapter", lat_a), ("full", lat_f)) if lat_f else (("adapter", lat_a),):
            result[f"{key}_p50_ms_{count}"] = round(statistics.median(xs), 2)
            result[f"{key}_p99_ms_{count}"] = round(percentile(xs, 0.99), 2)
        if lat_f:
            print(f"{count} sampler(s): full p50 {result[f'full_p50_ms_{count}']} ms", flush=True)
    first = counts[0]
    summary = {
        "adapter_bytes": adapter_bytes,
        "full_bytes": full_bytes,
        "adapter_tensors": len(adapter),
        "versions": args.versions,
        "full_versions": args.full_versions,
        "adapter_p50_ms": result[f"adapter_p50_ms_{first}"],
        "adapter_p99_ms": result[f"adapter_p99_ms_{first}"],
        "full_p50_ms": result.get(f"full_p50_ms_{first}"),  # None with --full-versions 0
        "speedup_p50": (round(result[f"full_p50_ms_{first}"] / result[f"adapter_p50_ms_{first}"], 1)
                        if f"full_p50_ms_{first}" in result else None),
        **result,
    }
    for s in samplers:
        ray.get(s.close.remote())
    ray.shutdown()
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
