"""What a remote peer can make a sampler remember is bounded.

A sampler follows the run a request names (follow.py), and any peer may send one: a
peer naming fresh run ids, whose versions it never serves, leaves the sampler
following one run at a time (two while a run left is kept for the next one's first
manifest), and a legitimate second run is still taken up after the first. A run
unheard for the idle limit is forgotten, but never one we author. Holders of a version
(announce.py) are capped per version, stale ones leave as new ones come, and a holder
we are connected to is never pushed out by newcomers. Holders are kept only for the
versions the run's trainer announced: Haves naming made-up manifest hashes cannot push
a real version's holders out, and a pull's plan (chunks.py) takes a bounded number.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peerd.agents.sealing import seal
from peerd.inference.model.head import Head
from peerd.inference.model.shard import ShardBlock
from peerd.inference.model.source import ModelSource, load_config, load_tokenizer, resolve
from peerd.inference.runtime import eos_ids
from peerd.node import Node
from peerd.rl.announce import (
    MAX_EARLY_HASHES,
    MAX_HOLDERS_PER_VERSION,
    MAX_VERSIONS_KNOWN,
    Announcements,
    admit_holder,
)
from peerd.rl.follow import Follower
from peerd.rl.policy import LocalPolicy
from peerd.rl.rollouts import SamplerVersion, request_rollouts
from peerd.rl.sampler import RolloutSampler
from peerd.rl.weights import WeightStore
from protocols.rollout import RolloutRequest
from protocols.weights import Have, SignedAnnounce, VersionAnnounce
from tests.harness import swarm, wait_for
from tests.models import tiny_llama_dir

MODEL_RUN = "norm-only"  # what the trainer publishes: one small tensor, a full version


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return resolve(str(tiny_llama_dir(tmp_path_factory)))


def request(run_id: str, version: int) -> RolloutRequest:
    return RolloutRequest(run_id=run_id, prompts=("Say a number.",), group=1,
                          temperature=1.0, top_p=1.0, max_tokens=2, seed=3,
                          version=version, mode="sync")


@contextlib.asynccontextmanager
async def sampler_trainer_and_stranger(tmp_path: Path, tiny: ModelSource
                                       ) -> AsyncIterator[tuple[RolloutSampler, WeightStore,
                                                                WeightStore, Node]]:
    """A sampler wired as `peerd start --rollout` wires it (rollout_service.py), a
    trainer running the weights service, and a stranger that serves no weights, both
    connected to the sampler."""
    async with swarm(3, tmp_path, connect="star") as (node, trainer, stranger):
        tokenizer = load_tokenizer(tiny)
        policy = LocalPolicy(ShardBlock(tiny, 0, 4), Head(tiny))
        store, trainer_store = WeightStore(node), WeightStore(trainer)
        follower = Follower(store, policy)
        sampler = RolloutSampler(node, policy, tokenizer, eos_ids(tokenizer, load_config(tiny)),
                                 catch_up=follower.catch_up, on_switch=follower.leave)
        await node.start(store, sampler)
        await trainer.start(trainer_store)
        yield sampler, store, trainer_store, stranger


async def publish_version(trainer: WeightStore, sampler: RolloutSampler, run_id: str,
                          version: int) -> None:
    """A full version naming only the final norm (a real tensor of the policy's)."""
    import torch

    shape, dtype = sampler.policy.parameters()["model.norm.weight"]  # type: ignore[attr-defined]
    await trainer.publish(run_id, MODEL_RUN, version, "full",
                          {"model.norm.weight": torch.full(shape, 1.0 + version, dtype=dtype)})


async def test_fresh_run_ids_from_a_peer_leave_one_run_followed(
        tmp_path: Path, tiny: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("peerd.rl.sampler.RUN_IDLE_S", 0.3)
    async with sampler_trainer_and_stranger(tmp_path, tiny) as (sampler, store, trainer,
                                                                stranger):
        me = sampler.node.peer_id
        await publish_version(trainer, sampler, "one", 1)
        got = await request_rollouts(trainer.node, me, request("one", 1))
        assert {r.version for r in got} == {1}
        assert set(store.runs.following) == {"one"}
        await trio.sleep(0.4)  # run "one" goes quiet: the next run may take the sampler
        for i in range(12):  # a stranger names runs whose versions nobody serves
            with pytest.raises(SamplerVersion):
                await request_rollouts(stranger, me, request(f"made-up-{i}", 1))
            # "one" (whose manifest verified) is kept until the next run's verifies
            assert set(store.runs.following) == {"one", f"made-up-{i}"}
        assert sampler.policy.version == 0
        # the trainer's next run still takes the sampler up; only it stays followed
        await publish_version(trainer, sampler, "two", 1)
        got = await request_rollouts(trainer.node, me, request("two", 1))
        assert {r.version for r in got} == {1} and sampler.run_id == "two"
        assert set(store.runs.following) == {"two"}
        assert {h.announce.run_id for h in store.held.values()} == {"two"}
        assert len(store.status()["weights"]["following"]) == 1


async def test_a_run_unheard_for_the_idle_limit_is_forgotten(tmp_path: Path) -> None:
    async with swarm(2, tmp_path, connect="line") as (trainer_node, node):
        trainer = WeightStore(trainer_node, announce_s=0.2, follow_idle_s=2.0)
        store = WeightStore(node, announce_s=0.2, follow_idle_s=2.0)
        await trainer_node.start(trainer)
        await node.start(store)
        import torch

        await trainer.publish("live", MODEL_RUN, 1, "full", {"w": torch.ones(4)})
        store.follow("live", trainer_node.peer_id)  # its trainer re-announces: kept
        store.follow("ghost", trainer_node.peer_id)  # nobody announces it: forgotten
        await wait_for(lambda: store.latest("live") is not None, what="live announced")
        await wait_for(lambda: "ghost" not in store.runs.following, what="ghost forgotten")
        await trio.sleep(2.5)  # past the idle limit since the trainer's publish
        assert set(store.runs.following) == {"live"}
        assert set(trainer.runs.following) == {"live"}  # our own run: never forgotten


async def test_a_run_of_ours_that_ended_keeps_its_last_version_then_goes(tmp_path: Path
                                                                         ) -> None:
    """A trainer that runs one run after another does not keep every ended run's
    versions (a full version of SmolLM2 is 540 MB): an ended run keeps its newest one
    while samplers may still pull it, and goes once nobody asks for it."""
    import torch

    async with swarm(1, tmp_path) as (node,):
        trainer = WeightStore(node, announce_s=0.2, follow_idle_s=1.5)
        await node.start(trainer)

        def versions(run: str) -> list[int]:
            return sorted(h.announce.version for h in trainer.held.values()
                          if h.announce.run_id == run)

        for v in (1, 2, 3):
            await trainer.publish("ended", MODEL_RUN, v, "full", {"w": torch.full((4,), float(v))})
            await trainer.publish("resumed", MODEL_RUN, v, "full", {"w": torch.ones(4) * v})
            await trainer.publish("live", MODEL_RUN, v, "full", {"w": torch.zeros(4) + v})
        trainer.retire("ended")
        trainer.retire("resumed")
        assert versions("ended") == [3] and versions("live") == [1, 2, 3]
        assert versions("resumed") == [3]
        await trainer.publish("resumed", MODEL_RUN, 4, "full", {"w": torch.ones(4) * 4})
        await trio.sleep(0.8)
        trainer.touch("ended")  # a lagging sampler asked for it: it stays a while more
        await trio.sleep(1.0)
        assert "ended" in trainer.runs.following and versions("ended") == [3]
        await wait_for(lambda: "ended" not in trainer.runs.following, what="ended forgotten")
        assert versions("ended") == [] and set(trainer.runs.following) == {"live", "resumed"}
        named = {c for h in trainer.held.values() for t in h.manifest.tensors
                 for c in t.chunks}
        assert set(trainer.chunks) == named
        assert versions("resumed") == [3, 4] and versions("live") == [1, 2, 3]


# ---- the holders of a version --------------------------------------------------------


def fresh_ids(n: int) -> list[str]:
    return [str(ID.from_pubkey(create_new_key_pair().public_key)) for _ in range(n)]


def have(holder: str, manifest_hash: bytes = b"h" * 32) -> Have:
    return Have(run_id="run-1", version=1, manifest_hash=manifest_hash, holder=holder,
                complete=True, timestamp=0.0)


def test_admit_holder_keeps_the_freshest_and_those_kept() -> None:
    kept = {"k0", "k1"}
    holders: dict[str, float] = {}
    for i, peer in enumerate(["k0", "k1", *(f"p{j}" for j in range(10))]):
        holders = admit_holder(holders, peer, now=float(i), max_age_s=100.0, cap=4,
                               kept=kept.__contains__)
        assert len(holders) <= 4
    assert holders.keys() == {"k0", "k1", "p8", "p9"}
    # all kept: a newcomer finds no room; a known holder is refreshed in place
    full = admit_holder({"k0": 0.0, "k1": 1.0}, "p", now=2.0, max_age_s=100.0, cap=2,
                        kept=kept.__contains__)
    assert full == {"k0": 0.0, "k1": 1.0}
    assert admit_holder(full, "k0", now=3.0, max_age_s=100.0, cap=2,
                        kept=kept.__contains__) == {"k0": 3.0, "k1": 1.0}
    # the stale leave whoever arrives, kept or not
    assert admit_holder({"k0": 0.0, "p": 15.0}, "q", now=20.0, max_age_s=10.0, cap=2,
                        kept=kept.__contains__) == {"p": 15.0, "q": 20.0}


def announce(runs: Announcements, trainer: Node, version: int = 1,
             manifest_hash: bytes = b"h" * 32) -> None:
    """`trainer` announces `version` of run-1 and `runs` hears it on gossip."""
    body, sig = seal(VersionAnnounce(run_id="run-1", model_id="m", version=version,
                                     kind="full", manifest_hash=manifest_hash,
                                     author=trainer.peer_id, timestamp=0.0),
                     trainer.key_pair.private_key)
    nursery: Any = None  # no hooks: nothing starts
    runs._heard_announce(SignedAnnounce(body=body, sig=sig), nursery)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_holders_per_version_are_capped_and_expire(tmp_path: Path) -> None:
    async with swarm(2, tmp_path, connect="line") as (node, neighbour):
        clock = FakeClock()
        runs = Announcements(node, announce_s=10.0, clock=clock)
        runs.follow("run-1")
        key = b"h" * 32
        announce(runs, neighbour)
        runs._heard_have(have(neighbour.peer_id))  # connected to us
        strangers = fresh_ids(3 * MAX_HOLDERS_PER_VERSION)
        for peer in strangers:  # relayed Haves from fresh keys
            clock.now += 0.01
            runs._heard_have(have(peer))
            assert len(runs._holders[key]) <= MAX_HOLDERS_PER_VERSION
        held = runs.holders(key)
        assert len(held) == MAX_HOLDERS_PER_VERSION and neighbour.peer_id in held
        assert set(held) - {neighbour.peer_id} == set(strangers[1 - MAX_HOLDERS_PER_VERSION:])
        # past the age, what was heard is dropped as the next Have comes in
        clock.now += 3 * runs.announce_s + 1
        assert runs.holders(key) == []
        late = fresh_ids(1)[0]
        runs._heard_have(have(late))
        assert runs._holders[key] == {late: clock.now}


async def test_haves_of_made_up_versions_leave_a_known_versions_holders(tmp_path: Path
                                                                       ) -> None:
    """Holders are kept by manifest hash: a peer naming hundreds of hashes the trainer
    never announced pushed the real version's holders out (256 versions were kept, the
    oldest heard going first). Now they are held apart, a few, and drop out first."""
    async with swarm(3, tmp_path, connect="line") as (node, trainer, holder):
        runs = Announcements(node, announce_s=10.0, clock=FakeClock())
        runs.follow("run-1", trainer.peer_id)
        key = b"k" * 32
        announce(runs, trainer, manifest_hash=key)
        runs._heard_have(have(holder.peer_id, key))
        assert runs.holders(key) == [holder.peer_id]
        stranger = fresh_ids(1)[0]
        for i in range(1024):
            runs._heard_have(have(stranger, i.to_bytes(32, "big")))
        assert runs.holders(key) == [holder.peer_id]
        assert set(runs._holders) == {key} and len(runs._early) <= MAX_EARLY_HASHES
        # another run's version, or a hash the trainer did not sign, counts for nothing
        assert runs.holders((1023).to_bytes(32, "big")) == []


async def test_a_have_heard_before_its_announcement_counts_once_announced(
        tmp_path: Path) -> None:
    async with swarm(3, tmp_path, connect="line") as (node, trainer, holder):
        runs = Announcements(node, announce_s=10.0, clock=FakeClock())
        runs.follow("run-1", trainer.peer_id)
        keys = [bytes([i]) * 32 for i in range(MAX_VERSIONS_KNOWN + 1)]
        runs._heard_have(have(holder.peer_id, keys[0]))  # gossip overtook the announcement
        assert runs.holders(keys[0]) == []
        announce(runs, trainer, 1, keys[0])
        assert runs.holders(keys[0]) == [holder.peer_id]
        # the newest versions the trainer announced are known; older ones leave, with
        # their holders
        for v, key in enumerate(keys[1:], start=2):
            announce(runs, trainer, v, key)
            runs._heard_have(have(holder.peer_id, key))
        assert runs.holders(keys[0]) == [] and keys[0] not in runs._holders
        assert all(runs.holders(key) == [holder.peer_id] for key in keys[1:])
        runs.forget("run-1")
        assert runs._holders == {} and runs.versions == {}
