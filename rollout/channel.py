"""The adapter channel: both ends, and the message they exchange over ZeroMQ.

A message is three frames, never pickle:

    header   JSON: magic, incarnation, arm, version, step, chunk, chunks, peft_config,
             payload_bytes, payload_sha256, tensors [{name, dtype, shape, offset, nbytes}]
    payload  every tensor's raw little-endian bytes, back to back, in header order
    mac      HMAC-SHA256 of the header under the run's secret (the header holds the
             payload's SHA-256, so the MAC binds the payload too)

The learner (`AdapterSender`) connects one DEALER socket to each sampler's ROUTER
(`AdapterReceiver`, bound to one address, never to all interfaces: 127.0.0.1 in a
single-node job, else the node's own). PUB/SUB would drop messages sent before a subscriber
joins, so every version is acknowledged: the receiver validates, hands the adapter to its
loader, and answers `{"ok": true, ...}`, or `{"ok": false, "reason": ..., "kind": ...}`
while it keeps serving its last good version. Every reply carries the receiver's cumulative
refusal counts, which the learner reports as sync/refused_messages and
sync/refused_connections.

The sockets speak CurveZMQ: a connection is authenticated before any of its messages is
buffered, and the adapter is encrypted on the wire. The sampler's ROUTER is a CURVE server
with a key pair of its own process (its public key travels in its endpoint string, through
Ray); its ZAP handler admits one client key, the learner's, which both ends derive from the
run's secret (`learner_keys`; the secret reaches them through Ray only: no key is ever on
disk or on a command line). A peer that does not complete the handshake within
HANDSHAKE_S is dropped. Before the handshake, libzmq buffers at most one frame per
connection, and a frame is capped at FRAME_BYTES (ZMQ_MAXMSGSIZE caps a frame, not a
message): on the wire a message is its frames' lengths, then each frame cut into pieces of
at most FRAME_BYTES (`to_wire`), so the cap holds for the learner's messages too.

Replays: a receiver draws a random incarnation id when it starts, published with its
endpoint; the learner addresses each message to the incarnation it sends to (the header's
`incarnation`, under the MAC; the payload is encoded and hashed once and shared, only the
small header differs per receiver). A message captured off the wire names an incarnation
that a restarted sampler no longer has, and within one incarnation versions must increase.

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
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

MAGIC = "rl-lora-adapter/2"  # 2: the header names the receiver's incarnation
DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2}  # the allow-list of tensor dtypes
MAX_HEADER_BYTES = 16 << 20
# The most bytes in one frame on the wire: all that libzmq buffers for a connection that has
# not completed its handshake (HANDSHAKE_S at most). CURVE adds a few dozen bytes per frame.
FRAME_BYTES = 1 << 20
FRAME_OVERHEAD = 256
HANDSHAKE_S = 5.0  # a peer that has not authenticated by then is dropped (its descriptor freed)
# The most connections a receiver holds that have not delivered a message (so not proven to be
# the learner) at once; past it the oldest is dropped. What unauthenticated peers can cost a
# sampler as a whole: this many frames of FRAME_BYTES, ~33 MiB, however many connect. The
# learner's own connection delivers its message within milliseconds of its handshake, and
# reconnects by itself if it was dropped while idle.
MAX_UNAUTHENTICATED = 32
# Refusals: the kinds of refused messages (sync/refused_messages), how many are logged one by
# one before one summary line per LOG_EVERY_S, and how many recent reasons a receiver keeps.
MESSAGE_KINDS = ("mac", "incarnation", "stale", "malformed", "oversize")
FIRST_LOGGED = 5
LOG_EVERY_S = 60.0
RECENT_REASONS = 8
_ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # where libzmq asks who may connect (RFC 27)
_KEY_LABEL = b"rl-lora adapter channel: the learner's CURVE key"


class ChannelError(ValueError):
    """A message refused by the receiver, or a version a sampler did not acknowledge; `kind`
    is one of MESSAGE_KINDS for a refused message."""

    def __init__(self, message: str, kind: str = "malformed"):
        super().__init__(message)
        self.kind = kind


class Unacknowledged(ChannelError):
    """Some samplers did not acknowledge a version (dead, hung, or it failed to load there);
    `missing` names them: the driver restarts them and the learner catches them up."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message, "unacknowledged")
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
           secret: bytes, arm: str = "", chunk: int = 0, chunks: int = 1, incarnation: str = "") -> list[bytes]:
    """Frames for one adapter version of `arm` (or chunk `chunk` of `chunks` of its full
    weights); tensors are (name, dtype, shape, raw bytes). incarnation: the receiver's; the
    sender addresses a message to each receiver (`address`)."""
    meta, parts, offset = [], [], 0
    for name, dtype, shape, data in tensors:
        meta.append({"name": name, "dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": len(data)})
        parts.append(data)
        offset += len(data)
    payload = b"".join(parts)
    header = json.dumps({
        "magic": MAGIC, "incarnation": incarnation, "arm": arm, "version": version, "step": step, "chunk": chunk,
        "chunks": chunks, "peft_config": peft_config,
        "payload_bytes": len(payload), "payload_sha256": hashlib.sha256(payload).hexdigest(), "tensors": meta,
    }).encode()
    return [header, payload, hmac.new(secret, header, hashlib.sha256).digest()]


def address(frames: list, incarnation: str, secret: bytes) -> list:
    """A message addressed to one receiver's incarnation: a new header and MAC; the payload
    frame is the same object (encoded and hashed once for every receiver)."""
    header = json.loads(bytes(frames[0]))
    header["incarnation"] = incarnation
    header_b = json.dumps(header).encode()
    return [header_b, frames[1], hmac.new(secret, header_b, hashlib.sha256).digest()]


def decode(frames: list[bytes], secret: bytes, manifests: dict[str, dict], max_bytes: int,
           last_versions: dict[str, int], partial: dict[str, Partial] | None = None, *, incarnation: str) -> Adapter:
    """Validate frames against the run's secret, this receiver's incarnation and the
    learner's manifests, or raise ChannelError (its `kind` says why, for the counts).

    manifests: arm -> {tensor name -> [dtype, shape]}, which the message (or a version's
    chunks together) must match exactly; last_versions: arm -> the newest version accepted
    (a message must be newer); partial: arm -> the version whose chunks are arriving.
    """
    if len(frames) != 3:
        raise ChannelError(f"expected 3 frames (header, payload, mac), got {len(frames)}")
    header_b, payload, mac = frames
    if len(header_b) > MAX_HEADER_BYTES or len(payload) > max_bytes:
        raise ChannelError(f"message too large: {len(header_b) + len(payload)} bytes, limit {max_bytes}", "oversize")
    if not hmac.compare_digest(hmac.new(secret, header_b, hashlib.sha256).digest(), mac):
        raise ChannelError("bad MAC: sender does not hold the run's secret, or the header was altered", "mac")
    try:
        h = json.loads(bytes(header_b))
        arm, version, step, tensors = str(h["arm"]), int(h["version"]), int(h["step"]), h["tensors"]
        peft_config, size, digest = h["peft_config"], int(h["payload_bytes"]), h["payload_sha256"]
        chunk, chunks = int(h.get("chunk", 0)), int(h.get("chunks", 1))
    except (ValueError, KeyError, TypeError) as e:
        raise ChannelError(f"malformed header: {e!r}") from None
    if h.get("magic") != MAGIC:
        raise ChannelError(f"unknown message format {h.get('magic')!r}, expected {MAGIC}")
    if h.get("incarnation") != incarnation:
        raise ChannelError(f"addressed to incarnation {h.get('incarnation')!r}, not this receiver's {incarnation!r}: "
                           "replayed from an earlier sampler process, or meant for another sampler", "incarnation")
    if arm not in manifests:
        raise ChannelError(f"unknown arm {arm!r} (this sampler serves {sorted(manifests)})")
    last_version, ongoing = last_versions.get(arm, -1), (partial or {}).get(arm)
    if version <= last_version:
        raise ChannelError(f"stale or replayed version {version}{' of arm ' + arm if arm else ''}: already "
                           f"serving {last_version}", "stale")
    if not 0 <= chunk < chunks <= max(len(manifests[arm]), 1):
        raise ChannelError(f"chunk {chunk} of {chunks}: out of range for {len(manifests[arm])} tensors")
    if chunk == 0 and ongoing is not None and ongoing.version == version:
        raise ChannelError(f"replayed chunk 0 of version {version}{' of arm ' + arm if arm else ''}: its chunks "
                           "are arriving", "stale")
    if chunk and (ongoing is None or (ongoing.version, ongoing.chunks, len(ongoing.digests)) != (version, chunks, chunk)):
        have = f"version {ongoing.version}, {len(ongoing.digests)} of {ongoing.chunks} chunks" if ongoing else "no chunks"
        raise ChannelError(f"chunk {chunk} of {chunks} of version {version} out of order (have {have})", "stale")
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


def to_wire(frames: list) -> list:
    """A message as sent: its frames' lengths (little-endian u64 each), then each frame cut into
    pieces of at most FRAME_BYTES (views: nothing is copied)."""
    pieces: list = [struct.pack(f"<{len(frames)}Q", *(len(f) for f in frames))]
    for frame in frames:
        view = memoryview(frame).cast("B")
        pieces += [view[i:i + FRAME_BYTES] for i in range(0, len(view), FRAME_BYTES)]
    return pieces


def from_wire(pieces: list, max_bytes: int) -> list:
    """The frames `to_wire` sent, or ChannelError. A frame of one piece is used in place; a
    longer one is joined (one copy, which vLLM's worker would otherwise make: rollout/vllm_ext.py)."""
    lengths = pieces[0] if pieces else b""
    if not 8 <= len(lengths) <= 64 or len(lengths) % 8:
        raise ChannelError(f"not a channel message: its first frame ({len(lengths)} bytes) is not the frames' lengths")
    sizes = struct.unpack(f"<{len(lengths) // 8}Q", lengths)
    if sum(sizes) > max_bytes + MAX_HEADER_BYTES + 1024:
        raise ChannelError(f"message too large: {sum(sizes)} bytes, limit {max_bytes}", "oversize")
    frames, i = [], 1
    for size in sizes:
        parts, got = [], 0
        while got < size and i < len(pieces):
            parts.append(pieces[i])
            got += len(pieces[i])
            i += 1
        if got != size:
            break
        frames.append(parts[0] if len(parts) == 1 else b"".join(parts))
    if len(frames) != len(sizes) or i != len(pieces):
        raise ChannelError(f"frame lengths {list(sizes)} do not match the {len(pieces) - 1} pieces that came")
    return frames


def learner_keys(secret: bytes) -> tuple[bytes, bytes]:
    """The learner's CURVE key pair (Z85 public, Z85 secret), derived from the run's secret:
    the learner and every sampler (which hold the secret, handed out through Ray) compute the
    same pair, so a key never travels, nor is written anywhere. A sampler admits this public
    key only."""
    secret_key = z85.encode(hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest())
    return zmq.curve_public(secret_key), secret_key


def endpoint_string(address: str, incarnation: str, server_key: bytes) -> str:
    """What a receiver publishes (through Ray): 'tcp://HOST:PORT?incarnation=ID&key=HEX',
    its address, its incarnation and its CURVE public key; a restarted sampler's differs."""
    return f"{address}?incarnation={incarnation}&key={z85.decode(server_key).hex()}"


def parse_endpoint(endpoint: str) -> tuple[str, str, bytes]:
    """(address, incarnation, Z85 server key) of an endpoint string, or ValueError naming it."""
    address, _, query = endpoint.partition("?")
    try:
        fields = dict(part.split("=", 1) for part in query.split("&"))
        key = bytes.fromhex(fields["key"])
        if len(key) != 32 or not fields["incarnation"]:
            raise ValueError("a 32-byte key and an incarnation")
        return address, fields["incarnation"], z85.encode(key)
    except (ValueError, KeyError) as e:
        raise ValueError(f"adapter endpoint {endpoint!r} is not 'tcp://HOST:PORT?incarnation=ID&key=HEX': "
                         f"{e!r}") from None


def raise_fd_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (the sampler's: vLLM,
    Ray and the channel's connections share it); returns the new soft limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Throttled:
    """Warnings of one kind, bounded: the first FIRST_LOGGED as they come, then at most one
    line per LOG_EVERY_S saying how many more came and the last of them. A flood of refused
    messages or connections costs a handful of log lines, never one per message."""

    def __init__(self, what: str):
        self.what, self.logged, self.held, self.last = what, 0, 0, ""
        self.since = time.monotonic()
        self._lock = threading.Lock()

    def warn(self, text: str):
        with self._lock:
            if self.logged < FIRST_LOGGED:
                self.logged += 1
                more = f" (more are summarised every {LOG_EVERY_S:g} s)" if self.logged == FIRST_LOGGED else ""
                log.warning("%s: %s%s", self.what, text, more)
                self.since = time.monotonic()
                return
            self.held, self.last = self.held + 1, text
        self.flush()

    def flush(self, force: bool = False):
        with self._lock:
            now = time.monotonic()
            if self.held and (force or now - self.since >= LOG_EVERY_S):
                log.warning("%s: %d more in the last %.0f s, the last: %s", self.what, self.held, now - self.since,
                            self.last)
                self.held, self.since = 0, now


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


_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                     zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_MONITORED = (zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPT_FAILED | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
              | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


class AdapterReceiver:
    """A sampler's end: a CURVE ROUTER socket served by a thread; `load` is called per valid
    version. A second thread answers libzmq's authentication requests (ZAP: the learner's key
    only) and watches the socket's events, counting the connections refused or dropped
    before they authenticated.

    manifests: arm -> the tensors its messages must hold (one entry "" without arms).
    on_load_error: called (in place of a reply) when a valid version fails to load; the
    sampler exits there, so that Ray restarts it and the learner, which misses its ack,
    counts it missing and catches it up. Without one the reply says "load" failed, which
    the learner counts the same way.
    """

    def __init__(self, host: str, secret: bytes, manifests: dict[str, dict], max_bytes: int, load,
                 on_load_error=None, handshake_s: float = HANDSHAKE_S):
        if host.strip("[]") in ("", "*", "0.0.0.0", "::"):
            raise ValueError(f"the adapter channel binds one interface's address, not {host!r} (every interface)")
        self._secret, self._manifests, self._max_bytes, self._load = secret, manifests, max_bytes, load
        self._on_load_error = on_load_error
        self.versions: dict[str, int] = dict.fromkeys(manifests, -1)  # arm -> last version accepted and loaded
        self.partial: dict[str, Partial] = {}  # arm -> the full-weights version whose chunks are arriving
        self.incarnation = secrets.token_hex(8)  # this process's: messages must name it
        # Refusals: kind (MESSAGE_KINDS, "load", "connections") -> count, and the last few reasons.
        self.counts: collections.Counter = collections.Counter()
        self.recent: collections.deque = collections.deque(maxlen=RECENT_REASONS)
        self._counts_lock = threading.Lock()
        self._message_log = Throttled("refused adapter message")
        self._connection_log = Throttled("refused a connection to the adapter channel")
        self._client_key = z85.decode(learner_keys(secret)[0])
        self._peers: set[int] = set()  # descriptors of connections that delivered a message (authenticated)
        # Descriptors of the connections accepted that have delivered no message yet, oldest first
        # (at most MAX_UNAUTHENTICATED), and those dropped for it whose end is not seen yet.
        self._unproven: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._evicted: set[int] = set()
        self._evicting = 0  # dropped ones whose end is not reported yet
        self._fds_lock = threading.Lock()
        self._after_failure = False  # the next disconnection is that of a handshake failure, already counted
        self._denied_from = ""
        self._ctx = zmq.Context()
        # The ZAP handler is bound before the socket: with none, libzmq lets every CURVE client in.
        self._zap = self._ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(_ZAP_ENDPOINT)
        public, secret_key = zmq.curve_keypair()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.CURVE_SERVER, 1)
        self._sock.setsockopt(zmq.CURVE_SECRETKEY, secret_key)
        # A frame is all libzmq buffers before the handshake; the learner sends no bigger one.
        self._sock.setsockopt(zmq.MAXMSGSIZE, FRAME_BYTES + FRAME_OVERHEAD)
        self._sock.setsockopt(zmq.HANDSHAKE_IVL, int(1e3 * handshake_s))
        self._sock.setsockopt(zmq.LINGER, 0)
        self._monitor = self._sock.get_monitor_socket(_MONITORED)
        port = self._port = self._sock.bind_to_random_port(f"tcp://{host}")
        self._handshake_s = handshake_s
        self.endpoint = endpoint_string(f"tcp://{host}:{port}", self.incarnation, public)
        self._stop = threading.Event()
        self._guard = threading.Thread(target=self._watch, name="adapter-receiver-auth", daemon=True)
        self._guard.start()
        self._thread = threading.Thread(target=self._serve, name="adapter-receiver", daemon=True)
        self._thread.start()

    # -- who may connect ---------------------------------------------------------------
    def _watch(self):
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set():
            for sock, _ in poller.poll(100):
                if sock is self._zap:
                    self._authenticate(self._zap.recv_multipart())
                else:
                    event = recv_monitor_message(self._monitor)
                    self._on_event(event["event"], event["value"])

    def _authenticate(self, request: list[bytes]):
        """Answer one ZAP request (RFC 27): the learner's CURVE key passes, any other fails."""
        _, request_id, _domain, peer, _identity, mechanism, *credentials = request + [b""] * (6 - len(request))
        ok = mechanism == b"CURVE" and bool(credentials) and hmac.compare_digest(credentials[0], self._client_key)
        if not ok:
            self._denied_from = peer.decode(errors="replace")
        self._zap.send_multipart([b"1.0", request_id, b"200" if ok else b"400",
                                  b"OK" if ok else b"not the learner's key", b"learner" if ok else b"", b""])

    def _on_event(self, event: int, value: int):
        """Count each connection that closed without authenticating (once: a failed handshake
        is reported, then the connection's end); past MAX_UNAUTHENTICATED connections that
        have delivered no message, drop the oldest (counted when its end is reported, under
        that reason)."""
        evicted = f"more than {MAX_UNAUTHENTICATED} connections without a message at once: the oldest dropped"
        if event == zmq.EVENT_ACCEPTED:
            with self._fds_lock:
                if value in self._peers:  # its message came before this event: proven already
                    return
                self._unproven[value] = None
                oldest = [self._unproven.popitem(last=False)[0]
                          for _ in range(len(self._unproven) - MAX_UNAUTHENTICATED)]
                self._evicted.update(oldest)
            for fd in oldest:
                self._evicting += 1
                self._drop(fd)
            return
        if event in _HANDSHAKE_FAILED:
            self._after_failure = True
            if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                why = f"its CURVE key is not the learner's (from {self._denied_from or 'an unknown address'})"
            elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
                why = f"handshake protocol error 0x{value:x} (a client without the channel's CURVE mechanism?)"
            elif value == errno.EAGAIN:
                why = f"no handshake within {self._handshake_s:g} s"
            elif self._evicting and value in (errno.EPIPE, errno.ECONNRESET):  # what a dropped one reports
                self._evicting -= 1
                why = evicted
            else:
                why = f"handshake failed: {os.strerror(value)}"
            self._refuse("connections", why, self._connection_log)
        elif event == zmq.EVENT_DISCONNECTED:
            with self._fds_lock:
                self._unproven.pop(value, None)
                dropped = value in self._evicted
                self._evicted.discard(value)
            if self._after_failure:
                self._after_failure = False
            elif value in self._peers:
                self._peers.discard(value)
            elif dropped:  # dropped before its handshake began
                self._evicting = max(0, self._evicting - 1)
                self._refuse("connections", evicted, self._connection_log)
            else:  # no ZMTP 3 greeting at all (e.g. HTTP), or gone before its handshake
                self._refuse("connections", "closed before any handshake (not a ZMTP 3 CURVE client)",
                             self._connection_log)
        elif event == zmq.EVENT_ACCEPT_FAILED:
            self._connection_log.warn(f"could not accept a connection: {os.strerror(value)}")

    def _drop(self, fd: int):
        """End the connection on libzmq's descriptor `fd` (shutdown through a duplicate: libzmq
        sees its end and closes its own), if it is still one of this channel's (descriptors
        are reused: the check is its local port)."""
        try:
            conn = socket.socket(fileno=os.dup(fd))
        except OSError:
            return
        try:
            if conn.getsockname()[1] == self._port:
                conn.shutdown(socket.SHUT_RDWR)
        except (OSError, IndexError, TypeError):
            pass
        finally:
            conn.close()

    # -- messages ----------------------------------------------------------------------
    def _serve(self):
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            self._message_log.flush()
            self._connection_log.flush()
            if not poller.poll(100):
                continue
            # copy=False: a one-piece payload is used in place.
            message = self._sock.recv_multipart(copy=False)
            peer = message.pop(0)
            fd = message[0].get(zmq.SRCFD)
            with self._fds_lock:
                self._peers.add(fd)  # an authenticated connection: its end is no refusal
                self._unproven.pop(fd, None)
            reply = self._handle(message)
            if reply is not None:
                self._sock.send_multipart([peer.bytes, json.dumps(reply).encode()])

    def _handle(self, message: list) -> dict | None:
        """Validate and load one message (its pieces as received); the reply (None:
        on_load_error took over)."""
        start, arm = time.perf_counter(), ""
        try:
            frames = from_wire([piece.buffer for piece in message], self._max_bytes)
            message.clear()  # a joined frame is a copy: its pieces go before the load (full weights: GBs)
            arm = _arm_of(frames)
            adapter = decode(frames, self._secret, self._manifests, self._max_bytes, self.versions, self.partial,
                             incarnation=self.incarnation)
        except ChannelError as e:  # a refused message must never stop the receiver
            self._refuse(e.kind, str(e), self._message_log)
            return self._reply(False, arm, reason=str(e), kind=e.kind)
        try:
            self._load(adapter)
        except Exception as e:
            self.partial.pop(adapter.arm, None)  # this version cannot complete now
            reason = f"load failed: {e!r}"
            self._refuse("load", reason)
            log.error("adapter version %d%s passed validation but failed to load: %r", adapter.version,
                      f" of arm {adapter.arm}" if adapter.arm else "", e)
            if self._on_load_error is not None:
                self._on_load_error(e)
                return None
            return self._reply(False, arm, reason=reason, kind="load")
        self._advance(adapter)
        return self._reply(True, adapter.arm, version=adapter.version, chunk=adapter.chunk,
                           load_ms=1e3 * (time.perf_counter() - start))

    def _reply(self, ok: bool, arm: str, **fields) -> dict:
        with self._counts_lock:
            counts = dict(self.counts)
        return {"ok": ok, "arm": arm, "version": self.versions.get(arm, -1), **fields, "refused": counts}

    def _refuse(self, kind: str, reason: str, throttled: Throttled | None = None):
        with self._counts_lock:
            self.counts[kind] += 1
            self.recent.append(reason)
        if throttled is not None:
            throttled.warn(f"{reason} (still serving {self._serving()})")

    def _serving(self) -> str:
        versions = dict(self.versions)
        return (f"version {versions['']}" if list(versions) == [""] else
                "versions " + ", ".join(f"{arm}:{v}" for arm, v in versions.items()))

    def refusals(self) -> dict:
        """What was refused so far: messages (MESSAGE_KINDS) and connections, counts by kind
        (also "load": valid versions that failed to load) and the last few reasons."""
        with self._counts_lock:
            counts, recent = dict(self.counts), list(self.recent)
        return {"messages": sum(counts.get(k, 0) for k in MESSAGE_KINDS), "connections": counts.get("connections", 0),
                "by_kind": counts, "recent": recent}

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
        self._guard.join(timeout=2)
        self._message_log.flush(force=True)
        self._connection_log.flush(force=True)
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(0)
        self._zap.close(0)
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
    """The learner's end: one CURVE DEALER per sampler; `publish` returns once all acknowledged.

    secret: the run's; it signs each message's per-receiver header and gives the learner's
    CURVE key (`learner_keys`). Endpoints are the strings receivers publish (`endpoint_string`).
    """

    def __init__(self, secret: bytes):
        self._secret = secret
        self._public, self._secret_key = learner_keys(secret)
        self._ctx = zmq.Context()
        self._socks: dict[str, zmq.Socket] = {}
        self._incarnations: dict[str, str] = {}
        self._refused: dict[str, dict] = {}  # endpoint -> its receiver's counts, as its last reply said
        self._retired: collections.Counter = collections.Counter()  # those of samplers disconnected since

    def connect(self, endpoints: list[str]):
        for ep in endpoints:
            if ep not in self._socks:
                where, incarnation, server_key = parse_endpoint(ep)
                sock = self._ctx.socket(zmq.DEALER)
                sock.setsockopt(zmq.LINGER, 0)
                sock.setsockopt(zmq.CURVE_SERVERKEY, server_key)  # the sampler proves it holds this key's secret
                sock.setsockopt(zmq.CURVE_PUBLICKEY, self._public)
                sock.setsockopt(zmq.CURVE_SECRETKEY, self._secret_key)
                sock.setsockopt(zmq.MAXMSGSIZE, FRAME_BYTES + FRAME_OVERHEAD)  # replies are small
                sock.connect(where)
                self._socks[ep], self._incarnations[ep] = sock, incarnation

    def disconnect(self, endpoint: str):
        """Stop publishing to a sampler that left; publish would otherwise wait for its ack."""
        sock = self._socks.pop(endpoint, None)
        self._incarnations.pop(endpoint, None)
        self._retired.update(self._refused.pop(endpoint, {}))
        if sock is not None:
            sock.close(0)

    def _note(self, endpoint: str, reply: dict):
        """Keep the refusal counts a reply carries (cumulative in its receiver)."""
        try:
            self._refused[endpoint] = {str(k): int(v) for k, v in reply.get("refused", {}).items()}
        except (AttributeError, TypeError, ValueError):
            pass

    def refusals(self) -> dict:
        """sync/refused_messages and sync/refused_connections: what every sampler connected so
        far (a restarted one's earlier processes included) refused, as their last replies said."""
        totals = collections.Counter(self._retired)
        for counts in self._refused.values():
            totals.update(counts)
        return {"sync/refused_messages": sum(totals[k] for k in MESSAGE_KINDS),
                "sync/refused_connections": totals["connections"]}

    def publish(self, messages: list[list[bytes]], timeout_s: float, endpoints: list[str] | None = None) -> dict:
        """Send messages (one per arm) to every sampler (or to `endpoints`), each addressed to
        the sampler's incarnation; raise ChannelError if one refuses a message, Unacknowledged
        naming those that did not load every one in time (or failed to load one). Each
        message's payload is encoded once; each send references the same buffer (no copy)."""
        start = time.perf_counter()
        wanted = set()
        for frames in messages:
            header = json.loads(bytes(frames[0]))
            wanted.add((header["arm"], header["version"], header.get("chunk", 0)))
        targets = {ep: self._socks[ep] for ep in (endpoints if endpoints is not None else self._socks)}
        for ep, sock in targets.items():
            for frames in messages:
                sock.send_multipart(to_wire(address(frames, self._incarnations[ep], self._secret)), copy=False)
        poller = zmq.Poller()
        for sock in targets.values():
            poller.register(sock, zmq.POLLIN)
        pending = {ep: set(wanted) for ep in targets}
        failed: dict[str, str] = {}  # endpoint -> why a valid version failed to load there
        acks = []
        deadline = start + timeout_s
        while any(pending.values()):
            left_ms = 1e3 * (deadline - time.perf_counter())
            waiting = sorted(ep for ep, left in pending.items() if left)
            if left_ms <= 0:
                raise Unacknowledged(f"{describe(wanted)}: no acknowledgement within {timeout_s} s from {waiting}"
                                     + (f"; failed to load on {sorted(failed)}" if failed else ""),
                                     waiting + sorted(failed))
            for sock, _ in poller.poll(left_ms):
                reply = json.loads(sock.recv())
                ep = next(e for e, s in targets.items() if s is sock)
                self._note(ep, reply)
                key = (reply.get("arm"), reply.get("version"), reply.get("chunk", 0))
                if reply.get("kind") == "load":
                    failed[ep] = str(reply.get("reason"))
                    pending[ep] = set()
                    continue
                if not reply.get("ok") or key not in pending[ep]:
                    raise ChannelError(f"{describe(wanted)} refused by {ep}: {reply.get('reason', reply)}",
                                       reply.get("kind", "malformed"))
                acks.append(reply)
                pending[ep].discard(key)
        if failed:
            raise Unacknowledged(f"{describe(wanted)} failed to load on {sorted(failed)}: {failed}", sorted(failed))
        return {
            "sync/latency_ms": 1e3 * (time.perf_counter() - start),
            "sync/load_ms": max(a["load_ms"] for a in acks) if acks else 0.0,
            "sync/bytes": sum(len(f) for frames in messages for f in frames),
            **self.refusals(),
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
                metrics = self.publish([frames], timeout_s, targets)
                for key in totals:
                    totals[key] += metrics[key]
            except Unacknowledged as e:
                missing += e.missing
                targets = [ep for ep in targets if ep not in e.missing]
        if missing:
            raise Unacknowledged(f"{len(missing)} sampler(s) missed chunks of the weights: {missing}", missing)
        return {**totals, **self.refusals()}

    def request(self, endpoint: str, frames: list, timeout_s: float) -> dict:
        """Send one message exactly as given (not addressed: tests and tools that probe a
        sampler's checks) to a connected endpoint; its reply."""
        sock = self._socks[endpoint]
        sock.send_multipart(to_wire(frames), copy=False)
        if not sock.poll(1e3 * timeout_s):
            raise Unacknowledged(f"no reply within {timeout_s} s from {endpoint}", [endpoint])
        reply = json.loads(sock.recv())
        self._note(endpoint, reply)
        return reply

    def close(self):
        for sock in self._socks.values():
            sock.close(0)
        self._ctx.term()
