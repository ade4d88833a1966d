"""A hop's account of how far each session got here, for its entry to ask
(`/peerd/shard-progress/1.0.0`, protocols/shard.py; the entry's reading: stalls.py).

The shard server keeps one `HopProgress` a session while it lives, and the last
PROGRESS_KEPT after they end (an entry asks as soon as its step fails, but the hop may
have ended the session first). A hop answers for a session only to its entry peer;
anyone else, and any session it never had, gets "never had it" (-1): a session id
tells nothing to whoever guesses one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from protocols.shard import Failed
from protocols.shard_progress import PROGRESS_KEPT, Progress, ProgressReply


@dataclass(slots=True)
class HopProgress:
    entry: str  # the session's entry peer: the one peer told
    received: int = 0  # the OPEN (0) was taken in: the session exists
    passed: int = -1
    dialing: bool = False  # passing the OPEN on: the next stream is being opened
    writing: bool = False  # passing a step on: a write waits on the next hop
    told: Failed | None = None  # the FAILED this hop sent for the session (the first)

    def tell(self, failed: Failed) -> None:
        if self.told is None:
            self.told = failed

    def reply(self, session: str) -> ProgressReply:
        return ProgressReply(session=session, received=self.received, passed=self.passed,
                             passing=self.dialing or self.writing, failed=self.told)


class ProgressBook:
    def __init__(self, kept: int = PROGRESS_KEPT) -> None:
        self.kept = kept
        self.live: dict[str, HopProgress] = {}
        self.ended: OrderedDict[str, HopProgress] = OrderedDict()

    def open(self, session: str, entry: str) -> HopProgress:
        self.ended.pop(session, None)
        progress = self.live[session] = HopProgress(entry)
        return progress

    def end(self, session: str) -> None:
        """The session ended here: its account is kept (as it stands, and with any
        report still to be sent) among the latest ended ones."""
        progress = self.live.pop(session, None)
        if progress is not None:
            progress.dialing = progress.writing = False
            self._keep(session, progress)

    def refused(self, session: str, entry: str, failed: Failed) -> None:
        """An OPEN refused before the session existed here (saturated, another policy
        version): taken in, never passed on, and the refusal sent."""
        if session not in self.live:
            self._keep(session, HopProgress(entry, told=failed))

    def answer(self, peer: str, req: Progress) -> ProgressReply:
        progress = self.live.get(req.session) or self.ended.get(req.session)
        if progress is None or progress.entry != peer:
            return ProgressReply(session=req.session, received=-1, passed=-1, passing=False)
        return progress.reply(req.session)

    def _keep(self, session: str, progress: HopProgress) -> None:
        self.ended[session] = progress
        self.ended.move_to_end(session)
        while len(self.ended) > self.kept:
            self.ended.popitem(last=False)
