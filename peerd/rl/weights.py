"""Versioned policy weights over the swarm: the `weights` service.

The trainer `publish`es a version: its manifest and chunks (manifest.py) are stored
here and a signed `VersionAnnounce` goes out on gossip (protocols/weights.py). A
sampler `pull`s a version: the manifest from the trainer or the hints, else from a
few holders (checked against the trainer's signed hash, so the holder need not be
trusted; one that failed us is not asked again for that run), then the chunks it lacks,
in parallel batches from every holder it knows (chunks.py spreads them, the trainer
last), each checked against its SHA-256; a holder that sends a bad chunk is counted
as an offence and its chunks are fetched from another. What a peer fetched it serves
at once (`Have` on gossip, then `/peerd/weights/1.0.0`), so the trainer's upload does
not grow with the number of samplers. With `http_port` set, chunks also travel over
plain HTTP/1.1 (chunk_http.py serves ours, chunk_client.py fetches theirs): a holder
whose ledger entry advertises a port is asked there first, over libp2p when that fails.

Whom to follow, and the gossip of announcements and holders: announce.py.

Memory: manifests and chunks live in memory, the newest `keep_versions` versions of
each run (a pull in progress keeps its own; one once a run of ours ended: `retire`);
a chunk goes when no kept version names it. A run we stop following (`unfollow`: a
sampler moved on; or nobody announced or asked for it for `follow_idle_s`) takes its
versions with it. Holders re-announce their newest version every `announce_s` (soft
state: a holder not heard for three periods is forgotten), and the trainer its newest
announcement, so peers that join late learn both.

One module, past the usual size: publishing, pulling and serving share the store's
state (chunks held, pulls in progress and the holders they wait for) and its locks;
the parts that stand alone are already out (manifest.py, chunks.py, announce.py, the
metrics in metrics.py).
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter, deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from trio_typing import TaskStatus

from peerd.agents.sealing import seal
from peerd.node import Node
from peerd.rl.announce import (
    FOLLOW_IDLE_S,
    MAX_HOLDERS_PER_VERSION,
    AnnounceHook,
    Announcements,
)
from peerd.rl.chunk_client import ChunkFetcher
from peerd.rl.chunk_http import ChunkServer, serve_beside
from peerd.rl.chunks import ChunkPlan
from peerd.rl.metrics import WeightsCollector
from peerd.rpc import call, stream_handler
from peerd.service import EntryFields, Service
from peerd.streams import STREAM_FAILURES_OR_TIMEOUT
from protocols.codec import decode, encode
from protocols.errors import PeerError, RemoteError

if TYPE_CHECKING:
    import torch

    from peerd.ledger.gossip import LedgerGossip

from protocols.weights import (
    CHUNKS,
    DEFAULT_CHUNK_BYTES,
    LATEST,
    MANIFEST,
    MAX_REPLY_DATA_BYTES,
    TOPIC,
    BadAnnounce,
    ChunkReply,
    ChunkRequest,
    Have,
    Manifest,
    ManifestReply,
    ManifestRequest,
    SignedAnnounce,
    VersionAnnounce,
    digest,
)

log = logging.getLogger(__name__)

FEATURE = "weights"  # in our ledger entry: we serve /peerd/weights
PULL_TIMEOUT_S = 600.0
# a manifest is asked of the run's trainer and the hints first, then of at most this many
# self-declared holders, each within HOLDER_MANIFEST_TIMEOUT_S: holders that announce
# Have and stall cannot spend the pull's time before the trainer is asked
MANIFEST_HOLDERS = 3
HOLDER_MANIFEST_TIMEOUT_S = 3.0
MAX_MANIFEST_FAILED = 256  # per run: holders that failed us a manifest, not asked again
# a holder we could not get an answer from: not an offence, ask another
_NO_ANSWER: tuple[type[Exception], ...] = (RemoteError, ConnectionError,
                                           *STREAM_FAILURES_OR_TIMEOUT)


class WeightsUnavailable(Exception):
    """A pull could not complete: no holder answered with the manifest, or chunks
    remain that no holder could give intact."""


@dataclass
class Held:
    """A version we hold (all chunks when `complete`) and serve."""

    announce: VersionAnnounce
    signed: SignedAnnounce
    manifest: Manifest
    manifest_bytes: bytes
    complete: bool


@dataclass(frozen=True)
class PullStat:
    run_id: str
    version: int
    seconds: float
    bytes: int  # chunk bytes fetched (what we held already is not counted)
    chunks: int
    sources: dict[str, int] = field(default_factory=dict)  # peer -> chunks it gave


class WeightStore(Service):
    name = "weights"

    def __init__(self, node: Node, *, keep_versions: int = 3, parallel: int = 8,
                 per_holder: int = 2, chunk_bytes: int = DEFAULT_CHUNK_BYTES,
                 announce_s: float = 10.0, ledger: LedgerGossip | None = None,
                 http_port: int | None = None, follow_idle_s: float = FOLLOW_IDLE_S
                 ) -> None:
        """`http_port`: serve our chunks over HTTP on the libp2p listen host at this port
        (0: any free one; None: not at all). `ledger`: where holders' ports are read (and
        ours advertised); without it, chunks travel over libp2p only. `follow_idle_s`: a
        run we do not author, unheard of this long, is unfollowed."""
        self.node = node
        self.ledger = ledger
        self.http_port = http_port
        self.http_server = ChunkServer(self._serve_http_chunk) if http_port is not None \
            else None
        self.keep_versions = keep_versions
        self.parallel = parallel
        self.per_holder = per_holder
        self.chunk_bytes = chunk_bytes
        self.announce_s = announce_s
        self.follow_idle_s = follow_idle_s
        self.chunks: dict[bytes, bytes] = {}  # each one's SHA-256 checked as it came in
        self.held: dict[bytes, Held] = {}  # by manifest hash
        self.runs = Announcements(node, announce_s, self._heard_have)
        self._pulls: dict[bytes, ChunkPlan] = {}  # in progress, by manifest hash
        self._pinned: Counter[bytes] = Counter()  # versions being pulled: kept
        self._wake: dict[bytes, trio.Event] = {}
        self._locks: dict[tuple[str, int], trio.Lock] = {}
        # run -> holders that failed us a manifest of it (no answer, a bad one): skipped
        self._manifest_failed: dict[str, dict[str, None]] = {}
        self.pull_stats: deque[PullStat] = deque(maxlen=32)
        # "chunks", "bytes" (over either channel), "http_chunks", "http_bytes", "manifests"
        self.served: Counter[str] = Counter()
        # "pulls", "bytes", "chunks", "http_chunks", "http_bytes", "http_fallbacks"
        self.pulled: Counter[str] = Counter()
        self.pull_seconds = 0.0  # all pulls together
        self._nursery: trio.Nursery | None = None
        self.fetcher = ChunkFetcher(node, ledger, self.pulled)

    # ---- following (announce.py) --------------------------------------------------------

    def follow(self, run_id: str, trainer: str | None = None) -> None:
        """Act on announcements of `run_id` by `trainer` (None: the first author heard)."""
        self.runs.follow(run_id, trainer)

    def touch(self, run_id: str) -> None:
        """A followed run was asked for: it is not idle."""
        self.runs.touch(run_id)

    def unfollow(self, run_id: str) -> None:
        """Forget `run_id`: its announcements and the versions of it we hold (one being
        pulled goes when its pull ends)."""
        self.runs.forget(run_id)
        self._manifest_failed.pop(run_id, None)
        self._drop_old(run_id)

    def retire(self, run_id: str) -> None:
        """Our run `run_id` ended: keep its newest version only (a sampler that lags
        may still pull it), and let the run go once nobody has asked for it for
        `follow_idle_s`. Publishing a version of it again (`--resume`) takes it back."""
        if run_id not in self.runs.following:
            return
        self.runs.retired.add(run_id)
        self.runs.touch(run_id)
        self._drop_old(run_id)

    def holds(self, run_id: str) -> bool:
        """A version of `run_id` is held: we published it or its manifest verified."""
        return any(h.announce.run_id == run_id for h in self.held.values())

    def on_announce(self, hook: AnnounceHook) -> None:
        """Run `hook(announce)` for each new version of a followed run (in this service's
        nursery; its errors are logged): a sampler that lags pulls."""
        self.runs.hooks.append(hook)

    def latest(self, run_id: str) -> VersionAnnounce | None:
        return self.runs.latest(run_id)

    def holders(self, manifest_hash: bytes) -> list[str]:
        return self.runs.holders(manifest_hash)

    def _heard_have(self, have: Have) -> None:
        """A holder joins a pull in progress."""
        plan = self._pulls.get(have.manifest_hash)
        if plan is not None:
            plan.add_holder(have.holder)
            wake = self._wake.get(have.manifest_hash)
            if wake is not None:
                wake.set()

    # ---- the trainer's side --------------------------------------------------------------

    async def publish(self, run_id: str, model_id: str, version: int, kind: str,
                      tensors: Mapping[str, torch.Tensor], lora_scale: float | None = None
                      ) -> Manifest:
        """Store `tensors` as `version` of `run_id`, which we author, and announce it."""
        from peerd.rl.manifest import build_manifest  # torch: only when there is work

        manifest, chunks = await trio.to_thread.run_sync(
            lambda: build_manifest(run_id, model_id, version, kind, tensors,
                                   chunk_bytes=self.chunk_bytes, lora_scale=lora_scale))
        manifest_bytes = encode(manifest)
        announce = VersionAnnounce(run_id=run_id, model_id=model_id, version=version,
                                   kind=kind, manifest_hash=digest(manifest_bytes),
                                   author=self.node.peer_id, timestamp=time.time())
        body, sig = seal(announce, self.node.key_pair.private_key)
        signed = SignedAnnounce(body=body, sig=sig)
        if run_id not in self.runs.following:
            self.runs.follow(run_id, self.node.peer_id)
        self.runs.retired.discard(run_id)
        self.chunks.update(chunks)
        self._hold(Held(announce, signed, manifest, manifest_bytes, complete=True))
        self.runs.announced[run_id] = (announce, signed)
        self.runs.know(announce)
        await self.runs.publish(signed)
        return manifest

    # ---- the sampler's side --------------------------------------------------------------

    async def pull(self, run_id: str, version: int, *, names: Iterable[str] | None = None,
                   hints: Iterable[str] = (), timeout_s: float = PULL_TIMEOUT_S
                   ) -> dict[str, torch.Tensor]:
        """The tensors `names` (default: all) of `version` of the followed `run_id`,
        fetched from its holders (`hints`: more peers to ask) unless held already.
        Raises WeightsUnavailable, or trio.TooSlowError past `timeout_s`."""
        self.runs.touch(run_id)
        lock = self._locks.setdefault((run_id, version), trio.Lock())
        try:
            with trio.fail_after(timeout_s):
                async with lock:
                    return await self._pull(run_id, version, names, list(hints))
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop((run_id, version), None)

    async def _pull(self, run_id: str, version: int, names: Iterable[str] | None,
                    hints: list[str]) -> dict[str, torch.Tensor]:
        started = time.monotonic()
        held = self._held_version(run_id, version) or await self._fetch_manifest(
            run_id, version, hints)
        key = held.announce.manifest_hash
        self._pinned[key] += 1  # not dropped while we pull it, however old
        try:
            return await self._pull_chunks(held, names, hints, started)
        finally:
            self._pinned[key] -= 1
            if not self._pinned[key]:
                del self._pinned[key]
            self._drop_old(run_id)

    async def _pull_chunks(self, held: Held, names: Iterable[str] | None, hints: list[str],
                           started: float) -> dict[str, torch.Tensor]:
        key = held.announce.manifest_hash
        run_id, version = held.announce.run_id, held.announce.version
        wanted = None if names is None else list(names)
        needed = {h for t in held.manifest.tensors if wanted is None or t.name in wanted
                  for h in t.chunks}
        sizes = {h: s for h, s in held.manifest.chunk_sizes().items()
                 if h in needed and h not in self.chunks}
        sources: Counter[str] = Counter()
        if sizes:
            await self.runs.publish(self._have(held))  # serve what we fetch as it comes in
            # (a self-declared holder that failed us this run's manifest is not asked
            # for its chunks either: it would cost a stall a batch)
            failed = self._manifest_failed.get(run_id, {})
            peers = [*(p for p in self.holders(key) if p not in failed), *hints,
                     held.announce.author]
            plan = ChunkPlan(sizes, [p for p in peers if p != self.node.peer_id],
                             author=held.announce.author, max_in_flight=self.parallel,
                             per_holder=self.per_holder,
                             batch_bytes=min(4 * held.manifest.chunk_bytes,
                                             MAX_REPLY_DATA_BYTES),
                             max_holders=MAX_HOLDERS_PER_VERSION + len(hints))
            self._pulls[key] = plan
            try:
                await self._fetch_chunks(key, plan, sources)
            finally:
                del self._pulls[key]
                self._wake.pop(key, None)
        from peerd.rl.manifest import assemble  # torch: only when there is work

        tensors = await trio.to_thread.run_sync(  # every held chunk was hashed on arrival
            lambda: assemble(held.manifest, self.chunks, wanted, hashed=True))
        if not held.complete and all(h in self.chunks for h in held.manifest.chunk_sizes()):
            held.complete = True
        if sizes:
            await self.runs.publish(self._have(held))
            seconds = time.monotonic() - started
            stat = PullStat(run_id, version, seconds, sum(sizes.values()), len(sizes),
                            dict(sources))
            self.pull_stats.append(stat)
            self.pulled.update(pulls=1, bytes=stat.bytes, chunks=stat.chunks)
            self.pull_seconds += seconds
            self.node.events.publish("weights.pulled", run_id=run_id, version=version,
                                     seconds=round(seconds, 4), bytes=stat.bytes,
                                     sources=dict(sources))
        return tensors

    def manifest(self, run_id: str, version: int) -> Manifest | None:
        """The manifest of a version we hold (after publish or pull): its kind, scale."""
        held = self._held_version(run_id, version)
        return None if held is None else held.manifest

    def _held_version(self, run_id: str, version: int) -> Held | None:
        for held in self.held.values():
            if held.announce.run_id == run_id and held.announce.version == version:
                return held
        return None

    def _manifest_failed_by(self, run_id: str, peer: str, first: Mapping[str, None]) -> None:
        """Remember a self-declared holder that failed us a manifest of `run_id` (the
        trainer and the hints are asked again next time: they are not self-declared)."""
        if peer in first or run_id not in self.runs.following:
            return
        failed = self._manifest_failed.setdefault(run_id, {})
        failed[peer] = None
        while len(failed) > MAX_MANIFEST_FAILED:
            del failed[next(iter(failed))]

    async def _fetch_manifest(self, run_id: str, version: int, hints: list[str]) -> Held:
        if run_id not in self.runs.following:
            raise WeightsUnavailable(f"not following run {run_id!r}")
        known = self.runs.announced.get(run_id)
        want = known[0].manifest_hash if known and known[0].version == version else b""
        trainer = self.runs.following[run_id] or (known[0].author if known else None)
        failed = self._manifest_failed.setdefault(run_id, {})
        first = dict.fromkeys([*([trainer] if trainer else []), *hints])
        peers = [p for p in (self.holders(want) if want else [])
                 if p not in first and p not in failed]
        random.shuffle(peers)
        candidates = [*first, *peers[:MANIFEST_HOLDERS]]
        request = ManifestRequest(run_id=run_id, version=version, manifest_hash=want)
        for peer in candidates:
            timeout_s = MANIFEST.timeout_s if peer in first else HOLDER_MANIFEST_TIMEOUT_S
            try:
                reply: ManifestReply = await call(self.node.host, peer, MANIFEST, request,
                                                  timeout_s, dial=self.node.new_stream)
                if reply.announce is None:
                    continue  # not held there
                held = self._check_manifest(reply, run_id, version, want)
            except PeerError as exc:
                self.node.offence(peer, exc.reason, f"weights manifest: {exc}")
                self._manifest_failed_by(run_id, peer, first)
                continue
            except _NO_ANSWER as exc:
                log.debug("manifest of %s v%d from %s failed: %r", run_id, version, peer, exc)
                self._manifest_failed_by(run_id, peer, first)
                continue
            except Exception:  # a dial fails in many ways; log it loudly in case it is ours
                log.warning("manifest of %s v%d from %s failed", run_id, version, peer,
                            exc_info=True)
                self._manifest_failed_by(run_id, peer, first)
                continue
            self.held[held.announce.manifest_hash] = held  # kept: the pull pins it
            self.runs.know(held.announce)  # its trainer signed it: its holders count
            return held
        raise WeightsUnavailable(f"no holder gave version {version} of {run_id} "
                                 f"(asked {len(candidates)})")

    def _check_manifest(self, reply: ManifestReply, run_id: str, version: int,
                        want: bytes) -> Held:
        """The held version a reply describes, once the trainer's signature, the hash and
        the sizes check out. Raises PeerError."""
        assert reply.announce is not None
        announce = self.runs.verify(reply.announce)
        if (announce.run_id, announce.version) != (run_id, version):
            raise BadAnnounce(f"asked for {run_id} v{version}, got {announce.run_id} "
                              f"v{announce.version}")
        if want and announce.manifest_hash != want:
            raise BadAnnounce("a manifest hash other than the one announced")
        if digest(reply.manifest) != announce.manifest_hash:
            raise BadAnnounce("the manifest's bytes do not hash to the signed hash")
        manifest = decode(reply.manifest, Manifest)
        manifest.check()
        if not announce.describes(manifest):
            raise BadAnnounce("the signed announcement does not describe the manifest")
        return Held(announce, reply.announce, manifest, reply.manifest, complete=False)

    async def _fetch_chunks(self, key: bytes, plan: ChunkPlan, sources: Counter[str]) -> None:
        async with trio.open_nursery() as nursery:
            while not plan.finished:
                job = plan.next()
                if job is not None:
                    nursery.start_soon(self._fetch_batch, key, plan, *job, sources)
                    continue
                if not plan.in_flight:
                    left = plan.stuck()
                    raise WeightsUnavailable(
                        f"{len(left)} chunks no holder gave intact (holders "
                        f"{len(plan.holders)}, failed {len(plan.failed)})")
                self._wake[key] = trio.Event()
                await self._wake[key].wait()

    async def _fetch_batch(self, key: bytes, plan: ChunkPlan, peer: str, batch: list[bytes],
                           sources: Counter[str]) -> None:
        got: list[bytes] = []
        try:
            data = await self.fetcher.fetch(peer, batch, plan.sizes)
            offered = [(h, d) for h, d in zip(batch, data, strict=True) if d]
            bad = await trio.to_thread.run_sync(self._verify_chunks, plan, offered)
            got = [h for h, d in offered if h not in bad]
            for h, d in offered:
                if h not in bad:
                    self.chunks[h] = d
            if bad:
                raise bad[next(iter(bad))]
            plan.returned(peer, got, [h for h, d in zip(batch, data, strict=True) if not d])
            sources[peer] += len(got)
        except PeerError as exc:
            self.node.offence(peer, exc.reason, f"weights chunks: {exc}")
            if got:
                sources[peer] += len(got)
            plan.fail(peer, batch, got)
        except _NO_ANSWER as exc:
            log.debug("chunks from %s failed: %r", peer, exc)
            plan.fail(peer, batch, got)
        except Exception:  # a dial fails in many ways; log it loudly in case it is ours
            log.warning("chunks from %s failed", peer, exc_info=True)
            plan.fail(peer, batch, got)
        except BaseException:
            plan.fail(peer, batch)
            raise
        finally:
            wake = self._wake.get(key)
            if wake is not None:
                wake.set()

    @staticmethod
    def _verify_chunks(plan: ChunkPlan, offered: list[tuple[bytes, bytes]]
                       ) -> dict[bytes, PeerError]:
        """(worker thread) The chunks that are not what their names say, and why."""
        bad: dict[bytes, PeerError] = {}
        for h, data in offered:
            try:
                _check_chunk(h, data, plan.sizes[h])
            except PeerError as exc:
                bad[h] = exc
        return bad

    # ---- what we hold --------------------------------------------------------------------

    def _hold(self, held: Held) -> None:
        self.held[held.announce.manifest_hash] = held
        self._drop_old(held.announce.run_id)

    def _drop_old(self, run_id: str) -> None:
        """Keep the newest `keep_versions` versions of `run_id` (one once it is
        retired, none once we follow it no more), and those being pulled; drop the
        chunks no kept version names."""
        keep = 0 if run_id not in self.runs.following else (
            1 if run_id in self.runs.retired else self.keep_versions)
        mine = sorted((h for h in self.held.values() if h.announce.run_id == run_id),
                      key=lambda h: h.announce.version, reverse=True)
        dropped = [h for h in mine[keep:]
                   if h.announce.manifest_hash not in self._pinned]
        if not dropped:
            return
        for held in dropped:
            del self.held[held.announce.manifest_hash]
        named = {c for held in self.held.values() for t in held.manifest.tensors
                 for c in t.chunks}
        for h in [h for h in self.chunks if h not in named]:
            del self.chunks[h]

    def _have(self, held: Held) -> Have:
        a = held.announce
        return Have(run_id=a.run_id, version=a.version, manifest_hash=a.manifest_hash,
                    holder=self.node.peer_id, complete=held.complete, timestamp=time.time())

    # ---- serving -------------------------------------------------------------------------

    async def _serve_manifest(self, peer: str, request: ManifestRequest) -> ManifestReply:
        request.check()
        versions = [h for h in self.held.values() if h.announce.run_id == request.run_id
                    and (request.version in (LATEST, h.announce.version))
                    and request.manifest_hash in (b"", h.announce.manifest_hash)]
        if not versions:
            return ManifestReply()
        held = max(versions, key=lambda h: h.announce.version)
        self.served["manifests"] += 1
        return ManifestReply(announce=held.signed, manifest=held.manifest_bytes)

    async def _serve_chunks(self, peer: str, request: ChunkRequest) -> ChunkReply:
        request.check()
        budget = MAX_REPLY_DATA_BYTES
        data = []
        for h in request.hashes:
            chunk = self.chunks.get(h, b"")
            if chunk and (len(chunk) <= budget or budget == MAX_REPLY_DATA_BYTES):
                budget -= len(chunk)
                data.append(chunk)
                self.served.update(chunks=1, bytes=len(chunk))
            else:
                data.append(b"")
        return ChunkReply(data=tuple(data))

    def _serve_http_chunk(self, h: bytes) -> bytes | None:
        chunk = self.chunks.get(h)
        if chunk is not None:
            self.served.update(chunks=1, bytes=len(chunk), http_chunks=1,
                               http_bytes=len(chunk))
        return chunk

    async def _reannounce(self) -> None:
        """Soft state: our newest authored announcement and newest held version of
        each run, every `announce_s`; runs idle past `follow_idle_s` unfollowed."""
        while True:
            await trio.sleep(self.announce_s)
            for run in self.runs.idle(self.follow_idle_s):
                log.info("unfollowing run %s: not heard of for %.0f s", run,
                         self.follow_idle_s)
                self.unfollow(run)
            for run in list(self.runs.following):
                got = self.runs.announced.get(run)
                if got is not None and got[0].author == self.node.peer_id:
                    await self.runs.publish(got[1])
                mine = [h for h in self.held.values() if h.announce.run_id == run]
                if mine:
                    await self.runs.publish(self._have(max(mine, key=lambda h: h.announce.version)))

    # ---- the service ---------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        node = self.node
        node.pubsub.set_topic_validator(TOPIC, self.runs.validate, False)
        node.set_stream_handler(MANIFEST.id, stream_handler(MANIFEST, self._serve_manifest,
                                                            node.offence))
        node.set_stream_handler(CHUNKS.id, stream_handler(CHUNKS, self._serve_chunks,
                                                          node.offence))
        node.metrics.registry.register(WeightsCollector(self))
        subscription = await node.pubsub.subscribe(TOPIC)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                if self.http_server is not None and self.http_port is not None:
                    await nursery.start(serve_beside, self.http_server, node.config.listen,
                                        self.http_port)
                    if self.ledger is not None:
                        self.ledger.republish()  # our port, for pullers to find
                nursery.start_soon(self.runs.intake, subscription)
                nursery.start_soon(self._reannounce)
                task_status.started()
        finally:
            await self.fetcher.aclose()

    def entry_fields(self) -> EntryFields:
        fields: EntryFields = {"features": (FEATURE,)}
        if self.http_server is not None and self.http_server.port:
            fields["weights_http_port"] = self.http_server.port
        return fields

    def status(self) -> dict[str, Any]:
        last = self.pull_stats[-1] if self.pull_stats else None
        return {"weights": {
            "following": dict(self.runs.following),
            "held": sorted(f"{h.announce.run_id}@{h.announce.version}"
                           + ("" if h.complete else " (part)") for h in self.held.values()),
            "held_bytes": sum(len(c) for c in self.chunks.values()),
            "served": dict(self.served),
            "pulled": {**self.pulled, "seconds": round(self.pull_seconds, 4)},
            "http": None if self.http_server is None else {
                "port": self.http_server.port, "connections": self.http_server.active,
                "answered": {str(k): v for k, v in self.http_server.answered.items()}},
            "last_pull": None if last is None else {
                "run_id": last.run_id, "version": last.version,
                "seconds": round(last.seconds, 4), "bytes": last.bytes,
                "chunks": last.chunks, "sources": last.sources},
        }}


def _check_chunk(h: bytes, data: bytes, size: int) -> None:
    from peerd.rl.manifest import check_chunk  # torch: imported once a pull runs

    check_chunk(h, data, size)
