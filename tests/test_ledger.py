"""The capability ledger rules and its SQLite store, without a network.

The clock is passed explicitly (`now`), so every time rule is tested exactly.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import stat
from pathlib import Path
from typing import Any

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.secp256k1 import create_new_key_pair as new_secp256k1_key_pair
from libp2p.peer.id import ID

from peerd.ledger.book import (
    Accepted,
    Duplicate,
    Ledger,
    LedgerReject,
    sign_entry,
    verify_entry,
)
from peerd.ledger.store import LedgerStore, LedgerStoreError
from protocols.codec import encode
from protocols.errors import PeerError
from protocols.ledger import (
    MAX_CLOCK_SKEW_S,
    MAX_ENTRY_BYTES,
    MAX_TTL_S,
    MIN_TTL_S,
    Hardware,
    LedgerEntry,
    Load,
    ModelServed,
    SignedEntry,
)

T0 = 1_700_000_000.0
TTL = 30.0


def pid(kp: KeyPair) -> str:
    return str(ID.from_pubkey(kp.public_key))


def entry(kp: KeyPair, seq: int = 1, *, ts: float = T0, ttl: float = TTL,
          **fields: object) -> LedgerEntry:
    return LedgerEntry(peer_id=pid(kp), seq=seq, timestamp=ts, ttl_s=ttl, **fields)  # type: ignore[arg-type]


def signed(kp: KeyPair, seq: int = 1, **kw: object) -> SignedEntry:
    return sign_entry(entry(kp, seq, **kw), kp.private_key)  # type: ignore[arg-type]


def reason_of(ledger: Ledger, s: SignedEntry, now: float = T0) -> str:
    with pytest.raises(LedgerReject) as err:
        ledger.offer(s, now)
    return str(err.value.reason)


@pytest.fixture
def alice() -> KeyPair:
    return create_new_key_pair()


@pytest.fixture
def bob() -> KeyPair:
    return create_new_key_pair()


# ---- signatures -----------------------------------------------------------------


def test_sign_and_verify_with_real_ed25519_keys(alice: KeyPair) -> None:
    s = signed(alice, name="alice", skills=("code",))
    assert s.body == encode(entry(alice, name="alice", skills=("code",)))
    assert alice.public_key.verify(s.body, s.sig)
    got = verify_entry(s)
    assert got.peer_id == pid(alice) and got.skills == ("code",)


def test_accepted_entry_is_held(alice: KeyPair) -> None:
    ledger = Ledger()
    s = signed(alice)
    outcome = ledger.offer(s, T0)
    assert isinstance(outcome, Accepted) and outcome.previous is None
    assert pid(alice) in ledger and len(ledger) == 1
    assert ledger.get(pid(alice)) == entry(alice)
    assert ledger.signed(pid(alice)) == s
    assert ledger.received_at(pid(alice)) == T0
    assert ledger.signed_entries() == [s]


def test_forged_signature_is_refused(alice: KeyPair, bob: KeyPair) -> None:
    # Bob signs an entry that claims to be Alice's.
    forged = sign_entry(entry(alice, seq=99), bob.private_key)
    ledger = Ledger()
    assert reason_of(ledger, forged) == "bad_signature"
    assert pid(alice) not in ledger


def test_tampered_body_is_refused(alice: KeyPair) -> None:
    good = signed(alice, name="alice")
    tampered = SignedEntry(body=encode(entry(alice, name="mallory")), sig=good.sig)
    assert reason_of(Ledger(), tampered) == "bad_signature"
    flipped = bytearray(good.body)
    flipped[-1] ^= 0x01
    assert reason_of(Ledger(), SignedEntry(body=bytes(flipped), sig=good.sig)) in (
        "bad_signature", "malformed")


@pytest.mark.parametrize("sig", [b"", b"\0" * 64, b"short", b"\xff" * 200])
def test_garbage_signature_is_refused(alice: KeyPair, sig: bytes) -> None:
    assert reason_of(Ledger(), SignedEntry(body=signed(alice).body, sig=sig)) == "bad_signature"


def test_body_that_is_not_an_entry_is_malformed(alice: KeyPair) -> None:
    for body in (b"\xc1", encode(SignedEntry(body=b"", sig=b""))):
        s = SignedEntry(body=body, sig=alice.private_key.sign(body))
        assert reason_of(Ledger(), s) in ("malformed", "wrong_type")


def test_oversized_body_is_refused_before_decoding(alice: KeyPair) -> None:
    body = b"\0" * (MAX_ENTRY_BYTES + 1)
    assert reason_of(Ledger(), SignedEntry(body=body, sig=b"")) == "oversized"
    with pytest.raises(ValueError):
        sign_entry(entry(alice, name="x" * MAX_ENTRY_BYTES), alice.private_key)


@pytest.mark.parametrize("peer_id", [
    "not-a-peer-id",
    "",
    # A well-formed peer id whose multihash is a sha256 digest (as for RSA keys):
    # it names a key but does not embed it, so the signature cannot be checked.
    "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
])
def test_peer_id_without_an_embedded_key_is_refused(alice: KeyPair, peer_id: str) -> None:
    e = dataclasses.replace(entry(alice), peer_id=peer_id)
    s = SignedEntry(body=encode(e), sig=alice.private_key.sign(encode(e)))
    assert reason_of(Ledger(), s) == "bad_peer_id"


def test_entry_of_another_key_type_verifies_with_its_own_key() -> None:
    # secp256k1 public keys are small enough to be embedded in the peer id too.
    kp = new_secp256k1_key_pair()
    assert isinstance(Ledger().offer(signed(kp), T0), Accepted)


@pytest.mark.parametrize("ttl", [0.0, MIN_TTL_S / 2, MAX_TTL_S * 2, -1.0, float("inf"),
                                 float("nan")])
def test_ttl_out_of_range_is_malformed(alice: KeyPair, ttl: float) -> None:
    assert reason_of(Ledger(), signed(alice, ttl=ttl)) == "malformed"


@pytest.mark.parametrize("ts", [float("nan"), float("-inf")])
def test_non_finite_timestamp_is_malformed(alice: KeyPair, ts: float) -> None:
    assert reason_of(Ledger(), signed(alice, ts=ts)) == "malformed"


def test_negative_seq_is_malformed(alice: KeyPair) -> None:
    assert reason_of(Ledger(), signed(alice, seq=-1)) == "malformed"


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("fields", [
    {"reputation": {"peer": NAN}}, {"reputation": {"peer": 1.5}},
    {"reputation": {"peer": -INF}}, {"load": Load(cpu_percent=INF)},
    {"load": Load(cpu_percent=NAN)}, {"load": Load(queue=-1)},
    {"hardware": Hardware(memory_bytes=-5)},
    {"models": (ModelServed("m", 0, 4, "float32", tokens_per_s=NAN),)},
    {"models": (ModelServed("m", -1, 4, "float32"),)}, {"weights_http_port": -1},
    # past SQLite's INTEGER: the store's write failed, which ended the gossip service
    # and the daemon, on every peer that heard it
    {"seq": 2**64 - 1}, {"hardware": Hardware(memory_bytes=2**63)},
    {"models": (ModelServed("m", 0, 10**9, "float32", num_layers=10**9),)},
    {"models": (ModelServed("m", 4, 4, "float32"),)},
    {"models": (ModelServed("m", 0, 40, "float32", num_layers=30),)},
    {"models": tuple(ModelServed(f"m{i}", 0, 4, "float32") for i in range(9))},
    {"addrs": tuple(f"/ip4/10.0.0.{i}/tcp/1" for i in range(33))},
    {"addrs": ("/dns4/" + "a" * 300 + "/tcp/1",)}, {"skills": ("s",) * 65},
    {"reputation": {f"p{i}": 0.5 for i in range(257)}}, {"reputation": {"p" * 129: 0.5}},
], ids=["rep-nan", "rep-1.5", "rep-inf", "cpu-inf", "cpu-nan", "queue", "memory",
        "tok-nan", "layer", "port", "seq-2**64", "memory-2**63", "layers-1e9", "empty-span",
        "span-past-model", "9-models", "33-addrs", "long-addr", "65-skills", "257-reports",
        "long-reporter"])
def test_numbers_no_honest_peer_signs_are_malformed(alice: KeyPair,
                                                     fields: dict[str, Any]) -> None:
    """A NaN in a peer's entry was held and re-served, and made every peer's GET
    /ledger a 500 (JSON has no NaN) for as long as the entry lived."""
    assert reason_of(Ledger(), signed(alice, **fields)) == "malformed"


def test_an_entry_at_every_bound_is_taken(alice: KeyPair) -> None:
    from protocols.ledger import MAX_ADDRS, MAX_LAYERS, MAX_MODELS, MAX_REPUTATION, MAX_SKILLS

    Ledger().offer(signed(
        alice, seq=2**63 - 1, addrs=tuple(f"/ip4/10.0.0.{i}/tcp/1" for i in range(MAX_ADDRS)),
        models=tuple(ModelServed(f"m{i}", 0, MAX_LAYERS, "float32", num_layers=MAX_LAYERS)
                     for i in range(MAX_MODELS)),
        skills=("s",) * MAX_SKILLS, reputation={f"p{i}": 1.0 for i in range(MAX_REPUTATION)}),
        T0)


def test_a_snapshot_past_its_count_is_refused_before_any_entry_is_read() -> None:
    """Each item of a list is type-checked in Python: half a million empty entries in a
    16 MiB snapshot held the event loop for seconds before anything counted them."""
    from protocols.codec import decode, packb
    from protocols.errors import WireError
    from protocols.ledger import MAX_SNAPSHOT_ENTRIES, SyncResponse

    raw = packb({"t": SyncResponse.KIND, "v": 1,
                 "entries": [{"t": "ledger.signed", "v": 1, "body": b"", "sig": b""}]
                 * (MAX_SNAPSHOT_ENTRIES + 1)})
    with pytest.raises(WireError, match="items"):
        decode(raw, SyncResponse)
    ok = packb({"t": SyncResponse.KIND, "v": 1,
                "entries": [{"t": "ledger.signed", "v": 1, "body": b"", "sig": b""}] * 3})
    assert len(decode(ok, SyncResponse).entries) == 3


def test_a_reputation_that_is_not_a_number_is_malformed(alice: KeyPair) -> None:
    body = encode(entry(alice)).replace(b"\xaareputation\x80",
                                        b"\xaareputation\x81\xa1p\xa1x")
    assert body != encode(entry(alice))
    s = SignedEntry(body=body, sig=alice.private_key.sign(body))
    assert reason_of(Ledger(), s) == "malformed"


def test_ledger_reject_is_a_peer_error() -> None:
    assert issubclass(LedgerReject, PeerError)


# ---- last writer wins -----------------------------------------------------------


def test_higher_seq_replaces(alice: KeyPair) -> None:
    ledger = Ledger()
    ledger.offer(signed(alice, 1, name="old"), T0)
    outcome = ledger.offer(signed(alice, 2, ts=T0 + 1, name="new"), T0 + 1)
    assert isinstance(outcome, Accepted)
    assert outcome.previous is not None and outcome.previous.name == "old"
    held = ledger.get(pid(alice))
    assert held is not None and held.name == "new" and held.seq == 2
    assert len(ledger) == 1


def test_higher_seq_wins_even_with_an_older_timestamp(alice: KeyPair) -> None:
    ledger = Ledger()
    ledger.offer(signed(alice, 5, ts=T0), T0)
    ledger.offer(signed(alice, 6, ts=T0 - 5), T0)
    assert ledger.get(pid(alice)).seq == 6  # type: ignore[union-attr]


def test_lower_seq_is_a_stale_replay(alice: KeyPair) -> None:
    ledger = Ledger()
    old = signed(alice, 1)
    ledger.offer(old, T0)
    ledger.offer(signed(alice, 2), T0)
    assert reason_of(ledger, old) == "stale_seq"
    assert ledger.get(pid(alice)).seq == 2  # type: ignore[union-attr]


def test_same_bytes_again_is_a_duplicate_not_an_error(alice: KeyPair) -> None:
    ledger = Ledger()
    s = signed(alice, 3)
    ledger.offer(s, T0)
    outcome = ledger.offer(s, T0 + 1)
    assert isinstance(outcome, Duplicate) and outcome.entry.seq == 3
    assert ledger.received_at(pid(alice)) == T0  # a duplicate changes nothing


def test_same_seq_different_body_is_equivocation(alice: KeyPair) -> None:
    ledger = Ledger()
    ledger.offer(signed(alice, 3, name="one"), T0)
    assert reason_of(ledger, signed(alice, 3, name="two")) == "equivocation"
    assert ledger.get(pid(alice)).name == "one"  # type: ignore[union-attr]


def test_peers_do_not_interfere(alice: KeyPair, bob: KeyPair) -> None:
    ledger = Ledger()
    ledger.offer(signed(alice, 10), T0)
    assert isinstance(ledger.offer(signed(bob, 1), T0), Accepted)
    assert [e.peer_id for e in ledger.entries()] == sorted([pid(alice), pid(bob)])


# ---- time -----------------------------------------------------------------------


def test_expired_on_arrival_is_refused(alice: KeyPair) -> None:
    s = signed(alice, ts=T0, ttl=TTL)
    assert reason_of(Ledger(), s, now=T0 + TTL) == "expired"
    assert reason_of(Ledger(), s, now=T0 + TTL + 100) == "expired"
    assert isinstance(Ledger().offer(s, T0 + TTL - 0.001), Accepted)


def test_future_timestamp_is_refused(alice: KeyPair) -> None:
    s = signed(alice, ts=T0 + MAX_CLOCK_SKEW_S + 1)
    assert reason_of(Ledger(), s, now=T0) == "future_timestamp"
    # Within the allowed skew it is fine.
    assert isinstance(Ledger().offer(signed(alice, ts=T0 + MAX_CLOCK_SKEW_S), T0), Accepted)


def test_expire_drops_entries_at_the_right_time(alice: KeyPair, bob: KeyPair) -> None:
    ledger = Ledger()
    ledger.offer(signed(alice, ts=T0, ttl=10.0), T0)
    ledger.offer(signed(bob, ts=T0, ttl=20.0), T0)
    assert ledger.expire(T0 + 9.999) == []
    gone = ledger.expire(T0 + 10.0)
    assert [e.peer_id for e in gone] == [pid(alice)]
    assert pid(alice) not in ledger and pid(bob) in ledger
    assert ledger.expire(T0 + 19.0) == []
    assert [e.peer_id for e in ledger.expire(T0 + 25.0)] == [pid(bob)]
    assert len(ledger) == 0


def test_refresh_extends_life(alice: KeyPair) -> None:
    ledger = Ledger()
    ledger.offer(signed(alice, 1, ts=T0, ttl=10.0), T0)
    ledger.offer(signed(alice, 2, ts=T0 + 8, ttl=10.0), T0 + 8)
    assert ledger.expire(T0 + 12) == []
    assert pid(alice) in ledger


def test_after_expiry_an_older_seq_is_accepted_again(alice: KeyPair) -> None:
    # Once forgotten, the ledger has no memory of seq: a still-live older entry is
    # just an entry (the originator's next heartbeat supersedes it).
    ledger = Ledger()
    ledger.offer(signed(alice, 2, ts=T0, ttl=5.0), T0)
    ledger.expire(T0 + 6)
    assert isinstance(ledger.offer(signed(alice, 1, ts=T0 + 5, ttl=5.0), T0 + 6), Accepted)


def test_remove(alice: KeyPair) -> None:
    ledger = Ledger()
    ledger.offer(signed(alice), T0)
    ledger.remove(pid(alice))
    ledger.remove(pid(alice))  # idempotent
    assert pid(alice) not in ledger and ledger.get(pid(alice)) is None


# ---- a full book -----------------------------------------------------------------


def keys(n: int) -> list[KeyPair]:
    return [create_new_key_pair() for _ in range(n)]


def test_a_full_book_evicts_the_peer_heard_from_least_recently() -> None:
    a, b, c, d = keys(4)
    ledger = Ledger(max_entries=3)
    for i, kp in enumerate((a, b, c)):
        ledger.offer(signed(kp), T0 + i)
    ledger.offer(signed(a, seq=2), T0 + 3)  # a heard from again: b is now the oldest
    outcome = ledger.offer(signed(d), T0 + 4)
    assert isinstance(outcome, Accepted)
    assert [e.peer_id for e in outcome.evicted] == [pid(b)]
    assert sorted(e.peer_id for e in ledger.entries()) == sorted(map(pid, (a, c, d)))
    # a newer entry of a held peer evicts no one
    assert isinstance(done := ledger.offer(signed(c, seq=2), T0 + 5), Accepted)
    assert done.evicted == () and len(ledger) == 3


def test_a_full_book_never_evicts_a_kept_peer_and_refuses_when_only_those_remain() -> None:
    a, b, c, d = keys(4)
    ledger = Ledger(max_entries=2)
    ledger.offer(signed(a), T0)
    ledger.offer(signed(b), T0 + 1)
    keep = {pid(a)}
    outcome = ledger.offer(signed(c), T0 + 2, keep)
    assert isinstance(outcome, Accepted) and [e.peer_id for e in outcome.evicted] == [pid(b)]
    keep.add(pid(c))
    assert not ledger.has_room(pid(d), 100, keep)
    with pytest.raises(LedgerReject) as err:
        ledger.offer(signed(d), T0 + 3, keep)
    assert err.value.reason == "book_full"
    assert {e.peer_id for e in ledger.entries()} == {pid(a), pid(c)}
    assert ledger.has_room(pid(a), 10_000, keep)  # a held peer's newer entry fits
    assert isinstance(ledger.offer(signed(a, seq=2), T0 + 4, keep), Accepted)


def test_the_book_caps_the_bytes_of_its_entries() -> None:
    a, b, c = keys(3)
    one = len(signed(a, name="x" * 1000).body)
    ledger = Ledger(max_entries=100, max_bytes=2 * one + 10)
    ledger.offer(signed(a, name="x" * 1000), T0)
    ledger.offer(signed(b, name="x" * 1000), T0 + 1)
    outcome = ledger.offer(signed(c, name="x" * 1000), T0 + 2)
    assert isinstance(outcome, Accepted) and [e.peer_id for e in outcome.evicted] == [pid(a)]
    # a held peer whose entry grows past the cap makes room too
    grown = ledger.offer(signed(c, seq=2, name="x" * 1500), T0 + 3)
    assert isinstance(grown, Accepted) and [e.peer_id for e in grown.evicted] == [pid(b)]
    assert len(ledger) == 1
    ledger.expire(T0 + 10 * TTL)
    assert len(ledger) == 0 and ledger.has_room(pid(a), 2 * one, ())


# ---- LedgerStore ----------------------------------------------------------------


def saved_store(path: Path, *items: SignedEntry) -> None:
    store = LedgerStore(path)
    try:
        store.save((verify_entry(s), s) for s in items)
    finally:
        store.close()


def test_store_round_trip_into_a_fresh_ledger(tmp_path: Path, alice: KeyPair,
                                              bob: KeyPair) -> None:
    db = tmp_path / "ledger.sqlite"
    a, b = signed(alice, 4, name="a"), signed(bob, 9, name="b", skills=("x",))
    saved_store(db, a, b)
    ledger = Ledger()
    store = LedgerStore(db)
    try:
        assert store.load_into(ledger, T0 + 1) == 2
    finally:
        store.close()
    assert ledger.signed(pid(alice)) == a and ledger.signed(pid(bob)) == b
    assert ledger.get(pid(bob)).skills == ("x",)  # type: ignore[union-attr]


def test_store_keeps_one_row_per_peer(tmp_path: Path, alice: KeyPair) -> None:
    db = tmp_path / "ledger.sqlite"
    saved_store(db, signed(alice, 1))
    saved_store(db, signed(alice, 2))
    ledger = Ledger()
    store = LedgerStore(db)
    assert store.load_into(ledger, T0) == 1
    store.close()
    assert ledger.get(pid(alice)).seq == 2  # type: ignore[union-attr]


def test_delete(tmp_path: Path, alice: KeyPair, bob: KeyPair) -> None:
    db = tmp_path / "ledger.sqlite"
    saved_store(db, signed(alice), signed(bob))
    store = LedgerStore(db)
    store.delete([pid(alice)])
    ledger = Ledger()
    assert store.load_into(ledger, T0) == 1
    store.close()
    assert pid(bob) in ledger and pid(alice) not in ledger


def test_expired_rows_are_dropped_on_load(tmp_path: Path, alice: KeyPair,
                                          bob: KeyPair) -> None:
    db = tmp_path / "ledger.sqlite"
    saved_store(db, signed(alice, ttl=10.0), signed(bob, ttl=100.0))
    rejected: list[str] = []
    store = LedgerStore(db)
    ledger = Ledger()
    assert store.load_into(ledger, T0 + 50, on_reject=rejected.append) == 1
    store.close()
    assert pid(alice) not in ledger and pid(bob) in ledger
    assert rejected == []  # expiry is not the peer's fault
    with sqlite3.connect(db) as con:
        assert [r[0] for r in con.execute("SELECT peer_id FROM entries")] == [pid(bob)]


def test_tampered_row_is_dropped_on_load_and_reported(tmp_path: Path, alice: KeyPair,
                                                      bob: KeyPair) -> None:
    db = tmp_path / "ledger.sqlite"
    saved_store(db, signed(alice, name="honest"), signed(bob))
    forged_body = encode(entry(alice, name="tampered"))
    with sqlite3.connect(db) as con:
        con.execute("UPDATE entries SET body = ? WHERE peer_id = ?", (forged_body, pid(alice)))
    rejected: list[str] = []
    store = LedgerStore(db)
    ledger = Ledger()
    assert store.load_into(ledger, T0, on_reject=rejected.append) == 1
    store.close()
    assert rejected == ["bad_signature"]
    assert pid(alice) not in ledger and pid(bob) in ledger
    with sqlite3.connect(db) as con:
        assert [r[0] for r in con.execute("SELECT peer_id FROM entries")] == [pid(bob)]


def test_database_file_is_private(tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite"
    LedgerStore(db).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_corrupt_database_file_names_the_path(tmp_path: Path) -> None:
    db = tmp_path / "ledger.sqlite"
    db.write_bytes(bytes(range(256)) * 64)
    with pytest.raises(LedgerStoreError) as err:
        LedgerStore(db)
    assert str(db) in str(err.value)


def test_corrupt_database_with_a_valid_header_names_the_path(tmp_path: Path,
                                                             alice: KeyPair) -> None:
    db = tmp_path / "ledger.sqlite"
    saved_store(db, signed(alice))
    data = bytearray(db.read_bytes())
    data[100:] = b"\xa5" * (len(data) - 100)  # keep "SQLite format 3" header only
    db.write_bytes(bytes(data))
    with pytest.raises(LedgerStoreError) as err:
        store = LedgerStore(db)
        store.load_into(Ledger(), T0)
    assert str(db) in str(err.value)


def test_unopenable_path_names_the_path(tmp_path: Path) -> None:
    db = tmp_path / "missing-dir" / "ledger.sqlite"
    with pytest.raises(LedgerStoreError) as err:
        LedgerStore(db)
    assert str(db) in str(err.value)


def test_rows_past_the_cap_are_dropped_on_load(tmp_path: Path) -> None:
    """A file written under a larger cap (or before there was one) loads as a full book;
    the rows that did not fit leave the file."""
    kps = keys(5)
    saved_store(tmp_path / "l.db", *(signed(kp) for kp in kps))
    store = LedgerStore(tmp_path / "l.db")
    ledger = Ledger(max_entries=3)
    assert store.load_into(ledger, T0) == 3
    rows = {r[0] for r in store._db.execute("SELECT peer_id FROM entries")}
    assert rows == {e.peer_id for e in ledger.entries()} and len(rows) == 3
    store.close()


def test_a_store_that_cannot_delete_still_loads(tmp_path: Path, alice: KeyPair) -> None:
    """Rows the book refuses are deleted on load; a full or read-only disk made that
    delete raise out of the warm start, and the daemon did not start."""
    saved_store(tmp_path / "l.db", signed(alice, ttl=TTL))
    store = LedgerStore(tmp_path / "l.db")
    store._db.execute("PRAGMA query_only=ON")
    assert store.load_into(Ledger(), T0 + 2 * TTL) == 0  # expired: its delete fails
    store.close()
