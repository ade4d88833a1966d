"""Where a pipeline step stopped, from what each hop says of it (stalls.py), and what
a hop keeps to say it (progress.py): pure."""

from __future__ import annotations

import pytest

from peerd.inference.swarm.progress import ProgressBook
from peerd.inference.swarm.stalls import Stall, Told, locate_stall
from protocols.codec import decode, encode
from protocols.errors import WireError
from protocols.shard import FEATURE_SESSIONS, Failed
from protocols.shard_progress import SHARD_PROGRESS, Progress, ProgressReply

PEERS = ["A", "B", "C"]
STEP = 5


def at(received: int, passed: int, passing: bool = False,
       failed: Failed | None = None) -> ProgressReply:
    return ProgressReply(session="s" * 16, received=received, passed=passed, passing=passing,
                         failed=failed)


DONE = at(STEP, STEP)


def failed(by: str) -> Failed:
    return Failed(session="s" * 16, step=-1, peer_id=by, code="overloaded", message="full",
                  by=by, sig=b"x" * 64)


CASES: dict[str, tuple[list[ProgressReply | None], Stall]] = {
    "a hop holds the step": (
        [DONE, at(STEP, STEP - 1), at(STEP - 1, STEP - 1)],
        Stall("B", "B took step 5 in and did not pass it on")),
    "a hop says it passed it on, the next that it never got it": (
        [DONE, DONE, at(STEP - 1, STEP - 1)],
        Stall("C", "C says it never got step 5; B says it passed it on", witness="B")),
    "a hop says its next hop does not take it": (
        [DONE, at(STEP, STEP - 1, passing=True), at(STEP - 1, STEP - 1)],
        Stall("C", "B says C does not take step 5 in", witness="B")),
    "the first hop says it never got it": (
        [at(STEP - 1, STEP - 1), at(STEP - 1, STEP - 1), at(STEP - 1, STEP - 1)],
        Stall("A", "A says it never got step 5, which the entry sent it whole")),
    "a hop does not answer": (
        [DONE, None, at(STEP - 1, STEP - 1)],
        Stall("B", "B did not say how far step 5 got there")),
    "a hop claims a step never sent": (
        [DONE, at(STEP + 1, STEP), DONE],
        Stall("B", "B says it took in step 6; the entry sent up to 5")),
    "a hop never had the session": (
        [DONE, at(-1, -1), at(-1, -1)],
        Stall("B", "B says it never got step 5; A says it passed it on", witness="A")),
    "the last hop holds its result": (
        [DONE, DONE, at(STEP, STEP - 1, passing=True)],
        Stall("C", "C, the last hop, did not pass step 5 back")),
    "every hop passed it on": (
        [DONE, DONE, DONE],
        Stall("C", "every hop passed step 5 on; it never came back from C")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_the_step_stopped_where_the_hops_words_say(case: str) -> None:
    answers, expected = CASES[case]
    assert locate_stall(PEERS, STEP, True, answers) == expected


def test_a_step_the_entry_could_not_write_whole_stopped_at_the_first_hop() -> None:
    assert locate_stall(PEERS, STEP, False, [DONE, DONE, DONE]) == Stall(
        "A", "A did not take step 5 in")


def test_a_refusal_a_hop_sent_is_weighed_whoever_swallowed_it() -> None:
    """The last hop refused; the middle hop swallowed it and says nothing of it: the
    entry hears it from the last hop's own answer."""
    refusal = failed("C")
    answers = [at(1, 1), at(1, 1), at(0, -1, failed=refusal)]
    assert locate_stall(PEERS, 1, True, answers) == Told(refusal, "C")
    # the first hop on the way that says it sent one: what reached the entry had the
    # chain relayed it
    relayed = [at(1, 1, failed=refusal), None, at(0, -1, failed=failed("C"))]
    assert locate_stall(PEERS, 1, True, relayed) == Told(refusal, "A")


def test_an_open_the_first_hop_admitted_and_never_answered_is_its_fault() -> None:
    answers = [at(0, 0), at(0, 0), at(0, 0)]
    assert locate_stall(PEERS, 0, True, answers, admitted=False) == Stall(
        "A", "A admitted the session but never answered the OPEN")
    assert locate_stall(PEERS, 0, True, answers, admitted=True).culprit == "C"


def test_routes_cross_only_peers_that_answer_the_probe() -> None:
    assert SHARD_PROGRESS.id == FEATURE_SESSIONS


def test_progress_replies_that_no_hop_could_give_do_not_check() -> None:
    for received, passed in [(3, 4), (-2, -2), (2**63, 0)]:
        with pytest.raises(WireError):
            at(received, passed).check()
    at(-1, -1).check()
    reply = at(3, 2, passing=True, failed=failed("B"))
    assert decode(encode(reply), ProgressReply) == reply
    assert "failed" not in at(3, 2).to_wire()  # left off the wire when absent


def test_a_hop_answers_for_a_session_only_to_its_entry_and_keeps_the_latest_ended() -> None:
    book = ProgressBook(kept=2)
    mine = book.open("s1", "entry")
    mine.received, mine.passed, mine.writing = 3, 2, True
    assert book.answer("entry", Progress("s1")) == ProgressReply("s1", 3, 2, True)
    assert book.answer("other", Progress("s1")) == ProgressReply("s1", -1, -1, False)
    assert book.answer("entry", Progress("nope")) == ProgressReply("nope", -1, -1, False)
    book.end("s1")
    assert book.answer("entry", Progress("s1")) == ProgressReply("s1", 3, 2, False)
    mine.tell(failed("me"))  # a report sent after the session ended here
    mine.tell(failed("later"))  # (the first one is what it sent)
    assert book.answer("entry", Progress("s1")).failed == failed("me")
    book.refused("s2", "entry", failed("me"))
    assert book.answer("entry", Progress("s2")) == ProgressReply("s2", 0, -1, False,
                                                                 failed("me"))
    book.refused("s3", "entry", failed("me"))
    assert book.answer("entry", Progress("s1")).received == -1  # past the latest 2
    assert set(book.ended) == {"s2", "s3"} and not book.live
