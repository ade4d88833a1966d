"""The entry peer's side of a pipeline session.

`Pipeline.start(route)` sends OPEN to the first hop and returns at once: the first
`step` follows it on the same stream, the hops chain the session on among themselves
as they forward it, and the last hop dials back here on `/peerd/shard-return/3.0.0`
with the first RESULT, so a cold session costs one pass through the chain
(protocols/shard.py). `Pipeline.open(route)` waits instead until every hop has
admitted the session and the return stream is in (one pass too), for a caller that
wants a refusal before it computes anything. `PipelineSession.step(hidden,
start_pos, keep)` writes one FORWARD to the first hop and reads one RESULT from the
last: N+1 hops per step.

When a step fails, the session finds out who is at fault, in this order: a FAILED
report from a hop ("I could not reach my next hop"), or a refusal of the session
relayed up the chain, naming the hop that refused; an ERROR from the first hop; a
route peer we are no longer connected to, a route peer that does not answer a ping;
else (a stall, or a stream that broke with no word) where the step stopped, from how
far each hop says it got (`located`: stalls.py).
`PipelineFailure.culprit` names it (or None) so generation can ban it, re-route and replay.
Every FAILED is signed by the hop that says it (`by`), relayed up the chain or sent
straight here: it is that hop's word, whoever carried it. A hop names itself or a hop
beside it; a report that names anyone else blames its author, and one that does not
check (signature, session, an author off the route) blames whoever sent it (the first
hop, for what it relays: each hop relays only what checks). A report against a hop
beside its author is its word alone (`PipelineFailure.witness`), and both are blamed,
since one of the two lies (or the named hop stalled the session), unless the entry can
tell: a next hop said to be unreachable that does not answer our ping is blamed alone.
A RESULT that is not what a route computes (another shape or dtype, hidden states that
are not finite, other than one timing a hop could have measured for each hop) is the
last hop's fault, as anything else it sends that the protocol does not allow: it is
counted against it and blamed (malformed). (Each hop refuses non-finite hidden states
from the hop before it, so the last hop's input was finite.)
Codes from the wire are read through protocols.shard.known_code: a failure's code is
one of a known few, or "other".

Past 450 lines because `start`, `open`, the diagnosis of a failed step and the pool
share the session's state (its streams, reports, refusal); the rules of the diagnosis
are out (stalls.py: where a step stopped), and the pool is the piece to split off if
it grows.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from libp2p.host.ping import ID as PING_PROTOCOL_ID
from libp2p.peer.id import ID

from peerd.host import ping_once
from peerd.inference.model.tensors import from_wire, to_wire
from peerd.inference.swarm.routing import Route
from peerd.inference.swarm.server import check_failed, retired
from peerd.inference.swarm.stalls import Told, ask_hops, locate_stall
from peerd.node import Node
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
from protocols.codec import decode, encode
from protocols.errors import PeerError, WireError
from protocols.framing import read_frame, write_frame
from protocols.shard import (
    CODES,
    OTHER,
    RETIRED_RETURN_IDS,
    SHARD,
    SHARD_RETURN,
    VERSION,
    Close,
    Failed,
    Forward,
    Hop,
    HopTiming,
    Open,
    Opened,
    PolicyTag,
    Result,
    check_timings,
    known_code,
    step_deadline_s,
)
from protocols.spec import ErrorReply

log = logging.getLogger(__name__)

UNKNOWN_SESSION = "unknown_session"  # the ERROR code of a return stream for no session here
STALLED = "stalled"  # the code of a failure found by asking the hops how far it got
WRONG_OUTPUT = "wrong_output"  # a hop whose compute an audit found wrong (audit.py)
REPORT_GRACE_S = 0.5  # after a broken stream, how long to wait for a hop's FAILED report
PROBE_TIMEOUT_S = 2.0
PROGRESS_TIMEOUT_S = 3.0  # for a hop's answer to how far a session got there
# A finished request's session stays open this long for the next request on the same
# route: opening one costs no round trip of its own, but the hops' KV caches of the
# last request can be reused (a shared prefix). The next request's first FORWARD
# truncates the caches with keep=0, or (a request that asks to reuse a prefix) with
# keep = the tokens it shares with what they hold.
POOL_IDLE_S = 30.0
POOL_PER_ROUTE = 2
LENGTH_STEP = 256  # session lengths round up to this, so a session fits later requests
# the codes of a failure found here, beside those a hop sends (protocols.shard.CODES)
LOCAL_CODES = frozenset({"closed", "timeout", "failed", STALLED, WRONG_OUTPUT})
MAX_REPORTS = 4  # FAILEDs kept a session (the first is the one that counts)


def pooled_length(max_length: int) -> int:
    """The length to open a session with: a little slack for the next request (the KV
    cache each shard reserves grows with it, so only a little)."""
    return -(-max_length // LENGTH_STEP) * LENGTH_STEP


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class PipelineFailure(Exception):
    """A session could not be opened or a step failed; `culprit` is the peer at fault.
    `code` is one of protocols.shard.CODES or LOCAL_CODES, else OTHER: the callers keep
    it (bans, metrics, status), and a hop's refusal may say anything. `witness`: the
    hop whose word alone blames `culprit`, a hop beside it (`PipelineSession.report`,
    `settled`): unless the entry could check it, both are at fault."""

    def __init__(self, culprit: str | None, code: str, message: str,
                 witness: str | None = None) -> None:
        super().__init__(message)
        self.culprit = culprit
        self.code = code if code in CODES or code in LOCAL_CODES else OTHER
        self.witness = witness

    @property
    def at_fault(self) -> tuple[str, ...]:
        """The peers to ban for this failure: the culprit, and a witness against it."""
        return tuple(p for p in (self.culprit, self.witness) if p is not None)

    def detailed(self, detail: str) -> PipelineFailure:
        return PipelineFailure(self.culprit, self.code, f"{self} ({detail})", self.witness)


@dataclass(frozen=True, slots=True)
class StepResult:
    hidden: Any  # torch.Tensor [1, T, H]
    timings: tuple[HopTiming, ...]
    wall_ms: float

    @property
    def compute_ms(self) -> float:
        return sum(t.compute_ms for t in self.timings)


@dataclass(eq=False)
class PipelineSession:
    pipeline: Pipeline
    id: str
    route: tuple[Hop, ...]
    dtype: str
    first: Any = None  # stream to the first hop
    returned: trio.Event = field(default_factory=trio.Event)
    return_stream: Any = None
    failed: trio.Event = field(default_factory=trio.Event)
    reports: list[PipelineFailure] = field(default_factory=list)  # what hops told us
    admitted: trio.Event = field(default_factory=trio.Event)  # the first hop's OPENED
    refusal: PipelineFailure | None = None  # an ERROR from the first hop, as a failure
    watching: bool = False  # a task reads `first` (Pipeline.start): nothing else may
    watch: trio.CancelScope = field(default_factory=trio.CancelScope)  # that task's
    done: trio.Event = field(default_factory=trio.Event)
    # a FORWARD is being written to `first`: a cancel now leaves it cut part-way, and
    # the stream can then only be reset (a CLOSE after it would read as garbage)
    writing: bool = False
    step_no: int = 0
    max_length: int = 0
    rows: int = 1  # sequences decoded side by side (OPEN.rows): every step [rows, T, H]
    held: int = 0  # positions the route's caches hold (the user keeps it up to date)
    # committed token ids whose KV fills the caches' first positions, as the last
    # request left them: a pooled session's reusable prefix (the user keeps it)
    cached: tuple[int, ...] = ()
    features: Any = None  # torch.Tensor [len(cached), H]: the target's last hidden states
    # at those positions, kept for a drafter when a speculative request pooled it
    idle_since: float = 0.0  # when it went back to the pool

    @property
    def peers(self) -> list[str]:
        return [h.peer_id for h in self.route]

    def report(self, failed: Failed, sender: str, relayed: bool) -> None:
        """Keep a hop's FAILED (a step then fails with it), weighed as its author's word
        (`by`, whose signature it carries). `sender` sent it: its author, straight to us
        over the return protocol, or the first hop relaying it up the chain (each hop
        relays only what checks). The author may blame itself or a hop beside it;
        anyone else named is its own fault. One that blames a hop beside it (its next
        hop unreachable, or refusing its OPEN; what the hop before sent refused, a
        refusal that would go back through that hop, which could swallow it) is a
        witness (`settled` weighs it): a liar can neither fail requests unblamed nor get
        an honest hop banned alone. PeerError if it does not check: `sender`'s fault."""
        weighed = self.weigh(failed, sender, relayed)
        if len(self.reports) < MAX_REPORTS:
            self.reports.append(weighed)

    def weigh(self, failed: Failed, sender: str, relayed: bool) -> PipelineFailure:
        """A hop's FAILED as its author's word (`report`); PeerError if it does not
        check."""
        peers = self.peers
        check_failed(failed, self.id, peers if relayed else {sender} & set(peers),
                     "a hop of the route" if relayed else f"its sender {sender}")
        reporter, witness = failed.by, None
        at = peers.index(reporter)
        beside = {peers[i] for i in (at - 1, at + 1) if 0 <= i < len(peers)}
        if failed.peer_id == reporter:
            culprit = reporter
        elif failed.peer_id in beside:  # its word alone: see `settled`
            culprit, witness = failed.peer_id, reporter
        else:
            culprit = reporter
        return PipelineFailure(culprit, known_code(failed.code), failed.message, witness)

    async def step(self, hidden: Any, start_pos: int, keep: int = -1,
                   tree: Sequence[int] = (), source: Sequence[int] = ()) -> StepResult:
        """Run positions start_pos.. (a chain, or a token `tree`: protocols.shard)
        through the whole route; the last hop's output. `source`: a first step of fewer
        rows than the session's, the row each session row starts from."""
        if self.done.is_set():
            raise PipelineFailure(None, "closed", "session is closed")
        if hidden.dim() != 3 or (len(source) if source else hidden.shape[0]) != self.rows:
            raise ValueError(f"hidden states of shape {list(hidden.shape)}"
                             f"{f' for {len(source)} rows' if source else ''} in a session "
                             f"of {self.rows} rows")
        self.step_no += 1
        msg = Forward(session=self.id, step=self.step_no, start_pos=start_pos, keep=keep,
                      hidden=to_wire(hidden, self.dtype), tree=tuple(tree),
                      source=tuple(source))
        t0 = time.perf_counter()
        result: Result | None = None
        returned: Any = None  # its hidden states, checked
        error: BaseException | None = None

        async def exchange(cancel: trio.CancelScope) -> None:
            nonlocal result, returned, error
            try:
                self.writing = True
                await write_frame(self.first, encode(msg), SHARD.max_data_bytes)
                self.writing = False
                await self.returned.wait()  # (a cold session's comes with its first RESULT)
                while result is None:
                    raw = await read_frame(self.return_stream, SHARD_RETURN.max_data_bytes)
                    reply = decode(raw, Result)
                    if reply.session != self.id or reply.step > self.step_no:
                        raise WireError(f"result for session {reply.session} step {reply.step}")
                    if reply.step == self.step_no:
                        returned = self._returned(reply, msg)
                        result = reply
            except Exception as exc:
                error = exc
            cancel.cancel()

        async def watch(cancel: trio.CancelScope) -> None:
            await self.failed.wait()
            cancel.cancel()

        limit_s = step_deadline_s(math.prod(hidden.shape[:-1]))  # [B, T, H]: B x T
        with trio.move_on_after(limit_s) as deadline:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(exchange, nursery.cancel_scope)
                nursery.start_soon(watch, nursery.cancel_scope)
        if result is not None:
            return StepResult(returned.to(hidden.dtype), result.timings,
                              (time.perf_counter() - t0) * 1e3)
        if deadline.cancelled_caught:
            error = trio.TooSlowError(f"step took over {limit_s:.0f} s")
        raise await self._diagnose(error)

    def _returned(self, reply: Result, sent: Forward) -> Any:
        """The hidden states of the RESULT for `sent` [rows, T, H]; WireError unless the
        route could have computed them: the FORWARD's shape in the session's dtype, every
        element finite (a NaN made sampling raise, and greedy decoding emit garbage), and
        one timing, a time a hop could have measured, for each hop (the request's figures
        add them up)."""
        h = reply.hidden
        h.check(rank=3)
        if h.shape != sent.hidden.shape or h.dtype != self.dtype:
            raise WireError(f"result of {h.dtype}{list(h.shape)} for a step of "
                            f"{self.dtype}{list(sent.hidden.shape)}")
        check_timings(reply.timings, len(self.route))
        out = from_wire(h)
        if not bool(out.isfinite().all()):
            raise WireError("result hidden states that are not finite")
        return out

    async def _diagnose(self, error: BaseException | None) -> PipelineFailure:
        """Who broke the chain? A hop's report, a lost connection, a failed ping."""
        self.done.set()
        if not self.reports:
            with trio.move_on_after(REPORT_GRACE_S):
                await self.failed.wait()
        detail = f"{type(error).__name__}: {error}" if error else "a hop reported a failure"
        if self.reports:
            return await self.settled(self.reports[0].detailed(detail))
        if self.refusal is not None:
            return self.refusal
        refusal = None if self.watching else await self._first_hop_refusal()
        if refusal is not None:  # the first hop refused what we sent: our own bug
            return PipelineFailure(None, refusal.code, f"{self.route[0].peer_id} refused the "
                                   f"step: {refusal.message:.1000}")
        node = self.pipeline.node
        for pid in self.peers:
            if not await node_reachable(node, pid):
                return PipelineFailure(pid, "unreachable", f"{pid} is unreachable ({detail})")
        if isinstance(error, PeerError):  # what the return stream carried: the last hop's
            last = self.route[-1].peer_id
            node.offence(last, error.reason, f"shard-return: {error}")
            return PipelineFailure(last, error.reason, detail)
        if error is None or isinstance(error, STREAM_FAILURES_OR_TIMEOUT):
            return (await self.located(self.step_no)).detailed(detail)
        return PipelineFailure(None, "failed", f"pipeline step failed ({detail})")

    async def located(self, step: int) -> PipelineFailure:
        """Where step `step` (0: the OPEN) stopped, every hop answering a ping and none
        saying why: from how far each hop says it got (stalls.py)."""
        answers = await ask_hops(self.pipeline.node, self.peers, self.id, PROGRESS_TIMEOUT_S)
        found = locate_stall(self.peers, step, not self.writing, answers,
                             self.admitted.is_set())
        if isinstance(found, Told):
            try:
                return await self.settled(self.weigh(found.failed, found.sender, True))
            except PeerError as exc:
                return PipelineFailure(found.sender, exc.reason, f"{found.sender} told of "
                                       f"a FAILED that does not check: {exc}")
        return PipelineFailure(found.culprit, STALLED, found.why, found.witness)

    async def settled(self, failure: PipelineFailure) -> PipelineFailure:
        """A hop's word against a hop beside it, weighed: that it could not reach it is
        checked with a ping from here. A hop that does not answer is at fault alone; one
        that answers leaves both at fault (the reporter lies, or the hop it names took
        the session and stalled it), as anything else a hop says of its neighbour."""
        if failure.witness is None or failure.culprit is None or failure.code != "unreachable":
            return failure
        if await node_reachable(self.pipeline.node, failure.culprit):
            return failure
        return PipelineFailure(failure.culprit, failure.code, str(failure))

    async def _first_hop_refusal(self) -> ErrorReply | None:
        with trio.move_on_after(0.2):
            try:
                reply = decode(await read_frame(self.first, SHARD.max_control_bytes), ErrorReply)
                return reply
            except Exception:
                return None
        return None

    async def close(self) -> None:
        self.watch.cancel()
        if self.first is not None and not self.done.is_set() and not self.writing:
            await send_quietly(self.first, Close(self.id), SHARD.max_control_bytes)
        self.done.set()
        self.pipeline.sessions.pop(self.id, None)
        if self.first is not None:
            await close_stream(self.first, abort=self.writing)


class Pipeline:
    """Entry-peer side of `/peerd/shard`: open sessions, receive results and reports."""

    def __init__(self, node: Node, model_id: str) -> None:
        self.node = node
        self.model_id = model_id
        self.sessions: dict[str, PipelineSession] = {}
        self.pool: dict[tuple[Hop, ...], list[PipelineSession]] = {}

    def register(self) -> None:
        self.node.set_stream_handler(SHARD_RETURN.id, self._handle_return)
        for retired_id in RETIRED_RETURN_IDS:
            self.node.set_stream_handler(retired_id, retired)
        self.node.nursery.start_soon(self._sweep_pool)

    # ---- the pool of idle sessions ---------------------------------------------------

    def take(self, route: Route, max_length: int, tokens: Sequence[int] = ()
             ) -> PipelineSession | None:
        """An idle session on exactly this route, long enough; None if there is none.
        Of several, the one whose cached tokens share the longest prefix with `tokens`,
        then the most recently used."""
        hops = tuple(Hop(s.peer_id, s.start, s.end) for s in route.spans)
        idle = self.pool.get(hops, [])
        fits = _fitting(idle, max_length)
        if not fits:
            return None
        best = max(fits, key=lambda s: common_prefix(s.cached, tokens))  # first of equals
        idle.remove(best)
        return best

    async def release(self, s: PipelineSession) -> None:
        """A request is done with `s`: keep it for the next one on its route, or close it
        (a session of several rows is never pooled: requests decode one)."""
        if s.done.is_set() or s.failed.is_set() or s.writing or s.rows != 1:
            await s.close()
            return
        s.idle_since = time.monotonic()
        idle = self.pool.setdefault(s.route, [])
        idle.append(s)
        while len(idle) > POOL_PER_ROUTE:
            await idle.pop(0).close()

    def idle(self, max_length: int) -> list[tuple[tuple[Hop, ...], list[PipelineSession]]]:
        """Each route with idle sessions long enough for `max_length`, and those
        sessions (what `take` could hand out on it)."""
        out = [(hops, _fitting(idle, max_length)) for hops, idle in self.pool.items()]
        return [(hops, fits) for hops, fits in out if fits]

    @property
    def pooled(self) -> int:
        return sum(len(v) for v in self.pool.values())

    async def _sweep_pool(self) -> None:
        while True:
            await trio.sleep(POOL_IDLE_S / 4)
            try:
                await self._sweep_once()
            except Exception:  # our bug: this round's sessions may leak, the node goes on
                log.exception("pipeline: sweeping the pool of idle sessions failed")

    async def _sweep_once(self) -> None:
        """Close the sessions idle past POOL_IDLE_S (or ended). Every one leaves the pool
        before the first close: a close awaits its first hop, and meanwhile `take` must
        not hand out a session this round is about to close (nor `release`, past the
        cap, close one twice)."""
        now = time.monotonic()
        stale: list[PipelineSession] = []
        for route, idle in list(self.pool.items()):
            kept: list[PipelineSession] = []
            for s in idle:
                (stale if now - s.idle_since > POOL_IDLE_S or s.done.is_set()
                 else kept).append(s)
            idle[:] = kept
            if not idle:
                del self.pool[route]
        for s in stale:
            try:
                await s.close()
            except Exception:  # the others are out of the pool too: close them all
                log.exception("pipeline: closing idle session %s failed", s.id)

    async def start(self, route: Route, max_length: int, dtype: str = "float32",
                    policy: PolicyTag | None = None) -> PipelineSession:
        """A session on `route`, its OPEN sent and nothing waited for: the first `step`
        carries it through the chain. A refusal (or the first hop's answer that it does
        not speak this version) fails that step, naming the hop at fault. Only the
        first hop's dial can fail here."""
        s = await self._send_open(route, max_length, dtype, policy)
        s.watching = True
        self.node.nursery.start_soon(self._watch, s, False)
        return s

    async def open(self, route: Route, max_length: int, dtype: str = "float32",
                   policy: PolicyTag | None = None, rows: int = 1) -> PipelineSession:
        """A session on `route`, once every hop has admitted it and the last hop's return
        stream is in; with `policy`, every hop holds that RL policy version until it
        closes, or the OPEN fails (protocols/shard.py). Never pool a tagged session: a
        plain request must not be given it. `rows` > 1: that many sequences side by
        side (only through peers that list FEATURE_ROWS)."""
        s = await self._send_open(route, max_length, dtype, policy, rows)
        try:
            # one deadline for the whole chain: the first hop's answer, the refusals the
            # chain relays, the last hop's return stream
            with trio.fail_after(SHARD.open_timeout_s):
                await self._watch(s, True)
        except trio.TooSlowError:
            stalled = (await s.located(0)).detailed(
                f"opening the session took over {SHARD.open_timeout_s} s")
            await s.close()
            raise stalled from None
        except BaseException:
            await s.close()
            raise
        failure = s.refusal or (await s.settled(s.reports[0]) if s.reports else None)
        if failure is not None or not s.returned.is_set():
            await s.close()
            raise failure or PipelineFailure(s.route[0].peer_id, "unreachable",
                                             f"{s.route[0].peer_id} ended the session")
        return s

    async def _send_open(self, route: Route, max_length: int, dtype: str,
                         policy: PolicyTag | None, rows: int = 1) -> PipelineSession:
        """A new session, registered here, its OPEN written to the first hop."""
        hops = tuple(Hop(s.peer_id, s.start, s.end) for s in route.spans)
        s = PipelineSession(self, secrets.token_hex(16), hops, dtype, max_length=max_length,
                            rows=rows)
        self.sessions[s.id] = s
        first = hops[0].peer_id
        request = Open(session=s.id, model_id=self.model_id, route=hops, hop=0,
                       entry_peer=self.node.peer_id, max_length=max_length, dtype=dtype,
                       policy=policy, rows=rows)
        try:
            with trio.fail_after(SHARD.open_timeout_s):
                s.first = await send_opening(self.node.new_stream_eager, first, SHARD, request)
        except (OpenFailed, trio.TooSlowError) as exc:
            await s.close()
            raise PipelineFailure(first, "unreachable", str(exc) or "dial timed out") from None
        except BaseException:
            await s.close()
            raise
        return s

    async def _watch(self, s: PipelineSession, until_returned: bool) -> None:
        """Read what the first hop sends on the session's stream: its OPENED, then only
        refusals (its own ERROR for a FORWARD, or a FAILED relayed up the chain) until
        it ends. With `until_returned`, stop once the chain is open (OPENED in, the
        return stream in: no refusal can follow), leaving the stream to the caller."""
        with s.watch:
            async with trio.open_nursery() as nursery:
                if until_returned:
                    nursery.start_soon(_when_open, s, nursery.cancel_scope)
                await self._read_first(s)
                nursery.cancel_scope.cancel()

    async def _read_first(self, s: PipelineSession) -> None:
        first = s.route[0].peer_id
        try:
            await read_answer(s.first, first, SHARD, accept=lambda a: a.session == s.id)
            s.admitted.set()
            msg = decode(await read_frame(s.first, SHARD.max_control_bytes), Failed, ErrorReply)
            if isinstance(msg, ErrorReply):
                # its last word on a FORWARD (our bug, or its own failure, which it
                # reports too): the step fails as the chain ends, and is diagnosed then
                s.refusal = PipelineFailure(None, msg.code, f"{first} refused the step: "
                                            f"{msg.message:.1000}")
                return
            s.report(msg, first, relayed=True)  # a refusal relayed from further down
        except OpenRefused as exc:
            if isinstance(exc.reply, Failed):  # names the hop that could not open
                try:
                    s.report(exc.reply, first, relayed=True)
                except PeerError as bad:
                    s.refusal = PipelineFailure(first, bad.reason, f"{first} refused with "
                                                f"a malformed FAILED: {bad}")
            else:
                s.refusal = PipelineFailure(first, exc.code,
                                            f"{first} refused: {exc.message:.1000}")
        except Unsupported as exc:
            s.refusal = PipelineFailure(first, VERSION, str(exc))
        except OpenFailed as exc:
            s.refusal = PipelineFailure(first, "unreachable", str(exc))
        except STREAM_FAILURES:  # the first hop ended the session: a step finds out why
            return
        except PeerError as exc:
            s.refusal = PipelineFailure(first, exc.reason, f"{first} sent what {SHARD.id} "
                                        f"does not allow: {exc}")
        except Exception:  # our bug: the session fails, the node goes on
            log.exception("session %s: reading the first hop's stream failed", s.id)
        s.failed.set()

    async def _handle_return(self, stream: Any) -> None:
        """The last hop's return stream (kept for the session), or a hop's report."""
        peer = remote_peer(stream)
        try:
            with trio.fail_after(SHARD_RETURN.open_timeout_s):
                raw = await read_frame(stream, SHARD_RETURN.max_control_bytes)
            msg = decode(raw, Opened, Failed)
            s = self.sessions.get(msg.session)
            if s is None:  # no offence: a session we closed, or one an OPEN named us for
                # falsely (the chain ends it on this ERROR: protocols/shard.py)
                await send_quietly(stream, ErrorReply(UNKNOWN_SESSION, f"no session "
                                                      f"{msg.session!r:.40} here"),
                                   SHARD_RETURN.max_control_bytes)
                return
            if isinstance(msg, Failed):
                if peer not in s.peers:
                    raise WireError("failure report from a peer outside the route")
                s.report(msg, peer, relayed=False)
                s.failed.set()
                return
            if peer != s.route[-1].peer_id or s.return_stream is not None:
                raise WireError("return stream from a peer that is not the route's last hop")
            await write_frame(stream, encode(Opened(s.id)), SHARD_RETURN.max_control_bytes)
            s.return_stream = stream
            s.returned.set()
            await s.done.wait()
        except PeerError as exc:
            self.node.offence(peer, exc.reason, f"shard-return: {exc}")
            await send_quietly(stream, ErrorReply(exc.reason, str(exc)[:1000]),
                               SHARD_RETURN.max_control_bytes)
        except STREAM_FAILURES_OR_TIMEOUT as exc:
            log.debug("return stream from %s failed: %r", peer, exc)
        except Exception:  # our bug: the handler must not raise (LIBP2P_NOTES.md trap 1)
            log.exception("return stream from %s failed", peer)
        finally:
            await close_stream(stream)


def _fitting(idle: list[PipelineSession], max_length: int) -> list[PipelineSession]:
    """The live sessions of `idle` at least `max_length` long, most recently pooled
    first."""
    return [s for s in reversed(idle) if s.max_length >= max_length
            and not s.done.is_set() and not s.failed.is_set()]  # (evicted while idle)


async def _when_open(s: PipelineSession, cancel: trio.CancelScope) -> None:
    await s.admitted.wait()
    await s.returned.wait()
    cancel.cancel()


async def node_reachable(node: Node, peer_id: str) -> bool:
    """Connected and answering a ping within PROBE_TIMEOUT_S."""
    if peer_id == node.peer_id:
        return True
    pid = ID.from_base58(peer_id)
    if pid not in node.host.get_network().connections:
        return False
    with trio.move_on_after(PROBE_TIMEOUT_S):
        try:
            stream = await node.host.new_stream(pid, [PING_PROTOCOL_ID])
            try:
                await ping_once(stream)
                return True
            finally:
                await close_stream(stream)
        except Exception:
            return False
    return False
