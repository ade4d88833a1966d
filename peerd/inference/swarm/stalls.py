"""Where a pipeline step stopped, read from what each hop says of it (`ask_hops`; the
rule, `locate_stall`, is pure).

A step that stalls (no RESULT by its deadline, no refusal, every hop answering pings)
or breaks with no word from anyone had no one to blame: a hop that took a step in and
sat on it, or swallowed a refusal on its way up, failed requests unblamed, again on
every retry. So the entry asks each hop how far the session got there
(`/peerd/shard-progress/1.0.0`, protocols/shard.py) and follows the step down the
chain from where the entry sent it:

- a hop that sent a FAILED for the session (its own, or one it relayed as it came)
  tells the entry what a chain that swallowed it did not: the entry weighs it as any
  hop's report (`Told`);
- a hop that does not answer, or says it took in a step the entry never sent, is
  where the step stopped;
- a hop that says it never got the step its hop before says it passed on: one of the
  two lies, or the link between them broke, and the entry cannot tell which: both
  (the hop before as witness); the first hop alone, for a step the entry sent whole;
- a hop that took the step in and has not passed it on holds it, unless it says it is
  passing it on and its next hop does not take it: that next hop, on its word (a
  witness); the last hop passes its RESULT to the entry, which reads: the last hop
  alone;
- every hop passed it on: the last hop's RESULT never came back: the last hop.

A liar gains nothing by any answer: it is blamed, alone or beside the hop it names,
and an honest hop is blamed only beside one that lies about it (as when a hop says its
neighbour is unreachable: pipeline.py). An honest hop that holds a step past the
deadline (a CPU that slow) is blamed too: the entry routes around it for a while.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import trio

from peerd.node import Node
from peerd.rpc import call
from protocols.errors import PeerError, WireError
from protocols.shard import Failed
from protocols.shard_progress import SHARD_PROGRESS, Progress, ProgressReply

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Stall:
    """The step stopped at `culprit` (`witness`: on whose word alone)."""

    culprit: str
    why: str
    witness: str | None = None


@dataclass(frozen=True, slots=True)
class Told:
    """A hop's answer carries the FAILED it sent for the session: weigh that."""

    failed: Failed
    sender: str


def locate_stall(peers: Sequence[str], step: int, sent_whole: bool,
                 answers: Sequence[ProgressReply | None], admitted: bool = True
                 ) -> Stall | Told:
    """Where step `step` (0: the OPEN) stopped on the route `peers`, given what each hop
    answered (None: no answer, or one that did not check). `sent_whole`: the entry wrote
    the step's frame whole to the first hop; `admitted`: the first hop's answer to the
    OPEN came."""
    assert len(answers) == len(peers)
    for peer, answer in zip(peers, answers, strict=True):
        if answer is not None and answer.failed is not None:
            return Told(answer.failed, peer)
    first = peers[0]
    if not sent_whole:  # our write of it waits on the first hop to read
        return Stall(first, f"{first} did not take step {step} in")
    for i, (peer, answer) in enumerate(zip(peers, answers, strict=True)):
        if answer is None:
            return Stall(peer, f"{peer} did not say how far step {step} got there")
        if answer.received > step:
            return Stall(peer, f"{peer} says it took in step {answer.received}; the entry "
                         f"sent up to {step}")
        if answer.received < step:
            if i == 0:
                return Stall(peer, f"{peer} says it never got step {step}, which the entry "
                             "sent it whole")
            before = peers[i - 1]
            return Stall(peer, f"{peer} says it never got step {step}; {before} says it "
                         "passed it on", witness=before)
        if i == 0 and step == 0 and not admitted:
            return Stall(peer, f"{peer} admitted the session but never answered the OPEN")
        if answer.passed >= step:
            continue
        if not answer.passing:
            return Stall(peer, f"{peer} took step {step} in and did not pass it on")
        if i + 1 == len(peers):  # to the entry, which reads its return stream
            return Stall(peer, f"{peer}, the last hop, did not pass step {step} back")
        after = peers[i + 1]
        return Stall(after, f"{peer} says {after} does not take step {step} in",
                     witness=peer)
    last = peers[-1]
    return Stall(last, f"every hop passed step {step} on; it never came back from {last}")


async def ask_hops(node: Node, peers: Sequence[str], session: str,
                   timeout_s: float) -> list[ProgressReply | None]:
    """What each of `peers` says of how far `session` got there (all asked at once,
    each within `timeout_s`); None for one that did not answer, or answered what does
    not check (counted against it)."""
    answers: list[ProgressReply | None] = [None] * len(peers)

    async def ask(i: int, peer: str) -> None:
        try:
            reply = await call(node.host, peer, SHARD_PROGRESS, Progress(session), timeout_s,
                               dial=node.new_stream)
            reply.check()
            if reply.session != session:
                raise WireError(f"progress of session {reply.session!r:.40}")
            answers[i] = reply
        except PeerError as exc:
            node.offence(peer, exc.reason, f"{SHARD_PROGRESS.id}: {exc}")
        except Exception as exc:  # no answer (a timeout, an error reply, a reset)
            log.info("session %s: %s did not say how far it got: %r", session, peer, exc)

    async with trio.open_nursery() as nursery:
        for i, peer in enumerate(peers):
            nursery.start_soon(ask, i, peer)
    return answers
