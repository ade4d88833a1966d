"""The pull's plan, pure: peers that hold chunks serve before the trainer, a holder is
not asked again for what it lacks, a failed holder is dropped and its chunks go
elsewhere, and a plan with nobody left to ask says which chunks are stuck."""

from __future__ import annotations

import random

from peerd.rl.chunks import ChunkPlan


def hashes(n: int) -> dict[bytes, int]:
    return {bytes([i]) * 32: 100 for i in range(n)}


def plan(n: int, holders: list[str], **kw: int) -> ChunkPlan:
    return ChunkPlan(hashes(n), holders, author="T", rng=random.Random(0), **kw)


def test_peers_serve_before_the_author_and_load_is_spread() -> None:
    p = plan(40, ["T", "A", "B"], batch_chunks=4, per_holder=2, max_in_flight=8)
    order = [job[0] for job in iter(p.next, None)]
    # first a batch to each peer, then the author ties with peers holding one batch
    assert order[:2] in (["A", "B"], ["B", "A"])
    assert sorted(order) == ["A", "A", "B", "B", "T", "T"]  # per_holder caps each
    assert p.busy == 6


def test_missing_chunks_go_to_another_holder_and_failed_holders_are_dropped() -> None:
    p = plan(4, ["A", "B"], batch_chunks=4, per_holder=1)
    peer, batch = p.next()  # type: ignore[misc]
    p.returned(peer, got=batch[:2], missing=batch[2:])
    other, again = p.next()  # type: ignore[misc]
    assert other != peer and sorted(again) == sorted(batch[2:])
    p.fail(other, again)
    assert p.next() is None  # `peer` lacks them, `other` failed
    assert sorted(p.stuck()) == sorted(batch[2:])
    p.add_holder("T")
    assert p.stuck() == []
    last, rest = p.next()  # type: ignore[misc]
    assert last == "T"
    p.returned(last, got=rest, missing=[])
    assert p.finished


def test_batches_respect_the_byte_budget_and_the_parallel_cap() -> None:
    p = ChunkPlan({bytes([i]) * 32: 1000 for i in range(10)}, ["A", "B", "C"], author=None,
                  batch_bytes=2500, max_in_flight=2, per_holder=4)
    first = p.next()
    second = p.next()
    assert first and second and len(first[1]) == len(second[1]) == 2
    assert p.next() is None  # two in flight at most
    assert p.stuck() == []  # not stuck: batches are in flight


def test_holders_joining_a_pull_are_bounded() -> None:
    """Each Have admitted mid-pull added its holder for the rest of the pull; a version's
    holders are capped, but fresh keys take the place of the stalest, so the plan grew
    with every one. It takes `max_holders` besides the author; a newcomer takes a failed
    holder's place while few have failed, and a failed holder does not come back."""
    p = plan(200, ["A", "T"], max_holders=4, per_holder=1, batch_chunks=1)
    for i in range(1000):
        p.add_holder(f"fresh{i}")
    assert p.holders == ["A", "T", "fresh0", "fresh1", "fresh2"]
    for i in range(1000):  # each one fails its batch at once; a newcomer comes
        job = p.next()
        if job is None:
            break
        p.fail(*job)
        p.add_holder(f"late{i}")
        assert len(p.holders) <= 5 and "T" in p.holders
    assert p.next() is None and len(p.failed) <= 2 * 4 + 1
    for peer in sorted(p.failed):
        p.add_holder(peer)
        assert p.holders.count(peer) <= 1 and peer not in p.holders[5:]
    assert all(peer in p.failed for peer in p.holders)
    # the author joins past the cap
    assert plan(1, ["A", "B", "C", "D", "E", "T"], max_holders=4).holders \
        == ["A", "B", "C", "D", "T"]
