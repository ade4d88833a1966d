"""The entry peer's pool of idle pipeline sessions against its sweeper, on real nodes
serving the tiny model (tests/test_pipeline.py's swarm): a request that takes or
releases a session while the sweeper awaits a close never meets a session the sweeper
is about to close, and the sweeper never ends the node."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import trio

import peerd.inference.swarm.pipeline as pipeline_module
from peerd.inference.swarm.routing import Route
from tests.models import tiny_llama_dir
from tests.test_pipeline import PROMPT, model_swarm

IDLE_S = 0.4  # POOL_IDLE_S here: the sweeper wakes every IDLE_S / 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


async def test_a_request_during_a_sweep_gets_no_session_the_sweep_closes(
        tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stale sessions on one route; the sweeper's close of the first is held. A
    request that asks for a session meanwhile gets none (both are on their way out), so
    it opens its own, which the next request takes from the pool; then the sweep ends:
    both stale sessions closed, the node running, the session in use open and
    computing."""
    monkeypatch.setattr(pipeline_module, "POOL_IDLE_S", IDLE_S)
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4)]) as (_, runtimes):
        entry = runtimes[0]
        pipeline = entry.generator.pipeline
        route = entry.generator.route()
        assert isinstance(route, Route)
        first = await pipeline.open(route, 16)
        second = await pipeline.open(route, 16)
        closing, go_on = trio.Event(), trio.Event()
        close_first = first.close

        async def held_close() -> None:
            closing.set()
            await go_on.wait()
            await close_first()

        first.close = held_close  # type: ignore[method-assign]
        await pipeline.release(first)
        await pipeline.release(second)
        assert pipeline.pooled == 2
        first.idle_since = second.idle_since = time.monotonic() - 2 * IDLE_S

        with trio.fail_after(10):
            await closing.wait()  # the sweeper awaits the first close
        taken = pipeline.take(route, 16)
        # the request opens its own session, uses it, pools it; the next one takes it
        third = await pipeline.open(route, 16)
        await pipeline.release(third)
        in_use = pipeline.take(route, 16)
        go_on.set()
        with trio.fail_after(10):
            await first.done.wait()
            await second.done.wait()
        assert not entry.node.nursery.cancel_scope.cancel_called
        assert taken is None  # not `second`, which the sweep was about to close
        assert in_use is third and not third.done.is_set()
        try:
            with torch.inference_mode():
                hidden = entry.head.embed(torch.tensor([PROMPT]))
            result = await third.step(hidden, 0)
            assert result.hidden.shape == hidden.shape
        finally:
            await third.close()
