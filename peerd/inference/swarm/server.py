"""The shard server: runs this peer's decoder layers for pipeline sessions.

A session arrives as a stream on `/peerd/shard/3.0.0` that opens with OPEN and then
carries FORWARDs until CLOSE or EOF. For each session this peer opens the next hop's
stream itself (the route is in OPEN), or, as the last hop, a return stream to the
entry peer; every FORWARD it computes goes on down the chain, so a step costs N+1
hops. A session's KV cache lives here until CLOSE, EOF, idle ttl or a refusal.

Nothing waits for an answer (protocols/shard.py): once this peer has admitted a
session it answers OPENED and opens the next stream beside the first FORWARD's
compute (`_chain`); the next hop's answer is read when it comes, and a refusal from
it, or from further down, is relayed upstream and ends the session here: as it is,
signed by the hop that refused, once its signature checks (one that does not is the
next hop's fault, which this peer says in a refusal of its own, signed by it).

Whatever an upstream peer sends that breaks the rules (a FORWARD for another
session, a wrong shape or dtype, hidden states that are not finite, positions out of
range, an oversized frame, a route that skips layers) is refused with an error reply
and counted against it; the session ends and the peer keeps serving every other
session. When the next hop cannot be reached, this peer reports it to the entry peer
(FAILED over the return protocol) so the entry can ban it and re-route; so does a peer
whose own compute gives hidden states that are not finite (an overflow), naming itself.

An OPEN tagged with an RL policy version (protocols/shard.py, PolicyTag) is admitted
only by the server's `gate` (set by an RL pipeline shard: peerd/rl/shard_gate.py),
which holds that version for the session until it closes, or refuses it; a server
with no gate refuses every tagged OPEN (UNVERSIONED) and admits every plain one.

One module, past the usual size: a session's life (open, forward, relay, return,
close, eviction) moves one set of state and its refusal paths; the rules that stand
alone are out (lending.py: what is lent to whom; peerd/turns.py: the compute's order;
streams.py: the handshake; protocols/shard.py: what a FORWARD may be; progress.py: how
far each session got, which its entry may ask). The chaining
(`_chain` and its relay of refusals) is the part that could move out next.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import trio
from libp2p.peer.id import ID
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from peerd import compute
from peerd.agents.sealing import check_signature
from peerd.inference.model.tensors import TORCH_DTYPES, from_wire, to_wire
from peerd.inference.slot import ShardLimits
from peerd.inference.swarm.lending import Eviction, Lending, OverShare
from peerd.inference.swarm.progress import HopProgress, ProgressBook
from peerd.node import Node
from peerd.rpc import stream_handler
from peerd.streams import (
    STREAM_FAILURES,
    STREAM_FAILURES_OR_TIMEOUT,
    OpenFailed,
    OpenRefused,
    Unsupported,
    close_stream,
    read_answer,
    remote_peer,
    send_opening,
    send_quietly,
)
from peerd.turns import Turns
from protocols.codec import decode, encode
from protocols.errors import PeerError, WireError
from protocols.framing import StreamClosed, read_frame, write_frame
from protocols.shard import (
    DTYPES,
    IMPERSONATION,
    MAX_ROWS,
    RETIRED_IDS,
    REVOKED,
    SHARD,
    SHARD_RETURN,
    UNVERSIONED,
    VERSION,
    Close,
    Failed,
    Forward,
    HopTiming,
    Open,
    Opened,
    PolicyTag,
    Result,
    check_forward,
    check_route,
    known_code,
)
from protocols.shard_progress import SHARD_PROGRESS, Progress, ProgressReply
from protocols.spec import ErrorReply, SessionStream

log = logging.getLogger(__name__)

MAX_SHOWN_PEERS = 16  # in status: the peers that took the most compute
# A FAILED report to the entry is best effort, and short: the entry waits for one only
# a moment after a broken step (pipeline.REPORT_GRACE_S) before it diagnoses alone.
REPORT_TIMEOUT_S = 5.0
# After a failed write downstream: how long to wait for the next hop's answer, which may
# be a refusal on its way (relayed upstream: then the write's failure is no news).
ANSWER_GRACE_S = 0.5


class Block(Protocol):
    """What the server needs of the compute layer (peerd.inference.model.shard.ShardBlock)."""

    model_id: str
    start: int
    end: int
    num_layers: int  # of the whole model
    hidden_size: int
    dtype: Any  # torch.dtype of the compute

    def new_cache(self) -> Any: ...
    def begin(self, hidden: Any, start_pos: int, cache: Any, keep: int | None = None,
              span: tuple[int, int] | None = None, tree: Sequence[int] = ()) -> Any: ...
    def run(self, step: Any, layers: range) -> None: ...
    def cache_len(self, cache: Any) -> int: ...
    def kv_bytes_per_position(self, span: tuple[int, int] | None = None) -> int: ...
    def fork(self, cache: Any, source: Sequence[int]) -> None: ...


class Refused(Exception):
    """OPEN refused for capacity or versions (not misbehaviour): not an offence.
    `culprit`: whom this peer blames, when not itself (its next hop); `relayed`: a
    refusal from further down, checked, to pass on as it is."""

    def __init__(self, code: str, message: str, culprit: str | None = None,
                 relayed: Failed | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.culprit = culprit
        self.relayed = relayed


class Gate(Protocol):
    """Which sessions this peer's weights may serve (peerd/rl/shard_gate.py)."""

    async def admit(self, tag: PolicyTag | None, revoke: Callable[[], None]) -> Any:
        """A hold with `release()` kept while the session lives (or None), or raises
        Refused. `revoke()` ends the session (its holder must let go)."""
        ...


@dataclass(slots=True)
class _Session:
    id: str
    open: Open
    span: tuple[int, int]
    cache: Any
    kv_per_position: int
    downstream: Any = None  # stream to the next hop, or the return stream to the entry
    # a frame is being written downstream: a cancel (eviction, the step's deadline) now
    # leaves it cut part-way, and the stream can only be reset, with no CLOSE after it
    writing: bool = False
    connected: trio.Event = field(default_factory=trio.Event)  # downstream is set
    answered: trio.Event = field(default_factory=trio.Event)  # its answer is in (or failed)
    refused: bool = False  # a refusal came from downstream (relayed upstream)
    watch: trio.CancelScope = field(default_factory=trio.CancelScope)  # the _chain task's
    is_last: bool = False
    step: int = -1
    opened_at: float = field(default_factory=time.monotonic)
    # what lending.py keeps of it
    reserved_positions: int = 0  # KV charged to its entry peer, in positions
    busy: bool = False  # in a forward now
    last_used: float = field(default_factory=time.monotonic)
    forwards: int = 0
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # cancelled: evicted
    hold: Any = None  # the gate's hold on our weights' version (tagged sessions)
    # how far it got here, for its entry to ask (progress.py); set once admitted
    progress: HopProgress = field(default_factory=lambda: HopProgress(""))

    @property
    def holder(self) -> str:
        """Whom it is charged to: the entry peer named in OPEN. An entry that did not
        open the session refuses the last hop's return stream, and the refusal ends the
        session along the whole chain."""
        return self.open.entry_peer

    @property
    def max_length(self) -> int:
        return self.open.max_length


class ShardServer:
    """Serves `block` on `node`; create, then `register()` before the node runs tasks."""

    def __init__(self, node: Node, block: Block, limits: ShardLimits | None = None,
                 compute: Turns | None = None) -> None:
        self.node = node
        self.block = block
        self.limits = limits or ShardLimits()
        # One forward at a time per model (torch already uses every intra-op thread),
        # the peers' turns served fairly; the entry side (generate.py) shares them.
        self.compute = compute or Turns(
            quantum=self.limits.compute_quantum_positions * (block.end - block.start))
        self.sessions: dict[str, _Session] = {}
        self.lending = Lending(self.limits.max_sessions, self.limits.max_kv_bytes, self._evict,
                               headroom=self.limits.kv_headroom_positions)
        self._labelled: dict[str, set[str]] = {}  # peers with a /metrics gauge, by resource
        self.gate: Gate | None = None  # tagged sessions: the RL shard's (shard_gate.py)
        self.progress = ProgressBook()  # what the entries may ask of their sessions

    def register(self) -> None:
        self.node.set_stream_handler(SHARD.id, self._handle)
        self.node.set_stream_handler(SHARD_PROGRESS.id, stream_handler(
            SHARD_PROGRESS, self._serve_progress, self.node.offence))
        for retired_id in RETIRED_IDS:
            self.node.set_stream_handler(retired_id, self._retired)
        self.node.metrics.registry.register(_TurnsCollector(self.compute))

    async def _serve_progress(self, peer: str, req: Progress) -> ProgressReply:
        return self.progress.answer(peer, req)

    async def _retired(self, stream: Any) -> None:
        """A peer before 3.0.0 opening a session: say why not, clearly."""
        await retired(stream)

    # ---- one session's stream ------------------------------------------------------

    async def _handle(self, stream: Any) -> None:
        """Stream handler: never raises (LIBP2P_NOTES.md trap 1)."""
        upstream = remote_peer(stream)
        session: _Session | None = None
        request: Open | None = None
        try:
            with trio.fail_after(SHARD.open_timeout_s):
                raw = await read_frame(stream, SHARD.max_control_bytes)
                request = decode(raw, Open)
                session = await self._open(request, upstream)
            with session.scope:  # cancelled when the session is evicted or refused
                await write_frame(stream, encode(Opened(session=session.id)),
                                  SHARD.max_control_bytes)
                self.node.nursery.start_soon(self._chain, session, stream)
                await self._serve(session, stream, upstream)
        except StreamClosed:
            pass
        except Refused as exc:
            assert request is not None  # (a Refused comes after the OPEN is read)
            refusal = self._refusal_of(exc, request.session)
            self.progress.refused(request.session, request.entry_peer, refusal)
            await send_quietly(stream, refusal, SHARD.max_control_bytes)
        except PeerError as exc:
            self.node.offence(upstream, exc.reason, f"shard: {exc}")
            if session is not None and session.open.hop > 0:
                # the hop before us, whose refusal it would be to pass on: the entry
                # hears it from us (and cannot tell which of us two lies: pipeline.py)
                await self._report(session, session.step + 1, upstream, exc.reason,
                                   f"{self.node.peer_id} refused what {upstream} sent "
                                   f"it: {exc}")
            await send_quietly(stream, ErrorReply(code=exc.reason, message=str(exc)[:1000]),
                               SHARD.max_control_bytes)
        except trio.TooSlowError:
            self.node.offence(upstream, "timeout", "shard: OPEN not completed in time")
        except STREAM_FAILURES as exc:
            log.debug("shard stream from %s ended: %r", upstream, exc)
        except Exception:
            log.exception("shard session from %s failed", upstream)
            await send_quietly(stream, ErrorReply(code="internal", message="internal error"),
                               SHARD.max_control_bytes)
        finally:
            if session is not None:
                await self._drop(session)
            await close_stream(stream)

    async def _open(self, req: Open, upstream: str) -> _Session:
        b = self.block
        if req.model_id != b.model_id:
            raise WireError(f"this peer serves {b.model_id!r}, not {req.model_id!r}")
        check_route(req.route, b.num_layers)
        if not 0 <= req.hop < len(req.route):
            raise WireError(f"hop index {req.hop} outside the route")
        hop = req.route[req.hop]
        if hop.peer_id != self.node.peer_id:
            raise WireError(f"route hop {req.hop} names {hop.peer_id}, not this peer")
        if not b.start <= hop.start < hop.end <= b.end:
            raise WireError(f"route asks this peer for layers [{hop.start}, {hop.end}); it "
                            f"serves [{b.start}, {b.end})")
        if req.dtype not in DTYPES:
            raise WireError(f"wire dtype {req.dtype!r} not one of {sorted(DTYPES)}")
        if not 1 <= req.max_length <= self.limits.max_length:
            raise WireError(f"max_length {req.max_length} outside 1..{self.limits.max_length}")
        if not 1 <= req.rows <= MAX_ROWS:
            raise WireError(f"rows {req.rows} outside 1..{MAX_ROWS}")
        if req.session in self.sessions or not 8 <= len(req.session) <= 128:
            raise WireError("session id reused or not 8..128 characters")
        req.check()
        try:
            ID.from_base58(req.entry_peer)
        except Exception:
            raise WireError(f"entry peer {req.entry_peer!r:.60} is not a peer id") from None
        # The session is charged, and its turns counted, to its entry peer: the first
        # hop hears it from the entry itself, a later hop from the hop before it, which
        # passes the entry's name on. (A later hop cannot tell whether that hop passed
        # it on honestly: the last hop's return stream, which the entry refuses for a
        # session it did not open, ends such a session along the chain.)
        opener = req.entry_peer if req.hop == 0 else req.route[req.hop - 1].peer_id
        if upstream != opener:
            raise PeerError(f"{upstream} opened a session as {opener} (route hop "
                            f"{req.hop}'s {'entry' if req.hop == 0 else 'previous hop'})",
                            reason=IMPERSONATION)
        span = (hop.start, hop.end)
        session = _Session(req.session, req, span, b.new_cache(),
                           b.kv_bytes_per_position(span) * req.rows,  # every row's KV
                           is_last=req.hop == len(req.route) - 1)
        session.hold = await self._admit(req, session)
        try:
            self.lending.open(session)
        except OverShare as exc:
            if session.hold is not None:
                session.hold.release()
            self._over_share(exc)
            raise Refused("overloaded", f"{self.node.peer_id} is saturated: {exc}") from None
        self.sessions[session.id] = session
        session.progress = self.progress.open(session.id, req.entry_peer)
        self._publish_lent()
        self.node.events.publish("shard.session.opened", session=session.id,
                                 entry=req.entry_peer, layers=list(span))
        return session

    async def _admit(self, req: Open, session: _Session) -> Any:
        """The gate's hold for the session (None: nothing held), or Refused."""
        if self.gate is None:
            if req.policy is not None:
                raise Refused(UNVERSIONED, f"{self.node.peer_id} does not hold RL policy "
                              "versions: it takes no tagged session")
            return None
        return await self.gate.admit(req.policy, lambda: self._revoke(session))

    def _revoke(self, s: _Session) -> None:
        """The gate must move to another version: end the session first, and tell its
        entry (which opens another at the new version)."""
        s.scope.cancel()
        self.node.nursery.start_soon(self._report, s, s.step, self.node.peer_id, REVOKED,
                                     f"{self.node.peer_id} moves to a new policy version")

    async def _chain(self, s: _Session, upstream: Any) -> None:
        """Open the session's next stream (`_connect_downstream`) and watch it for as long
        as the session lives: a refusal from the next hop, now or later (relayed from
        further down), goes upstream as this peer's FAILED and ends the session here.
        Runs beside `_serve`, which waits for `s.connected` before its first write down."""
        with s.watch:
            try:
                target, spec, _ = self._next_stream(s.open)
                s.progress.dialing = True
                await self._connect_downstream(s.open, lambda stream: self._connected(s, stream))
                s.answered.set()
                await self._watch_downstream(s, target, spec)
            except Refused as exc:
                s.refused = True
                s.answered.set()
                s.progress.dialing = False
                refusal = self._refusal_of(exc, s.id)
                s.progress.tell(refusal)
                await send_quietly(upstream, refusal, SHARD.max_control_bytes)
                s.scope.cancel()
            except Exception:  # our bug: end the session, keep serving
                log.exception("session %s: its next stream failed", s.id)
                s.answered.set()
                s.scope.cancel()

    @staticmethod
    def _connected(s: _Session, stream: Any) -> None:
        s.downstream = stream
        s.progress.dialing = False
        s.progress.passed = max(s.progress.passed, 0)  # the OPEN went on
        s.connected.set()

    def _next_stream(self, req: Open) -> tuple[str, SessionStream, Open | Opened]:
        """Whom this hop dials for the session, on which protocol, with what opening."""
        if req.hop == len(req.route) - 1:
            return req.entry_peer, SHARD_RETURN, Opened(req.session)
        return req.route[req.hop + 1].peer_id, SHARD, dataclasses.replace(req, hop=req.hop + 1)

    async def _connect_downstream(self, req: Open,
                                  connected: Callable[[Any], None] | None = None) -> Any:
        """Open the next hop's stream (forwarding OPEN), or the return stream, and read
        its answer. With `connected`, the stream is handed over as soon as the opening
        is written (the caller sends on before the answer; it closes the stream);
        without, it is closed here on failure. Whatever goes wrong is a Refused that
        this peer reports upstream as its own FAILED."""
        target, spec, opening = self._next_stream(req)
        stream: Any = None
        try:
            with trio.fail_after(spec.open_timeout_s):
                stream = await send_opening(self.node.new_stream_eager, target, spec, opening)
                if connected is not None:
                    connected(stream)
                await read_answer(stream, target, spec, accept=lambda a: a.session == req.session)
        except BaseException as exc:
            if connected is None and stream is not None:
                await close_stream(stream)  # (shielded itself)
            refusal = self._refusal(req, target, spec, exc)
            if refusal is None:
                raise
            raise refusal from None
        return stream

    def _refusal(self, req: Open, target: str, spec: SessionStream,
                 exc: BaseException) -> Refused | None:
        """What this hop reports upstream when its next stream did not open (None: not a
        failure of the opening; our own bug, or a cancellation). It names its next hop
        (the entry weighs that word: pipeline.py); the last hop, which cannot reach the
        entry itself, names itself."""
        if isinstance(exc, OpenRefused) and isinstance(exc.reply, Failed):
            return self._relayed(req, target, exc.reply)  # a refusal further down
        at = None if target == req.entry_peer else target
        why = f"{self.node.peer_id} could not open the session on {target}"
        if isinstance(exc, OpenRefused):  # its ERROR: our OPEN broke its rules, it says
            return Refused(known_code(exc.code), f"{target} refused the session: "
                           f"{exc.message}", at)
        if isinstance(exc, Unsupported):  # its peerd speaks another version
            return Refused(VERSION, f"{why}: {exc}", at)
        if isinstance(exc, OpenFailed):
            return Refused("unreachable", f"{why}: {exc}", at)
        if isinstance(exc, trio.TooSlowError):
            return Refused("unreachable", f"{why}: no answer within {spec.open_timeout_s} s",
                           at)
        return None

    async def _watch_downstream(self, s: _Session, target: str, spec: SessionStream) -> None:
        """After its answer, the next stream carries only refusals relayed from further
        down (FAILED), and its end. An ERROR there is the next hop's last word on a
        FORWARD, and its end is no news either: the hop that ended the session has told
        the entry, or this hop's next write finds out (as before 2.0.0)."""
        while True:
            try:
                raw = await read_frame(s.downstream, spec.max_control_bytes)
                msg = decode(raw, Failed, ErrorReply)
            except STREAM_FAILURES:
                return
            except PeerError as exc:
                raise Refused(exc.reason, f"{target} sent what {spec.id} does not allow "
                              f"there: {exc}", None if target == s.open.entry_peer
                              else target) from None
            if isinstance(msg, ErrorReply):
                return
            raise self._relayed(s.open, target, msg)

    @staticmethod
    def _relayed(req: Open, target: str, failed: Failed) -> Refused:
        """A refusal from `target`, the next hop, to pass upstream as it is: signed by a
        hop after this one, for this session. One that is not is `target`'s fault (it
        made it up, or passed it on unchecked): this hop refuses the session naming it.
        Whom the refusal blames is the entry's to weigh."""
        further = {hop.peer_id for hop in req.route[req.hop + 1:]}
        try:
            check_failed(failed, req.session, further, "a hop after this one")
        except PeerError as exc:
            return Refused(exc.reason, f"{target} relayed a refusal that does not check: "
                           f"{exc}", None if target == req.entry_peer else target)
        return Refused(known_code(failed.code), failed.message, relayed=failed)

    def _refusal_of(self, exc: Refused, session: str) -> Failed:
        """The FAILED this hop sends upstream for `exc`: one relayed as it came, or its
        own, signed."""
        if exc.relayed is not None:
            return exc.relayed
        return self._failed(session, -1, exc.culprit or self.node.peer_id, exc.code, str(exc))

    def _failed(self, session: str, step: int, culprit: str, code: str,
                message: str) -> Failed:
        """A FAILED in this peer's words, signed (protocols/shard.py)."""
        unsigned = Failed(session=session, step=step, peer_id=culprit, code=code,
                          message=message[:1000], by=self.node.peer_id, sig=b"")
        return dataclasses.replace(unsigned, sig=self.node.key_pair.private_key.sign(
            unsigned.signed_bytes()))

    async def _serve(self, s: _Session, stream: Any, upstream: str) -> None:
        while True:
            with trio.move_on_after(self.limits.session_ttl_s) as idle:
                raw = await read_frame(stream, SHARD.max_data_bytes)
            if idle.cancelled_caught:
                log.info("session %s idle for %.0f s; closing", s.id, self.limits.session_ttl_s)
                return
            msg = decode(raw, Forward, Close)
            if isinstance(msg, Close):
                if msg.session != s.id:
                    raise WireError(f"CLOSE for unknown session {msg.session!r:.40}")
                return
            check_forward(msg, session=s.id, last_step=s.step, dtype=s.open.dtype,
                          hidden_size=self.block.hidden_size,
                          cached=self.block.cache_len(s.cache), max_length=s.open.max_length,
                          rows=s.open.rows, hop=s.open.hop)
            s.progress.received = msg.step
            try:
                self.lending.grow(s, msg.start_pos + msg.hidden.shape[1])
            except OverShare as exc:  # its entry peer is over its share: this session goes
                self._over_share(exc)
                await self._report(s, msg.step, self.node.peer_id, "evicted",
                                   f"{self.node.peer_id} is saturated: {exc}")
                return
            finally:
                self._publish_lent()
            t0 = time.perf_counter()
            s.busy = True
            try:
                hidden = await self._forward(s, msg)
            except PeerError:  # what the sender sent (hidden states not finite): its offence
                raise
            except Exception as exc:  # our failure, not the sender's: own up to the entry
                log.exception("session %s: forward failed on this peer", s.id)
                await self._report(s, msg.step, self.node.peer_id, "internal",
                                   f"{self.node.peer_id} failed to compute: {exc!r:.200}")
                raise
            finally:
                s.busy = False
                s.last_used = time.monotonic()
            s.forwards += 1
            timing = HopTiming(peer_id=self.node.peer_id,
                               compute_ms=round((time.perf_counter() - t0) * 1e3, 3))
            s.step = msg.step
            timings = (*msg.timings, timing)
            sent = hidden.to(TORCH_DTYPES[s.open.dtype])  # [B, T, H] in the wire's dtype
            if not bool(torch.isfinite(sent).all()):  # an overflow (float16's range, say):
                # ours, so we own up to it rather than pass it on to be refused
                await self._report(s, msg.step, self.node.peer_id, "internal",
                                   f"{self.node.peer_id} computed hidden states that are "
                                   f"not finite in {s.open.dtype} (an overflow?)")
                return
            out = to_wire(sent)
            if s.is_last:
                reply: Forward | Result = Result(session=s.id, step=msg.step, hidden=out,
                                                 timings=timings)
            else:
                reply = dataclasses.replace(msg, hidden=out, timings=timings)
            downstream = SHARD_RETURN if s.is_last else SHARD
            try:
                with trio.fail_after(downstream.step_timeout_s):
                    s.progress.writing = True
                    await s.connected.wait()  # (a failed connection ends the session)
                    s.writing = True
                    await write_frame(s.downstream, encode(reply), downstream.max_data_bytes)
                    s.writing = False
                s.progress.writing = False
                s.progress.passed = msg.step
            except STREAM_FAILURES_OR_TIMEOUT as exc:
                with trio.move_on_after(ANSWER_GRACE_S):  # a refusal on its way ends it
                    await s.answered.wait()
                if s.refused:
                    return
                nxt = s.open.entry_peer if s.is_last else s.open.route[s.open.hop + 1].peer_id
                log.info("session %s: cannot reach %s (%r)", s.id, nxt, exc)
                if not s.is_last:  # (if the entry itself is gone there is nobody to tell)
                    await self._report(s, msg.step, nxt, "unreachable",
                                       f"{self.node.peer_id} could not forward to {nxt}")
                return

    async def _forward(self, s: _Session, msg: Forward) -> Any:
        """The forward through this peer's span, in turns at the compute charged to the
        session's entry peer (turns.py: fair between peers). A turn computes at most
        `compute_turn_budget` positions x layers (and at least one layer): so a decoding
        step, a few positions, goes in one turn, and a long prefill (or a peer pushing
        2048 positions again and again) in many, letting the other peers' steps in
        between. Layers run in separate turns compute exactly what they compute in one;
        a chain of more positions than the budget goes in chunks of it, which in float32
        moves the last bits of a long prompt's results. A token tree is never chunked.
        A session of several rows counts rows x positions."""
        rows, positions = msg.hidden.shape[0], msg.hidden.shape[1]
        budget = self.limits.compute_turn_budget
        chunk = max(1, budget // rows)  # positions of every row a turn may take
        cuts = [0, positions] if msg.tree else [*range(0, positions, chunk), positions]
        decoded: list[Any] = []  # the FORWARD's hidden states [rows, T, H], once decoded
        done: list[Any] = []  # each chunk's output [rows, b - a, H]

        for a, b in itertools.pairwise(cuts):
            per_turn = max(1, budget // ((b - a) * rows))  # layers a turn of it may run
            layers = range(*s.span)
            groups = [layers[i:i + per_turn] for i in range(0, len(layers), per_turn)]

            def begin(a: int = a, b: int = b, first: range = groups[0]) -> Any:
                if not decoded:
                    x = from_wire(msg.hidden)  # [rows, T, H], as sent
                    if not bool(torch.isfinite(x).all()):  # (NaN poisons every later hop)
                        raise WireError("hidden states that are not finite")
                    decoded.append(x.to(self.block.dtype))
                keep = None if msg.keep < 0 or a > 0 else msg.keep
                step = self.block.begin(decoded[0][:, a:b], msg.start_pos + a, s.cache, keep,
                                        span=s.span, tree=msg.tree)
                self.block.run(step, first)
                return step

            step: Any = None  # ShardBlock's Step, between its first and last layers
            for group in groups:
                async with self.compute.take(s.holder, rows * (b - a) * len(group)):
                    if step is None:
                        step = await compute.run(begin)
                    else:
                        await compute.run(self.block.run, step, group)
            assert step is not None
            done.append(step.x)
        if msg.source:  # each session row takes its prompt's KV
            await compute.run(self.block.fork, s.cache, msg.source)
        return done[0] if len(done) == 1 else await compute.run(torch.cat, done, 1)  # [B, T, H]

    async def _report(self, s: _Session, step: int, culprit: str, code: str,
                      message: str) -> None:
        """Tell the entry peer which peer broke the session, over the return protocol."""
        report = self._failed(s.id, step, culprit, code, message)
        s.progress.tell(report)
        try:
            with trio.fail_after(REPORT_TIMEOUT_S):
                stream = await self.node.new_stream_eager(s.open.entry_peer, SHARD_RETURN.id)
                try:
                    await write_frame(stream, encode(report), SHARD_RETURN.max_control_bytes)
                finally:
                    await close_stream(stream)
        except Exception as exc:
            log.debug("could not report to the entry peer: %r", exc)

    def _evict(self, s: _Session, eviction: Eviction) -> None:
        """Lending took `s` back for a peer within its share: end it, and tell its entry
        (which replays elsewhere, as on any failover)."""
        s.scope.cancel()
        message = (f"{self.node.peer_id} evicted the session: {eviction.for_peer} needed "
                   f"{eviction.resource} that {eviction.holder} held over its fair share")
        self.node.nursery.start_soon(self._report, s, s.step, self.node.peer_id, "evicted",
                                     message)
        self.node.metrics.evictions.labels(eviction.resource).inc()
        self.node.events.publish("shard.session.evicted", session=s.id, holder=s.holder,
                                 resource=eviction.resource, for_peer=eviction.for_peer,
                                 forwards=s.forwards)
        if s.forwards == 0:  # opened, held, never used: greed
            self.node.offence(s.holder, "idle_session",
                              f"shard session {s.id} evicted unused after "
                              f"{time.monotonic() - s.opened_at:.0f} s")

    def _over_share(self, exc: OverShare) -> None:
        self.node.metrics.share_refusals.labels(exc.resource).inc()
        if exc.peer != self.node.peer_id:  # (our own requests are no offence to us)
            self.node.offence(exc.peer, "over_share", f"shard {exc.resource}: {exc}")

    def lent(self) -> dict[str, Any]:
        """Who holds what of this peer: sessions and KV bytes (capacity, used, by entry
        peer), and the compute's turns (by peer: turns, cost served, time waited, queued)."""
        turns = self.compute.stats()
        busiest = sorted(turns, key=lambda p: -turns[p].cost)[:MAX_SHOWN_PEERS]
        other = self.compute.other()  # the peers the compute no longer counts one by one
        return {**self.lending.held(), "compute": {
            "waiting": self.compute.waiting, "busy": self.compute.busy,
            "peers": {p: {"turns": turns[p].turns, "cost": turns[p].cost,
                          "waited_s": round(turns[p].waited_s, 3), "queued": turns[p].queued}
                      for p in busiest},
            "other": {"turns": other.turns, "cost": other.cost,
                      "waited_s": round(other.waited_s, 3)}}}

    def _publish_lent(self) -> None:
        """The shares on /metrics: `peerd_lent{resource, peer}` for the peers holding
        now (a gauge a peer no longer holds is removed) and each capacity."""
        metrics = self.node.metrics
        for name, resource in self.lending.held().items():
            metrics.lent_capacity.labels(name).set(resource["capacity"])
            holders = set(resource["held"])
            for gone in self._labelled.get(name, set()) - holders:
                metrics.lent.remove(name, gone)
            for peer, amount in resource["held"].items():
                metrics.lent.labels(name, peer).set(amount)
            self._labelled[name] = holders

    async def _drop(self, s: _Session) -> None:
        s.watch.cancel()
        if s.hold is not None:
            s.hold.release()
        self.lending.close(s)
        self._publish_lent()
        if self.sessions.pop(s.id, None) is None:
            return
        self.progress.end(s.id)
        if s.downstream is not None:
            if not s.is_last and not s.writing:
                await send_quietly(s.downstream, Close(s.id), SHARD.max_control_bytes)
            await close_stream(s.downstream, abort=s.writing)
        self.node.events.publish("shard.session.closed", session=s.id, last_step=s.step)


def check_failed(failed: Failed, session: str, authors: Collection[str], whose: str) -> None:
    """PeerError unless `failed` is well formed, for `session`, and said and signed by
    one of `authors` (`whose` names them in the error)."""
    failed.check()
    if failed.session != session:
        raise WireError(f"a FAILED for session {failed.session!r:.40}")
    if failed.by not in authors:
        raise WireError(f"a FAILED said by {failed.by:.60}, not {whose}")
    check_signature(failed.by, failed.signed_bytes(), failed.sig, "a FAILED")


async def retired(stream: Any) -> None:
    """Answer a stream of a retired protocol version (RETIRED_IDS) with an ERROR of code
    VERSION, and close it."""
    try:
        await send_quietly(stream, ErrorReply(VERSION, f"this peer speaks {SHARD.id} and "
                                              f"{SHARD_RETURN.id}, not older versions: "
                                              "upgrade peerd"), SHARD.max_control_bytes)
    finally:
        await close_stream(stream)


class _TurnsCollector:
    """The compute's turns on /metrics, read when scraped (a gauge set at every turn
    would cost the hot path): per peer that took the most, turns, cost (positions x
    layers) and seconds waited, as counters, and jobs queued now."""

    def __init__(self, turns: Turns) -> None:
        self.turns = turns

    def collect(self) -> Iterator[Metric]:
        stats = self.turns.stats()
        shown = sorted(stats, key=lambda p: -stats[p].cost)[:MAX_SHOWN_PEERS]
        families: dict[str, CounterMetricFamily | GaugeMetricFamily] = {
            "turns": CounterMetricFamily("peerd_compute_turns", "Turns at the compute "
                                         "served, by peer", labels=["peer"]),
            "cost": CounterMetricFamily("peerd_compute_cost", "Positions x layers computed "
                                        "in those turns, by peer", labels=["peer"]),
            "waited_s": CounterMetricFamily("peerd_compute_waited_seconds", "Time spent "
                                            "waiting for those turns, by peer",
                                            labels=["peer"]),
            "queued": GaugeMetricFamily("peerd_compute_queued", "Jobs waiting for a turn "
                                        "now, by peer", labels=["peer"]),
        }
        for peer in shown:
            for name, family in families.items():
                family.add_metric([peer], float(getattr(stats[peer], name)))
        yield from families.values()
