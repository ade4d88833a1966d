"""A pipeline sampler on real in-process libp2p hosts: a tiny random Llama split over
two `--rollout` peers (the entry: the head and layers [0, 2); a rollout shard: layers
[2, 4)), with a third peer publishing the run's versions.

Its rollouts equal a whole-model LocalPolicy's at the same version and seed: the same
tokens, behaviour log-probs within LOGPROB_ATOL, before and after a new version is
published and applied (each peer pulling only its own tensors). A shard that is
behind refuses the session and serves it after its pull. A tagged session never sees
a version change: the shard's apply waits for it, and past its deadline ends it
(REVOKED) before any weight changes. While it follows a run, a shard refuses plain
sessions and plain routing goes around it. A bad tag is refused as bad input and the
shard keeps serving."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peerd.inference.model.head import Head
from peerd.inference.model.shard import ShardBlock
from peerd.inference.model.source import resolve
from peerd.inference.slot import ModelOptions
from peerd.inference.swarm.pipeline import PipelineFailure
from peerd.inference.swarm.routing import NoRoute, Route, Span
from peerd.inference.swarm.server import Refused
from peerd.node import Node
from peerd.rl.pipeline_policy import NO_PIPELINE, PipelinePolicy
from peerd.rl.policy import Generation, LocalPolicy
from peerd.rl.rollout_service import Rollouts
from peerd.rl.run import RunSpec
from peerd.rl.weights import WeightStore
from peerd.rpc import Busy
from peerd.streams import OpenRefused, open_session
from protocols.rollout import FEATURE_PIPELINE_SAMPLER, FEATURE_ROLLOUT, FEATURE_ROLLOUT_SHARD
from protocols.shard import BEHIND as SHARD_BEHIND
from protocols.shard import (
    FEATURE_ROWS,
    FEATURE_TAGGED_ONLY,
    FOLLOWING,
    REVOKED,
    SHARD,
    UNVERSIONED,
    Hop,
    Open,
    PolicyTag,
)
from tests.harness import connect_nodes, gossip, rejections, serve_model, swarm, wait_for
from tests.models import tiny_llama_dir
from tests.rl_swarm import add_sampler, rl_pipeline_swarm, seven_task

# float32 everywhere, the same modules and batches (a prompt length's rows together);
# the pipeline prefills every row where LocalPolicy prefills a prompt once, and keeps
# ended rows in the batch where LocalPolicy drops them, so kernels sum in other orders:
# float rounding, as in tests/test_rl_policy.py
LOGPROB_ATOL = 1e-4
RUN = "run-p"
PROMPTS = [[1, 17, 42, 99, 7, 250, 3], [5, 6, 7]]
EOS = {2}
SETTINGS: dict[str, Any] = {"n": 3, "temperature": 1.0, "top_p": 1.0, "max_tokens": 8,
                            "seed": 11, "eos_ids": EOS}
Q0 = "model.layers.0.self_attn.q_proj.weight"  # the entry's
DOWN3 = "model.layers.3.mlp.down_proj.weight"  # the shard's


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@dataclass
class Swarm:
    trainer: Node
    store: WeightStore  # the trainer's: it publishes the run's versions
    entry: Rollouts  # head + [0, 2): samples through the pipeline
    shard: Rollouts  # [2, 4): a rollout shard
    model_id: str

    @property
    def policy(self) -> PipelinePolicy:
        policy: PipelinePolicy = self.entry.sampler.policy
        return policy


@contextlib.asynccontextmanager
async def pipeline_swarm(tmp_path: Path, tiny: Path) -> AsyncIterator[Swarm]:
    async with swarm(3, tmp_path, connect="star") as (trainer, entry, shard):
        await connect_nodes(entry, shard)
        store = WeightStore(trainer)
        await trainer.start(store)
        services = [await add_sampler(entry, tiny, (0, 2)),
                    await add_sampler(shard, tiny, (2, 4))]
        sw = Swarm(trainer, store, *services, model_id=resolve(str(tiny)).model_id)
        await wait_for(lambda: isinstance(sw.policy.route(), Route), what="a pipeline")
        yield sw


def reference(tiny: Path) -> LocalPolicy:
    source = resolve(str(tiny))
    return LocalPolicy(ShardBlock(source, 0, 4), Head(source))


def new_version(ref: LocalPolicy, seed: int) -> dict[str, torch.Tensor]:
    """A full update touching the entry's layers, its head and the shard's layers."""
    g = torch.Generator().manual_seed(seed)
    params = ref.parameters()
    return {n: torch.randn(params[n][0], generator=g) * 0.1 for n in (Q0, DOWN3,
                                                                      "lm_head.weight")}


def assert_same(got: Generation, want: Generation) -> None:
    assert got.version == want.version
    for got_group, want_group in zip(got.groups, want.groups, strict=True):
        for a, b in zip(got_group, want_group, strict=True):
            assert a.ids == b.ids
            assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                                  atol=LOGPROB_ATOL)


async def ask_for(sw: Swarm, version: int) -> None:
    """Ask each hop for a session tagged `version`, as the entry's next generation
    would (the entry's own gate directly, the shard over the wire): each refuses
    (BEHIND) and moves to it, from the tensors it fetched when it was announced."""
    tag = PolicyTag(RUN, version, sw.trainer.peer_id)
    part = f"{RUN}@{version} (part)"
    for peer in (sw.entry, sw.shard):
        store = peer.node.service(WeightStore)
        await wait_for(lambda store=store: part in store.status()["weights"]["held"],
                       what=f"a peer to fetch version {version}")
    with pytest.raises(Refused) as refused:
        await sw.entry.gate.admit(tag, lambda: None)
    assert refused.value.code == SHARD_BEHIND
    route = sw.policy.route()
    assert isinstance(route, Route)
    hops = tuple(Hop(s.peer_id, s.start, s.end) for s in route.spans)
    entry = sw.entry.node
    opening = Open(session=f"ask-for-{version}", model_id=sw.model_id, route=hops, hop=1,
                   entry_peer=entry.peer_id, max_length=64, dtype="float32", policy=tag)
    with pytest.raises(OpenRefused) as refused_there:
        await open_session(entry.new_stream, sw.shard.node.peer_id, SHARD, opening)
    assert refused_there.value.code == SHARD_BEHIND, refused_there.value


async def test_pipeline_rollouts_equal_the_whole_models_before_and_after_a_version(
        tmp_path: Path, tiny: Path) -> None:
    async with pipeline_swarm(tmp_path, tiny) as sw:
        entry_features = gossip(sw.entry.node).refresh().features
        assert {FEATURE_ROLLOUT, FEATURE_PIPELINE_SAMPLER,
                FEATURE_ROLLOUT_SHARD} <= set(entry_features)
        assert sw.shard.sampler is None  # a shard without the first layer does not sample
        ref = reference(tiny)
        sw.policy.take_up(RUN, sw.trainer.peer_id)
        before = await sw.policy.generate_many(PROMPTS, **SETTINGS)
        assert_same(before, await ref.generate_many(PROMPTS, **SETTINGS))
        assert sw.shard.gate.following == RUN  # taken up at the first tagged session
        # a prompt's completions decoded as the rows of one session, the same tokens
        assert sw.policy.status()["peak_in_flight"] > 1
        assert sw.policy.status()["peak_rows"] == SETTINGS["n"]

        update = new_version(ref, 1)
        await sw.store.publish(RUN, sw.model_id, 1, "full", update)
        # each peer fetches only its own tensors, and applies them between generations
        shard_store = sw.shard.node.service(WeightStore)
        entry_store = sw.entry.node.service(WeightStore)
        await wait_for(lambda: shard_store.status()["weights"]["held"] == [f"{RUN}@1 (part)"]
                       and entry_store.status()["weights"]["held"] == [f"{RUN}@1 (part)"],
                       what="both peers to fetch their part of version 1")
        assert sw.policy.version == sw.shard.gate.weights.version == 0
        await ref.apply(1, full=update)
        after = await sw.policy.generate_many(PROMPTS, **SETTINGS)
        assert_same(after, await ref.generate_many(PROMPTS, **SETTINGS))
        assert [c.ids for g in after.groups for c in g] != [c.ids for g in before.groups
                                                             for c in g]
        assert sw.policy.version == sw.shard.status()["rollout"]["shard"]["version"] == 1
        assert sw.shard.gate.refused["behind"] >= 1  # asked for 1, it applied what it held


async def test_rows_that_end_early_ride_along_and_a_hop_without_rows_gets_one_a_session(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A row that meets EOS rides to its batch's end unread: the completions are still
    LocalPolicy's, some shorter than the others. Through a hop that does not list
    FEATURE_ROWS (a peer before rows) each completion is a session of its own, and
    the tokens are the same again."""
    async with pipeline_swarm(tmp_path, tiny) as sw:
        ref = reference(tiny)
        sw.policy.take_up(RUN, sw.trainer.peer_id)
        plain = await ref.generate_many(PROMPTS, **SETTINGS)
        # an EOS that ends the first completion at its third token, and not every other
        stop = plain.groups[0][0].ids[2]
        settings = SETTINGS | {"eos_ids": {stop}}
        want = await ref.generate_many(PROMPTS, **settings)
        lengths = [len(c.ids) for g in want.groups for c in g]
        assert lengths[0] == 3 and max(lengths) == SETTINGS["max_tokens"], lengths
        assert_same(await sw.policy.generate_many(PROMPTS, **settings), want)
        assert sw.policy.status()["peak_rows"] == SETTINGS["n"]

        real = sw.shard.entry_fields

        def before_rows() -> Any:
            fields = real()
            fields["features"] = tuple(f for f in fields["features"] if f != FEATURE_ROWS)
            return fields

        monkeypatch.setattr(sw.shard, "entry_fields", before_rows)
        gossip(sw.shard.node).refresh()
        await wait_for(lambda: not sw.policy._rows_taken(),
                       what="the entry to see a hop without rows")
        sw.policy.peak_rows = 0
        assert_same(await sw.policy.generate_many(PROMPTS, **settings), want)
        assert sw.policy.status()["peak_rows"] == 1


async def test_a_shard_that_is_behind_refuses_then_serves_after_its_pull(
        tmp_path: Path, tiny: Path) -> None:
    async with pipeline_swarm(tmp_path, tiny) as sw:
        ref = reference(tiny)
        update = new_version(ref, 2)
        await sw.store.publish(RUN, sw.model_id, 1, "full", update)  # nobody follows yet
        sw.policy.take_up(RUN, sw.trainer.peer_id)
        await sw.policy.follower.catch_up(RUN, 1, sw.trainer.peer_id)
        assert (sw.policy.version, sw.shard.gate.weights.version) == (1, 0)
        got = await sw.policy.generate_many(PROMPTS, **SETTINGS)
        await ref.apply(1, full=update)
        assert_same(got, await ref.generate_many(PROMPTS, **SETTINGS))
        assert sw.shard.gate.refused["behind"] >= 1
        assert sw.policy.retries["behind"] >= 1
        assert sw.shard.gate.weights.version == 1


async def test_a_generation_under_way_ends_at_its_version_and_the_next_takes_the_new(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Async mode's case: the trainer publishes while the pipeline samples. Both peers
    fetch the version and wait: the generation's later completions are admitted at its
    version, none is refused and started again; the next generation takes the new one."""
    async with pipeline_swarm(tmp_path, tiny) as sw:
        ref = reference(tiny)
        sw.policy.take_up(RUN, sw.trainer.peer_id)
        await sw.policy.generate_many(PROMPTS[:1], **SETTINGS | {"n": 1})  # both follow
        retries = dict(sw.policy.retries)
        sw.policy.parallel = 1  # one completion at a time: no session open between two
        pipeline = sw.policy.generator.pipeline
        real_open, opened, go_on = pipeline.open, [0], trio.Event()

        async def open_second_after_the_publish(*args: Any, **kwargs: Any) -> Any:
            opened[0] += 1
            if opened[0] == 2:
                await go_on.wait()
            return await real_open(*args, **kwargs)

        monkeypatch.setattr(pipeline, "open", open_second_after_the_publish)
        got: list[Generation] = []
        update = new_version(ref, 5)
        async with trio.open_nursery() as nursery:
            async def generate() -> None:
                got.append(await sw.policy.generate_many(PROMPTS, **SETTINGS))

            nursery.start_soon(generate)
            await wait_for(lambda: opened[0] == 2, what="the first completion done")
            await sw.store.publish(RUN, sw.model_id, 1, "full", update)
            for peer in (sw.entry, sw.shard):
                store = peer.node.service(WeightStore)
                await wait_for(lambda store=store: f"{RUN}@1 (part)" in
                               store.status()["weights"]["held"], what="version 1 fetched")
            await trio.sleep(0.3)  # (an apply of its own would have begun by now)
            assert sw.policy.version == sw.shard.gate.weights.version == 0
            go_on.set()
        assert got[0].version == 0 and sw.policy.retries == retries  # nothing again
        assert_same(got[0], await ref.generate_many(PROMPTS, **SETTINGS))
        await ref.apply(1, full=update)
        after = await sw.policy.generate_many(PROMPTS, **SETTINGS)
        assert after.version == 1
        assert_same(after, await ref.generate_many(PROMPTS, **SETTINGS))
        assert sw.shard.gate.weights.version == 1


async def test_a_tagged_session_never_sees_a_version_change(tmp_path: Path,
                                                            tiny: Path) -> None:
    async with pipeline_swarm(tmp_path, tiny) as sw:
        ref = reference(tiny)
        sw.policy.take_up(RUN, sw.trainer.peer_id)
        await sw.policy.generate_many(PROMPTS[:1], **SETTINGS | {"n": 1})  # both follow
        route = sw.policy.route()
        assert isinstance(route, Route)
        generator = sw.entry.model.runtime.generator  # type: ignore[union-attr]
        tag = PolicyTag(RUN, 0, sw.trainer.peer_id)
        ids = PROMPTS[0]
        session = await generator.pipeline.open(route, 64, "float32", policy=tag)
        await session.step(generator.embed(ids[:4]), 0)
        update = new_version(ref, 3)
        await sw.store.publish(RUN, sw.model_id, 1, "full", update)
        shard = sw.shard.gate.weights
        await ask_for(sw, 1)  # both hops start their apply; it waits for the session
        await wait_for(lambda: shard.applying and sw.policy.weights.applying,
                       what="both applies to wait")
        await trio.sleep(0.3)
        assert shard.version == 0 and sw.policy.version == 0  # held by the session
        out = await session.step(generator.embed(ids[4:]), 4)
        with torch.inference_mode():  # the whole model at version 0, in one pass
            whole = ref.block.forward(ref.head.embed(torch.tensor([ids])), 0,
                                      ref.block.new_cache())  # [1, P, H]
        assert torch.allclose(out.hidden, whole[:, 4:], atol=1e-5)
        await session.close()
        await wait_for(lambda: shard.version == sw.policy.version == 1,
                       what="the apply once the session closed")

        # a session left open past the deadline is ended before the weights change
        shard.revoke_after_s = sw.policy.weights.revoke_after_s = 0.3
        session = await generator.pipeline.open(route, 64, "float32",
                                                policy=PolicyTag(RUN, 1, sw.trainer.peer_id))
        await session.step(generator.embed(ids[:4]), 0)
        await sw.store.publish(RUN, sw.model_id, 2, "full", new_version(ref, 4))
        await ask_for(sw, 2)
        await wait_for(lambda: shard.version == sw.policy.version == 2,
                       what="the apply after revoking")
        with pytest.raises(PipelineFailure) as failed:
            await session.step(generator.embed(ids[4:]), 4)
        assert failed.value.code == REVOKED
        await session.close()


async def test_a_following_shard_refuses_plain_sessions_and_plain_routes_avoid_it(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with pipeline_swarm(tmp_path, tiny) as sw:
        generator = sw.entry.model.runtime.generator  # type: ignore[union-attr]
        assert isinstance(generator.route(), Route)  # before any run: a plain route
        assert sw.shard.status()["rollout"]["shard"]["plain_sessions"] == "served"
        sw.policy.take_up(RUN, sw.trainer.peer_id)
        await sw.policy.generate_many(PROMPTS[:1], **SETTINGS | {"n": 1})
        assert FEATURE_TAGGED_ONLY in gossip(sw.shard.node).refresh().features
        assert "refused" in sw.shard.status()["rollout"]["shard"]["plain_sessions"]
        route = sw.policy.route()
        assert isinstance(route, Route)
        with pytest.raises(PipelineFailure) as refused:
            await generator.pipeline.open(route, 64, "float32")
        assert refused.value.code == FOLLOWING
        await wait_for(lambda: isinstance(generator.route(), NoRoute),
                       what="plain routing to go around the following shards")
        # once the run has been quiet (no session open), a plain session takes the
        # shards back to the model as loaded
        monkeypatch.setattr("peerd.rl.shard_gate.RUN_IDLE_S", 0.0)
        session = await generator.pipeline.open(route, 64, "float32")
        await session.close()
        assert sw.shard.gate.following is None and sw.entry.gate.following is None
        assert sw.shard.status()["rollout"]["shard"]["plain_sessions"] == "served"
        await wait_for(lambda: isinstance(generator.route(), Route),
                       what="plain routing through the shards again")


async def test_a_new_runs_sessions_arriving_together_leave_the_old_run_once(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new run's first completions open their sessions at once on shards that follow
    a quiet old run: one session takes each shard back to version 0, the others find
    it done, and the generation goes through without a retry."""
    async with pipeline_swarm(tmp_path, tiny) as sw:
        sw.policy.take_up(RUN, sw.trainer.peer_id)
        await sw.policy.generate_many(PROMPTS[:1], **SETTINGS | {"n": 1})  # both follow
        resets, real_reset = [0], sw.shard.gate.weights.reset

        async def counted() -> None:  # slow, as copying back a real model's base is
            resets[0] += 1
            await trio.sleep(0.3)
            await real_reset()

        monkeypatch.setattr(sw.shard.gate.weights, "reset", counted)
        monkeypatch.setattr("peerd.rl.shard_gate.RUN_IDLE_S", 0.0)
        retries = dict(sw.policy.retries)
        sw.policy.take_up("run-b", sw.trainer.peer_id)
        got = await sw.policy.generate_many(PROMPTS, **SETTINGS)  # 2 sessions at once
        assert got.version == 0 and sw.policy.retries == retries
        assert sw.shard.gate.following == sw.entry.gate.following == "run-b"
        assert resets[0] == 1


async def test_a_bad_tag_is_refused_and_the_shard_keeps_serving(tmp_path: Path,
                                                                tiny: Path) -> None:
    async with pipeline_swarm(tmp_path, tiny) as sw:
        route = sw.policy.route()
        assert isinstance(route, Route)
        hops = tuple(Hop(s.peer_id, s.start, s.end) for s in route.spans)
        shard_id, entry = sw.shard.node.peer_id, sw.entry.node
        assert hops[1].peer_id == shard_id
        for i, bad in enumerate((PolicyTag("bad run!", 0, sw.trainer.peer_id),
                                 PolicyTag(RUN, -3, sw.trainer.peer_id),
                                 PolicyTag(RUN, 0, ""))):
            opening = Open(session=f"bad-session-{i}", model_id=sw.model_id, route=hops,
                           hop=1, entry_peer=entry.peer_id, max_length=64,
                           dtype="float32", policy=bad)
            with pytest.raises(OpenRefused) as refused:
                await open_session(entry.new_stream, shard_id, SHARD, opening)
            assert refused.value.code == "malformed"
        assert rejections(sw.shard.node).get("malformed", 0) == 3
        assert sw.shard.gate.following is None  # a bad tag took nothing up
        sw.policy.take_up(RUN, sw.trainer.peer_id)
        got = await sw.policy.generate_many(PROMPTS[:1], **SETTINGS | {"n": 1})
        assert got.version == 0 and len(got.groups[0][0].ids) >= 1


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_trainer_trains_with_a_pipeline_sampler(tmp_path: Path, tiny: Path,
                                                        mode: str) -> None:
    """GRPO steps whose every rollout came through the pipeline, each checked by the
    trainer against its own log-probs (the float32 tolerance); in async mode at
    staleness 0 (pushed orders), so every rollout is still on-policy."""
    async with rl_pipeline_swarm(tmp_path, tiny) as (training, (entry, shard)):
        spec = RunSpec(model=str(tiny), task=str(seven_task(tmp_path)), run_id="pipe",
                       group=4, batch=2, steps=3, max_tokens=3, lr=0.02, seed=1,
                       checkpoint_every=3, mode=mode, staleness=0)
        run = await training.start_run(spec)
        with trio.fail_after(120):
            await run.ended.wait()
        out = run.to_json()
        assert run.state == "done", out
        assert out["step"] == 3 and out["staleness"] == {"0": 3 * 2 * 4}
        assert out["last"]["verify_max_dev"] <= spec.verify_tolerance
        assert not out["dropped"]
        assert entry.sampler.policy.generations > 0 and shard.gate.admitted > 0
        # the last version is fetched; a generation would apply it (none comes)
        await wait_for(lambda: "pipe@3 (part)" in
                       shard.node.service(WeightStore).status()["weights"]["held"],
                       what="the shard to fetch the last version")
        assert entry.sampler.policy.version == shard.gate.weights.version == 2


async def test_a_tagged_session_is_refused_by_a_shard_that_does_not_hold_versions(
        tmp_path: Path, tiny: Path) -> None:
    """A peer serving the model without the rollout service: tagged sessions refused
    (UNVERSIONED), plain ones served as ever."""
    async with swarm(2, tmp_path) as (plain, entry):
        runtime = await serve_model(plain, ModelOptions(spec=str(tiny), torch_threads=1))
        mine = await serve_model(entry, ModelOptions(spec=str(tiny), layers=(0, 2),
                                                     torch_threads=1))
        route = Route((Span(plain.peer_id, 0, 4, 0.0),), 0.0)
        with pytest.raises(PipelineFailure) as refused:
            await mine.generator.pipeline.open(route, 64, "float32",
                                               policy=PolicyTag(RUN, 0, entry.peer_id))
        assert refused.value.code == UNVERSIONED and runtime.server.gate is None
        session = await mine.generator.pipeline.open(route, 64, "float32")
        out = await session.step(mine.generator.embed(PROMPTS[0]), 0)
        assert out.hidden.shape[1] == len(PROMPTS[0])
        await session.close()


async def test_a_pipeline_that_cannot_be_had_fails_within_the_deadline(tmp_path: Path,
                                                                       tiny: Path) -> None:
    """The only shard for layers [2, 4) follows another run: it refuses (OTHER_RUN), is
    routed around, and with no other the request fails "no_pipeline" (not "busy": the
    trainer counts it); the entry keeps sampling once the shard is free again."""
    async with pipeline_swarm(tmp_path, tiny) as sw:
        sw.shard.gate.follower.take_up("other-run", sw.trainer.peer_id)
        sw.policy.take_up(RUN, sw.trainer.peer_id)
        sw.policy.deadline_s = 1.5
        with trio.fail_after(10), pytest.raises(Busy) as failed:
            await sw.policy.generate_many(PROMPTS[:1], **SETTINGS | {"n": 1})
        assert failed.value.reason == NO_PIPELINE
        assert sw.shard.gate.refused["other_run"] >= 1
        assert sw.policy.retries["other_run"] >= 1 and sw.policy.retries["no_route"] >= 1
        sw.shard.gate.follower.leave()
        sw.policy.bans.forgive(sw.shard.node.peer_id)
        got = await sw.policy.generate_many(PROMPTS[:1], **SETTINGS | {"n": 1})
        assert got.version == 0
