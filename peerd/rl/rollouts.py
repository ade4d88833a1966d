"""Rollouts between trainer and samplers: signing, verifying, and the calls.

Torch-free: the trainer's side (`request_rollouts`, `serve_pushes`) needs no model.

`verify_rollout` is the one gate a rollout passes before anything uses it: the body's
size, its signature against the public key in the sampler's peer id, its fields, and,
where the caller knows them, that it is the run's, from the peer that answered or
pushed it. A rollout that fails raises PeerError (its reason is a metric label); the
caller counts it against the peer that sent it. When the sampler is known (the peer
that answered or pushed), the signature is checked against its key before the body is
decoded: a rollout not signed by it costs one signature check, not a decoding.

A push is taken in order of cost: the cheap questions first (is there such a run here,
did it order rollouts from this peer: `expects`), refused whole and unread when the
answer is no; then the signatures and bodies, in a worker thread so that the event
loop keeps serving while a 16 MiB push is checked. A push with bad rollouts counts
one offence against its pusher (an honest sampler signs none), however many it held.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

import trio
from libp2p.crypto.keys import PrivateKey

from peerd.agents.sealing import check_signature, seal, unseal
from peerd.node import Node
from peerd.rl.types import Rollout
from peerd.rpc import call, stream_handler
from protocols.codec import decode
from protocols.errors import PeerError, RemoteError, WireError
from protocols.rollout import (
    AHEAD,
    BEHIND,
    MAX_ROLLOUT_BYTES,
    ROLLOUT,
    ROLLOUT_PUSH,
    PushAck,
    RolloutBatch,
    RolloutMsg,
    RolloutPush,
    RolloutRequest,
    SignedRollout,
    WrongRollout,
    prompt_seed,
    versions_of,
)

log = logging.getLogger(__name__)

# (pushing peer, its verified rollouts) -> counts by outcome: "admitted", or a reason
OnPush = Callable[[str, list[Rollout]], dict[str, int]]
# (pushing peer, the push's run id) -> None when such a push is wanted now, else why it
# is refused (a PushAck reason: "no_such_run", "unasked"), before a rollout is read
Expects = Callable[[str, str], str | None]


class SamplerVersion(RemoteError):
    """A sync-mode request the sampler refused because it is not at the wanted version:
    `code` is BEHIND (it must pull first) or AHEAD."""

    def __init__(self, code: str, message: str, have: int, want: int) -> None:
        super().__init__(code, message)
        self.have = have
        self.want = want


def sign_rollout(msg: RolloutMsg, key: PrivateKey) -> SignedRollout:
    body, sig = seal(msg, key)
    return SignedRollout(body=body, sig=sig)


def verify_rollout(signed: SignedRollout, *, run_id: str | None = None,
                   sampler: str | None = None, vocab_size: int | None = None) -> Rollout:
    """The rollout in `signed`, once its signature is the named sampler's and its fields
    check; with `run_id` / `sampler` / `vocab_size`, also that it is that run's, made by
    that peer, with ids in that vocabulary. Raises PeerError."""
    return to_rollout(verified(signed, run_id=run_id, sampler=sampler,
                               vocab_size=vocab_size))


def verified(signed: SignedRollout, *, run_id: str | None = None, sampler: str | None = None,
             vocab_size: int | None = None) -> RolloutMsg:
    """verify_rollout's checks; the wire message (with its seed and index)."""
    signed.check()
    if len(signed.body) > MAX_ROLLOUT_BYTES:  # (check() says so too; before any decoding)
        raise WireError("rollout body too large", reason="oversized")
    if sampler is None:
        msg = unseal(signed.body, signed.sig, RolloutMsg, lambda m: m.sampler)
    else:  # the signer must be the peer it came from: check that before decoding
        check_signature(sampler, signed.body, signed.sig, "a rollout")
        msg = decode(signed.body, RolloutMsg)
        if msg.sampler != sampler:  # signed by the peer that sent it, in another's name
            raise PeerError(f"a rollout naming sampler {msg.sampler!r:.60} came from "
                            f"{sampler}, who signed it", reason="impersonation")
    msg.check()
    if run_id is not None and msg.run_id != run_id:
        raise WrongRollout(f"a rollout of run {msg.run_id!r}, not {run_id!r}")
    if vocab_size is not None and any(t >= vocab_size for t in (*msg.prompt_ids,
                                                                *msg.completion_ids)):
        raise WireError(f"a token id outside the vocabulary of {vocab_size}")
    return msg


def to_rollout(msg: RolloutMsg) -> Rollout:
    return Rollout(run_id=msg.run_id, prompt_index=msg.prompt_index, group_id=msg.group_id,
                   prompt_ids=msg.prompt_ids, completion_ids=msg.completion_ids,
                   behaviour_logprobs=msg.behaviour_logprobs, version=msg.version,
                   sampler=msg.sampler, text=msg.text)


# ---- the trainer asks ------------------------------------------------------------------


async def request_rollouts(node: Node, peer_id: str, request: RolloutRequest, *,
                           timeout_s: float | None = None, vocab_size: int | None = None
                           ) -> list[Rollout]:
    """Ask sampler `peer_id` for `request`'s rollouts; all of them, verified, in order
    (prompt by prompt, G each). Raises SamplerVersion when it refuses for its version,
    RemoteError for another refusal, PeerError (counted against it here) when its
    answer does not check, and trio.TooSlowError past the deadline."""
    request.check()
    try:
        batch: RolloutBatch = await call(node.host, peer_id, ROLLOUT, request, timeout_s,
                                         dial=node.new_stream)
        batch.check()
        msgs = await trio.to_thread.run_sync(  # (decoding up to 16 MiB: off the event loop)
            lambda: [verified(s, run_id=request.run_id, sampler=peer_id,
                              vocab_size=vocab_size) for s in batch.rollouts])
        _check_answer(request, msgs)
    except RemoteError as exc:
        versions = versions_of(exc.message) if exc.code in (BEHIND, AHEAD) else None
        if versions is not None:
            raise SamplerVersion(exc.code, exc.message, *versions) from None
        raise
    except PeerError as exc:
        node.offence(peer_id, exc.reason, f"rollouts: {exc}")
        raise
    return [to_rollout(m) for m in msgs]


def _check_answer(request: RolloutRequest, msgs: list[RolloutMsg]) -> None:
    """The answer is the request's: every prompt's G completions, in order, with the
    prompt's seed, at the wanted version in sync mode, one version throughout."""
    want = [(p, g) for p in range(len(request.prompts)) for g in range(request.group)]
    if request.push:
        want = []  # an order: the rollouts come later, pushed
    got = [(m.prompt_index, m.index) for m in msgs]
    if got != want:
        raise WrongRollout(f"{len(got)} rollouts that are not the {len(request.prompts)} "
                           f"prompts x {request.group} asked for, in order")
    if any(m.seed != prompt_seed(request, m.prompt_index) for m in msgs):
        raise WrongRollout("a rollout of another seed")
    versions = {m.version for m in msgs}
    if not msgs:
        return
    if len(versions) != 1 or min(versions) < request.version:
        raise WrongRollout(f"rollouts of versions {sorted(versions)[:4]}; asked for "
                           f"{request.version} ({request.mode})")
    groups = [m.group_id for m in msgs]
    for p in range(len(request.prompts)):
        ids = set(groups[p * request.group:(p + 1) * request.group])
        if len(ids) != 1:
            raise WrongRollout(f"prompt {p}'s completions name {len(ids)} groups")


# ---- the sampler pushes ----------------------------------------------------------------


async def push_rollouts(node: Node, trainer: str, run_id: str,
                        rollouts: Sequence[SignedRollout], *, timeout_s: float | None = None
                        ) -> PushAck:
    """Push our rollouts to the run's trainer; its ack says what it admitted and what it
    refused, by reason."""
    push = RolloutPush(run_id=run_id, rollouts=tuple(rollouts))
    push.check()
    ack: PushAck = await call(node.host, trainer, ROLLOUT_PUSH, push, timeout_s,
                              dial=node.new_stream)
    try:
        ack.check()
    except PeerError as exc:
        node.offence(trainer, exc.reason, f"push ack: {exc}")
        raise
    return ack


def serve_pushes(node: Node, on_push: OnPush, *, expects: Expects) -> None:
    """The trainer's side of the push. A push `expects` refuses is answered at once,
    unread. Otherwise each rollout is verified (signed by the pushing peer, of the
    push's run; in a worker thread) before `on_push` sees it; a bad one is refused by
    reason, the good ones of the same push still go in, and a push with any bad one
    counts one offence against the pusher."""

    async def handle(peer: str, push: RolloutPush) -> PushAck:
        push.check()
        unwanted = expects(peer, push.run_id)
        if unwanted is not None:  # no such run, no order: no rollout of it is read
            return PushAck(admitted=0, refused={unwanted: len(push.rollouts)})
        good, refused, first = await trio.to_thread.run_sync(_verify_push, peer, push)
        if first is not None:
            node.offence(peer, first.reason,
                         f"a push of {len(push.rollouts)} rollouts, {refused.total()} bad "
                         f"({', '.join(f'{k}: {v}' for k, v in refused.items())}); the "
                         f"first: {first}")
        outcome: dict[str, int] = on_push(peer, good) if good else {}
        admitted = int(outcome.get("admitted", 0))
        refused.update({k: int(v) for k, v in outcome.items() if k != "admitted" and v})
        return PushAck(admitted=admitted, refused=dict(refused))

    node.set_stream_handler(ROLLOUT_PUSH.id, stream_handler(ROLLOUT_PUSH, handle, node.offence))


def _verify_push(peer: str, push: RolloutPush
                 ) -> tuple[list[Rollout], Counter[str], PeerError | None]:
    """(worker thread) The push's good rollouts, the bad ones counted by reason, and
    the first bad one's error."""
    good: list[Rollout] = []
    refused: Counter[str] = Counter()
    first: PeerError | None = None
    for signed in push.rollouts:
        try:
            good.append(to_rollout(verified(signed, run_id=push.run_id, sampler=peer)))
        except PeerError as exc:
            refused[exc.reason] += 1
            first = first or exc
    return good, refused, first
