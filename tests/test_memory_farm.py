"""Farmed replays over real in-process libp2p hosts with tiny random Llama models: a
peer without a model gets a candidate admitted by two replaying peers that agree (the
utility the same as a local judge's on the same tasks); a lying replayer (its own
replay patched to flip scores: a misbehaving peer, not a mock of the network) is
caught and counted, and the candidate settled by a third peer or by the requester's
own model; every bad job is refused in words and the replaying peer keeps serving; a
result with a bad signature or for another job is refused and counted."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from peerd.agents.election import WorkFailed
from peerd.agents.reputation import NO_SHOW_S, PRIOR
from peerd.agents.sealing import seal
from peerd.inference.face import LanguageModel, ModelUnavailable
from peerd.inference.slot import ModelOptions, ModelSlot
from peerd.memory.admission import judge
from peerd.memory.admissions import Candidate
from peerd.memory.farm import FILL_ROUNDS, Farm
from peerd.memory.farming import replayers
from peerd.memory.scec import decode_scec, encode_scec, scec_hash
from peerd.memory.service import Memory
from peerd.node import Node
from protocols.codec import decode, encode
from protocols.framing import encode_uvarint, frame
from protocols.ledger import LedgerEntry, ModelServed
from protocols.memory import ScecMsg
from protocols.memory_replay import (
    FEATURE_REPLAY,
    REPLAY,
    ArmReplay,
    ReplayJob,
    ReplayResult,
    ScecReplay,
    SignedReplayResult,
)
from tests.harness import book, dial, error_code, gossip, rogue_host, swarm, wait_for
from tests.models import tiny_llama_dir
from tests.test_memory_service import LOOSE, planted


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


class LyingFarm(Farm):
    """A replaying peer that runs the job honestly, then flips every B score it signs."""

    async def _serve(self, peer: str, job: ReplayJob) -> SignedReplayResult:
        honest = await super()._serve(peer, job)
        r = decode(honest.body, ReplayResult)
        flipped = dataclasses.replace(r, tasks=tuple(
            dataclasses.replace(t, with_item=dataclasses.replace(
                t.with_item, score=1.0 - t.with_item.score)) for t in r.tasks))
        body, sig = seal(flipped, self.node.key_pair.private_key)
        return SignedReplayResult(body=body, sig=sig)


async def start_memory(node: Node, tiny: Path | None, *, replay: str = "auto",
                       lying: bool = False) -> Memory:
    slot = ModelSlot(node, gossip(node), ModelOptions(str(tiny), torch_threads=1)) \
        if tiny is not None else None
    memory = Memory(node, slot, node.config.data_dir, embedder="hashing", settings=LOOSE,
                    task_similarity=0.0, diffuse=False, replay=replay)
    memory.farm.deadline_s = 30.0
    if lying:
        memory.farm = LyingFarm(node, memory._face, memory._ledger_entries,
                                deadline_s=30.0)
    await node.start(*([slot] if slot is not None else []), memory)
    if slot is not None:
        await slot.settled.wait()
    return memory


@contextlib.asynccontextmanager
async def farm_swarm(tmp_path: Path, tiny: Path, replaying: int, *, requester_model: bool,
                     replay: str = "auto", liar: int | None = None
                     ) -> AsyncIterator[list[Memory]]:
    """n0, the requester (with a model or none), and `replaying` peers serving the tiny
    model, each connected to n0; `liar`: the index (1..) of a lying one."""
    async with swarm(1 + replaying, tmp_path, connect="star") as nodes:
        memories = [await start_memory(nodes[0], tiny if requester_model else None,
                                       replay=replay)]
        for i, node in enumerate(nodes[1:], start=1):
            memories.append(await start_memory(node, tiny, lying=i == liar))
        model = memories[1]._face().model_id
        await wait_for(lambda: len(replayers(book(nodes[0]).entries(), model,
                                             nodes[0].peer_id, {})) == replaying,
                       what="the requester's ledger lists every replaying peer")
        yield memories


async def tasks_from(source: Memory, target: Memory, helps: bool = True,
                     domain: str = "chat") -> tuple[str, list[str]]:
    """A planted candidate and the runs `source`'s model recorded for it, kept in
    `target`'s store too (a model-less peer holds runs others recorded)."""
    candidate, runs = await planted(source, domain, helps=helps)
    if target is not source:
        for h in dict.fromkeys(runs):
            stored = await source.live_store().get_scec(h)
            assert stored is not None
            await target.observe(decode_scec(stored.body), [])
    return candidate, runs


async def decided(memory: Memory, candidate: str, origin: str, domain: str = "chat"
                  ) -> Candidate:
    c = await memory.propose(candidate, domain, "rule", origin=origin)
    with trio.fail_after(60):
        await c.done.wait()
    return c


async def nothing(scec: ScecMsg) -> Sequence[str]:
    return ()


async def chosen_tasks(memory: Memory, c: Candidate) -> list[ScecMsg]:
    return (await memory.desk()._tasks(c))[0]  # the tasks the desk picked for c


async def test_a_model_less_peer_admits_by_two_peers_that_agree(tmp_path: Path, tiny: Path
                                                                ) -> None:
    async with farm_swarm(tmp_path, tiny, 2, requester_model=False) as (req, p, q):
        candidate, runs = await tasks_from(p, req)
        c = await decided(req, candidate, runs[0])
        assert c.state == "admitted", c.to_json()
        assert set(c.replayed_by) == {p.node.peer_id, q.node.peer_id} == set(c.farmed_to)
        # the same utility as a local judge's on the same tasks (latency not charged),
        # against the memory as it was then: empty
        reference = await judge(p._face(), candidate, await chosen_tasks(req, c), nothing,
                                req.weights)
        assert c.utility is not None
        assert c.utility.d_score == pytest.approx(reference.utility.d_score)
        assert c.utility.d_tokens == pytest.approx(reference.utility.d_tokens)
        assert c.utility.d_latency == 0.0 and c.utility.total > 0
        kept = await req.live_store().get(c.item_id)
        assert kept is not None and kept.item.author == req.node.peer_id
        row = (await req.live_store().decisions(10))[0]
        assert row.action == "admitted"
        assert set(row.detail["replayed_by"]) == set(c.replayed_by)
        assert not req.node.offences and req.farm.counts["false_replay"] == 0
        # a candidate that hurts is refused as the local judge would
        bad, bad_runs = await tasks_from(q, req, helps=False, domain="talk")
        r = await decided(req, bad, bad_runs[0], "talk")
        assert (r.state, r.reason) == ("refused", "no_gain"), r.to_json()
        assert len(r.replayed_by) == 2


async def test_a_liar_is_outvoted_by_a_third_peer_and_counted(tmp_path: Path, tiny: Path
                                                              ) -> None:
    async with farm_swarm(tmp_path, tiny, 3, requester_model=False, liar=3) as memories:
        req, p, q, liar = memories
        for _ in range(10):  # p ranks last: the liar and q are seated, p breaks the tie
            req.farm.book.observe(p.node.peer_id, agreed=False, punctual=False, now=0.0)
        candidate, runs = await tasks_from(p, req)
        c = await decided(req, candidate, runs[0])
        assert c.state == "admitted", c.to_json()
        assert set(c.farmed_to) == {p.node.peer_id, q.node.peer_id, liar.node.peer_id}
        assert set(c.replayed_by) == {p.node.peer_id, q.node.peer_id}
        assert req.node.offences[liar.node.peer_id] == {"false_replay": 1}
        assert p.node.peer_id not in req.node.offences
        assert q.node.peer_id not in req.node.offences
        assert req.farm.caught.recent(liar.node.peer_id, req.farm.clock())
        # what the job saw outlives a restart: the book is read back from the data dir
        again = Farm(req.node, req._face, req._ledger_entries, book_path=req.farm.book_path)
        assert again.book.own() == pytest.approx(req.farm.book.own())
        assert again.book.own()[liar.node.peer_id] < PRIOR < again.book.own()[q.node.peer_id]
        # ... and so does who was caught lately, until NO_SHOW_S has passed
        assert again.caught.recent(liar.node.peer_id, again.clock())
        assert not again.caught.recent(q.node.peer_id, again.clock())
        later = Farm(req.node, req._face, req._ledger_entries, book_path=req.farm.book_path,
                     clock=lambda: time.time() + NO_SHOW_S)
        assert not later.caught.recent(liar.node.peer_id, later.clock())


async def test_with_two_replayers_a_liar_leaves_the_candidate_unverified(
        tmp_path: Path, tiny: Path) -> None:
    async with farm_swarm(tmp_path, tiny, 2, requester_model=False, liar=2) as (req, p, _):
        candidate, runs = await tasks_from(p, req)
        c = await decided(req, candidate, runs[0])
        assert (c.state, c.reason) == ("refused", "unverified"), c.to_json()
        assert c.replayed_by == () and len(c.farmed_to) == 2
        assert not req.node.offences  # nobody can tell which of the two lied
        row = (await req.live_store().decisions(10))[0]
        assert (row.action, row.detail["reason"]) == ("refused", "unverified")


async def test_a_requester_with_a_model_settles_locally_and_counts_the_liar(
        tmp_path: Path, tiny: Path) -> None:
    async with farm_swarm(tmp_path, tiny, 2, requester_model=True, replay="farm",
                          liar=2) as (req, p, liar):
        candidate, runs = await tasks_from(req, req)
        c = await decided(req, candidate, runs[0])
        assert c.state == "admitted", c.to_json()  # by our own replay after the dispute
        assert c.replayed_by == () and set(c.farmed_to) == {p.node.peer_id,
                                                            liar.node.peer_id}
        assert req.node.offences[liar.node.peer_id] == {"false_replay": 1}
        assert p.node.peer_id not in req.node.offences
        local = await judge(req._face(), candidate, await chosen_tasks(req, c), nothing,
                            req.weights)
        assert c.utility is not None
        assert c.utility.d_score == pytest.approx(local.utility.d_score)


def job_for(tasks: Sequence[ScecMsg], model: str, **changes: object) -> ReplayJob:
    job = ReplayJob(job_id="job-1", model=model, candidate="Be brief.",
                    scecs=tuple(encode_scec(s) for s in tasks), given=((),) * len(tasks))
    return dataclasses.replace(job, **changes)  # type: ignore[arg-type]


async def test_bad_jobs_are_refused_in_words_and_the_peer_keeps_serving(
        tmp_path: Path, tiny: Path) -> None:
    async with swarm(1, tmp_path, connect="none") as (node,), rogue_host(tmp_path) as rogue:
        p = await start_memory(node, tiny)
        _, runs = await tasks_from(p, p)
        stored = await p.live_store().get_scec(runs[1])
        assert stored is not None
        scec = decode_scec(stored.body)
        model = p._face().model_id
        await dial(rogue.host, node)
        good = frame(encode(job_for([scec], model)))
        cases = [
            (frame(b"\xc1 not msgpack"), "malformed", True),
            (encode_uvarint(REPLAY.max_request_bytes + 1) + b"x" * 64, "oversized", True),
            (frame(encode(job_for([scec], model, job_id="no spaces"))), "malformed", True),
            (frame(encode(job_for([dataclasses.replace(scec, seed=i) for i in range(5)],
                                  model))), "oversized", True),
            (frame(encode(job_for([scec], model, given=()))), "malformed", True),
            (frame(encode(job_for([scec], model, scecs=(b"\xc1 junk",)))), "malformed",
             True),
            (frame(encode(job_for([scec], model, candidate="x" * 4001))), "oversized",
             True),
            (frame(encode(job_for([scec], "some/other-model"))), "unknown_model", False),
            (frame(encode(ReplayResult(job_id="j", requester="r", replayer="r", model="m",
                                       version="", tasks=()))), "wrong_type", True),
        ]
        counted = 0
        for raw, code, offence in cases:
            assert error_code(await rogue.exchange(node, REPLAY.id, raw)) == code, raw[:40]
            counted += offence
            assert sum(node.offences[rogue.peer_id].values()) == counted, code
        # the peer keeps serving: a good job gets a signed result of both arms
        reply = await rogue.exchange(node, REPLAY.id, good, max_reply=REPLAY.max_response_bytes)
        assert reply is not None
        signed = decode(reply, SignedReplayResult)
        result = decode(signed.body, ReplayResult)
        assert (result.replayer, result.requester) == (node.peer_id, rogue.peer_id)
        assert [t.scec for t in result.tasks] == [scec_hash(scec)]
        assert node.key_pair.public_key.verify(signed.body, signed.sig)


async def test_a_result_with_a_bad_signature_or_for_another_job_is_refused_and_counted(
        tmp_path: Path) -> None:
    async with swarm(1, tmp_path, connect="none") as (node,), rogue_host(tmp_path) as rogue:
        req = await start_memory(node, None)
        await dial(rogue.host, node)
        job = ReplayJob(job_id="job-2", model="m", candidate="Be brief.",
                        scecs=(b"x",), given=((),))
        arm = ArmReplay("a" * 64, 1.0, 12)
        ours = ReplayResult(job_id="job-2", requester=node.peer_id, replayer=rogue.peer_id,
                            model="m", version="", tasks=(ScecReplay("0" * 64, arm, arm),))
        other = create_new_key_pair()
        posing = dataclasses.replace(ours, replayer=str(ID.from_pubkey(other.public_key)))
        key = rogue.key_pair.private_key
        for reply, reason in [
                (SignedReplayResult(body=encode(ours), sig=b"\0" * 64), "bad_signature"),
                (SignedReplayResult(*seal(posing, other.private_key)), "impersonation"),
                (SignedReplayResult(*seal(dataclasses.replace(ours, job_id="job-3"), key)),
                 "wrong_job"),
                (SignedReplayResult(*seal(dataclasses.replace(ours, requester=rogue.peer_id),
                                          key)), "wrong_job"),
                (SignedReplayResult(*seal(dataclasses.replace(ours, model="x"), key)),
                 "wrong_model"),
                (SignedReplayResult(body=b"\xc1 junk", sig=b""), "malformed")]:
            rogue.answer(REPLAY.id, frame(encode(reply)))
            with pytest.raises(WorkFailed) as caught:
                await req.farm._ask(rogue.peer_id, job, ["0" * 64])
            assert caught.value.reason == reason
        assert node.offences[rogue.peer_id] == {"bad_signature": 1, "impersonation": 1,
                                                "wrong_job": 2, "wrong_model": 1,
                                                "malformed": 1}
        # an honest answer from the same peer is taken
        rogue.answer(REPLAY.id, frame(encode(SignedReplayResult(*seal(ours, key)))))
        assert await req.farm._ask(rogue.peer_id, job, ["0" * 64]) == ours


class StallingFarm(Farm):
    """A replaying peer that takes every job and never answers (not a mock of the
    network: a misbehaving peer, over the real protocol)."""

    async def _serve(self, peer: str, job: ReplayJob) -> SignedReplayResult:
        await trio.sleep_forever()
        raise AssertionError("unreachable")


def replaying_entry(peer: str, model: str) -> LedgerEntry:
    return LedgerEntry(peer_id=peer, seq=1, timestamp=time.time(), ttl_s=60.0,
                       features=(FEATURE_REPLAY,),
                       models=(ModelServed(model, 0, 2, "float32", num_layers=2),))


def no_model() -> LanguageModel:
    raise ModelUnavailable("no model here")


async def test_replayers_that_take_the_job_and_never_answer_cost_a_bounded_time(
        tmp_path: Path) -> None:
    """Five replayers take the job and never answer: the job is given up after
    FILL_ROUNDS deadlines (two seats, two rounds: four peers asked, not all five one
    deadline after another), and those that stalled rank last for the next job."""
    async with swarm(6, tmp_path, connect="star", heartbeat_s=3.0) as nodes:
        requester, stalling = nodes[0], nodes[1:]
        for node in stalling:
            StallingFarm(node, no_model, lambda: []).register()
        entries = [replaying_entry(n.peer_id, "m") for n in stalling]
        farm = Farm(requester, no_model, lambda: entries, deadline_s=0.5)
        scec = ScecMsg(prompt="What is 1 + 2?", domain="chat", model="m", version="",
                       max_tokens=8, temperature=0.0, top_p=1.0, seed=1, stop=(),
                       memory=(), memory_ids=(), answer="3", scorer="exact", output="3",
                       score=1.0, prompt_tokens=10, latency_s=0.1)
        got = await farm.replay("Be brief.", [scec], nothing, "m", None)
        assert got.reason == "unverified" and got.by == ()
        assert len(got.asked) == FILL_ROUNDS * 2 < len(stalling)
        assert all(farm.no_shows.recent(p, farm.clock()) for p in got.asked)
        assert farm.counts["jobs_asked"] == len(got.asked)
        # the one never asked now ranks first: the no-shows are demoted
        fresh = {n.peer_id for n in stalling} - set(got.asked)
        again = await farm.replay("Be brief.", [scec], nothing, "m", None)
        assert fresh <= set(again.asked[:2])
