"""The compute thread: every call on one long-lived thread, in order; results and
exceptions come back; cancellation waits for the call unless it is abandoned."""

from __future__ import annotations

import threading
import time

import pytest
import trio
import trio.testing

from peerd import compute
from peerd.compute import ComputeThread


async def test_calls_run_on_one_thread_in_order() -> None:
    seen: list[tuple[int, int]] = []

    def note(i: int) -> int:
        seen.append((i, threading.get_ident()))
        return i * i

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(compute.run, note, i)
            await trio.testing.wait_all_tasks_blocked()  # submitted in this order
    assert [i for i, _ in seen] == list(range(20))
    threads = {t for _, t in seen}
    assert threads == {compute.compute_thread().ident}
    assert threading.get_ident() not in threads
    assert await compute.run(note, 7) == 49
    assert compute.compute_thread() is compute.compute_thread()


async def test_exception_reaches_the_caller_and_the_thread_goes_on() -> None:
    def fail() -> None:
        raise ValueError("bad tensor")

    with pytest.raises(ValueError, match="bad tensor"):
        await compute.run(fail)
    assert await compute.run(lambda: 3) == 3


async def test_cancel_waits_for_the_call_to_finish() -> None:
    worker = ComputeThread("test-compute")
    finished = threading.Event()

    def slow() -> str:
        time.sleep(0.3)
        finished.set()
        return "done"

    with trio.move_on_after(0.05) as scope:
        result = await worker.run(slow)
    # the call was running when the deadline passed: run waited for it and returned
    assert finished.is_set()
    assert result == "done"
    assert not scope.cancelled_caught


async def test_abandoned_call_returns_at_once_and_the_queue_goes_on() -> None:
    worker = ComputeThread("test-compute")
    release, finished = threading.Event(), threading.Event()

    def blocked() -> str:
        release.wait(30)
        finished.set()
        return "late"

    with trio.move_on_after(0.05) as scope:
        await worker.run(blocked, abandon_on_cancel=True)
    assert scope.cancelled_caught
    assert not finished.is_set()  # it left while the call was still running
    release.set()
    assert await worker.run(lambda: "next") == "next"  # the dropped result went nowhere
