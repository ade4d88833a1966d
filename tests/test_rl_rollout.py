"""The rollout protocol without a network: strict request checks, caps, and
verify_rollout refusing every tampered, forged, misattributed or malformed rollout."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID

from peerd.rl.rollouts import sign_rollout, verify_rollout
from peerd.rl.types import Rollout
from protocols.codec import decode, encode
from protocols.errors import PeerError, WireError
from protocols.rollout import (
    MAX_ROLLOUTS,
    MAX_WORK_TOKENS,
    PushAck,
    RolloutBatch,
    RolloutMsg,
    RolloutPush,
    RolloutRequest,
    SignedRollout,
    behind_message,
    prompt_seed,
    versions_of,
)


def request(**kw: Any) -> RolloutRequest:
    fields: dict[str, Any] = {"run_id": "run-1", "prompts": ("What is 2 + 2?",), "group": 4,
                              "temperature": 1.0, "top_p": 1.0, "max_tokens": 16, "seed": 3,
                              "version": 0, "mode": "sync"} | kw
    return RolloutRequest(**fields)


def key_and_id() -> tuple[KeyPair, str]:
    kp = create_new_key_pair()
    return kp, str(ID.from_pubkey(kp.public_key))


def rollout_msg(sampler: str, **kw: Any) -> RolloutMsg:
    fields: dict[str, Any] = {
        "run_id": "run-1", "seed": 3, "prompt_index": 0, "index": 1, "group_id": "g" * 32,
        "prompt_ids": (1, 2, 3), "completion_ids": (7, 8, 2),
        "behaviour_logprobs": (-0.5, -1.25, -0.01), "version": 4, "sampler": sampler,
        "text": "42"} | kw
    return RolloutMsg(**fields)


# ---- requests ---------------------------------------------------------------------------


def test_a_good_request_checks_and_round_trips() -> None:
    req = request(prompts=("a", "b"), mode="async", temperature=0.0, top_p=0.5)
    req.check()
    assert decode(encode(req), RolloutRequest) == req
    # one seed a prompt: on the wire only when given (a peer of the first 1.0.0 takes
    # the rest)
    assert "seeds" not in req.to_wire()
    seeded = request(prompts=("a", "b"), seeds=(5, 2**63 - 1))
    seeded.check()
    assert decode(encode(seeded), RolloutRequest) == seeded
    assert [prompt_seed(seeded, i) for i in (0, 1)] == [5, 2**63 - 1]
    assert [prompt_seed(req, i) for i in (0, 1)] == [3, 3]


@pytest.mark.parametrize(("change", "match"), [
    ({"run_id": ""}, "run id"),
    ({"run_id": "a/b"}, "run id"),
    ({"run_id": "x" * 65}, "run id"),
    ({"prompts": ()}, "0 prompts"),
    ({"prompts": ("",)}, "prompt 0"),
    ({"prompts": ("x" * 8001,)}, "prompt 0"),
    ({"prompts": ("x",) * 65}, "65 prompts"),
    ({"group": 0}, "group"),
    ({"group": 65}, "group"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 2049}, "max_tokens"),
    ({"seed": -1}, "seed"),
    ({"seeds": (1, 2)}, "2 seeds for 1 prompts"),
    ({"prompts": ("a", "b"), "seeds": (1, -1)}, "a seed out of range"),
    ({"prompts": ("a", "b"), "seeds": (1, 2**63)}, "a seed out of range"),
    ({"version": -1}, "version"),
    ({"mode": "later"}, "mode"),
])
def test_bad_requests_are_refused(change: dict[str, Any], match: str) -> None:
    with pytest.raises(WireError, match=match) as info:
        request(**change).check()
    assert info.value.reason == "malformed"


def test_work_is_capped() -> None:
    with pytest.raises(WireError, match="completions") as info:
        request(prompts=("x",) * 8, group=64).check()  # 512 completions
    assert info.value.reason == "oversized"
    assert MAX_ROLLOUTS >= 8 * 32  # so the next refusal is for the tokens
    with pytest.raises(WireError, match="tokens of work") as info:
        request(prompts=("x",) * 8, group=32, max_tokens=2048).check()
    assert info.value.reason == "oversized"
    request(prompts=("x",) * 8, group=32, max_tokens=MAX_WORK_TOKENS // 256).check()


def test_requests_decode_strictly() -> None:
    wire = request().to_wire() | {"extra": 1}
    with pytest.raises(WireError, match="unknown fields"):
        RolloutRequest.from_wire(wire)
    wire = request().to_wire()
    del wire["version"]
    with pytest.raises(WireError, match="missing field"):
        RolloutRequest.from_wire(wire)
    with pytest.raises(WireError):
        RolloutRequest.from_wire(request().to_wire() | {"group": "4"})


def test_behind_messages_name_both_versions() -> None:
    assert versions_of(behind_message(3, 5)) == (3, 5)
    assert versions_of("something else") is None


def test_acks_and_pushes_check() -> None:
    PushAck(admitted=2, refused={"stale": 1}).check()
    with pytest.raises(WireError):
        PushAck(admitted=-1, refused={}).check()
    with pytest.raises(WireError):
        PushAck(admitted=0, refused={"x" * 41: 1}).check()
    with pytest.raises(WireError, match="no rollouts"):
        RolloutPush(run_id="r", rollouts=()).check()
    big = SignedRollout(body=b"x" * 400_000, sig=b"s")
    with pytest.raises(WireError) as info:
        RolloutBatch(rollouts=(big,)).check()
    assert info.value.reason == "oversized"


# ---- verify_rollout ---------------------------------------------------------------------


def test_an_honest_rollout_verifies() -> None:
    kp, me = key_and_id()
    signed = sign_rollout(rollout_msg(me), kp.private_key)
    got = verify_rollout(decode(encode(signed), SignedRollout), run_id="run-1", sampler=me,
                         vocab_size=100)
    assert got == Rollout(run_id="run-1", prompt_index=0, group_id="g" * 32,
                          prompt_ids=(1, 2, 3), completion_ids=(7, 8, 2),
                          behaviour_logprobs=(-0.5, -1.25, -0.01), version=4, sampler=me,
                          text="42")


def reason_of(signed: SignedRollout, **expect: Any) -> str:
    with pytest.raises(PeerError) as info:
        verify_rollout(signed, **expect)
    return info.value.reason


def test_tampered_forged_and_misattributed_rollouts_are_refused() -> None:
    kp, me = key_and_id()
    other, other_id = key_and_id()
    honest = sign_rollout(rollout_msg(me), kp.private_key)
    # a log-prob changed after signing
    changed = encode(rollout_msg(me, behaviour_logprobs=(-0.5, -0.25, -0.01)))
    assert reason_of(SignedRollout(body=changed, sig=honest.sig)) == "bad_signature"
    # a version tag changed after signing
    retagged = encode(rollout_msg(me, version=5))
    assert reason_of(SignedRollout(body=retagged, sig=honest.sig)) == "bad_signature"
    # another key signs a rollout in our name
    forged = sign_rollout(rollout_msg(me), other.private_key)
    assert reason_of(forged) == "bad_signature"
    # a peer relays our honest rollout as its answer: not signed by the peer it came
    # from, which is checked before its body is read
    assert reason_of(honest, sampler=other_id) == "bad_signature"
    # a peer signs a rollout naming us as its sampler, and sends it
    assert reason_of(forged, sampler=other_id) == "impersonation"
    # the wrong run
    assert reason_of(honest, run_id="run-2") == "wrong_rollout"
    # ids outside the trainer's vocabulary
    assert reason_of(honest, vocab_size=8) == "malformed"
    # a sampler id that embeds no key
    nokey = sign_rollout(rollout_msg("not-a-peer-id"), kp.private_key)
    assert reason_of(nokey) == "bad_peer_id"
    # garbage in the body: malformed once signed by the peer it came from; not even
    # decoded when it is not
    assert reason_of(SignedRollout(body=b"\xc1garbage", sig=honest.sig)) == "malformed"
    assert reason_of(SignedRollout(body=b"\xc1garbage", sig=honest.sig),
                     sampler=me) == "bad_signature"
    assert reason_of(SignedRollout(body=b"\xc1garbage",
                                   sig=kp.private_key.sign(b"\xc1garbage")),
                     sampler=me) == "malformed"


@pytest.mark.parametrize("change", [
    {"behaviour_logprobs": (-0.5, -1.0)},  # one short
    {"behaviour_logprobs": (-0.5, 0.5, -0.1)},  # a probability above 1
    {"behaviour_logprobs": (-0.5, float("nan"), -0.1)},
    {"behaviour_logprobs": (-0.5, float("-inf"), -0.1)},
    {"completion_ids": ()},
    {"behaviour_logprobs": (), "completion_ids": ()},
    {"completion_ids": (7, -8, 2)},
    {"prompt_ids": ()},
    {"completion_ids": (7, 1 << 30, 2)},
    {"text": "x" * 97},  # 32 characters a token
    {"group_id": ""},
    {"prompt_index": 64},
    {"index": -1},
    {"version": -2},
])
def test_signed_but_malformed_rollouts_are_refused(change: dict[str, Any]) -> None:
    kp, me = key_and_id()
    signed = sign_rollout(rollout_msg(me, **change), kp.private_key)
    assert reason_of(signed) == "malformed"


def test_rollout_fields_are_what_the_overview_names() -> None:
    # the wire message carries every field of the trainer's Rollout but its reward
    wire = {f.name for f in dataclasses.fields(RolloutMsg)}
    assert {f.name for f in dataclasses.fields(Rollout)} - {"reward"} <= wire


# ---- list bounds, before any item is read -------------------------------------------------


def _over(cls: type[Any], wire: dict[str, Any], name: str, item: Any, n: int) -> Any:
    """Decode `wire` with its list (or map) `name` holding `n` copies of `item`."""
    from protocols.codec import packb

    items: Any = {f"r{i}": item for i in range(n)} if isinstance(wire[name], dict) \
        else [item] * n
    return decode(packb({**wire, name: items}), cls)


TINY = {"t": SignedRollout.KIND, "v": 1, "body": b"", "sig": b""}  # well typed, 14 bytes
LISTS = [  # (message, field, a well-typed item, the most items an honest peer sends)
    (RolloutPush(run_id="r", rollouts=()), "rollouts", TINY, "MAX_ROLLOUTS"),
    (RolloutBatch(rollouts=()), "rollouts", TINY, "MAX_ROLLOUTS"),
    (request(), "prompts", "x", "MAX_PROMPTS"),
    (request(seeds=(1,)), "seeds", 1, "MAX_PROMPTS"),
    (PushAck(admitted=0, refused={"x": 1}), "refused", 1, "MAX_REASONS"),
    (rollout_msg("p"), "prompt_ids", 1, "MAX_PROMPT_TOKENS"),
    (rollout_msg("p"), "completion_ids", 1, "MAX_TOKENS"),
    (rollout_msg("p"), "behaviour_logprobs", -0.5, "MAX_TOKENS"),
]


@pytest.mark.parametrize(("msg", "name", "item", "bound"), LISTS,
                         ids=[f"{type(m).__name__}.{f}" for m, f, _, _ in LISTS])
def test_lists_past_their_bound_are_refused_before_any_item_is_read(
        msg: Any, name: str, item: Any, bound: str) -> None:
    """The codec type-checks each item in Python: a 16 MiB push of a million tiny
    rollouts held the event loop for seconds before check() counted them."""
    import protocols.rollout

    most = getattr(protocols.rollout, bound)
    wire = msg.to_wire()
    with pytest.raises(WireError, match="items"):
        _over(type(msg), wire, name, item, most + 1)
    assert len(getattr(_over(type(msg), wire, name, item, most), name)) == most
