"""The adapter message and both socket ends, without vLLM (the integration tests load real adapters)."""

import struct

import pytest
import zmq

from rollout.channel import AdapterReceiver, AdapterSender, ChannelError, decode, encode, write_safetensors

SECRET = b"s" * 32
MANIFEST = {"a.lora_A.weight": ["F32", [1, 4]], "a.lora_B.weight": ["F32", [3, 1]]}


def tensors(scale=1.0):
    return [
        ("a.lora_A.weight", "F32", (1, 4), struct.pack("<4f", *(scale * x for x in (1, 2, 3, 4)))),
        ("a.lora_B.weight", "F32", (3, 1), struct.pack("<3f", 0.5, -0.5, 0.25)),
    ]


def frames(version=1, **kw):
    return encode(version, version, kw.get("tensors", tensors()), {"r": 1, "lora_alpha": 32}, kw.get("secret", SECRET))


def test_round_trip_safetensors_file_and_in_memory_views(tmp_path):
    a = decode(frames(3), SECRET, {"": MANIFEST}, 1 << 20, {"": 2})
    assert (a.version, a.step, a.peft_config["r"]) == (3, 3, 1)
    assert [t["offset"] for t in a.tensors] == [0, 16] and len(a.payload) == 28
    from safetensors.numpy import load_file

    write_safetensors(a, tmp_path / "adapter_model.safetensors")
    loaded = load_file(tmp_path / "adapter_model.safetensors")
    assert loaded["a.lora_A.weight"].tolist() == [[1, 2, 3, 4]]
    assert loaded["a.lora_B.weight"].ravel().tolist() == [0.5, -0.5, 0.25]
    # What the sampler hands vLLM's worker instead of a file: the same tensors, as views.
    import torch

    from rollout.vllm_ext import tensors_from_payload

    views = tensors_from_payload(torch.frombuffer(bytearray(a.payload), dtype=torch.uint8), a.tensors)
    assert {k: v.tolist() for k, v in views.items()} == {k: v.tolist() for k, v in loaded.items()}


@pytest.mark.parametrize("mutate, reason", [
    (lambda f: [f[0], f[1][:-4], f[2]], "truncated payload"),
    (lambda f: [f[0], f[1][:8] + b"\x00" * 4 + f[1][12:], f[2]], "digest mismatch"),
    (lambda f: [f[0].replace(b'"version": 1', b'"version": 9'), f[1], f[2]], "bad MAC"),
    (lambda f: frames(secret=b"x" * 32), "bad MAC"),
    (lambda f: f[:2], "expected 3 frames"),
    (lambda f: frames(tensors=[tensors()[0], ("a.lora_B.weight", "F32", (1, 3), tensors()[1][3])]), "does not match the manifest"),
    (lambda f: frames(tensors=[tensors()[0], ("a.lora_B.weight", "I64", (3, 1), b"\x00" * 24)]), "not allowed"),
    (lambda f: frames(tensors=tensors()[:1]), "names differ"),
    (lambda f: frames(tensors=[tensors()[0], ("a.lora_B.weight", "F32", (3, 1), b"\x00" * 4000)]), "too large"),
])
def test_refusals(mutate, reason):
    with pytest.raises(ChannelError, match=reason):
        decode(mutate(frames()), SECRET, {"": MANIFEST}, 1024, {"": 0})


def test_replayed_version_refused():
    with pytest.raises(ChannelError, match="replayed"):
        decode(frames(2), SECRET, {"": MANIFEST}, 1 << 20, {"": 2})


def test_sockets_ack_and_keep_last_good_version():
    loaded = []
    rx = AdapterReceiver("127.0.0.1", SECRET, {"": MANIFEST}, 1 << 20, loaded.append)
    tx = AdapterSender()
    try:
        assert rx.endpoint.startswith("tcp://127.0.0.1:")
        tx.connect([rx.endpoint])
        m = tx.publish([frames(1)], timeout_s=10)
        assert m["sync/bytes"] > 28 and m["sync/latency_ms"] > 0
        with pytest.raises(ChannelError, match="bad MAC"):
            tx.publish([frames(2, secret=b"y" * 32)], timeout_s=10)
        with pytest.raises(ChannelError, match="replayed"):
            tx.publish([frames(1)], timeout_s=10)
        assert [a.version for a in loaded] == [1] and rx.versions[""] == 1 and len(rx.refused) == 2
        tx.publish([frames(2)], timeout_s=10)
        assert rx.versions[""] == 2
    finally:
        tx.close()
        rx.close()


def test_unacknowledged_version_times_out():
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # a peer that never answers
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    tx = AdapterSender()
    try:
        tx.connect([f"tcp://127.0.0.1:{port}"])
        with pytest.raises(ChannelError, match="no acknowledgement"):
            tx.publish([frames(1)], timeout_s=0.5)
    finally:
        tx.close()
        silent.close(0)
        ctx.term()


def test_disconnected_sampler_is_not_waited_for():
    rx = AdapterReceiver("127.0.0.1", SECRET, {"": MANIFEST}, 1 << 20, lambda a: None)
    gone = AdapterReceiver("127.0.0.1", SECRET, {"": MANIFEST}, 1 << 20, lambda a: None)
    tx = AdapterSender()
    try:
        tx.connect([rx.endpoint, gone.endpoint])
        tx.publish([frames(1)], timeout_s=10)
        gone.close()
        with pytest.raises(ChannelError, match="no acknowledgement"):
            tx.publish([frames(2)], timeout_s=0.5)
        tx.disconnect(gone.endpoint)
        assert tx.publish([frames(3)], timeout_s=10)["sync/bytes"] > 0
    finally:
        tx.close()
        rx.close()


def test_each_arm_has_its_own_manifest_and_versions():
    """A sweep's arms (rl/arms.py) publish one message each: arm b's rank-2 adapter is checked
    against b's manifest, versions are counted per arm, an unknown arm and a message crossed
    onto another arm's manifest are refused, and one publish waits for every arm's ack."""
    wide = {"a.lora_A.weight": ["F32", [2, 4]], "a.lora_B.weight": ["F32", [3, 2]]}
    rank2 = [("a.lora_A.weight", "F32", (2, 4), struct.pack("<8f", *range(8))),
             ("a.lora_B.weight", "F32", (3, 2), struct.pack("<6f", *range(6)))]
    loaded = []
    rx = AdapterReceiver("127.0.0.1", SECRET, {"a": MANIFEST, "b": wide}, 1 << 20, loaded.append)
    tx = AdapterSender()

    def message(arm, version, t):
        return encode(version, version, t, {"r": 1}, SECRET, arm)

    try:
        tx.connect([rx.endpoint])
        tx.publish([message("a", 0, tensors()), message("b", 0, rank2)], timeout_s=10)
        assert sorted((a.arm, a.version) for a in loaded) == [("a", 0), ("b", 0)]
        tx.publish([message("a", 1, tensors())], timeout_s=10)  # b stays at 0: its own stream
        assert rx.versions == {"a": 1, "b": 0}
        with pytest.raises(ChannelError, match="unknown arm 'c'"):
            tx.publish([message("c", 5, tensors())], timeout_s=10)
        with pytest.raises(ChannelError, match="does not match the manifest"):
            tx.publish([message("b", 1, tensors())], timeout_s=10)  # a's rank-1 tensors sent as b's
        with pytest.raises(ChannelError, match="replayed version 1 of arm a"):
            tx.publish([message("a", 1, tensors())], timeout_s=10)
        assert rx.versions == {"a": 1, "b": 0} and len(loaded) == 3
    finally:
        tx.close()
        rx.close()


WEIGHTS = {f"w{i}": ["F32", [2, 2]] for i in range(5)}  # a model's full weights: five tensors


def weight(i: int, scale: float = 1.0, shape=(2, 2)):
    count = shape[0] * shape[1]
    return (f"w{i}", "F32", shape, struct.pack(f"<{count}f", *(scale * (i + k) for k in range(count))))


def chunked(version: int, groups=((0, 1), (2, 3), (4,)), scale: float = 1.0, secret: bytes = SECRET):
    """A version of the full weights as chunk messages (full fine-tuning: rollout/channel.py)."""
    return [encode(version, version, [weight(i, scale) for i in group], {}, secret, "", k, len(groups))
            for k, group in enumerate(groups)]


def test_full_weights_arrive_in_chunks_and_complete_one_version():
    """Each chunk is checked alone and loaded; the last completes the version, whose digest
    is the hash of the chunks' digests, and only then does the version count."""
    import hashlib
    import json

    loaded = []
    rx = AdapterReceiver("127.0.0.1", SECRET, {"": WEIGHTS}, 1 << 20, loaded.append)
    tx = AdapterSender()
    try:
        tx.connect([rx.endpoint])
        messages = chunked(1)
        metrics = tx.publish_chunks(iter(messages), timeout_s=10)
        assert [(a.chunk, a.chunks, a.complete) for a in loaded] == [(0, 3, False), (1, 3, False), (2, 3, True)]
        digests = [json.loads(m[0])["payload_sha256"] for m in messages]
        assert loaded[-1].digest == hashlib.sha256(",".join(digests).encode()).hexdigest()
        assert rx.versions[""] == 1 and not rx.partial
        assert metrics["sync/bytes"] == sum(len(f) for m in messages for f in m)
    finally:
        tx.close()
        rx.close()


@pytest.mark.parametrize("bad, reason", [
    (lambda good: [good[0], good[1][:-4], good[2]], "truncated payload"),
    (lambda good: encode(2, 2, [weight(2, 7.0), weight(3, 7.0)], {}, b"f" * 32, "", 1, 3), "bad MAC"),
    (lambda good: encode(2, 2, [weight(2), weight(3, shape=(1, 4))], {}, SECRET, "", 1, 3), "does not match the manifest"),
    (lambda good: encode(2, 2, [weight(1), weight(2)], {}, SECRET, "", 1, 3), "unexpected or repeated \\['w1'\\]"),
    (lambda good: encode(2, 2, [weight(4)], {}, SECRET, "", 2, 3), "out of order"),
    (lambda good: encode(1, 1, [weight(2), weight(3)], {}, SECRET, "", 1, 3), "replayed"),
    (lambda good: chunked(2, scale=2.0)[0], "replayed chunk 0 of version 2"),
])
def test_a_bad_chunk_is_refused_and_the_last_good_weights_stay(bad, reason):
    """Version 1 is served; version 2's first chunk has arrived. A truncated, forged,
    misshapen, repeated, out-of-order or replayed chunk is refused before anything of it is
    loaded: version 1 stays the version served, and the genuine chunks still complete 2."""
    loaded = []
    rx = AdapterReceiver("127.0.0.1", SECRET, {"": WEIGHTS}, 1 << 20, loaded.append)
    tx = AdapterSender()
    try:
        tx.connect([rx.endpoint])
        tx.publish_chunks(iter(chunked(1)), timeout_s=10)
        genuine = chunked(2, scale=2.0)
        tx.publish([genuine[0]], timeout_s=10)
        with pytest.raises(ChannelError, match=reason):
            tx.publish([bad(genuine[1])], timeout_s=10)
        assert rx.versions[""] == 1 and len(loaded) == 4 and len(rx.refused) == 1
        tx.publish_chunks(iter(genuine[1:]), timeout_s=10)
        assert rx.versions[""] == 2 and [a.version for a in loaded[-2:]] == [2, 2]
    finally:
        tx.close()
        rx.close()


def test_a_version_that_misses_tensors_is_refused_at_its_last_chunk():
    with pytest.raises(ChannelError, match="missing \\['w4'\\]"):
        decode(encode(1, 1, [weight(0), weight(1), weight(2), weight(3)], {}, SECRET), SECRET, {"": WEIGHTS},
               1 << 20, {"": 0})


def test_a_sampler_that_misses_a_chunk_gets_no_more_and_is_named():
    """publish_chunks goes on with the samplers that answer (they complete the version) and
    names the one that did not; the learner's driver then restarts and catches it up."""
    alive = AdapterReceiver("127.0.0.1", SECRET, {"": WEIGHTS}, 1 << 20, lambda a: None)
    stuck: list = []
    slow = AdapterReceiver("127.0.0.1", SECRET, {"": WEIGHTS}, 1 << 20,
                           lambda a: stuck.append(a) or (a.chunk == 1 and __import__("time").sleep(2)))
    tx = AdapterSender()
    try:
        tx.connect([alive.endpoint, slow.endpoint])
        with pytest.raises(ChannelError, match="missed chunks") as e:
            tx.publish_chunks(iter(chunked(1)), timeout_s=1.0)
        assert e.value.missing == [slow.endpoint]
        assert alive.versions[""] == 1 and [a.chunk for a in stuck] == [0, 1]
    finally:
        tx.close()
        alive.close()
        slow.close()
