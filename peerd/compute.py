"""One thread runs all of this process's torch work.

torch's CPU kernels run their parallel parts on OpenMP (libgomp), which keeps a team of
worker threads for every thread that ever ran a parallel region. Once a process holds
more such threads than it has cores, libgomp stops spinning between parallel regions and
puts its workers to sleep at once, so every small op pays a wake-up. trio's
`to_thread.run_sync` takes whichever cached thread is idle, so over a daemon's life
several threads can come to run torch, each with its own team, and every forward after
that runs throttled: no faster than a single torch thread (bench/README.md, "Figures
behind other design choices").

So every torch call of a peer (loading, shard forwards, drafting, verification,
embeddings) goes through `run`: a FIFO served by one long-lived thread. It serialises
that work, which a peer did anyway (one CapacityLimiter guards its compute); what it
changes is only which thread runs it. Keep torch work off the event loop's thread too:
a parallel op there would start a second team.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import outcome
import trio

T = TypeVar("T")

_Job = tuple[Callable[[], Any], Callable[[outcome.Outcome[Any]], None]]


class ComputeThread:
    """A daemon thread that runs submitted calls one at a time, in order."""

    def __init__(self, name: str = "peerd-compute") -> None:
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    @property
    def ident(self) -> int | None:
        return self._thread.ident

    def _serve(self) -> None:
        while True:
            fn, deliver = self._jobs.get()
            deliver(outcome.capture(fn))
            del fn, deliver  # drop the result's references before waiting again

    async def run(self, fn: Callable[..., T], *args: Any,
                  abandon_on_cancel: bool = False) -> T:
        """fn(*args) on the compute thread; its result or its exception. Cancelling waits
        for the call to finish (it may be mutating state the caller owns), unless
        `abandon_on_cancel`: then the caller leaves at once and the result is dropped."""
        token = trio.lowlevel.current_trio_token()
        task = trio.lowlevel.current_task()
        state = {"abandoned": False}

        def deliver(result: outcome.Outcome[Any]) -> None:
            def wake() -> None:
                if not state["abandoned"]:
                    trio.lowlevel.reschedule(task, result)
            try:
                token.run_sync_soon(wake)
            except trio.RunFinishedError:  # the caller's run is over: nobody to tell
                pass

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            if abandon_on_cancel:
                state["abandoned"] = True
                return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED

        self._jobs.put((lambda: fn(*args), deliver))
        result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        return result


_thread: ComputeThread | None = None
_lock = threading.Lock()


def compute_thread() -> ComputeThread:
    """This process's compute thread, started on first use."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = ComputeThread()
        return _thread


async def run(fn: Callable[..., T], *args: Any, abandon_on_cancel: bool = False) -> T:
    """fn(*args) on this process's compute thread (see the module's docstring)."""
    return await compute_thread().run(fn, *args, abandon_on_cancel=abandon_on_cancel)
