"""Versioned policy weights on the wire: the manifest, the announcement, and the pull.

A trainer publishes a new policy version of run `run_id` as a `Manifest`: for each
tensor its Hugging Face name, dtype, shape, size and the SHA-256 of each chunk of its
raw little-endian bytes. The SHA-256 of the manifest's canonical bytes is the
version's identity (`manifest_hash`). Chunks are content-addressed: anyone holding a
chunk can serve it, and whoever fetches one checks it against its name.

Gossip topic `peerd/weights/1` carries two small messages:
- `SignedAnnounce`: the canonical bytes of a `VersionAnnounce` (run, model, version,
  kind, manifest hash) and the author's (the trainer's) signature over them. It is
  signed on its own, not only by pubsub, because holders re-serve it with the
  manifest: a puller checks the manifest it got from any peer against the trainer's
  signed hash, so it need not trust that peer.
- `Have`: a peer holds (all or part of) the chunks of a version and serves them; its
  publisher must be the holder. Pullers learn where to fetch from these.

Two request/response protocols serve the data (one request type each):
- `/peerd/weights/manifest/1.0.0`: `ManifestRequest(run, version | manifest hash)` ->
  `ManifestReply(signed announce, manifest bytes)`, or an empty reply when not held;
- `/peerd/weights/1.0.0`: `ChunkRequest(hashes)` -> `ChunkReply(data)`, `data[i]` the
  chunk named `hashes[i]` or b"" when the peer does not hold it (or it did not fit in
  the reply budget: ask again).

and a side channel over plain HTTP/1.1 (SHARDCAST's way, far faster than py-libp2p's
streams): `GET /chunks/<sha256 hex>` -> the chunk's bytes, 404 when not held (`CHUNKS_HTTP`,
served by peerd/rl/chunk_http.py). A holder advertises its port in its ledger entry
(`LedgerEntry.weights_http_port`); the host is the IP of the puller's direct libp2p
connection to it. The hash is the capability: a puller checks every chunk against the
manifest it verified against the trainer's signed hash, so no token is needed.

Whom a receiver follows for a run (whose announcements it acts on) is the receiver's
choice (peerd/rl/weights.py); here only the shape and the values are checked.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

from protocols.codec import Message, encode
from protocols.errors import PeerError, WireError
from protocols.spec import RequestResponse

TOPIC = "peerd/weights/1"

KINDS = ("full", "lora")
# bytes per element of each dtype a manifest may carry (raw little-endian)
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
HASH_BYTES = 32  # SHA-256
RUN_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_MODEL_ID_CHARS = 256
MAX_NAME_CHARS = 256
MAX_DIMS = 8
MAX_TENSORS = 16_384
MIN_CHUNK_BYTES = 1024
MAX_CHUNK_BYTES = 4 * 1024 * 1024
DEFAULT_CHUNK_BYTES = 1024 * 1024
MAX_TOTAL_BYTES = 1 << 40  # a manifest describing more than 1 TiB is a lie
MAX_MANIFEST_BYTES = 8 * 1024 * 1024
# chunk hashes a manifest can name and still travel (each is 34 bytes of msgpack): the
# bound on one tensor's list, however large the model (its chunk count is the sizes')
MAX_CHUNKS = MAX_MANIFEST_BYTES // (HASH_BYTES + 2)
MAX_GOSSIP_BYTES = 2048  # a signed announcement or a Have
MAX_CLOCK_SKEW_S = 60.0  # an announcement dated further in the future is refused
MAX_HASHES_PER_REQUEST = 64
MAX_REPLY_DATA_BYTES = 8 * 1024 * 1024  # chunk bytes in one reply; the rest come back b""
LATEST = -1  # ManifestRequest.version: the newest version the peer holds


class BadManifest(PeerError):
    """A manifest whose values cannot be true (sizes that do not add up, unknown dtype)."""

    reason = "bad_manifest"


class BadChunk(PeerError):
    """A chunk whose bytes do not match its name (SHA-256) or its expected size."""

    reason = "bad_chunk"


class BadAnnounce(PeerError):
    reason = "bad_announce"


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def check_run_id(run_id: str) -> None:
    if not RUN_ID.fullmatch(run_id):
        raise WireError(f"run id {run_id!r:.80} is not 1..64 of [A-Za-z0-9._-]")


def chunk_count(nbytes: int, chunk_bytes: int) -> int:
    return -(-nbytes // chunk_bytes)


# ---- the manifest ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TensorEntry(Message):
    """One tensor of a version: its bytes are the concatenation of its chunks, every
    chunk `chunk_bytes` long but the last."""

    MAX_ITEMS = {"shape": MAX_DIMS, "chunks": MAX_CHUNKS}
    name: str  # Hugging Face name of the whole model, or `M.lora_A` / `M.lora_B`
    dtype: str  # a key of ITEMSIZE
    shape: tuple[int, ...]
    nbytes: int  # prod(shape) * itemsize
    chunks: tuple[bytes, ...]  # SHA-256 of each chunk, in order


@dataclass(frozen=True, slots=True)
class Manifest(Message):
    """A published policy version. Its identity is `manifest_hash(manifest)`."""

    KIND = "weights.manifest"
    MAX_ITEMS = {"tensors": MAX_TENSORS}
    run_id: str
    model_id: str
    version: int  # 0 is the base model as loaded
    kind: str  # "full": tensors replace the model's; "lora": adapters (lora_deltas)
    chunk_bytes: int
    tensors: tuple[TensorEntry, ...]
    lora_scale: float | None = None  # lora_alpha / r, for "lora" only

    def check(self) -> None:
        """Raise BadManifest unless every size adds up and every value is allowed."""
        try:
            check_run_id(self.run_id)
        except WireError as exc:
            raise BadManifest(str(exc)) from None
        if not 0 < len(self.model_id) <= MAX_MODEL_ID_CHARS:
            raise BadManifest(f"model id of {len(self.model_id)} characters")
        if self.version < 0:
            raise BadManifest(f"version {self.version} < 0")
        if self.kind not in KINDS:
            raise BadManifest(f"kind {self.kind!r:.40} not one of {', '.join(KINDS)}")
        if self.kind == "lora":
            if self.lora_scale is None or not math.isfinite(self.lora_scale):
                raise BadManifest("a lora version needs a finite lora_scale")
        elif self.lora_scale is not None:
            raise BadManifest("lora_scale on a full version")
        if not MIN_CHUNK_BYTES <= self.chunk_bytes <= MAX_CHUNK_BYTES:
            raise BadManifest(f"chunk size {self.chunk_bytes} outside "
                              f"{MIN_CHUNK_BYTES}..{MAX_CHUNK_BYTES}")
        if len(self.tensors) > MAX_TENSORS:
            raise BadManifest(f"{len(self.tensors)} tensors (at most {MAX_TENSORS})")
        names: set[str] = set()
        total = 0
        for t in self.tensors:
            if not 0 < len(t.name) <= MAX_NAME_CHARS or t.name in names:
                raise BadManifest(f"tensor name {t.name!r:.80} empty, long or repeated")
            names.add(t.name)
            if t.dtype not in ITEMSIZE:
                raise BadManifest(f"{t.name}: dtype {t.dtype!r:.40} not one of "
                                  f"{', '.join(ITEMSIZE)}")
            if len(t.shape) > MAX_DIMS or any(d < 0 for d in t.shape):
                raise BadManifest(f"{t.name}: shape {t.shape!r:.80} not allowed")
            expected = math.prod(t.shape) * ITEMSIZE[t.dtype]
            if t.nbytes != expected:
                raise BadManifest(f"{t.name}: {t.nbytes} bytes, but shape {list(t.shape)} "
                                  f"of {t.dtype} is {expected}")
            if len(t.chunks) != chunk_count(t.nbytes, self.chunk_bytes):
                raise BadManifest(f"{t.name}: {len(t.chunks)} chunks do not add up to "
                                  f"{t.nbytes} bytes in chunks of {self.chunk_bytes}")
            if any(len(h) != HASH_BYTES for h in t.chunks):
                raise BadManifest(f"{t.name}: a chunk hash is not {HASH_BYTES} bytes")
            total += t.nbytes
            if total > MAX_TOTAL_BYTES:
                raise BadManifest(f"more than {MAX_TOTAL_BYTES} bytes of tensors")

    def chunk_sizes(self) -> dict[bytes, int]:
        """Each chunk's length, by hash (one hash, one content, one length)."""
        sizes: dict[bytes, int] = {}
        for t in self.tensors:
            for i, h in enumerate(t.chunks):
                sizes[h] = min(self.chunk_bytes, t.nbytes - i * self.chunk_bytes)
        return sizes

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def manifest_hash(manifest: Manifest) -> bytes:
    """The version's identity: SHA-256 of the manifest's canonical bytes."""
    return digest(encode(manifest))


# ---- gossip ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VersionAnnounce(Message):
    """A new policy version. Signed by `author` (SignedAnnounce)."""

    KIND = "weights.announce"
    run_id: str
    model_id: str
    version: int
    kind: str
    manifest_hash: bytes
    author: str  # the trainer's peer id
    timestamp: float  # unix seconds

    def check(self, now: float) -> None:
        try:
            check_run_id(self.run_id)
        except WireError as exc:
            raise BadAnnounce(str(exc)) from None
        if not 0 < len(self.model_id) <= MAX_MODEL_ID_CHARS:
            raise BadAnnounce(f"model id of {len(self.model_id)} characters")
        if self.version < 0 or self.kind not in KINDS:
            raise BadAnnounce(f"version {self.version} / kind {self.kind!r:.40} not allowed")
        if len(self.manifest_hash) != HASH_BYTES:
            raise BadAnnounce(f"manifest hash of {len(self.manifest_hash)} bytes")
        if not math.isfinite(self.timestamp) or self.timestamp > now + MAX_CLOCK_SKEW_S:
            raise BadAnnounce(f"announcement dated {self.timestamp - now:.0f} s ahead")

    def describes(self, manifest: Manifest) -> bool:
        return (manifest.run_id, manifest.model_id, manifest.version, manifest.kind) == (
            self.run_id, self.model_id, self.version, self.kind)


@dataclass(frozen=True, slots=True)
class SignedAnnounce(Message):
    KIND = "weights.announce.signed"
    body: bytes  # canonical msgpack of a VersionAnnounce
    sig: bytes  # the author's ed25519 signature over body


@dataclass(frozen=True, slots=True)
class Have(Message):
    """`holder` serves chunks of this version (all of them when `complete`). Gossip;
    the pubsub publisher must be the holder."""

    KIND = "weights.have"
    run_id: str
    version: int
    manifest_hash: bytes
    holder: str
    complete: bool
    timestamp: float

    def check(self, now: float) -> None:
        try:
            check_run_id(self.run_id)
        except WireError as exc:
            raise BadAnnounce(str(exc)) from None
        if self.version < 0 or len(self.manifest_hash) != HASH_BYTES:
            raise BadAnnounce("a Have with a bad version or manifest hash")
        if not math.isfinite(self.timestamp) or self.timestamp > now + MAX_CLOCK_SKEW_S:
            raise BadAnnounce(f"Have dated {self.timestamp - now:.0f} s ahead")


# ---- the pull ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ManifestRequest(Message):
    KIND = "weights.manifest.req"
    run_id: str
    version: int  # LATEST (-1): the newest the peer holds
    manifest_hash: bytes = b""  # when set, the version must have this identity

    def check(self) -> None:
        check_run_id(self.run_id)
        if self.version < LATEST:
            raise WireError(f"version {self.version} < {LATEST}")
        if self.manifest_hash and len(self.manifest_hash) != HASH_BYTES:
            raise WireError(f"manifest hash of {len(self.manifest_hash)} bytes")


@dataclass(frozen=True, slots=True)
class ManifestReply(Message):
    """The author's signed announcement and the manifest's canonical bytes; both empty
    when the peer does not hold the version (not an error: holders come and go)."""

    KIND = "weights.manifest.reply"
    announce: SignedAnnounce | None = None
    manifest: bytes = b""


@dataclass(frozen=True, slots=True)
class ChunkRequest(Message):
    KIND = "weights.chunks.req"
    MAX_ITEMS = {"hashes": MAX_HASHES_PER_REQUEST}
    hashes: tuple[bytes, ...]

    def check(self) -> None:
        if not 0 < len(self.hashes) <= MAX_HASHES_PER_REQUEST:
            raise WireError(f"{len(self.hashes)} hashes asked (1..{MAX_HASHES_PER_REQUEST})")
        if any(len(h) != HASH_BYTES for h in self.hashes):
            raise WireError(f"a chunk hash is not {HASH_BYTES} bytes")


@dataclass(frozen=True, slots=True)
class ChunkReply(Message):
    KIND = "weights.chunks.reply"
    MAX_ITEMS = {"data": MAX_HASHES_PER_REQUEST}  # one an asked hash
    data: tuple[bytes, ...]  # data[i]: the chunk named hashes[i], or b"" when not held


MANIFEST = RequestResponse(
    id="/peerd/weights/manifest/1.0.0",
    request=ManifestRequest,
    response=ManifestReply,
    max_request_bytes=1024,
    max_response_bytes=MAX_MANIFEST_BYTES + MAX_GOSSIP_BYTES + 1024,
    timeout_s=15.0,
    max_concurrent=16,
    max_concurrent_per_peer=2,
)

CHUNKS = RequestResponse(
    id="/peerd/weights/1.0.0",
    request=ChunkRequest,
    response=ChunkReply,
    max_request_bytes=MAX_HASHES_PER_REQUEST * (HASH_BYTES + 2) + 256,
    # a chunk larger than the data budget still goes out alone
    max_response_bytes=max(MAX_REPLY_DATA_BYTES, MAX_CHUNK_BYTES)
    + MAX_HASHES_PER_REQUEST * 8 + 1024,
    timeout_s=30.0,
    max_concurrent=32,
    max_concurrent_per_peer=4,
)


@dataclass(frozen=True, slots=True)
class HttpChunks:
    """The HTTP/1.1 chunk side channel, declared as data: its one path and its limits."""

    path: str  # GET <path><64 lowercase hex digits of the chunk's SHA-256>
    max_concurrent: int  # connections served at once (one request at a time each);
    # more are answered 503
    max_header_bytes: int  # a request head longer than this is answered 431
    request_timeout_s: float  # to receive a request's head, idle keep-alive included
    send_timeout_s: float  # to send one response
    connect_timeout_s: float  # a puller's dial: past it, the holder is asked over libp2p
    # A puller stops trying HTTP with a holder for this long after it failed there
    down_s: float


CHUNKS_HTTP = HttpChunks(
    path="/chunks/",
    max_concurrent=32,
    max_header_bytes=8 * 1024,
    request_timeout_s=15.0,
    send_timeout_s=CHUNKS.timeout_s,
    connect_timeout_s=3.0,
    down_s=60.0,
)
