"""A pipeline sampler's shard: which pipeline sessions a `--rollout` peer serving a
slice of the layers takes, so that every step of a tagged session runs on one version.

The peer's layers (and its head, when it samples itself) are VersionedWeights
(versions.py) following an RL run (follow.py, pulling only its slice). Its shard
server asks `ShardGate.admit` at every OPEN (protocols/shard.py, PolicyTag):

- a tagged OPEN at exactly our version of the run we follow (or of any run, while
  we follow none: we take it up) is admitted, and the session HOLDS that version
  until it closes: an apply waits for it (and revokes it after a while: the server
  then ends the session, FAILED "revoked", before any weight changes);
- an older tag than ours, or one while an apply waits: AHEAD; a newer one: BEHIND,
  and we start pulling it at once (the sampler asks again shortly). A shard behind
  the entry fetches announced versions without applying them (follow.py), so this
  is how its pipeline moves: the pull finds the chunks held and applies;
- another run's tag: OTHER_RUN, until the run we follow has been quiet RUN_IDLE_S
  with no session open; then we go back to version 0 and take the new run;
- an untagged (plain) OPEN while we follow a run: FOLLOWING. Our weights are the
  run's, not the model as loaded, so a plain request would get a model nobody asked
  for; status and the ledger (FEATURE_TAGGED_ONLY: plain routing goes around us) say
  so. Once the run has been quiet RUN_IDLE_S we go back to version 0 and serve
  plain sessions again.

The rules are `admission`, a pure function; the gate applies them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from peerd.inference.swarm.server import Refused
from peerd.rl.follow import Follower
from peerd.rl.versions import Hold, VersionedWeights
from protocols.shard import AHEAD, BEHIND, FOLLOWING, OTHER_RUN, PolicyTag

log = logging.getLogger(__name__)

RUN_IDLE_S = 30.0  # a run quiet this long (no session open) may be left (as sampler.py's)


@dataclass(frozen=True, slots=True)
class Verdict:
    code: str = ""  # "": admit; else the FAILED code the OPEN is refused with
    message: str = ""
    leave: bool = False  # first go back to version 0 and follow no run, then judge again
    pull: bool = False  # start pulling the tag's version


ADMIT = Verdict()


def admission(tag: PolicyTag | None, following: str | None, version: int, applying: bool,
              run_quiet: bool) -> Verdict:
    """What to do with an OPEN carrying `tag` (None: a plain one) at a shard following
    run `following` (None: none) at `version`, with an apply waiting or not, and the
    run quiet (RUN_IDLE_S without a request, no session open) or not."""
    if following is not None and (tag is None or tag.run_id != following):
        if run_quiet:
            return Verdict(leave=True)
        if tag is None:
            return Verdict(FOLLOWING, f"this peer's layers follow RL run {following!r} at "
                           f"version {version}, not the model as loaded: it takes only "
                           "that run's tagged sessions")
        return Verdict(OTHER_RUN, f"this peer's layers follow RL run {following!r}, not "
                       f"{tag.run_id!r}")
    if tag is None:
        return ADMIT
    if version < tag.version:
        return Verdict(BEHIND, f"this shard is at version {version}; the session wants "
                       f"{tag.version} (pulling it now)", pull=True)
    if version > tag.version:
        return Verdict(AHEAD, f"this shard is at version {version}; the session wants "
                       f"{tag.version}")
    if applying:
        return Verdict(AHEAD, f"this shard is moving past version {version}")
    return ADMIT


class ShardGate:
    """The admission rules at a shard server (the server's `gate`), over `weights`
    and the follower that pulls their versions. `run` owns the pulls it starts."""

    def __init__(self, weights: VersionedWeights, follower: Follower,
                 on_change: Callable[[], object] = lambda: None) -> None:
        self.weights = weights
        self.follower = follower
        self.on_change = on_change  # we took up or left a run (our ledger entry changes)
        self.refused: Counter[str] = Counter()  # OPENs refused, by code
        self.admitted = 0
        self._last_request = time.monotonic()  # of the run we follow
        self._pulling = False
        self._leaving = trio.Lock()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    @property
    def following(self) -> str | None:
        return self.follower.run_id

    def touch(self) -> None:
        """The run we follow asked for something (our own sampler counts too)."""
        self._last_request = time.monotonic()

    def _verdict(self, tag: PolicyTag | None) -> Verdict:
        quiet = (time.monotonic() - self._last_request >= RUN_IDLE_S
                 and not self.weights.holders)
        return admission(tag, self.following, self.weights.version, self.weights.applying,
                         quiet)

    async def admit(self, tag: PolicyTag | None, revoke: Any) -> Hold | None:
        """The session's hold on our version (None for an admitted plain session), or
        Refused with the verdict's code. `revoke()` ends the session (versions.py)."""
        verdict = self._verdict(tag)
        if verdict.leave:
            # A new run's first sessions come together: one leaves the old run; the
            # rest find it left (a second reset would wait for the first's session).
            async with self._leaving:
                if self._verdict(tag).leave:
                    await self.leave()
            verdict = self._verdict(tag)
        if tag is not None and self.following in (None, tag.run_id):
            self.touch()
            if self.following is None:
                self.follower.take_up(tag.run_id, tag.trainer)
                self.on_change()
        if verdict.pull and tag is not None:
            self._pull(tag)
        hold = None
        if not verdict.code and tag is not None:
            hold = self.weights.try_hold(revoke)
            if hold is None:  # an apply began meanwhile
                verdict = Verdict(AHEAD, f"this shard is moving past version {tag.version}")
        if verdict.code:
            self.refused[verdict.code] += 1
            raise Refused(verdict.code, verdict.message)
        self.admitted += 1
        return hold

    async def leave(self) -> None:
        """Back to version 0 (the model as loaded), following no run."""
        log.info("leaving run %s (quiet for %.0f s)", self.following, RUN_IDLE_S)
        await self.weights.reset()
        self.follower.leave()
        self.on_change()

    def _pull(self, tag: PolicyTag) -> None:
        if self._pulling or self._nursery is None:
            return
        self._pulling = True
        self._nursery.start_soon(self._pull_now, tag)

    async def _pull_now(self, tag: PolicyTag) -> None:
        try:
            await self.follower.catch_up(tag.run_id, tag.version, tag.trainer)
        except Exception as exc:
            log.warning("could not pull version %d of %s: %s", tag.version, tag.run_id, exc)
        finally:
            self._pulling = False

    def status(self) -> dict[str, Any]:
        plain = (f"refused: the layers follow run {self.following!r}"
                 if self.following is not None else "served")
        return {"following": self.following, "version": self.weights.version,
                "sessions_held": self.weights.holders, "admitted": self.admitted,
                "refused": dict(self.refused), "plain_sessions": plain}
