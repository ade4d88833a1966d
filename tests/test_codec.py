"""Wire messages: round trips, canonical bytes, strict requests, tolerant records."""

from __future__ import annotations

import dataclasses
import math

import msgpack
import pytest

from protocols.codec import Message, decode, encode, packb, unpackb
from protocols.errors import PeerError, UnsupportedVersion, WireError, WrongMessageType
from protocols.ledger import (
    Hardware,
    LedgerEntry,
    Load,
    ModelServed,
    SignedEntry,
    SyncRequest,
    SyncResponse,
)
from protocols.shard import (
    MAX_COMPUTE_MS,
    MAX_ROUTE_HOPS,
    MAX_ROWS,
    MAX_TENSOR_RANK,
    MAX_TREE_POSITIONS,
    SHARD,
    STEP_S_PER_POSITION,
    Close,
    Failed,
    Forward,
    Hop,
    HopTiming,
    Open,
    Opened,
    Result,
    WireTensor,
    step_deadline_s,
)
from protocols.shard_progress import Progress, ProgressReply
from protocols.spec import ErrorReply

PEER = "12D3KooWExamplePeerIdThatIsNotCheckedByTheCodec"

FULL_ENTRY = LedgerEntry(
    peer_id=PEER,
    seq=7,
    timestamp=1_700_000_000.25,
    ttl_s=30.0,
    name="alpha",
    addrs=("/ip4/127.0.0.1/tcp/4001", "/ip4/10.0.0.2/tcp/4001"),
    hardware=Hardware(device="cuda", memory_bytes=80 << 30, cpu_count=16,
                      accelerator="NVIDIA H100 80GB HBM3"),
    models=(ModelServed(model_id="llama-3-8b", layer_start=0, layer_end=16, dtype="bf16",
                        tokens_per_s=41.5),
            ModelServed(model_id="llama-3-8b", layer_start=16, layer_end=32, dtype="bf16")),
    skills=("summarise", "translate"),
    load=Load(sessions=2, queue=1, cpu_percent=12.5),
    reputation={"12D3KooWOther": 0.75, "12D3KooWAnother": 1.0},
    software="peerd/0.1.0",
)
SIGNED = SignedEntry(body=encode(FULL_ENTRY), sig=b"\x01" * 64)

# Every top-level message declared in protocols/ (plus the shared error reply).
MESSAGES: list[Message] = [
    FULL_ENTRY,
    LedgerEntry(peer_id=PEER, seq=0, timestamp=0.0, ttl_s=1.0),  # defaults only
    SIGNED,
    SyncRequest(),
    SyncResponse(entries=()),
    SyncResponse(entries=(SIGNED, SignedEntry(body=b"", sig=b""))),
    ErrorReply(code="malformed", message="bad frame"),
    # the shard session (protocols.shard.SHARD, SHARD_RETURN)
    Open(session="s" * 16, model_id="m", route=(Hop(PEER, 0, 2), Hop(PEER, 2, 4)), hop=1,
         entry_peer=PEER, max_length=64, dtype="float16"),
    Opened(session="s" * 16),
    Forward(session="s" * 16, step=2, start_pos=3, keep=3,
            hidden=WireTensor("float16", (1, 2, 1), b"\0" * 4),
            timings=(HopTiming(PEER, 1.5),), tree=(-1, 0)),
    Result(session="s" * 16, step=2, hidden=WireTensor("float32", (1, 1, 1), b"\0" * 4),
           timings=(HopTiming(PEER, 1.5), HopTiming(PEER, 0.25))),
    Failed(session="s" * 16, step=2, peer_id=PEER, code="unreachable", message="gone",
           by=PEER, sig=b"\1" * 64),
    Close(session="s" * 16),
    # asking a hop how far a session got (protocols.shard_progress.SHARD_PROGRESS)
    Progress(session="s" * 16),
    ProgressReply(session="s" * 16, received=3, passed=2, passing=True),
    ProgressReply(session="s" * 16, received=0, passed=-1, passing=False, failed=Failed(
        session="s" * 16, step=-1, peer_id=PEER, code="overloaded", message="full", by=PEER,
        sig=b"\1" * 64)),
]


def wire_map(msg: Message, **changes: object) -> dict[str, object]:
    obj = msg.to_wire()
    obj.update(changes)
    return obj


@pytest.mark.parametrize("msg", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(msg: Message) -> None:
    data = encode(msg)
    assert decode(data, type(msg)) == msg
    assert encode(decode(data, type(msg))) == data


def test_nested_records_round_trip_as_their_types() -> None:
    back = decode(encode(FULL_ENTRY), LedgerEntry)
    assert isinstance(back.hardware, Hardware)
    assert all(isinstance(m, ModelServed) for m in back.models)
    assert isinstance(back.models, tuple) and isinstance(back.skills, tuple)
    assert isinstance(back.load, Load)


def test_decode_picks_among_expected_types() -> None:
    assert decode(encode(ErrorReply("busy", "later")), SyncResponse, ErrorReply) == \
        ErrorReply("busy", "later")


# ---- canonical encoding ---------------------------------------------------------


def test_same_value_same_bytes() -> None:
    names = [f.name for f in dataclasses.fields(LedgerEntry)]
    twin = LedgerEntry(**{n: getattr(FULL_ENTRY, n) for n in reversed(names)})
    assert twin == FULL_ENTRY
    assert encode(twin) == encode(FULL_ENTRY)


def test_dict_key_order_is_irrelevant() -> None:
    a = FULL_ENTRY
    b = dataclasses.replace(a, reputation=dict(reversed(list(a.reputation.items()))))
    assert list(a.reputation) != list(b.reputation)
    assert encode(a) == encode(b)
    assert packb({"b": 1, "a": {"y": 2, "x": 3}}) == packb({"a": {"x": 3, "y": 2}, "b": 1})


def test_map_keys_are_sorted_on_the_wire() -> None:
    raw = msgpack.unpackb(encode(FULL_ENTRY), raw=False)
    assert list(raw) == sorted(raw)
    assert list(raw["hardware"]) == sorted(raw["hardware"])


def test_bytes_stay_bytes() -> None:
    assert isinstance(unpackb(encode(SIGNED))["body"], bytes)


# ---- strict requests ------------------------------------------------------------


def test_request_refuses_unknown_fields() -> None:
    with pytest.raises(WireError, match="unknown fields"):
        SyncRequest.from_wire(wire_map(SyncRequest(), extra=1))
    with pytest.raises(WireError, match="unknown fields"):
        decode(packb(wire_map(SIGNED, note="hi")), SignedEntry)


def test_errors_quote_a_peers_values_briefly() -> None:
    """The errors echo what the peer sent, and they are logged and sent back: a 1 MB
    message type or a thousand unknown field names made a line of megabytes."""
    huge = "x" * 1_000_000
    for raw in (packb({"t": huge, "v": 1}), packb({**wire_map(SIGNED), "t": huge})):
        with pytest.raises(WrongMessageType) as err:
            decode(raw, SignedEntry)
        assert len(str(err.value)) < 200
    with pytest.raises(WireError) as err2:
        decode(packb({**wire_map(SIGNED), **{f"f{i}" + "y" * 1000: 1 for i in range(1000)}}),
               SignedEntry)
    assert "unknown fields" in str(err2.value) and len(str(err2.value)) < 400
    with pytest.raises(WrongMessageType) as err3:
        SignedEntry.from_wire({**wire_map(SIGNED), "t": huge})
    assert len(str(err3.value)) < 200


def test_request_refuses_missing_fields() -> None:
    obj = wire_map(SIGNED)
    del obj["sig"]
    with pytest.raises(WireError, match="missing field 'sig'"):
        decode(packb(obj), SignedEntry)


@pytest.mark.parametrize("version", [0, 2, 99])
def test_request_refuses_another_version(version: int) -> None:
    with pytest.raises(UnsupportedVersion) as err:
        decode(packb(wire_map(SyncRequest(), v=version)), SyncRequest)
    assert err.value.reason == "unsupported_version"


@pytest.mark.parametrize("version", [None, "1", 1.0, True])
def test_missing_or_non_integer_version_is_refused(version: object) -> None:
    obj = wire_map(SyncRequest(), v=version)
    if version is None:
        del obj["v"]
    with pytest.raises(WireError, match="version"):
        decode(packb(obj), SyncRequest)


@pytest.mark.parametrize(("field", "value"), [
    ("body", "text, not bytes"),
    ("body", 5),
    ("sig", None),
    ("sig", [1, 2]),
])
def test_request_refuses_wrong_field_types(field: str, value: object) -> None:
    with pytest.raises(WireError) as err:
        decode(packb(wire_map(SIGNED, **{field: value})), SignedEntry)
    assert err.value.reason == "malformed"


@pytest.mark.parametrize(("field", "value"), [
    ("seq", "7"),
    ("seq", True),  # a bool is not an integer on our wire
    ("seq", 7.0),
    ("timestamp", "now"),
    ("ttl_s", None),
    ("addrs", "/ip4/1.2.3.4/tcp/1"),  # a string is not a list of strings
    ("addrs", [1, 2]),
    ("hardware", [1]),
    ("hardware", {"memory_bytes": "lots"}),
    ("models", [{"model_id": "m"}]),  # nested record missing required fields
    ("reputation", {"peer": "high"}),
    ("reputation", [1]),
])
def test_record_fields_are_type_checked(field: str, value: object) -> None:
    with pytest.raises(WireError):
        decode(packb(wire_map(FULL_ENTRY, **{field: value})), LedgerEntry)


def test_int_is_accepted_for_float_fields() -> None:
    entry = decode(packb(wire_map(FULL_ENTRY, timestamp=1_700_000_000, ttl_s=30)), LedgerEntry)
    assert isinstance(entry.timestamp, float) and entry.timestamp == 1_700_000_000.0
    assert isinstance(entry.ttl_s, float)


def test_sync_response_checks_nested_entries_strictly() -> None:
    obj = wire_map(SyncResponse(entries=(SIGNED,)))
    obj["entries"][0]["surprise"] = 1  # type: ignore[index]
    with pytest.raises(WireError, match="unknown fields"):
        decode(packb(obj), SyncResponse)


# ---- tolerant records -----------------------------------------------------------


def test_record_ignores_unknown_fields() -> None:
    obj = wire_map(FULL_ENTRY, gpu_temp_c=71, future={"nested": [1, 2]})
    obj["hardware"]["npu"] = "x"  # type: ignore[index]
    assert decode(packb(obj), LedgerEntry) == FULL_ENTRY


def test_record_accepts_a_higher_version() -> None:
    assert decode(packb(wire_map(FULL_ENTRY, v=LedgerEntry.VERSION + 1, extra=1)),
                  LedgerEntry) == FULL_ENTRY


def test_record_refuses_a_lower_version() -> None:
    with pytest.raises(UnsupportedVersion):
        decode(packb(wire_map(FULL_ENTRY, v=0)), LedgerEntry)


def test_record_still_needs_its_required_fields() -> None:
    obj = wire_map(FULL_ENTRY)
    del obj["seq"]
    with pytest.raises(WireError, match="missing field 'seq'"):
        decode(packb(obj), LedgerEntry)


def test_record_defaults_fill_absent_optional_fields() -> None:
    minimal = {"t": LedgerEntry.KIND, "v": 1, "peer_id": PEER, "seq": 1, "timestamp": 1.0,
               "ttl_s": 2.0}
    entry = decode(packb(minimal), LedgerEntry)
    assert entry.hardware == Hardware() and entry.models == () and entry.reputation == {}


# ---- wrong type, garbage --------------------------------------------------------


def test_decode_with_the_wrong_type_raises_wrong_message_type() -> None:
    with pytest.raises(WrongMessageType) as err:
        decode(encode(SyncResponse(entries=())), SyncRequest)
    assert err.value.reason == "wrong_type"
    with pytest.raises(WrongMessageType):
        SyncRequest.from_wire(SyncResponse(entries=()).to_wire())
    with pytest.raises(WrongMessageType):
        decode(packb({"no": "type"}), SyncRequest)


@pytest.mark.parametrize("data", [
    b"",
    b"\xc1",  # a byte msgpack never uses
    b"\x92\x01",  # an array announced with 2 items, holding 1
    b"\x81\xa1t",  # a map cut short
    b"\x01\x02",  # trailing data after a complete object
    bytes(range(256)),
])
def test_malformed_msgpack_is_a_wire_error(data: bytes) -> None:
    with pytest.raises(WireError) as err:
        decode(data, SyncRequest)
    assert err.value.reason == "malformed"


@pytest.mark.parametrize("item", [b"\x80", b"\x90", b"\x91\x90", b"\x81\x00\x90"],
                         ids=["maps", "arrays", "nested arrays", "maps of arrays"])
def test_a_frame_of_tiny_containers_is_refused_before_they_are_all_built(item: bytes) -> None:
    n = 2**20 // len(item)
    flood = b"\xdd" + n.to_bytes(4, "big") + item * n
    with pytest.raises(WireError, match="maps and arrays") as err:
        unpackb(flood)
    assert err.value.reason == "malformed"


def test_frames_as_dense_as_honest_ones_decode() -> None:
    # a tool's JSON schema is the densest honest data: a map every 14 bytes or so
    schema = {"type": "object", "properties": {f"p{i}": {"type": "integer"}
                                               for i in range(5000)}}
    assert unpackb(packb(schema)) == schema
    assert unpackb(packb([[]] * 1000)) == [[]] * 1000  # small frames: a floor of containers


@pytest.mark.parametrize("obj", [[1, 2], 3, "t", None, b"bytes"])
def test_non_map_message_is_a_wire_error(obj: object) -> None:
    with pytest.raises(WireError, match="map"):
        decode(packb(obj), SyncRequest)


def test_wire_errors_are_peer_errors() -> None:
    # Handlers count PeerError against the peer (STYLE.md habit 5).
    assert issubclass(WireError, PeerError)
    assert issubclass(WrongMessageType, WireError)
    assert issubclass(UnsupportedVersion, WireError)


def test_an_optional_field_at_its_default_stays_off_the_wire() -> None:
    """A chain's FORWARD encodes as it did before trees existed, so a peer that does not
    know `tree` (strict decoding) still serves it; a tree's FORWARD carries it."""
    hidden = WireTensor(dtype="float32", shape=(1, 1, 2), data=b"\0" * 8)
    chain = Forward(session="s", step=1, start_pos=0, keep=-1, hidden=hidden)
    assert "tree" not in unpackb(encode(chain))
    assert decode(encode(chain), Forward) == chain
    tree = dataclasses.replace(chain, tree=(-1,))
    assert unpackb(encode(tree))["tree"] == [-1]
    assert decode(encode(tree), Forward) == tree


def test_a_shard_steps_deadline_grows_with_its_positions() -> None:
    # a decode step waits the step timeout; a long prefill on a slow CPU, minutes more
    assert step_deadline_s(1) == pytest.approx(SHARD.step_timeout_s + STEP_S_PER_POSITION)
    assert step_deadline_s(4000) == pytest.approx(SHARD.step_timeout_s + 200.0)
    assert step_deadline_s(0) == SHARD.step_timeout_s


LISTS_PAST_THEIR_COUNT = {
    # a tree is a draft (MAX_TREE_POSITIONS), a source a row of the session each
    # (MAX_ROWS), timings one a hop, a route its hops (MAX_ROUTE_HOPS)
    "tree": (Forward, "tree", MAX_TREE_POSITIONS),
    "source": (Forward, "source", MAX_ROWS),
    "forward timings": (Forward, "timings", MAX_ROUTE_HOPS),
    "result timings": (Result, "timings", MAX_ROUTE_HOPS),
    "route": (Open, "route", MAX_ROUTE_HOPS),
}


def _shard_message(cls: type[Message], field: str, items: int) -> bytes:
    """A shard message whose list `field` holds `items` cheap items."""
    hidden = WireTensor(dtype="float32", shape=(1, 1, 2), data=b"\0" * 8)
    hop, timing = Hop(PEER, 0, 1), HopTiming(PEER, 1.0)
    base: Message
    if cls is Open:
        base = Open(session="s" * 16, model_id="m", route=(hop,), hop=0, entry_peer=PEER,
                    max_length=8, dtype="float32")
    elif cls is Result:
        base = Result(session="s", step=1, hidden=hidden, timings=(timing,))
    else:
        base = Forward(session="s", step=1, start_pos=0, keep=-1, hidden=hidden)
    item = {"route": hop.to_wire(), "timings": timing.to_wire()}.get(field, 0)
    return packb({**base.to_wire(), field: [item] * items})


@pytest.mark.parametrize("case", list(LISTS_PAST_THEIR_COUNT))
def test_a_shard_list_past_its_count_is_refused_before_any_item_is_read(
        case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A FORWARD whose tree was 2M zero bytes took 2.6 s to type-check, item by item,
    before the tree's own rule refused it (the 32 MiB frame allows ~44 s); every list
    a shard message carries has a count no honest peer exceeds, checked first."""
    import protocols.codec as codec

    cls, field, most = LISTS_PAST_THEIR_COUNT[case]
    at_bound: Message = decode(_shard_message(cls, field, most), cls)
    assert len(getattr(at_bound, field)) == most  # at the bound: taken
    checked: list[str] = []
    real = codec._check

    def counting(tp: object, value: object, where: str) -> object:
        checked.append(where)
        return real(tp, value, where)

    monkeypatch.setattr(codec, "_check", counting)
    with pytest.raises(WireError, match=rf"{cls.__name__}\.{field}: {most + 1} items"):
        decode(_shard_message(cls, field, most + 1), cls)
    assert not checked  # refused before any field, let alone an item, was read


def test_a_tensor_of_too_many_dimensions_is_refused_before_they_are_read() -> None:
    raw = packb({"t": Result.KIND, "v": 1, "session": "s", "step": 1, "timings": [],
                 "hidden": {"dtype": "float32", "shape": [0] * (MAX_TENSOR_RANK + 1),
                            "data": b""}})
    with pytest.raises(WireError, match=rf"WireTensor\.shape: {MAX_TENSOR_RANK + 1} items"):
        decode(raw, Result)


@pytest.mark.parametrize("ms", [math.nan, math.inf, -math.inf, -1.0, MAX_COMPUTE_MS * 2])
def test_a_hop_timing_no_honest_hop_measures_is_malformed(ms: float) -> None:
    with pytest.raises(WireError, match="compute"):
        HopTiming(PEER, ms).check()
    HopTiming(PEER, 0.0).check()
    HopTiming(PEER, MAX_COMPUTE_MS).check()
    with pytest.raises(WireError, match="peer id"):
        HopTiming("x" * 1000, 1.0).check()
