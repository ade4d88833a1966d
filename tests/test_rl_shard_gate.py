"""Pipeline samplers' rules without a network: which OPEN a rollout shard admits
(`admission`), the PolicyTag on the wire (left off when absent), and versions held by
sessions (versions.py: an apply waits for holders, refuses new ones meanwhile, and
revokes revocable ones past its deadline; a slice of the layers applies only its own
tensors)."""

from __future__ import annotations

import os

import pytest
import torch
import trio

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peerd.inference.model.shard import ShardBlock
from peerd.inference.model.source import ModelSource, resolve
from peerd.rl.shard_gate import ADMIT, admission
from peerd.rl.versions import PolicyError, VersionedWeights
from protocols.codec import decode, encode
from protocols.errors import WireError
from protocols.shard import (
    AHEAD,
    BEHIND,
    FOLLOWING,
    OTHER_RUN,
    Hop,
    Open,
    PolicyTag,
)
from tests.models import tiny_llama_dir

TRAINER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
DOWN = "model.layers.3.mlp.down_proj.weight"


def tag(version: int = 2, run: str = "run-a") -> PolicyTag:
    return PolicyTag(run_id=run, version=version, trainer=TRAINER)


# ---- admission ---------------------------------------------------------------------------


def test_a_tag_at_our_version_of_our_run_is_admitted() -> None:
    assert admission(tag(2), "run-a", 2, False, False) == ADMIT
    assert admission(tag(0), None, 0, False, False) == ADMIT  # a run is taken up


def test_a_newer_tag_is_refused_behind_and_pulled() -> None:
    verdict = admission(tag(3), "run-a", 2, False, False)
    assert (verdict.code, verdict.pull) == (BEHIND, True)
    assert "version 2" in verdict.message and "3" in verdict.message
    assert admission(tag(1), None, 0, False, False).code == BEHIND  # a new run, behind


def test_an_older_tag_or_one_while_we_move_on_is_refused_ahead() -> None:
    older = admission(tag(1), "run-a", 2, False, False)
    assert (older.code, older.pull) == (AHEAD, False)
    assert admission(tag(2), "run-a", 2, True, False).code == AHEAD  # an apply waits


def test_another_run_is_refused_until_ours_is_quiet() -> None:
    assert admission(tag(0, "run-b"), "run-a", 2, False, False).code == OTHER_RUN
    assert admission(tag(0, "run-b"), "run-a", 2, False, True).leave
    assert admission(tag(0, "run-b"), None, 0, False, True) == ADMIT


def test_a_plain_session_is_refused_while_we_follow_a_run() -> None:
    following = admission(None, "run-a", 2, False, False)
    assert following.code == FOLLOWING and "run-a" in following.message
    assert admission(None, "run-a", 2, False, True).leave  # quiet: back to the model
    assert admission(None, None, 0, False, False) == ADMIT  # not following: served


# ---- the tag on the wire -----------------------------------------------------------------


def opening(policy: PolicyTag | None) -> Open:
    return Open(session="s" * 16, model_id="m", route=(Hop(TRAINER, 0, 4),), hop=0,
                entry_peer=TRAINER, max_length=64, dtype="float32", policy=policy)


def test_a_plain_open_is_what_tagless_peers_speak() -> None:
    wire = encode(opening(None))
    assert b"policy" not in wire  # left off at its default
    assert decode(wire, Open) == opening(None)
    tagged = opening(tag(5))
    assert decode(encode(tagged), Open) == tagged


@pytest.mark.parametrize("bad", [PolicyTag("no spaces!", 1, TRAINER),
                                 PolicyTag("run-a", -1, TRAINER),
                                 PolicyTag("run-a", 1, ""),
                                 PolicyTag("run-a", 1, "x" * 500)])
def test_a_bad_tag_is_refused(bad: PolicyTag) -> None:
    with pytest.raises(WireError):
        decode(encode(opening(bad)), Open).policy.check()  # type: ignore[union-attr]


# ---- versions held by sessions -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return resolve(str(tiny_llama_dir(tmp_path_factory)))


def weight(w: VersionedWeights, name: str) -> torch.Tensor:
    return w._params[name].detach().clone()


async def test_a_slice_holds_only_its_layers_and_applies_them(tiny: ModelSource) -> None:
    w = VersionedWeights(ShardBlock(tiny, 2, 4))
    names = set(w.parameters())
    assert all(n.startswith(("model.layers.2.", "model.layers.3.")) for n in names)
    before = weight(w, DOWN)
    with pytest.raises(PolicyError, match="names no parameter"):
        await w.apply(1, full={"lm_head.weight": torch.zeros(384, 64)})
    await w.apply(1, full={DOWN: before + 1})
    assert w.version == 1 and torch.equal(weight(w, DOWN), before + 1)


async def test_an_apply_waits_for_holders_and_refuses_new_ones(tiny: ModelSource) -> None:
    w = VersionedWeights(ShardBlock(tiny, 2, 4))
    before = weight(w, DOWN)
    hold = w.try_hold()
    assert hold is not None and hold.version == 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: w.apply(1, full={DOWN: before * 2}))
        await trio.sleep(0.05)
        assert w.applying and w.version == 0 and torch.equal(weight(w, DOWN), before)
        assert w.try_hold() is None  # no new holder while an apply waits
        hold.release()
    assert w.version == 1 and not w.applying
    assert torch.equal(weight(w, DOWN), before * 2)
    assert w.try_hold() is not None


async def test_revocable_holders_are_revoked_after_the_deadline(tiny: ModelSource) -> None:
    w = VersionedWeights(ShardBlock(tiny, 2, 4), revoke_after_s=0.1)
    revoked = trio.Event()
    hold = w.try_hold(revoke=revoked.set)
    assert hold is not None

    async def holder_ends_when_revoked() -> None:
        await revoked.wait()
        assert w.version == 0  # still ours when we are told
        hold.release()

    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder_ends_when_revoked)
            await w.apply(1, full={DOWN: weight(w, DOWN) + 1})
    assert revoked.is_set() and w.version == 1


async def test_a_holder_that_will_not_let_go_fails_the_apply_and_changes_nothing(
        tiny: ModelSource, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("peerd.rl.versions.REVOKED_GONE_S", 0.1)
    w = VersionedWeights(ShardBlock(tiny, 2, 4), revoke_after_s=0.05)
    before = weight(w, DOWN)
    hold = w.try_hold(revoke=lambda: None)  # told, and ignores it
    assert hold is not None
    with pytest.raises(PolicyError, match="did not let go"):
        await w.apply(1, full={DOWN: before + 1})
    assert w.version == 0 and torch.equal(weight(w, DOWN), before) and not w.applying
    hold.release()
    await w.apply(1, full={DOWN: before + 1})
    assert w.version == 1
