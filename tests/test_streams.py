"""Session streams: their declaration, the opening handshake (`open_session`) against a
scripted listener over in-process streams, and the stream failures caught by type."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.network.stream.exceptions import StreamClosed as NetStreamClosed
from libp2p.network.stream.exceptions import StreamEOF, StreamReset
from libp2p.peer.id import ID
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamReset

from peerd.loopback import LoopbackStream, loopback_pair
from peerd.streams import (
    STREAM_FAILURES,
    BadAnswer,
    OpenFailed,
    OpenRefused,
    Unreachable,
    open_session,
)
from peerd.turns import Turns
from protocols import shard
from protocols.codec import Message, decode, encode
from protocols.errors import PeerError
from protocols.framing import StreamClosed, encode_uvarint, read_frame, write_frame
from protocols.shard import (
    SHARD,
    SHARD_RETURN,
    Close,
    Failed,
    Forward,
    Hop,
    Open,
    Opened,
    Result,
    WireTensor,
)
from protocols.spec import ErrorReply, SessionStream

PEER = "12D3KooWExamplePeerIdThatIsNotCheckedHere"
SESSION = "s" * 16
OPEN = Open(session=SESSION, model_id="m", route=(Hop(PEER, 0, 4),), hop=0, entry_peer=PEER,
            max_length=64, dtype="float32")

Listener = Callable[[LoopbackStream], Awaitable[None]]


class Scripted:
    """A dial that hands each new stream's far end to `listener`, run in `nursery`; it
    keeps what the listener read and whether the stream ended after its answer."""

    def __init__(self, nursery: trio.Nursery, listener: Listener) -> None:
        self.nursery = nursery
        self.listener = listener
        self.dialled: list[tuple[str, str]] = []
        self.openings: list[bytes] = []
        self.closed_after = trio.Event()

    async def dial(self, peer_id: str, protocol: str) -> LoopbackStream:
        self.dialled.append((peer_id, protocol))
        ours, theirs = loopback_pair(peer_id)
        self.nursery.start_soon(self._serve, theirs)
        return ours

    async def _serve(self, stream: LoopbackStream) -> None:
        self.openings.append(await read_frame(stream, SHARD.max_control_bytes))
        await self.listener(stream)
        with trio.move_on_after(5):  # what the dialer does with the stream next
            try:
                await read_frame(stream, SHARD.max_data_bytes)
            except StreamClosed:
                self.closed_after.set()


def answer(msg: Message) -> Listener:
    async def listener(stream: LoopbackStream) -> None:
        await write_frame(stream, encode(msg), SHARD.max_data_bytes)
    return listener


def raw(data: bytes) -> Listener:
    async def listener(stream: LoopbackStream) -> None:
        await stream.write(data)
    return listener


async def silent(stream: LoopbackStream) -> None:
    await trio.sleep_forever()


async def hang_up(stream: LoopbackStream) -> None:
    await stream.close()


def same_session(a: Any) -> bool:
    return bool(a.session == SESSION)


# ---- the handshake ----------------------------------------------------------------


async def test_an_accepted_opening_returns_the_open_stream(nursery: trio.Nursery) -> None:
    far = Scripted(nursery, answer(Opened(SESSION)))
    stream, opened = await open_session(far.dial, PEER, SHARD, OPEN, accept=same_session)
    assert opened == Opened(SESSION)
    assert far.dialled == [(PEER, SHARD.id)]
    assert decode(far.openings[0], Open) == OPEN
    await write_frame(stream, encode(Close(SESSION)), SHARD.max_control_bytes)  # still open
    assert not far.closed_after.is_set()
    await stream.close()


@pytest.mark.parametrize("refusal", [
    Failed(session="", step=-1, peer_id="12D3KooWNextHop", code="overloaded", message="full",
           by="12D3KooWNextHop", sig=b"\0" * 64),
    ErrorReply(code="malformed", message="route skips layers"),
])
async def test_a_refusal_is_raised_with_its_reply_and_the_stream_closed(
        nursery: trio.Nursery, refusal: Failed | ErrorReply) -> None:
    far = Scripted(nursery, answer(refusal))
    with pytest.raises(OpenRefused) as err:
        await open_session(far.dial, PEER, SHARD, OPEN, accept=same_session)
    assert err.value.reply == refusal and err.value.peer == PEER
    assert (err.value.code, err.value.message) == (refusal.code, refusal.message)
    with trio.fail_after(5):
        await far.closed_after.wait()


async def test_an_answer_for_another_session_is_a_bad_answer(nursery: trio.Nursery) -> None:
    far = Scripted(nursery, answer(Opened("another-session")))
    with pytest.raises(BadAnswer, match="another opening") as err:
        await open_session(far.dial, PEER, SHARD, OPEN, accept=same_session)
    assert err.value.peer == PEER
    with trio.fail_after(5):
        await far.closed_after.wait()


@pytest.mark.parametrize(("listener", "words"), [
    (raw(b"\x03\xc1\xc1\xc1"), "malformed msgpack"),
    (answer(Result(SESSION, 1, WireTensor("float32", (0,), b""), ())), "unexpected message"),
    (raw(encode_uvarint(SHARD.max_control_bytes + 1)), "exceeds the limit"),  # never read
    (raw(b"\x09abc"), "frame bytes"),  # then closed: a truncated frame
], ids=["garbage", "wrong type", "oversized", "truncated"])
async def test_an_answer_outside_the_protocol_is_a_bad_answer(
        nursery: trio.Nursery, listener: Listener, words: str) -> None:
    async def then_hang_up(stream: LoopbackStream) -> None:
        await listener(stream)
        await stream.close()

    far = Scripted(nursery, then_hang_up)
    with pytest.raises(BadAnswer, match=words):
        await open_session(far.dial, PEER, SHARD, OPEN, accept=same_session)


async def test_no_answer_before_the_stream_closes_is_unreachable(nursery: trio.Nursery) -> None:
    far = Scripted(nursery, hang_up)
    with pytest.raises(Unreachable, match="without an answer"):
        await open_session(far.dial, PEER, SHARD, OPEN)


async def test_a_failed_dial_is_unreachable() -> None:
    async def dial(peer_id: str, protocol: str) -> Any:
        raise ConnectionRefusedError(f"this peer does not serve {protocol}")

    with pytest.raises(Unreachable, match="cannot reach"):
        await open_session(dial, PEER, SHARD, OPEN)


async def test_a_broken_stream_is_unreachable() -> None:
    class Broken:
        async def write(self, data: bytes) -> None:
            raise StreamReset()

        async def close(self) -> None:
            pass

    async def dial(peer_id: str, protocol: str) -> Any:
        return Broken()

    with pytest.raises(Unreachable, match="StreamReset"):
        await open_session(dial, PEER, SHARD, OPEN)


async def test_an_opening_cut_by_a_cancel_resets_its_stream() -> None:
    """The caller never gets the stream, so it is ended here; reset, not closed, as
    the opening may be on the wire part-way."""
    ended: list[str] = []

    class Stalled:
        async def write(self, data: bytes) -> None:
            await trio.sleep_forever()

        async def close(self) -> None:
            ended.append("close")

        async def reset(self) -> None:
            ended.append("reset")

    async def dial(peer_id: str, protocol: str) -> Any:
        return Stalled()

    with trio.move_on_after(0.1):
        await open_session(dial, PEER, SHARD, OPEN)
    assert ended == ["reset"]


async def test_a_silent_peer_is_unreachable_at_the_declared_deadline(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    far = Scripted(nursery, silent)
    start = trio.current_time()
    with pytest.raises(Unreachable, match="did not answer"):
        await open_session(far.dial, PEER, SHARD_RETURN, Opened(SESSION))
    assert trio.current_time() - start == pytest.approx(SHARD_RETURN.open_timeout_s)


async def test_an_enclosing_deadline_stays_the_callers(
        nursery: trio.Nursery, autojump_clock: trio.testing.MockClock) -> None:
    """A caller's own deadline, no later than the handshake's, is the caller's TooSlowError
    (Pipeline.open's "timeout", with nobody blamed), not Unreachable."""
    far = Scripted(nursery, silent)
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(SHARD.open_timeout_s):
            await open_session(far.dial, PEER, SHARD, OPEN)


async def test_an_opening_the_protocol_does_not_declare_is_our_bug() -> None:
    async def dial(peer_id: str, protocol: str) -> Any:
        raise AssertionError("never dialled")

    with pytest.raises(TypeError, match="does not open"):
        await open_session(dial, PEER, SHARD, Opened(SESSION))


def test_an_open_failure_is_not_the_callers_peers_fault() -> None:
    """A shard opening its next hop must not blame its upstream for what the next hop
    did: an OpenFailed is no PeerError, which the server counts against the upstream."""
    for cls in (Unreachable, BadAnswer, OpenRefused):
        assert issubclass(cls, OpenFailed)
    assert not issubclass(OpenFailed, PeerError)


# ---- the declaration -----------------------------------------------------------------


def test_the_shard_protocols_declare_every_shard_message() -> None:
    declared: set[type[Message]] = set()
    for spec in (SHARD, SHARD_RETURN):
        declared |= {*spec.opens, spec.opened, *spec.refusals, *spec.dialer_sends,
                     *spec.listener_sends}
    kinds = {cls for cls in vars(shard).values()
             if isinstance(cls, type) and issubclass(cls, Message) and cls.KIND}
    assert kinds <= declared, kinds - declared
    assert {Forward, Result} <= set(SHARD.dialer_sends) | set(SHARD_RETURN.dialer_sends)


def test_a_forward_frame_fits_the_data_cap_and_a_control_frame_does_not_need_it() -> None:
    assert SHARD.max_control_bytes < SHARD.max_data_bytes
    assert SHARD_RETURN.max_data_bytes == SHARD.max_data_bytes
    assert len(encode(OPEN)) < SHARD.max_control_bytes


BASE = dict(id="/peerd/x/1.0.0", opens=(Open,), opened=Opened, refusals=(ErrorReply,),
            dialer_sends=(Forward,), listener_sends=(), max_control_bytes=1024,
            max_data_bytes=4096, open_timeout_s=1.0, step_timeout_s=1.0)


@pytest.mark.parametrize(("change", "words"), [
    ({"id": "/other/x/1.0.0"}, "must start with /peerd/"),
    ({"opens": ()}, "at least one opening"),
    ({"refusals": (Opened,)}, "cannot both accept and refuse"),
    ({"refusals": (Close,)}, "needs a code and a message"),
    ({"max_control_bytes": 8192}, "max_control_bytes"),
    ({"max_control_bytes": 0}, "max_control_bytes"),
    ({"open_timeout_s": 0.0}, "deadlines"),
])
def test_a_malformed_declaration_is_refused(change: dict[str, Any], words: str) -> None:
    SessionStream(**BASE)
    with pytest.raises(ValueError, match=words):
        SessionStream(**{**BASE, **change})


def test_a_declaration_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SHARD.open_timeout_s = 1.0


# ---- stream failures, by type ---------------------------------------------------------


@pytest.mark.parametrize("exc", [StreamEOF(), StreamReset(), NetStreamClosed(),
                                 MuxedStreamReset(), MuxedStreamEOF(), StreamClosed(),
                                 trio.BrokenResourceError(), trio.ClosedResourceError()],
                         ids=lambda e: type(e).__name__)
def test_what_ends_a_stream_is_a_stream_failure(exc: Exception) -> None:
    assert isinstance(exc, STREAM_FAILURES)


@pytest.mark.parametrize("exc", [ValueError(), RuntimeError(), trio.TooSlowError(),
                                 ConnectionRefusedError()], ids=lambda e: type(e).__name__)
def test_our_bugs_and_deadlines_are_not_stream_failures(exc: Exception) -> None:
    assert not isinstance(exc, STREAM_FAILURES)


async def test_a_loopback_write_to_a_gone_peer_is_a_stream_failure() -> None:
    ours, theirs = loopback_pair(PEER)
    await theirs.close()
    with pytest.raises(STREAM_FAILURES):
        await ours.write(b"x")
    await ours.close()
    with pytest.raises(STREAM_FAILURES):
        await ours.write(b"x")


# ---- both callers keep their blame ------------------------------------------------------

def key_and_id() -> tuple[Any, str]:
    key_pair = create_new_key_pair()
    return key_pair.private_key, ID.from_pubkey(key_pair.public_key).to_base58()


(_, FIRST), (NEXT_KEY, NEXT), (_, SELF) = (key_and_id() for _ in range(3))


def signed(failed: Failed, key: Any = None) -> Failed:
    """`failed` signed with `key` (NEXT's by default)."""
    return dataclasses.replace(failed, sig=(key or NEXT_KEY).sign(failed.signed_bytes()))


FULL = signed(Failed(session=SESSION, step=-1, peer_id=NEXT, code="overloaded",
                     message="no room", by=NEXT, sig=b""))
BAD_OPEN = ErrorReply(code="malformed", message="route skips layers")


class FakeNode:
    peer_id = SELF

    def __init__(self, dial: Callable[[str, str], Awaitable[Any]]) -> None:
        self.new_stream = self.new_stream_eager = dial


@pytest.mark.parametrize(("listener", "code", "words"), [
    (answer(FULL), "overloaded", "no room"),  # a refusal further down, passed on as it is
    (answer(BAD_OPEN), "malformed", "refused the session: route skips layers"),
    (answer(Opened("another-session")), "unreachable", "another opening"),
    (raw(b"\x01\xc1"), "unreachable", "malformed msgpack"),
    (hang_up, "unreachable", "without an answer"),
    # a refusal that does not check is the next hop's own, whoever it claims wrote it
    (answer(dataclasses.replace(FULL, message="tampered")), "bad_signature", "does not check"),
    (answer(signed(dataclasses.replace(FULL, session="s" * 20))), "malformed",
     "for session"),
    (answer(signed(dataclasses.replace(FULL, by=SELF))), "malformed", "not a hop after"),
], ids=["failed", "error", "wrong session", "garbage", "hang up", "forged", "replayed",
        "said by us"])
async def test_a_hop_reports_what_its_next_hop_did_as_a_refusal(
        nursery: trio.Nursery, listener: Listener, code: str, words: str) -> None:
    """ShardServer._handle turns Refused into a FAILED upstream; no PeerError escapes
    to be counted against the upstream peer. A refusal from further down goes on as
    it came (signed by its author); anything else names the next hop."""
    from peerd.inference.swarm.server import Refused, ShardServer

    far = Scripted(nursery, listener)
    server = ShardServer(FakeNode(far.dial), block=None,  # type: ignore[arg-type]
                         compute=Turns(quantum=1))  # (its own block would size them)
    req = dataclasses.replace(OPEN, route=(Hop(SELF, 0, 2), Hop(NEXT, 2, 4)))
    with pytest.raises(Refused) as err:
        await server._connect_downstream(req)
    assert err.value.code == code and words in str(err.value)
    if code == "overloaded":
        assert (err.value.relayed, err.value.culprit) == (FULL, None)
    else:
        assert (err.value.relayed, err.value.culprit) == (None, NEXT)
    assert far.dialled == [(NEXT, SHARD.id)]


async def test_the_last_hop_opens_the_return_stream_to_the_entry(nursery: trio.Nursery) -> None:
    from peerd.inference.swarm.server import ShardServer

    far = Scripted(nursery, answer(Opened(SESSION)))
    server = ShardServer(FakeNode(far.dial), block=None,  # type: ignore[arg-type]
                         compute=Turns(quantum=1))  # (its own block would size them)
    req = dataclasses.replace(OPEN, route=(Hop(FIRST, 0, 2), Hop(SELF, 2, 4)), hop=1,
                              entry_peer=PEER)
    stream = await server._connect_downstream(req)
    assert far.dialled == [(PEER, SHARD_RETURN.id)]
    assert decode(far.openings[0], Opened) == Opened(SESSION)
    await stream.close()


@pytest.mark.parametrize(("listener", "culprit", "witness", "code"), [
    (answer(FULL), NEXT, None, "overloaded"),  # FAILED names the peer at fault: its author
    # ...or a hop beside its author, as a witness: one of the two lies
    (answer(signed(dataclasses.replace(FULL, peer_id=FIRST, code="malformed"))), FIRST, NEXT,
     "malformed"),
    # anyone else named is its author's fault, and a code nobody declared is "other"
    (answer(signed(dataclasses.replace(FULL, peer_id=SELF, code="x" * 500))), NEXT, None,
     "other"),
    # one that does not check is the first hop's (each hop relays only what checks)
    (answer(dataclasses.replace(FULL, peer_id=FIRST)), FIRST, None, "bad_signature"),
    (answer(signed(dataclasses.replace(FULL, by=SELF))), FIRST, None, "malformed"),
    (answer(BAD_OPEN), FIRST, None, "malformed"),
    (answer(Opened("another-session")), FIRST, None, "unreachable"),
    (raw(b"\x01\xc1"), FIRST, None, "unreachable"),
    (hang_up, FIRST, None, "unreachable"),
], ids=["failed", "failed against a neighbour", "failed off the route", "forged",
        "said off the route", "error", "wrong session", "garbage", "hang up"])
async def test_the_entry_blames_the_first_hop_or_whom_a_failed_names(
        nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, listener: Listener,
        culprit: str, witness: str | None, code: str) -> None:
    from peerd.inference.swarm import pipeline as module
    from peerd.inference.swarm.pipeline import Pipeline, PipelineFailure
    from peerd.inference.swarm.routing import Route, Span

    monkeypatch.setattr(module.secrets, "token_hex", lambda n: SESSION)  # (FULL's)
    far = Scripted(nursery, listener)
    pipeline = Pipeline(FakeNode(far.dial), "m")  # type: ignore[arg-type]
    with pytest.raises(PipelineFailure) as err:
        await pipeline.open(Route((Span(FIRST, 0, 2, 0.0), Span(NEXT, 2, 4, 0.0)), 0.0), 64)
    assert (err.value.culprit, err.value.witness, err.value.code) == (culprit, witness, code)
    assert far.dialled == [(FIRST, SHARD.id)] and not pipeline.sessions
