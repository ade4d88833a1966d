"""The prompt cache by default and warm routes, over real in-process hosts serving a
tiny random Llama: on in float32 (greedy output the same with and without it, and
one process's), off in bfloat16; a request that reuses prompts keeps the route of
the pooled session holding its prefix within the warm margin, and leaves it beyond;
a plain request that reuses a speculative request's session keeps its features for
the next speculative one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from peerd.inference.model.source import reference_model, resolve
from peerd.inference.options import SamplingParams, SpeculativeOptions
from peerd.inference.request import GenerationStats
from peerd.inference.runtime import ModelRuntime
from peerd.inference.swarm.routing import Route
from peerd.inference.swarm.warm import WarmMargin
from tests.models import tiny_llama_dir
from tests.test_pipeline import PROMPT, model_swarm

N = 12
NGRAM = SpeculativeOptions(draft="ngram", verify="greedy")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tiny: Path) -> torch.nn.Module:
    return reference_model(resolve(str(tiny)))


async def run(entry: ModelRuntime, prompt: list[int], reuse: bool,
              spec: SpeculativeOptions | None = None, n: int = N
              ) -> tuple[list[int], GenerationStats]:
    out: list[int] = []

    async def collect(token: int) -> bool:
        out.append(token)
        return True

    request = await entry.generator.prepare(prompt, SamplingParams(max_tokens=n), spec)
    stats = await entry.generator.generate(request, collect, reuse_prefix=reuse)
    return out, stats


def expected(reference: torch.nn.Module, entry: ModelRuntime, prompt: list[int]) -> list[int]:
    """One process's greedy tokens, up to the first EOS (which ends a request unseen)."""
    tokens: list[int] = []
    with torch.inference_mode():
        while len(tokens) < N:
            logits = reference(torch.tensor([[*prompt, *tokens]])).logits  # type: ignore[operator]
            token = int(logits[0, -1].argmax())
            if token in entry.generator.eos_ids:
                break
            tokens.append(token)
    return tokens


def best_route(entry: ModelRuntime) -> Route:
    route = entry.generator.route()
    assert isinstance(route, Route)
    return route


async def test_on_by_default_in_float32_and_off_in_bfloat16(tmp_path: Path,
                                                            tiny: Path) -> None:
    async with model_swarm(tmp_path / "f32", tiny, [(0, 2), (2, 4)]) as (_, runtimes):
        entry = runtimes[0]
        assert entry.generator.prompt_cache is None  # unset: where it is safe
        assert entry.generator.reuses_prompts(best_route(entry))
        entry.generator.prompt_cache = False  # --no-prompt-cache
        assert not entry.generator.reuses_prompts(best_route(entry))
    async with model_swarm(tmp_path / "bf16", tiny, [(0, 2), (2, 4)],
                           dtype="bfloat16") as (_, runtimes):
        entry = runtimes[0]
        assert entry.generator.wire_dtype == "bfloat16"
        assert not entry.generator.reuses_prompts(best_route(entry))
        entry.generator.prompt_cache = True  # --prompt-cache: the user's call
        assert entry.generator.reuses_prompts(best_route(entry))


async def test_greedy_output_is_the_same_with_and_without_the_cache(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module) -> None:
    """float32, 3 shards: the next turn of each conversation, decoded on the KV its
    first turn left (plain and with a drafter), equals the same turn prefilled fresh
    and one process's greedy decoding, token for token."""
    conversations = [PROMPT, PROMPT[::-1], [7, 7, 7, 30, 31, 32, 7, 7], list(range(40, 70)),
                     [200, 3, 150, 3, 99, 12]]
    async with model_swarm(tmp_path, tiny, [(0, 1), (1, 3), (3, 4)]) as (_, runtimes):
        entry = runtimes[0]
        assert entry.generator.reuses_prompts(best_route(entry))
        for i, first_turn in enumerate(conversations):
            spec = NGRAM if i % 2 else None
            answer, _ = await run(entry, first_turn, True, spec)
            turn = [*first_turn, *answer, 11, 22, 33 + i]  # the user's next message
            cached, stats = await run(entry, turn, True, spec)
            assert stats.cached_tokens >= len(first_turn)  # the first turn's KV was reused
            fresh, stats = await run(entry, turn, False, spec)
            assert stats.cached_tokens == 0
            assert cached == fresh == expected(reference, entry, turn), i


async def test_a_plain_request_keeps_the_features_it_reused(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module) -> None:
    """A speculative turn pools its session with the target's features; a plain turn
    that reuses it pools it again with those of the prefix it reused, so the next
    speculative turn still resumes from the caches."""
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4)]) as (_, runtimes):
        entry = runtimes[0]
        first, _ = await run(entry, PROMPT, True, NGRAM)
        second_turn = [*PROMPT, *first, 5, 6]
        second, stats = await run(entry, second_turn, True)  # plain
        assert stats.cached_tokens >= len(PROMPT)
        third_turn = [*second_turn, *second, 8, 9]
        third, stats = await run(entry, third_turn, True, NGRAM)
        # the features stop where the plain turn's reuse did
        assert len(PROMPT) <= stats.cached_tokens <= len(second_turn)
        assert third == expected(reference, entry, third_turn)


async def test_a_request_reusing_its_prompt_keeps_the_warm_route_within_the_margin(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module) -> None:
    """Two replicas of [2, 4). The best route moves to the other replica (its RTT as
    the entry measured it drops); a request that reuses its prompt stays on the warm
    one while it costs within the margin, and a request that does not moves. Beyond
    the margin the reusing request moves too."""
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4), (2, 4)]) as (_, runtimes):
        entry, x, y = runtimes
        gen = entry.generator
        # RTTs and a margin so wide that the replicas' measured throughput (tens of ms
        # a token on a loaded machine, and noisy) does not decide
        gen.warm_margin = WarmMargin(fraction=0.2, floor_ms=400.0)
        rtt = entry.node.rtt_ms
        ids = {"x": x.node.peer_id, "y": y.node.peer_id}

        def last_hop(stats: GenerationStats) -> str:
            peer: str = stats.route[-1]["peer_id"]
            return next(name for name, pid in ids.items() if pid == peer)

        rtt[ids["x"]], rtt[ids["y"]] = 1.0, 200.0
        first, stats = await run(entry, PROMPT, True)
        assert last_hop(stats) == "x"
        # y is ~200 ms cheaper now: within the margin
        rtt[ids["x"]], rtt[ids["y"]] = 200.0, 1.0
        assert best_route(entry).spans[-1].peer_id == ids["y"]
        turn = [*PROMPT, *first, 4, 5]
        tokens, stats = await run(entry, turn, True)
        assert last_hop(stats) == "x" and stats.cached_tokens >= len(PROMPT)
        assert tokens == expected(reference, entry, turn)
        _, stats = await run(entry, [9, 8, 7, 6], False)  # reuses nothing: the best route
        assert last_hop(stats) == "y" and stats.cached_tokens == 0
        # x ~5 s dearer: beyond the margin, the best route wins
        rtt[ids["x"]] = 5000.0
        later = [*turn, *tokens, 6]
        tokens, stats = await run(entry, later, True)
        assert last_hop(stats) == "y" and stats.cached_tokens < len(PROMPT)
        assert tokens == expected(reference, entry, later)
