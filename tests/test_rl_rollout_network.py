"""The rollout sampler on real in-process libp2p hosts with a tiny random Llama.

A trainer node asks a sampler node for rollouts: G completions per prompt, signed and
verified, log-probs recomputed with transformers' reference model (LOGPROB_ATOL),
seeded determinism, sync-mode version refusals. Bad input (garbage, oversized,
malformed, too much work, a queue full) gets a clear error and the sampler keeps
serving. The async push: verified per rollout (off the event loop), refused by reason,
relays refused, one offence a bad push; a push nobody expects is refused unread."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peerd.inference.model.head import Head
from peerd.inference.model.shard import ShardBlock
from peerd.inference.model.source import (
    ModelSource,
    load_config,
    load_tokenizer,
    reference_model,
    resolve,
)
from peerd.inference.runtime import eos_ids
from peerd.node import Node
from peerd.rl.policy import LocalPolicy
from peerd.rl.rollouts import (
    SamplerVersion,
    push_rollouts,
    request_rollouts,
    serve_pushes,
    sign_rollout,
)
from peerd.rl.sampler import RolloutSampler
from peerd.rl.types import Rollout
from peerd.rpc import call
from protocols.codec import decode, encode
from protocols.errors import PeerError, RemoteError
from protocols.framing import encode_uvarint, frame
from protocols.rollout import (
    FEATURE_ROLLOUT,
    ROLLOUT,
    ROLLOUT_PUSH,
    RolloutBatch,
    RolloutMsg,
    RolloutPush,
    RolloutRequest,
    SignedRollout,
)
from tests.harness import (
    connect_nodes,
    dial,
    error_code,
    events,
    gossip,
    open_test_node,
    rejections,
    rogue_host,
    swarm,
    wait_for,
)
from tests.models import tiny_llama_dir

LOGPROB_ATOL = 1e-4  # float32 both sides; see tests/test_rl_policy.py (measured ~1e-6)
PROMPTS = ("What is 2 + 3?", "Say hello.")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return resolve(str(tiny_llama_dir(tmp_path_factory)))


@pytest.fixture(scope="module")
def ref(tiny: ModelSource) -> Any:
    return reference_model(tiny)


def request(**kw: Any) -> RolloutRequest:
    fields: dict[str, Any] = {"run_id": "run-1", "prompts": PROMPTS, "group": 3,
                              "temperature": 1.0, "top_p": 1.0, "max_tokens": 10, "seed": 9,
                              "version": 0, "mode": "sync"} | kw
    return RolloutRequest(**fields)


@contextlib.asynccontextmanager
async def trainer_and_sampler(tmp_path: Path, tiny: ModelSource, **sampler_kw: Any
                              ) -> AsyncIterator[tuple[Node, Node, RolloutSampler]]:
    async with swarm(2, tmp_path, connect="line") as (trainer, node):
        tokenizer = load_tokenizer(tiny)
        policy = LocalPolicy(ShardBlock(tiny, 0, 4), Head(tiny))
        sampler = RolloutSampler(node, policy, tokenizer,
                                 eos_ids(tokenizer, load_config(tiny)), **sampler_kw)
        await node.start(sampler)
        yield trainer, node, sampler


async def still_serves(trainer: Node, node: Node) -> None:
    got = await request_rollouts(trainer, node.peer_id, request(prompts=("ok?",), group=1,
                                                                 max_tokens=3))
    assert len(got) == 1


async def test_rollouts_are_answered_signed_and_match_the_reference(
        tmp_path: Path, tiny: ModelSource, ref: Any) -> None:
    async with trainer_and_sampler(tmp_path, tiny) as (trainer, node, sampler):
        assert FEATURE_ROLLOUT in gossip(node).refresh().features
        got = await request_rollouts(trainer, node.peer_id, request(), vocab_size=400)
        assert [r.prompt_index for r in got] == [0, 0, 0, 1, 1, 1]
        assert len({r.group_id for r in got[:3]}) == 1 != len({r.group_id for r in got})
        tokenizer = load_tokenizer(tiny)
        worst = 0.0
        for r in got:
            assert (r.run_id, r.version, r.sampler, r.reward) == ("run-1", 0, node.peer_id, None)
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": PROMPTS[r.prompt_index]}],
                add_generation_prompt=True, tokenize=False)
            assert list(r.prompt_ids) == tokenizer(text, add_special_tokens=False).input_ids
            assert r.text == tokenizer.decode(list(r.completion_ids), skip_special_tokens=True)
            assert len(r.completion_ids) == len(r.behaviour_logprobs) <= 10
            ids = torch.tensor([list(r.prompt_ids) + list(r.completion_ids)])
            with torch.inference_mode():
                logits = ref(ids).logits[0, len(r.prompt_ids) - 1:-1]  # [C, V]
            lp = torch.log_softmax(logits.float(), dim=-1).gather(
                1, torch.tensor(r.completion_ids)[:, None])[:, 0]
            worst = max(worst, float((lp - torch.tensor(r.behaviour_logprobs)).abs().max()))
        print(f"max |logprob - reference| = {worst:.2e}")
        assert worst < LOGPROB_ATOL
        status = sampler.status()["rollout"]
        assert (status["requests_served"], status["rollouts_produced"], status["version"]) \
            == (1, 6, 0)
        assert status["idle_s"] > 0


async def test_same_seed_same_rollouts(tmp_path: Path, tiny: ModelSource) -> None:
    async with trainer_and_sampler(tmp_path, tiny) as (trainer, node, _):
        first = await request_rollouts(trainer, node.peer_id, request())
        again = await request_rollouts(trainer, node.peer_id, request())
        other = await request_rollouts(trainer, node.peer_id, request(seed=10))
        assert first == again
        assert [r.completion_ids for r in other] != [r.completion_ids for r in first]
        # one seed a prompt: each prompt's rollouts are those of a request of it alone
        seeded = await request_rollouts(trainer, node.peer_id, request(seeds=(21, 22)))
        for i, prompt in enumerate(PROMPTS):
            alone = await request_rollouts(trainer, node.peer_id,
                                           request(prompts=(prompt,), seed=21 + i))
            mine = [r for r in seeded if r.prompt_index == i]
            assert [r.completion_ids for r in mine] == [r.completion_ids for r in alone]


async def test_a_request_names_the_oldest_version_it_takes(tmp_path: Path,
                                                           tiny: ModelSource) -> None:
    async with trainer_and_sampler(tmp_path, tiny) as (trainer, node, sampler):
        # behind, with no way to catch up (no weights service wired): refused, no offence
        with pytest.raises(SamplerVersion) as info:
            await request_rollouts(trainer, node.peer_id, request(version=2))
        assert (info.value.code, info.value.have, info.value.want) == ("behind", 0, 2)
        await sampler.policy.apply(3, full={})
        sampler.run_id = "run-1"  # as catching up to run-1's version 3 would have set
        # at or past the oldest version asked: answered, tagged with the version used
        for mode in ("sync", "async"):
            got = await request_rollouts(trainer, node.peer_id, request(version=2, mode=mode))
            assert {r.version for r in got} == {3}
        # a policy that follows a run serves no other trainer's run while it is asked
        async with open_test_node(tmp_path / "elsewhere") as elsewhere:
            await connect_nodes(elsewhere, node)
            with pytest.raises(RemoteError) as other:
                await request_rollouts(elsewhere, node.peer_id,
                                       dataclasses.replace(request(version=0), run_id="run-2"))
            assert other.value.code == "other_run"
            assert not node.offences.get(elsewhere.peer_id)
        # ... but its own trainer's next run at once (a trainer runs one at a time)
        got = await request_rollouts(trainer, node.peer_id,
                                     dataclasses.replace(request(version=0), run_id="run-2"))
        assert {r.version for r in got} == {0} and sampler.run_id == "run-2"
        assert not trainer.offences.get(node.peer_id) and not node.offences.get(trainer.peer_id)


async def test_bad_requests_get_a_clear_error_and_the_sampler_keeps_serving(
        tmp_path: Path, tiny: ModelSource) -> None:
    async with trainer_and_sampler(tmp_path, tiny) as (trainer, node, _), \
            rogue_host(tmp_path) as rogue:
        await dial(rogue.host, node)
        cases = [
            (frame(b"\xc1\xc1 not msgpack"), "malformed"),
            (frame(encode(RolloutBatch(rollouts=()))), "wrong_type"),
            (frame(encode(request(group=0))), "malformed"),
            (frame(encode(request(prompts=("x",) * 64, group=64))), "oversized"),
            (frame(encode(request(temperature=float("inf")))), "malformed"),
            # the length alone refuses it (2 MB written would wait on the muxer's window)
            (encode_uvarint(ROLLOUT.max_request_bytes + 1) + b"x" * 64, "oversized"),
        ]
        for raw, code in cases:
            assert error_code(await rogue.exchange(node, ROLLOUT.id, raw)) == code, code
        assert node.offences[rogue.peer_id]["malformed"] >= 3
        assert rejections(node).get("oversized", 0) >= 2
        # a prompt our tokenizer makes too long: refused, not counted against the trainer
        with pytest.raises(RemoteError) as info:
            await request_rollouts(trainer, node.peer_id,
                                   request(prompts=("1 2 3 4 5 6 7 8 9 " * 60,), max_tokens=10))
        assert info.value.code == "too_long"
        assert not node.offences.get(trainer.peer_id)
        await still_serves(trainer, node)


async def test_beyond_the_queue_a_request_is_refused_busy(tmp_path: Path,
                                                          tiny: ModelSource) -> None:
    async with trainer_and_sampler(tmp_path, tiny, max_queued=0) as (trainer, node, sampler):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(request_rollouts, trainer, node.peer_id,
                               request(group=8, max_tokens=64, prompts=("long",) * 2))
            await wait_for(lambda: sampler._waiting > 0, what="the first request in hand")
            with pytest.raises(RemoteError) as info:
                await request_rollouts(trainer, node.peer_id, request())
            assert info.value.code == "busy"
        assert not node.offences.get(trainer.peer_id)
        await still_serves(trainer, node)


async def test_a_lying_sampler_is_refused_and_counted(tmp_path: Path, tiny: ModelSource
                                                      ) -> None:
    async with swarm(1, tmp_path) as (trainer,), rogue_host(tmp_path) as rogue:
        await dial(rogue.host, trainer)
        one = request(prompts=("x",), group=1)
        msg = RolloutMsg(run_id="run-1", seed=9, prompt_index=0, index=0, group_id="g",
                         prompt_ids=(1, 2), completion_ids=(5,), behaviour_logprobs=(-0.1,),
                         version=0, sampler=rogue.peer_id, text="5")
        honest = sign_rollout(msg, rogue.key_pair.private_key)
        tampered = SignedRollout(body=encode(RolloutMsg(**{
            **{f: getattr(msg, f) for f in msg.__dataclass_fields__},
            "behaviour_logprobs": (-0.0001,)})), sig=honest.sig)
        for batch, asked, reason in [
            (RolloutBatch(rollouts=(tampered,)), one, "bad_signature"),
            (RolloutBatch(rollouts=(honest, honest)), one, "wrong_rollout"),  # two for one
            (RolloutBatch(rollouts=(sign_rollout(RolloutMsg(**{
                **{f: getattr(msg, f) for f in msg.__dataclass_fields__}, "version": 1}),
                rogue.key_pair.private_key),)), dataclasses.replace(one, version=2),
             "wrong_rollout"),  # older than the oldest version asked for
        ]:
            rogue.answer(ROLLOUT.id, frame(encode(batch)))
            with pytest.raises(PeerError) as info:
                await request_rollouts(trainer, rogue.peer_id, asked)
            assert info.value.reason == reason
            assert trainer.offences[rogue.peer_id][reason] >= 1
        rogue.answer(ROLLOUT.id, frame(encode(RolloutBatch(rollouts=(honest,)))))
        assert (await request_rollouts(trainer, rogue.peer_id, one))[0].completion_ids == (5,)


async def test_async_push_is_verified_and_acked_by_reason(tmp_path: Path,
                                                          tiny: ModelSource) -> None:
    async with trainer_and_sampler(tmp_path, tiny) as (trainer, node, sampler), \
            rogue_host(tmp_path) as rogue:
        pushed: list[tuple[str, list[Rollout]]] = []

        def on_push(peer: str, rollouts: list[Rollout]) -> dict[str, int]:
            pushed.append((peer, rollouts))
            return {"admitted": len(rollouts) - 1, "stale": 1}  # the buffer's verdict

        serve_pushes(trainer, on_push, expects=lambda peer, run: None)
        signed = await sampler.produce(request(mode="async", version=0))
        ack = await push_rollouts(node, trainer.peer_id, "run-1", signed)
        assert (ack.admitted, ack.refused) == (5, {"stale": 1})
        assert pushed[0][0] == node.peer_id and len(pushed[0][1]) == 6
        assert {r.version for r in pushed[0][1]} == {0}

        # one tampered rollout among good ones: refused by reason, the rest go in
        bad = SignedRollout(body=signed[0].body, sig=signed[1].sig)
        ack = await push_rollouts(node, trainer.peer_id, "run-1", [bad, *signed[1:3]])
        assert (ack.admitted, ack.refused) == (1, {"bad_signature": 1, "stale": 1})
        assert trainer.offences[node.peer_id]["bad_signature"] == 1
        # another run's push, and a peer relaying the sampler's rollouts as its own
        ack = await push_rollouts(node, trainer.peer_id, "run-2", signed[:2])
        assert (ack.admitted, ack.refused) == (0, {"wrong_rollout": 2})
        await dial(rogue.host, trainer)
        raw = frame(encode(RolloutPush(run_id="run-1", rollouts=tuple(signed[:2]))))
        reply = await rogue.exchange(trainer, ROLLOUT_PUSH.id, raw)
        assert reply is not None
        # (checked against the pusher's key before the body is read: not its signature)
        assert decode(reply, type(ack)).refused == {"bad_signature": 2}
        # garbage and an empty push: an error, and the trainer keeps taking pushes
        assert error_code(await rogue.exchange(trainer, ROLLOUT_PUSH.id, frame(b"\x00"))) \
            == "malformed"
        raw = frame(encode(RolloutPush(run_id="run-1", rollouts=())))
        assert error_code(await rogue.exchange(trainer, ROLLOUT_PUSH.id, raw)) == "malformed"
        ack = await push_rollouts(node, trainer.peer_id, "run-1", signed[:1])
        assert ack.admitted == 0 and ack.refused == {"stale": 1}
        assert len(pushed) == 3  # the refused-in-full pushes never reached the buffer


async def test_a_junk_push_is_refused_whole_before_any_rollout_is_read(
        tmp_path: Path, tiny: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """256 junk rollouts (6 MB): from a peer nobody expects, refused at once, nothing
    verified; from one expected, each signature is checked before its body is read, in
    a worker thread, and the push counts one offence, not 256. An honest push lands."""
    import threading

    import peerd.rl.rollouts as rollouts

    checked: list[str] = []
    real = rollouts.verified

    def counted(*args: Any, **kw: Any) -> Any:
        checked.append(threading.current_thread().name)
        return real(*args, **kw)

    monkeypatch.setattr(rollouts, "verified", counted)
    async with trainer_and_sampler(tmp_path, tiny) as (trainer, node, sampler):
        expected: set[tuple[str, str]] = set()
        pushed: list[list[Rollout]] = []

        def on_push(peer: str, got: list[Rollout]) -> dict[str, int]:
            pushed.append(got)
            return {"admitted": len(got)}

        serve_pushes(trainer, on_push, expects=lambda peer, run: None if (peer, run) in
                     expected else "unasked")
        junk = [SignedRollout(body=b"\xc1" * 24_000, sig=b"\x00" * 64)] * 256
        ack = await push_rollouts(node, trainer.peer_id, "run-1", junk)
        assert (ack.admitted, ack.refused) == (0, {"unasked": 256})
        assert checked == [] and not trainer.offences.get(node.peer_id)

        expected.add((node.peer_id, "run-1"))
        ack = await push_rollouts(node, trainer.peer_id, "run-1", junk)
        assert (ack.admitted, ack.refused) == (0, {"bad_signature": 256})  # not "malformed"
        assert dict(trainer.offences[node.peer_id]) == {"bad_signature": 1}
        assert rejections(trainer)["bad_signature"] == 1
        assert len(checked) == 256 and threading.main_thread().name not in checked
        assert pushed == []

        signed = await sampler.produce(request(mode="async", version=0))
        ack = await push_rollouts(node, trainer.peer_id, "run-1", signed)
        assert (ack.admitted, ack.refused) == (6, {})
        assert [r.sampler for r in pushed[0]] == [node.peer_id] * 6


async def test_a_peer_serving_the_model_becomes_a_sampler(tmp_path: Path, tiny: ModelSource
                                                          ) -> None:
    from peerd.inference.slot import ModelOptions
    from tests.harness import serve_model

    async with swarm(2, tmp_path, connect="line") as (trainer, node):
        runtime = await serve_model(node, ModelOptions(spec=str(tiny.path), layers=(0, 4),
                                                       device="cpu"))
        await node.start(RolloutSampler.from_runtime(node, runtime))
        got = await request_rollouts(trainer, node.peer_id, request(prompts=("hi",), group=2))
        assert len(got) == 2 and {r.sampler for r in got} == {node.peer_id}


async def test_a_pushed_order_that_stalls_gives_up_its_turn(
        tmp_path: Path, tiny: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    """An order whose generation never finishes (a pipeline route that stopped
    answering) is dropped after the sampler's order bound: the turn is free again and
    the next request is served."""
    async with trainer_and_sampler(tmp_path, tiny, order_timeout_s=1.0) \
            as (trainer, node, sampler):
        generate_many = sampler.policy.generate_many
        stalled = trio.Event()

        async def stall(*args: Any, **kw: Any) -> Any:
            stalled.set()
            await trio.sleep_forever()

        monkeypatch.setattr(sampler.policy, "generate_many", stall)
        reply = await call(trainer.host, node.peer_id, ROLLOUT,
                           request(prompts=("ok?",), group=1, max_tokens=3, mode="async",
                                   push=True), dial=trainer.new_stream)
        assert reply.rollouts == ()  # taken: made and pushed later
        with trio.fail_after(10):
            await stalled.wait()
        assert sampler._turn.locked()
        await wait_for(lambda: events(node, "rollout.push_failed"), 10,
                       "the stalled order given up")
        assert not sampler._turn.locked() and sampler._orders == 0
        monkeypatch.setattr(sampler.policy, "generate_many", generate_many)
        with trio.fail_after(30):
            await still_serves(trainer, node)
