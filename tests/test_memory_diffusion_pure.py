"""The memory's diffusion rules without a network: the wire checks of the announcement
and of /peerd/memory/1.0.0, the token bucket, and the per-author record (fake clock)."""

from __future__ import annotations

import dataclasses

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from peerd.memory.item import sign_item
from peerd.memory.standing import AuthorRecord, TokenBucket
from protocols.codec import decode, encode, packb
from protocols.errors import WireError
from protocols.memory import (
    MAX_ANNOUNCE_BYTES,
    MAX_IDS,
    MAX_K,
    MAX_QUERY_CHARS,
    MAX_TEXT_CHARS,
    MEMORY,
    ItemAnnounce,
    MemoryReply,
    MemoryRequest,
)

ID_A = "a" * 64
KEY = create_new_key_pair()
AUTHOR = str(ID.from_pubkey(KEY.public_key))


def announce(**fields: object) -> ItemAnnounce:
    base = ItemAnnounce(item_id=ID_A, domain="arithmetic", author=AUTHOR, utility=0.25,
                        created=1.7e9)
    return dataclasses.replace(base, **fields)


# ---- the announcement ------------------------------------------------------------------


def test_an_announcement_is_small_and_checks() -> None:
    good = announce()
    good.check()
    assert len(encode(good)) < MAX_ANNOUNCE_BYTES // 2
    bad = [announce(item_id="A" * 64), announce(item_id="ab"), announce(domain="Arith"),
           announce(author=""), announce(author="x" * 129), announce(utility=float("nan")),
           announce(utility=1e9), announce(created=-1.0), announce(created=float("inf"))]
    for msg in bad:
        with pytest.raises(WireError):
            msg.check()


def test_an_announcement_decodes_tolerantly() -> None:
    """A long-lived record: a newer peer's extra field or version is not an error."""
    wire = announce().to_wire()
    wire["hash_alg"] = "sha256"
    wire["v"] = 2
    assert decode(packb(wire), ItemAnnounce) == announce()
    wire = announce().to_wire()
    del wire["utility"]
    with pytest.raises(WireError):
        decode(packb(wire), ItemAnnounce)


# ---- the request and the reply ---------------------------------------------------------


def test_a_request_is_a_fetch_or_a_search() -> None:
    MemoryRequest.fetching((ID_A, "b" * 64)).check()
    MemoryRequest.searching("what is 2 + 3?", 4).check()
    MemoryRequest.searching("what is 2 + 3?", MAX_K, "arithmetic").check()
    bad = [
        MemoryRequest(ids=(ID_A,), query="also this", k=0, domain=""),
        MemoryRequest(ids=(ID_A,), query="", k=3, domain=""),
        MemoryRequest(ids=(), query="", k=3, domain=""),
        MemoryRequest.searching("   ", 3),
        MemoryRequest.searching("q", 0),
        MemoryRequest.searching("q", MAX_K + 1),
        MemoryRequest.searching("q", 3, "Not A Domain"),
        MemoryRequest.fetching(("not-hex",)),
        MemoryRequest.fetching((ID_A, ID_A)),
    ]
    for req in bad:
        with pytest.raises(WireError) as info:
            req.check()
        assert info.value.reason == "malformed", req
    for req in [MemoryRequest.fetching(tuple(f"{i:064x}" for i in range(MAX_IDS + 1))),
                MemoryRequest.searching("q" * (MAX_QUERY_CHARS + 1), 3)]:
        with pytest.raises(WireError) as info:
            req.check()
        assert info.value.reason == "oversized"


def test_a_request_decodes_strictly() -> None:
    wire = MemoryRequest.fetching((ID_A,)).to_wire()
    wire["extra"] = 1
    with pytest.raises(WireError, match="unknown fields"):
        decode(packb(wire), MemoryRequest)


def test_the_largest_request_and_reply_fit_their_frames() -> None:
    fetch = MemoryRequest.fetching(tuple(f"{i:064x}" for i in range(MAX_IDS)))
    search = MemoryRequest.searching("\U0001f600" * MAX_QUERY_CHARS, MAX_K, "a" * 32)
    for req in (fetch, search):
        req.check()
        assert len(encode(req)) <= MEMORY.max_request_bytes
    text = "\U0001f600" * MAX_TEXT_CHARS  # 4 bytes a character in UTF-8
    _, signed = sign_item(KEY.private_key, AUTHOR, text, "a" * 32, "insight",
                          origin="c" * 64, parent="d" * 64)
    signed.check()
    reply = MemoryReply(items=(signed,) * MAX_K, similarities=(-1.0,) * MAX_K)
    reply.check()
    assert len(encode(reply)) <= MEMORY.max_response_bytes


def test_a_reply_checks_its_items_and_similarities() -> None:
    _, signed = sign_item(KEY.private_key, AUTHOR, "2 + 3 = 5", "arithmetic", "example")
    MemoryReply(items=(signed,), similarities=()).check()
    MemoryReply(items=(signed,), similarities=(1.0004,)).check()  # a float index's rounding
    bad = [MemoryReply(items=(signed,), similarities=(0.5, 0.4)),
           MemoryReply(items=(signed,), similarities=(float("nan"),)),
           MemoryReply(items=(signed,), similarities=(1.5,)),
           MemoryReply(items=(dataclasses.replace(signed, sig=b"x" * 200),), similarities=()),
           MemoryReply(items=(signed,) * (MAX_K + 1), similarities=())]
    for reply in bad:
        with pytest.raises(WireError):
            reply.check()


# ---- the token bucket ------------------------------------------------------------------


def test_a_token_bucket_takes_a_burst_then_its_rate() -> None:
    bucket = TokenBucket(rate=0.5, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_s(0.0) == pytest.approx(2.0)
    assert not bucket.take(1.0)
    assert bucket.take(2.0)
    assert not bucket.take(2.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]  # capped
    assert bucket.take(101.0) is False and bucket.take(102.0) is True
    assert not bucket.take(50.0)  # a clock that steps back gives nothing


# ---- the author record -----------------------------------------------------------------


def test_an_author_is_blocked_after_three_refusals_making_two_thirds() -> None:
    record = AuthorRecord(backoff_s=100.0, half_life_s=1000.0)
    assert [record.report("r", False, t) for t in (0.0, 1.0)] == [False, False]
    assert not record.blocked("r", 2.0)
    assert record.report("r", False, 2.0) is True  # the third refusal: back-off starts
    assert record.blocked("r", 50.0) and record.blocked_authors(50.0) == ["r"]
    assert record.report("r", False, 60.0) is False  # already blocked: extended, not new
    assert record.blocked("r", 159.0)
    assert not record.blocked("r", 161.0)  # the back-off ends
    assert record.report("r", False, 162.0) is True  # one more failure: blocked again
    assert not record.blocked("someone else", 162.0)


def test_an_author_with_enough_admitted_items_is_not_blocked() -> None:
    record = AuthorRecord()
    for admitted in (True, True, False, False, False):  # 3 of 5 refused: 0.6 < 2/3
        record.report("mixed", admitted, 0.0)
    assert not record.blocked("mixed", 0.0)
    assert record.report("mixed", False, 0.0) is True  # 4 of 6
    standing = record.standing("mixed", 0.0)
    assert standing is not None and (standing.admitted, standing.refused) == (2, 4)


def test_old_refusals_fade_by_half_lives() -> None:
    record = AuthorRecord(half_life_s=10.0)
    record.report("r", False, 0.0)
    record.report("r", False, 9.0)  # the same period: both count whole
    standing = record.standing("r", 25.0)  # two half-lives on: 2 -> 0.5
    assert standing is not None and standing.refused == pytest.approx(0.5)
    assert standing.since == 20.0
    record.report("r", False, 25.0)
    record.report("r", False, 26.0)  # 2.5 refusals: not yet
    assert not record.blocked("r", 26.0)
    assert record.report("r", False, 27.0) is True  # 3.5


def test_the_record_forgets_the_least_recently_reported_author_past_its_cap() -> None:
    record = AuthorRecord(max_authors=2, backoff_s=100.0)
    for _ in range(3):
        record.report("a", False, 0.0)
    record.report("b", True, 1.0)
    record.report("a", False, 2.0)  # "a" is the most recent now
    record.report("c", True, 3.0)  # evicts "b"
    assert record.standing("b", 3.0) is None
    assert record.blocked("a", 3.0)
