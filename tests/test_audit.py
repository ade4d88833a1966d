"""Audits of a route's compute (peerd/inference/swarm/audit.py): the rules (pure), and
hops that send well-formed, finite, wrong hidden states over real in-process hosts."""

from __future__ import annotations

import dataclasses
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from peerd import proven
from peerd.inference.model.tensors import from_wire, to_wire
from peerd.inference.options import SamplingParams, SpeculativeOptions
from peerd.inference.runtime import ModelRuntime
from peerd.inference.swarm.audit import (
    TOLERANCES,
    Audits,
    Keeper,
    Verdict,
    alternatives,
    deviation,
    judge,
    noise_source,
    served_verdict,
    swapped,
    tolerance,
)
from peerd.inference.swarm.routing import BanList, Route, Server, Span
from peerd.proven import AGAIN_BAN_S, FIRST_BAN_S, FORGET_S, ProvenBook
from protocols.shard import Forward, Result
from tests.harness import wait_for
from tests.models import tiny_llama_dir
from tests.test_dsd import untrained_eagle
from tests.test_pipeline import PROMPT, generate, lie_downstream, model_swarm

# ---- the rules ------------------------------------------------------------------------

T, F = True, False


def test_versions_that_all_agree_blame_no_one() -> None:
    assert judge(["a", "b", "c"], [[T, T, T], [T, T, T], [T, T, T]]) is None


def test_a_majority_blames_the_minority_alone() -> None:
    assert judge(["a", "b", "c"], [[T, F, F], [F, T, T], [F, T, T]]) == Verdict(
        ("a",), True, "a disagreed with 2 of 3 versions of the same layers")
    assert judge(["a", "b", "c"], [[T, T, F], [T, T, F], [F, F, T]]).at_fault == ("c",)


def test_the_entrys_own_compute_settles_it_even_against_one() -> None:
    verdict = judge(["a", "me"], [[T, F], [F, T]], trusted="me")
    assert verdict == Verdict(("a",), True, "a disagreed with the entry's own compute of "
                              "the same layers")
    # the entry is trusted over a majority, too
    assert judge(["a", "b", "me"], [[T, T, F], [T, T, F], [F, F, T]],
                 trusted="me").at_fault == ("a", "b")  # type: ignore[union-attr]


def test_two_versions_that_disagree_are_both_at_fault() -> None:
    verdict = judge(["a", "b"], [[T, F], [F, T]])
    assert verdict is not None and verdict.at_fault == ("a", "b") and not verdict.proven
    # three that all disagree: no majority
    assert not judge(["a", "b", "c"], [[T, F, F], [F, T, F], [F, F, T]]).proven  # type: ignore[union-attr]


def test_the_noise_is_the_one_hop_whose_replacement_makes_the_route_agree() -> None:
    assert noise_source({"a": False, "b": True, "c": False}) == "b"
    assert noise_source({"a": False, "b": False}) is None
    assert noise_source({"a": True, "b": True}) is None


def test_alternatives_serve_the_whole_span_in_its_dtype_the_entry_first() -> None:
    servers = [Server("me", 0, 4, dtype="float32"), Server("a", 0, 2, dtype="float32"),
               Server("b", 2, 4, dtype="float32"), Server("c", 1, 4, dtype="float32"),
               Server("d", 2, 3, dtype="float32"), Server("e", 2, 4, dtype="bfloat16"),
               Server("f", 2, 4, dtype="float32")]
    route = Route((Span("a", 0, 2, 0.0), Span("b", 2, 4, 0.0)), 0.0)
    assert alternatives(servers, route, 1, "me", frozenset()) == ["me", "c"]
    assert alternatives(servers, route, 1, "x", frozenset({"c", "me"})) == ["f"]
    assert alternatives(servers, route, 0, "x", frozenset({"me"})) == []  # a's span: none else
    # a peer elsewhere on the route computes hop i's layers only beside it, as one span
    route = Route((Span("me", 0, 1, 0.0), Span("c", 1, 2, 0.0), Span("b", 2, 4, 0.0)), 0.0)
    assert alternatives(servers, route, 2, "me", frozenset()) == ["c", "f"]  # not me
    assert swapped(route, 2, "c") == Route((Span("me", 0, 1, 0.0), Span("c", 1, 4, 0.0)), 0.0)


def test_what_a_route_served_wrongly_is_its_one_other_hops_or_all_of_theirs() -> None:
    verdict = served_verdict(["me", "a"], "me", 3, 40)
    assert verdict.at_fault == ("a",) and verdict.proven
    assert "3 of the 40 positions" in verdict.why
    verdict = served_verdict(["me", "a", "b"], "me", 1, 40)
    assert verdict.at_fault == ("a", "b") and not verdict.proven
    assert served_verdict(["a", "b", "c"], "me", 1, 2).at_fault == ("a", "b", "c")


def test_a_keeper_keeps_every_row_the_last_session_returned() -> None:
    kept = Keeper()
    assert kept.served() is None
    rows = torch.arange(12.0).reshape(4, 3)
    kept.keep(0, rows[:3])
    kept.keep(2, rows[3:] * 10)  # position 2 again (a tree's path sent again as a chain)
    served = kept.served()
    assert served is not None and served.positions == (0, 1, 2, 2)
    assert torch.equal(served.hidden, torch.cat([rows[:3], rows[3:] * 10]))
    rows.zero_()  # a copy is kept, not a view of the pass's tensor
    assert served.hidden.sum() > 0
    kept.forget()
    assert kept.served() is None


def test_a_keeper_keeps_a_uniform_sample_of_a_long_requests_rows() -> None:
    """Past its limit a keeper holds `limit` rows, each position about as likely."""
    hits = Counter[int]()
    for seed in range(300):
        kept = Keeper(limit=8, rng=random.Random(seed))
        for start in range(0, 40, 4):
            kept.keep(start, torch.arange(start, start + 4.0).repeat(2, 1).T)  # [4, 2]
        served = kept.served()
        assert served is not None and len(served.positions) == 8
        assert all(float(served.hidden[i, 0]) == p for i, p in enumerate(served.positions))
        hits.update(served.positions)
    assert set(hits) == set(range(40))  # every position is sometimes kept
    assert max(hits.values()) < 2.5 * min(hits.values())  # 60 each, expected


def test_agreement_is_a_relative_distance_within_the_dtypes_tolerance() -> None:
    a = torch.randn(1, 5, 16)
    assert deviation(a, a) == 0.0
    assert deviation(a, a * 1.5) == pytest.approx(1 / 3, rel=1e-4)
    assert tolerance(["float32", "float32"]) == TOLERANCES["float32"] == 1e-3
    # the loosest of the route's dtypes
    assert tolerance(["float32", "float16"]) == TOLERANCES["float16"]
    assert tolerance(["float16", "bfloat16", "float32"]) == TOLERANCES["bfloat16"]
    assert tolerance(["float32", "float8"]) == TOLERANCES["bfloat16"]  # unknown: loose


def test_a_proof_bans_for_5_minutes_a_second_for_a_day_and_is_forgotten_after_30_days(
) -> None:
    book = ProvenBook()
    assert book.prove("liar", 1000.0, "first") == FIRST_BAN_S == 300
    assert book.banned(1000.0 + 299) == {"liar": (1.0, "first")}
    assert book.banned(1000.0 + 300) == {}
    assert book.prove("liar", 5000.0, "again") == AGAIN_BAN_S == 24 * 3600
    assert book.proofs("liar") == 2
    # long after its last proof, a peer starts again from its first ban
    later = 5000.0 + FORGET_S
    assert book.prove("liar", later, "once more") == FIRST_BAN_S
    # a book keeps its newest proofs
    small = ProvenBook(limit=2)
    for i, peer in enumerate("abc"):
        small.prove(peer, float(i), "x")
    assert set(small.proven) == {"b", "c"}


def test_the_book_outlives_a_restart_and_a_damaged_file_loses_only_its_bad_rows(
        tmp_path: Path) -> None:
    book = ProvenBook()
    book.prove("liar", 100.0, "first")
    book.prove("liar", 200.0, "again")
    book.prove("once", 300.0, "first")
    proven.save(tmp_path / proven.PROVEN_FILE, book.to_json())
    again = proven.load(tmp_path / proven.PROVEN_FILE, 400.0)
    assert again.proven == book.proven
    assert set(again.banned(400.0)) == {"liar", "once"}
    assert again.prove("liar", 500.0, "third") == AGAIN_BAN_S
    # rows that are not proofs are left out; a ban no longer than a day from its proof,
    # and no proof from the future, whatever the file says
    rows = {"ok": {"proofs": 1, "last": 10.0, "until": 310.0, "why": "w"},
            "long": {"proofs": 2, "last": 10.0, "until": 1e12, "why": "w"},
            "future": {"proofs": 2, "last": 1e12, "until": 1e12, "why": "w"},
            "zero": {"proofs": 0, "last": 10.0, "until": 310.0, "why": "w"},
            "nan": {"proofs": 1, "last": float("nan"), "until": 310.0, "why": "w"},
            "bool": {"proofs": True, "last": 10.0, "until": 310.0, "why": "w"},
            "text": "not a proof", "": {"proofs": 1, "last": 10.0, "until": 310.0,
                                        "why": "w"}}
    read = ProvenBook.from_json({"proven": rows}, 20.0)
    assert set(read.proven) == {"ok", "long", "future"}
    assert read.proven["long"].until == 10.0 + AGAIN_BAN_S
    assert read.proven["future"].last == 20.0
    assert read.proven["future"].until == 20.0 + AGAIN_BAN_S
    for damaged in ("{not json", "[1, 2]", '{"proven": 7}'):
        (tmp_path / proven.PROVEN_FILE).write_text(damaged)
        assert proven.load(tmp_path / proven.PROVEN_FILE, 400.0).proven == {}
    (tmp_path / proven.PROVEN_FILE).unlink()
    assert proven.load(tmp_path / proven.PROVEN_FILE, 400.0).proven == {}


# ---- over real hosts ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


def scaled(msg: Any) -> Any:
    """Hidden states off by a tenth: finite, the right shape, wrong."""
    return dataclasses.replace(msg, hidden=to_wire(from_wire(msg.hidden) * 1.1))


def noisy(msg: Any) -> Any:
    """Hidden states plus fresh noise each time."""
    h = from_wire(msg.hidden)
    return dataclasses.replace(msg, hidden=to_wire(h + 0.3 * h.std() * torch.randn_like(h)))


def events(runtime: ModelRuntime, kind: str) -> list[dict[str, Any]]:
    return [e.data for e in runtime.node.events.recent() if e.type == kind]


@pytest.mark.parametrize("lie", [scaled, noisy], ids=["scaled", "noisy"])
async def test_an_audit_blames_a_hop_whose_output_the_other_versions_outvote(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch, lie: Any) -> None:
    """The last hop sends finite hidden states of the right shape that no model
    computes: every check on a RESULT passed them, and the request answered garbage.
    The audit computes the hop's layers on its two replicas too: they agree, the liar
    does not, and it alone is banned and counted; the honest replicas are not."""
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4), (2, 4), (2, 4)]) as (_, runtimes):
        entry, liar, *honest = runtimes
        route = Route((Span(entry.node.peer_id, 0, 2, 0.0), Span(liar.node.peer_id, 2, 4, 0.0)),
                      0.0)
        audits = entry.generator.audits
        assert await audits.audit(route, PROMPT) == "agreed"  # before it lies
        lie_downstream(liar, lie, monkeypatch)
        assert await audits.audit(route, PROMPT) == "blamed"
        assert events(entry, "inference.audit")[-1]["at_fault"] == [liar.node.peer_id]
        assert entry.node.offences[liar.node.peer_id]["wrong_output"] == 1
        banned = entry.generator.bans.banned(time.monotonic())
        assert liar.node.peer_id in banned and not {r.node.peer_id for r in honest} & banned
        # proven wrong: routed around for the longest a ban lasts, at once
        assert 250 < entry.generator.bans.remaining(liar.node.peer_id, time.monotonic()) <= 300
        assert audits.status()["blamed"] == 1 and audits.status()["agreed"] == 1
        # proven wrong again (the ban over, say): routed around for a day
        assert await audits.audit(route, PROMPT) == "blamed"
        assert entry.node.offences[liar.node.peer_id]["wrong_output"] == 2
        assert entry.generator.bans.remaining(liar.node.peer_id, time.monotonic()) > 23 * 3600
        # ... also after the entry restarts: a new generator's audits read the proofs
        # from the data dir and ban the liar for what is left of its day, nobody else
        entry.generator.bans = BanList()
        restarted = Audits(entry.generator, 0.0)
        assert restarted.proven.proofs(liar.node.peer_id) == 2
        assert entry.generator.bans.banned(time.monotonic()) == {liar.node.peer_id}
        assert entry.generator.bans.remaining(liar.node.peer_id, time.monotonic()) > 23 * 3600


async def test_two_versions_that_disagree_are_both_banned_unless_one_is_the_entrys(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With one replica, the entry cannot tell which of the two lies: both are banned
    (neither counted). Where the entry serves the layers itself, its own compute
    settles it: the liar alone."""
    async with model_swarm(tmp_path, tiny, [(0, 4), (0, 2), (2, 4), (2, 4)]) as (_, runtimes):
        entry, first, liar, honest = runtimes
        lie_downstream(liar, scaled, monkeypatch)
        route = Route((Span(first.node.peer_id, 0, 2, 0.0), Span(liar.node.peer_id, 2, 4, 0.0)),
                      0.0)
        me = entry.node.peer_id
        assert await entry.generator.audits.audit(route, PROMPT) == "blamed"  # by the entry's
        assert events(entry, "inference.audit")[-1]["at_fault"] == [liar.node.peer_id]
        assert honest.node.peer_id not in entry.generator.bans.banned(time.monotonic())

        # the same from a peer that does not serve those layers: first's own audits
        other = first.generator
        route = Route((Span(first.node.peer_id, 0, 2, 0.0), Span(liar.node.peer_id, 2, 4, 0.0)),
                      0.0)
        monkeypatch.setattr(other, "servers", lambda: [
            s for s in type(other).servers(other) if s.peer_id != me])
        assert await other.audits.audit(route, PROMPT) == "disputed"
        assert {liar.node.peer_id, honest.node.peer_id} <= other.bans.banned(time.monotonic())
        assert not first.node.offences.get(honest.node.peer_id)


async def test_requests_are_audited_at_the_rate_and_route_around_what_an_audit_found(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At --audit-rate 1 every request's route is audited after it ends: a request
    through a lying last hop answers what it answers, its audit bans the liar, and the
    next request goes around it."""
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4), (2, 4), (2, 4)]) as (_, runtimes):
        entry = runtimes[0]
        audits = entry.generator.audits
        audits.rate = 1.0
        route = entry.generator.route()
        assert isinstance(route, Route)
        liar = next(r for r in runtimes if r.node.peer_id == route.spans[-1].peer_id)
        lie_downstream(liar, scaled, monkeypatch)
        await generate(entry, PROMPT)
        await wait_for(lambda: bool(events(entry, "inference.audit")), 30, "the audit")
        assert events(entry, "inference.audit")[0]["at_fault"] == [liar.node.peer_id]
        _, info = await generate(entry, PROMPT)
        assert liar.node.peer_id not in {s["peer_id"] for s in info["route"]}  # type: ignore[union-attr]


def after_the_first_pass(lie: Any, wider_than: int = 0) -> Any:
    """`lie` on a session's later passes only (a decoding step, a draft's tree; of more
    than `wider_than` positions), honest on its first (a request's prompt, a
    failover's replay, an audit's replay)."""
    def lying(msg: Any) -> Any:
        later = msg.start_pos > 0 if isinstance(msg, Forward) else (
            isinstance(msg, Result) and msg.step > 1)  # steps count from 1
        return lie(msg) if later and from_wire(msg.hidden).shape[1] > wider_than else msg
    return lying


async def wait_audited(runtime: ModelRuntime, n: int) -> dict[str, Any]:
    """The n-th audit's event, once it is out (audits run in the background)."""
    await wait_for(lambda: len(events(runtime, "inference.audit")) >= n
                   and not runtime.generator.audits.busy, 30, "the audit")
    return events(runtime, "inference.audit")[n - 1]


@pytest.mark.parametrize("drafting", [False, True], ids=["plain", "drafting"])
async def test_a_hop_that_lies_only_after_a_sessions_first_pass_is_found_by_what_it_served(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch, drafting: bool) -> None:
    """A last hop honest on every prefill from position 0 (which is all a replay is)
    and lying on every later pass (drafting: on the passes that verify a draft only):
    a replay of the request agrees with its replicas' compute, but not with what the
    route returned while the request decoded. The route's only hop besides the entry
    is proven wrong; the next request goes around it."""
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4), (2, 4)]) as (_, runtimes):
        entry = runtimes[0]
        g = entry.generator
        route = g.route()
        assert isinstance(route, Route)
        liar = next(r for r in runtimes if r.node.peer_id == route.spans[-1].peer_id)
        lie_downstream(liar, after_the_first_pass(scaled, 1 if drafting else 0), monkeypatch)
        g.audits.rate = 1.0
        spec = SpeculativeOptions("ngram", "greedy", 4, False) if drafting else None
        request = await g.prepare(PROMPT * 3, SamplingParams(max_tokens=24), spec)
        tokens: list[int] = []

        async def collect(token: int) -> bool:
            tokens.append(token)
            return True

        stats = await g.generate(request, collect)
        assert not drafting or any(r.drafted for r in stats.rounds)
        event = await wait_audited(entry, 1)
        assert event["outcome"] == "blamed" and event["at_fault"] == [liar.node.peer_id], event
        assert "served what it does not compute" in event["detail"]
        assert entry.node.offences[liar.node.peer_id]["wrong_output"] == 1
        # a replay alone (what an audit was before it kept what the route served) is
        # computed honestly: it agrees with the other replica
        assert await g.audits.audit(route, PROMPT * 3 + tokens) == "agreed"
        _, info = await generate(entry, PROMPT)
        assert liar.node.peer_id not in {s["peer_id"] for s in info["route"]}  # type: ignore[union-attr]


async def test_a_scored_chain_of_thought_is_audited_too(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """How a requester measures someone else's chain of thought (Generator.score) is a
    request like any: drawn for an audit, what its route returned is checked; a last
    hop that scaled it is outvoted by its two replicas."""
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4), (2, 4), (2, 4)]) as (_, runtimes):
        entry = runtimes[0]
        route = entry.generator.route()
        assert isinstance(route, Route)
        liar = next(r for r in runtimes if r.node.peer_id == route.spans[-1].peer_id)
        entry.generator.audits.rate = 1.0
        honest = await entry.generator.score(PROMPT, PROMPT[:6])
        assert (await wait_audited(entry, 1))["outcome"] == "agreed"
        lie_downstream(liar, scaled, monkeypatch)
        assert await entry.generator.score(PROMPT[:8], PROMPT[:6]) != honest[:6]
        event = await wait_audited(entry, 2)
        assert event["outcome"] == "blamed" and event["at_fault"] == [liar.node.peer_id], event


async def test_a_route_that_served_wrongly_bans_each_hop_but_the_entry(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two hops besides the entry, the middle one lying on later passes only, and no
    replicas: the entry saw only the last hop's output, so both are banned, neither
    counted an offence."""
    async with model_swarm(tmp_path, tiny, [(0, 1), (1, 3), (3, 4)]) as (_, runtimes):
        entry, liar, last = runtimes
        lie_downstream(liar, after_the_first_pass(scaled), monkeypatch)
        entry.generator.audits.rate = 1.0
        await generate(entry, PROMPT)
        event = await wait_audited(entry, 1)
        assert event["outcome"] == "disputed", event
        assert set(event["at_fault"]) == {liar.node.peer_id, last.node.peer_id}
        assert {liar.node.peer_id, last.node.peer_id} <= entry.generator.bans.banned(
            time.monotonic())
        assert not entry.node.offences.get(last.node.peer_id)


async def test_honest_routes_serve_what_they_compute_plain_drafting_and_sampled(
        tmp_path: Path, tiny: Path) -> None:
    """Audited at rate 1, honest requests of every kind (plain greedy; token trees and
    chains drafted by a head, with a pooled prefix reused; sampled) agree with their
    replays: a position computed alone, in a tree or in a prefill is within the
    tolerance, and nobody is blamed."""
    async with model_swarm(tmp_path, tiny, [(0, 1), (1, 3), (3, 4)]) as (_, runtimes):
        entry = runtimes[0]
        g = entry.generator
        g.audits.rate = 1.0
        head = untrained_eagle(entry, tmp_path / "eagle.safetensors")
        kinds: list[tuple[SamplingParams, SpeculativeOptions | None]] = [
            (SamplingParams(max_tokens=24), None),
            (SamplingParams(max_tokens=24), SpeculativeOptions(f"eagle:{head}", "greedy",
                                                               None, True)),
            (SamplingParams(max_tokens=24), SpeculativeOptions("ngram", "greedy", 4, False)),
            (SamplingParams(max_tokens=24, temperature=1.0, seed=3), None),
            (SamplingParams(max_tokens=24, temperature=0.8, seed=5),
             SpeculativeOptions(f"eagle:{head}", "sample", 3, False)),
        ]
        for n, (params, spec) in enumerate(kinds, 1):
            request = await g.prepare(PROMPT * 2, params, spec)

            async def collect(token: int) -> bool:
                return True

            await g.generate(request, collect)
            event = await wait_audited(entry, n)
            assert event["outcome"] == "agreed", event
            assert "as it computes them" in event["detail"]
        assert g.audits.status()["agreed"] == len(kinds)
        assert not g.bans.banned(time.monotonic())
