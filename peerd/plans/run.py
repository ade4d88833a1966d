"""Drive one plan: the planner's rules (planner.py) against a thinker, a dispatcher
and the clock.

`run_plan` asks the planner what to do next and does it: a step from the thinker (cut
off at the plan's wall budget), the step's calls started in the background (they run
while the planner waits, or, in async mode, while it thinks again), a wait for the next
call to end. Every event the planner makes is handed to `publish` at once, so a retry
or a result is seen live. It returns when the plan is over; calls still running then
are cancelled with the plan's nursery. A thinker that fails (no model, a swarm that
cannot serve, a bug) fails the plan in words; nothing it does escapes.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import trio

from peerd.inference.face import ModelUnavailable, Refused, SwarmUnavailable
from peerd.plans.planner import Dispatch, Finished, PlannedCall, Planner, Think, Wait
from peerd.plans.thinker import StepText, Thinker

log = logging.getLogger(__name__)

Attempted = Callable[[str, str, str, str], None]  # call_id, peer, code, message


class Ended(Protocol):
    def __call__(self, call_id: str, *, ok: bool, code: str, peer: str, elapsed_s: float,
                 attempts: int, result: Any = None, message: str = "") -> None: ...


DispatchCalls = Callable[[Sequence[PlannedCall], Attempted, Ended], Awaitable[None]]
Publish = Callable[[str, dict[str, Any]], None]
OnStep = Callable[[str, StepText], None]  # the parse's outcome, the step


async def run_plan(planner: Planner, thinker: Thinker, dispatch: DispatchCalls,
                   publish: Publish, *, on_step: OnStep | None = None) -> None:
    wake = trio.Event()

    def flush() -> None:
        for kind, data in planner.take_events():
            publish(kind, data)

    def attempted(call_id: str, peer: str, code: str, message: str) -> None:
        planner.attempted(call_id, peer, code, message)
        flush()

    def ended(call_id: str, *, ok: bool, code: str, peer: str, elapsed_s: float,
              attempts: int, result: Any = None, message: str = "") -> None:
        planner.ended(call_id, ok=ok, code=code, peer=peer, elapsed_s=elapsed_s,
                      attempts=attempts, result=result, message=message)
        flush()
        wake.set()

    wall_end = planner.started + planner.budget.wall_s
    async with trio.open_nursery() as nursery:
        while True:
            action = planner.next(trio.current_time())
            flush()
            if isinstance(action, Finished):
                break
            if isinstance(action, Dispatch):
                nursery.start_soon(dispatch, action.calls, attempted, ended)
            elif isinstance(action, Wait):
                with trio.move_on_at(action.until):
                    await wake.wait()
                wake = trio.Event()
            elif isinstance(action, Think):
                with trio.move_on_at(wall_end):
                    step = await _think(planner, thinker, action)
                    if step is not None:
                        outcome = planner.stepped(step.text, step.tokens, trio.current_time())
                        if on_step is not None:
                            on_step(outcome, step)
        nursery.cancel_scope.cancel()
    flush()


async def _think(planner: Planner, thinker: Thinker, action: Think) -> StepText | None:
    try:
        return await thinker.think(action.transcript)
    except (ModelUnavailable, SwarmUnavailable, Refused) as exc:
        planner.fail(f"the planner's model cannot answer: {exc}", trio.current_time())
    except Exception as exc:  # our bug, or the model's: this plan fails, the peer serves on
        log.exception("plan %s: the thinker failed", planner.id)
        planner.fail(f"the planner's model failed ({type(exc).__name__}: {exc})"[:500],
                     trio.current_time())
    return None
