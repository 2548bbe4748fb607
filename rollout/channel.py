"""The adapter channel: both ends, and the message they exchange over ZeroMQ.

A message is three frames, never pickle:

    header   JSON: magic, arm, version, step, chunk, chunks, peft_config, payload_bytes,
             payload_sha256, tensors [{name, dtype, shape, offset, nbytes}]
    payload  every tensor's raw little-endian bytes, back to back, in header order
    mac      HMAC-SHA256 of the header under the run's secret (the header holds the
             payload's SHA-256, so the MAC binds the payload too)

The learner (`AdapterSender`) connects one DEALER socket to each sampler's ROUTER
(`AdapterReceiver`, bound to the node's own address, never to all interfaces). PUB/SUB
would drop messages sent before a subscriber joins, so every version is acknowledged: the
receiver validates, hands the adapter to its loader, and answers `{"ok": true, ...}`, or
`{"ok": false, "reason": ...}` while it keeps serving its last good version.

One message carries one arm's adapter (rl/arms.py; "" in a run without arms): each arm has
its own manifest (its rank and target modules) and its own increasing versions, and a
message naming an arm the receiver was not given is refused.

Full fine-tuning (lora.rank 0) sends the model's weights instead, as `chunks` messages of at
most sync.chunk_mb each, so that neither end ever holds a second full copy in flight: each
chunk is a whole message (its own MAC and payload digest) that is validated before any of
it is loaded, chunk i+1 only after chunk i of the same version, no tensor twice, and the
last chunk completes the manifest. A version's digest is its one payload's SHA-256, or with
several chunks the SHA-256 of their digests joined by commas (`version_digest`).

Light module: no torch. The payload layout is safetensors' own: `write_safetensors` makes a
file of it by prefixing a header, without decoding tensors.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

log = logging.getLogger(__name__)

MAGIC = "rl-lora-adapter/1"
DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2}  # the allow-list of tensor dtypes
MAX_HEADER_BYTES = 16 << 20


class ChannelError(ValueError):
    """A message refused by the receiver, or a version a sampler did not acknowledge."""


class Unacknowledged(ChannelError):
    """Some samplers did not acknowledge a version in time (dead, or hung); `missing` names them."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


@dataclass(frozen=True)
class Adapter:
    """One valid message: an adapter version, or one chunk of a version's full weights."""

    arm: str
    version: int
    step: int
    peft_config: dict
    tensors: list  # [{name, dtype, shape, offset, nbytes}], in payload order
    payload: bytes
    # The payload's SHA-256; on the message that completes a version (the only one, or the
    # last chunk), the version's digest, which rollouts carry to name the exact weights.
    digest: str
    chunk: int = 0
    chunks: int = 1

    @property
    def complete(self) -> bool:
        return self.chunk == self.chunks - 1


@dataclass
class Partial:
    """A version of full weights whose first chunks arrived (the receiver's state)."""

    version: int
    chunks: int
    digests: list[str]  # each arrived chunk's payload digest, in order
    names: set[str]  # the tensors they held


def version_digest(chunk_digests: list[str]) -> str:
    return chunk_digests[0] if len(chunk_digests) == 1 else hashlib.sha256(",".join(chunk_digests).encode()).hexdigest()


def encode(version: int, step: int, tensors: list[tuple[str, str, tuple, bytes]], peft_config: dict,
           secret: bytes, arm: str = "", chunk: int = 0, chunks: int = 1) -> list[bytes]:
    """Frames for one adapter version of `arm` (or chunk `chunk` of `chunks` of its full
    weights); tensors are (name, dtype, shape, raw bytes)."""
    meta, parts, offset = [], [], 0
    for name, dtype, shape, data in tensors:
        meta.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": len(data)})
        parts.append(data)
        offset += len(data)
    payload = b"".join(parts)
    header = json.dumps({
        "magic": MAGIC, "arm": arm, "version": version, "step": step, "chunk": chunk, "chunks": chunks,
        "peft_config": peft_config,
        "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest(), "tensors": meta,
    }).encode()
    return [header, payload, hmac.new(secret, header, hashlib.sha256).digest()]


def decode(frames: list[bytes], secret: bytes, manifests: dict[str, dict], max_bytes: int,
           last_versions: dict[str, int], partial: dict[str, Partial] | None = None) -> Adapter:
    """Validate frames against the run's secret and the learner's manifests, or raise ChannelError.

    manifests: arm -> {tensor name -> [dtype, shape]}, which the message (or a version's
    chunks together) must match exactly; last_versions: arm -> the newest version accepted
    (a message must be newer); partial: arm -> the version whose chunks are arriving.
    """
    if len(frames) != 3:
        raise ChannelError(f"expected 3 frames (header, payload, mac), got {len(frames)}")
    header_b, payload, mac = frames
    if len(header_b) > MAX_HEADER_BYTES or len(payload) > max_bytes:
        raise ChannelError(f"message too large: {len(header_b) + len(payload)} bytes, limit {max_bytes}")
    if not hmac.compare_digest(hmac.new(secret, header_b, hashlib.sha256).digest(), mac):
        raise ChannelError("bad MAC: sender does not hold the run's secret, or the header was altered")
    try:
        h = json.loads(bytes(header_b))
        arm, version, step, tensors = str(h["arm"]), int(h["version"]), int(h["step"]), h["tensors"]
        peft_config, size, digest = h["peft_config"], int(h["payload_bytes"]), h["payload_sha256"]
        chunk, chunks = int(h.get("chunk", 0)), int(h.get("chunks", 1))
    except (ValueError, KeyError, TypeError) as e:
        raise ChannelError(f"malformed header: {e!r}") from None
    if h.get("magic") != MAGIC:
        raise ChannelError(f"unknown message format {h.get('magic')!r}, expected {MAGIC}")
    if arm not in manifests:
        raise ChannelError(f"unknown arm {arm!r} (this sampler serves {sorted(manifests)})")
    last_version, ongoing = last_versions.get(arm, -1), (partial or {}).get(arm)
    if version <= last_version:
        raise ChannelError(f"stale or replayed version {version}{' of arm ' + arm if arm else ''}: already "
                           f"serving {last_version}")
    if not 0 <= chunk < chunks <= max(len(manifests[arm]), 1):
        raise ChannelError(f"chunk {chunk} of {chunks}: out of range for {len(manifests[arm])} tensors")
    if chunk == 0 and ongoing is not None and ongoing.version == version:
        raise ChannelError(f"replayed chunk 0 of version {version}{' of arm ' + arm if arm else ''}: its chunks "
                           "are arriving")
    if chunk and (ongoing is None or (ongoing.version, ongoing.chunks, len(ongoing.digests)) != (version, chunks, chunk)):
        have = f"version {ongoing.version}, {len(ongoing.digests)} of {ongoing.chunks} chunks" if ongoing else "no chunks"
        raise ChannelError(f"chunk {chunk} of {chunks} of version {version} out of order (have {have})")
    if len(payload) != size:
        raise ChannelError(f"truncated payload: {len(payload)} bytes, header says {size}")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ChannelError("payload digest mismatch: payload corrupted in transit")
    seen = ongoing.names if chunk else set()
    try:
        end = _check_layout(tensors, manifests[arm], seen, chunk == chunks - 1)
    except (KeyError, TypeError, AttributeError) as e:
        raise ChannelError(f"malformed tensor entry: {e!r}") from None
    if end != size:
        raise ChannelError(f"tensors cover {end} bytes of a {size}-byte payload")
    if chunk == chunks - 1:
        digest = version_digest((ongoing.digests if chunk else []) + [digest])
    return Adapter(arm, version, step, peft_config, tensors, payload, digest, chunk, chunks)


def _check_layout(tensors: list, manifest: dict, seen: set[str] = frozenset(), last: bool = True) -> int:
    """Raise ChannelError unless each tensor matches the manifest and follows the previous one;
    seen: the names earlier chunks of the version held; last: these complete the manifest."""
    names = [t["name"] for t in tensors]
    counts = collections.Counter(map(str, names))
    unexpected = {str(n) for n in names if n not in manifest or n in seen or counts[str(n)] > 1}
    missing = set(manifest) - seen - set(names) if last else set()
    if unexpected or missing:
        raise ChannelError(f"tensor names differ from the manifest: missing {sorted(missing)[:3]}, "
                           f"unexpected or repeated {sorted(unexpected)[:3]}")
    end = 0
    for t in tensors:
        name, dtype, shape = t["name"], t["dtype"], t["shape"]
        if dtype not in DTYPE_BYTES:
            raise ChannelError(f"{name}: dtype {dtype!r} not allowed (allowed: {sorted(DTYPE_BYTES)})")
        if [dtype, list(shape)] != [manifest[name][0], list(manifest[name][1])]:
            raise ChannelError(f"{name}: {dtype}{list(shape)} does not match the manifest's "
                               f"{manifest[name][0]}{list(manifest[name][1])}")
        count = 1
        for d in shape:
            count *= d
        if t["offset"] != end or t["nbytes"] != count * DTYPE_BYTES[dtype]:
            raise ChannelError(f"{name}: offset/size {t['offset']}/{t['nbytes']} inconsistent with the layout")
        end += t["nbytes"]
    return end


def _arm_of(frames: list) -> str:
    """The arm a message says it is for, to label the reply (unchecked: decode checks it)."""
    try:
        return str(json.loads(bytes(frames[0]))["arm"]) if len(frames[0]) <= MAX_HEADER_BYTES else ""
    except Exception:
        return ""


def write_safetensors(adapter: Adapter, file: Path):
    """The payload as a safetensors file: its layout already is safetensors' data section."""
    header = {t["name"]: {"dtype": t["dtype"], "shape": t["shape"],
                          "data_offsets": [t["offset"], t["offset"] + t["nbytes"]]} for t in adapter.tensors}
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data section to 8 bytes
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        f.write(adapter.payload)


class AdapterReceiver:
    """A sampler's end: a ROUTER socket served by a thread; `load` is called per valid version.

    manifests: arm -> the tensors its messages must hold (one entry "" without arms)."""

    def __init__(self, host: str, secret: bytes, manifests: dict[str, dict], max_bytes: int, load):
        self._secret, self._manifests, self._max_bytes, self._load = secret, manifests, max_bytes, load
        self.versions: dict[str, int] = dict.fromkeys(manifests, -1)  # arm -> last version accepted and loaded
        self.partial: dict[str, Partial] = {}  # arm -> the full-weights version whose chunks are arriving
        self.refused: list[str] = []  # reasons, newest last
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        # A hard wall against memory exhaustion; decode gives the clear reason below it.
        self._sock.setsockopt(zmq.MAXMSGSIZE, max_bytes + MAX_HEADER_BYTES)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="adapter-receiver", daemon=True)
        self._thread.start()

    def _serve(self):
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(100):
                continue
            # copy=False: the payload is used in place (a MoE adapter can be 100+ MB).
            peer, *frames = [f.buffer for f in self._sock.recv_multipart(copy=False)]
            start = time.perf_counter()
            arm = _arm_of(frames)
            try:
                adapter = decode(frames, self._secret, self._manifests, self._max_bytes, self.versions, self.partial)
                try:
                    self._load(adapter)
                except BaseException:
                    self.partial.pop(adapter.arm, None)  # this version cannot complete now
                    raise
                self._advance(adapter)
                reply = {"ok": True, "arm": adapter.arm, "version": adapter.version, "chunk": adapter.chunk,
                         "load_ms": 1e3 * (time.perf_counter() - start)}
            except Exception as e:  # a refused message must never stop the receiver
                reason = str(e) if isinstance(e, ChannelError) else f"load failed: {e!r}"
                log.warning("refused adapter message: %s (still serving version %d)", reason, self.versions.get(arm, -1))
                self.refused.append(reason)
                reply = {"ok": False, "reason": reason, "arm": arm, "version": self.versions.get(arm, -1)}
            self._sock.send_multipart([bytes(peer), json.dumps(reply).encode()])

    def _advance(self, adapter: Adapter):
        """Record a loaded message: a chunk joins its version, the last completes it."""
        if adapter.complete:
            self.partial.pop(adapter.arm, None)
            self.versions[adapter.arm] = adapter.version
        elif adapter.chunk == 0:
            self.partial[adapter.arm] = Partial(adapter.version, adapter.chunks, [adapter.digest],
                                                {t["name"] for t in adapter.tensors})
        else:
            self.partial[adapter.arm].digests.append(adapter.digest)
            self.partial[adapter.arm].names.update(t["name"] for t in adapter.tensors)

    def close(self):
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(0)
        self._ctx.term()


def describe(wanted: set[tuple[str, int, int]]) -> str:
    """'version 3' (no arms), 'versions a:3, b:3', or 'version 3 (chunk 2)'."""
    versions = sorted({(arm, version) for arm, version, _ in wanted})
    chunks = sorted({chunk for _, _, chunk in wanted})
    where = f" (chunk {chunks[0]})" if chunks != [0] else ""
    if len(versions) == 1 and versions[0][0] == "":
        return f"version {versions[0][1]}{where}"
    return "versions " + ", ".join(f"{arm}:{version}" for arm, version in versions) + where


class AdapterSender:
    """The learner's end: one DEALER per sampler; `publish` returns once all acknowledged."""

    def __init__(self):
        self._ctx = zmq.Context()
        self._socks: dict[str, zmq.Socket] = {}

    def connect(self, endpoints: list[str]):
        for ep in endpoints:
            if ep not in self._socks:
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(ep)
                self._socks[ep] = sock

    def disconnect(self, endpoint: str):
        """Stop publishing to a sampler that left; publish would otherwise wait for its ack."""
        sock = self._socks.pop(endpoint, None)
        if sock is not None:
            sock.close(0)

    def publish(self, messages: list[list[bytes]], timeout_s: float, endpoints: list[str] | None = None) -> dict:
        """Send messages (one per arm) to every sampler (or to `endpoints`); raise ChannelError
        unless all load every one in time. Each message is encoded once; each send references
        the same buffers (no copy)."""
        start = time.perf_counter()
        wanted = set()
        for frames in messages:
            header = json.loads(frames[0])
            wanted.add((header["arm"], header["version"], header.get("chunk", 0)))
        targets = {ep: self._socks[ep] for ep in (endpoints if endpoints is not None else self._socks)}
        for sock in targets.values():
            for frames in messages:
                sock.send_multipart(frames, copy=False)
        poller = zmq.Poller()
        for sock in targets.values():
            poller.register(sock, zmq.POLLIN)
        pending = {ep: set(wanted) for ep in targets}
        acks = []
        deadline = start + timeout_s
        while any(pending.values()):
            left_ms = 1e3 * (deadline - time.perf_counter())
            waiting = sorted(ep for ep, left in pending.items() if left)
            if left_ms <= 0:
                raise Unacknowledged(f"{describe(wanted)}: no acknowledgement within {timeout_s} s from {waiting}",
                                     waiting)
            for sock, _ in poller.poll(left_ms):
                reply = json.loads(sock.recv())
                ep = next(e for e, s in targets.items() if s is sock)
                key = (reply.get("arm"), reply.get("version"), reply.get("chunk", 0))
                if not reply.get("ok") or key not in pending[ep]:
                    raise ChannelError(f"{describe(wanted)} refused by {ep}: {reply.get('reason', reply)}")
                acks.append(reply)
                pending[ep].discard(key)
        return {
            "sync/latency_ms": 1e3 * (time.perf_counter() - start),
            "sync/load_ms": max(a["load_ms"] for a in acks) if acks else 0.0,
            "sync/bytes": sum(len(f) for frames in messages for f in frames),
        }

    def publish_chunks(self, messages, timeout_s: float, endpoints: list[str] | None = None) -> dict:
        """publish for the chunks of a version of full weights (an iterable, encoded as it is
        consumed), one after another: each is acknowledged by every sampler before the next
        is encoded, so one chunk at a time is in flight; timeout_s applies to each. A sampler
        that misses a chunk gets no more of them (the others still get the whole version), and
        is named at the end."""
        targets = list(endpoints if endpoints is not None else self._socks)
        totals, missing = {"sync/latency_ms": 0.0, "sync/load_ms": 0.0, "sync/bytes": 0}, []
        for frames in messages:
            if not targets:
                break
            try:
                for key, value in self.publish([frames], timeout_s, targets).items():
                    totals[key] += value
            except Unacknowledged as e:
                missing += e.missing
                targets = [ep for ep in targets if ep not in e.missing]
        if missing:
            raise Unacknowledged(f"{len(missing)} sampler(s) missed chunks of the weights: {missing}", missing)
        return totals

    def close(self):
        for sock in self._socks.values():
            sock.close(0)
        self._ctx.term()
