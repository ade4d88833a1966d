"""LocalPolicy decodes a request's prompts together: prompts of one token length in one
prefill and one forward a token, at most `max_rows` rows a forward.

Batched generation against prompt-by-prompt generation (the same policy with
max_rows = n: one prompt's group a batch, the decoding before prompts were batched),
tiny random Llama in float32: the same tokens, log-probs within LOGPROB_ATOL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peerd.inference.model.head import Head
from peerd.inference.model.shard import ShardBlock
from peerd.inference.model.source import ModelSource, resolve
from peerd.rl.policy import Generation, LocalPolicy, batch_rows
from peerd.rl.versions import PolicyError
from tests.models import tiny_llama_dir

# A row's logits come from a [rows, ...] matmul instead of a [n, ...] one: float32
# rounding of kernels summing in other orders (~1e-6 on this model), inside this.
# Tokens are compared exactly: each row draws from its own generator, so a token could
# differ only where a probability moved across the generator's uniform draw by ~1e-7,
# which none of these draws does.
LOGPROB_ATOL = 1e-5
EQUAL = [[1, 17, 42, 99, 7, 250, 3], [5, 6, 7, 8, 9, 10, 11], [300, 2, 40, 41, 42, 43, 9],
         [12, 13, 14, 15, 16, 17, 18]]
MIXED = [EQUAL[0], [5, 6, 7], EQUAL[1], [44, 45, 46], [8], EQUAL[2]]
EOS = {2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return resolve(str(tiny_llama_dir(tmp_path_factory)))


@pytest.fixture(scope="module")
def policy(tiny: ModelSource) -> LocalPolicy:
    return LocalPolicy(ShardBlock(tiny, 0, 4), Head(tiny))  # nothing here changes weights


class Shapes:
    """The hidden-state shape of every block forward of a policy, while watched."""

    def __init__(self, policy: LocalPolicy) -> None:
        self.policy = policy
        self.seen: list[tuple[int, ...]] = []

    def __enter__(self) -> Shapes:
        block = self.policy.block
        forward = block.forward

        def watched(hidden: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
            self.seen.append(tuple(hidden.shape))
            return forward(hidden, *args, **kw)

        block.forward = watched  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.policy.block.forward  # the class's method again


async def generate(policy: LocalPolicy, prompts: list[list[int]], max_rows: int,
                   **kw: Any) -> Generation:
    settings: dict[str, Any] = {"n": 4, "temperature": 1.0, "top_p": 0.9, "max_tokens": 10,
                                "seed": 7, "eos_ids": EOS} | kw
    before, policy.max_rows = policy.max_rows, max_rows
    try:
        return await policy.generate_many(prompts, **settings)
    finally:
        policy.max_rows = before


def assert_same(got: Generation, expected: Generation) -> None:
    assert got.version == expected.version
    assert [len(g) for g in got.groups] == [len(g) for g in expected.groups]
    worst = 0.0
    for group, ref in zip(got.groups, expected.groups, strict=True):
        for c, r in zip(group, ref, strict=True):
            assert c.ids == r.ids
            diff = torch.tensor(c.logprobs) - torch.tensor(r.logprobs)
            worst = max(worst, float(diff.abs().max()))
    print(f"max |batched - prompt by prompt| log-prob = {worst:.1e}")
    assert worst <= LOGPROB_ATOL


def completions(out: Generation) -> Iterator[tuple[int, ...]]:
    return (c.ids for group in out.groups for c in group)


# ---- the plan ---------------------------------------------------------------------------


def test_rows_are_batched_by_prompt_length_under_the_cap() -> None:
    assert batch_rows([7, 7, 7], 2, 64) == [[(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]]
    # lengths apart, in order of first appearance; whole groups while the cap holds them
    assert batch_rows([7, 3, 7, 3, 7], 2, 4) == [
        [(0, 0), (0, 1), (2, 0), (2, 1)], [(4, 0), (4, 1)],
        [(1, 0), (1, 1), (3, 0), (3, 1)]]
    assert batch_rows([5, 5, 5], 2, 5) == [[(0, 0), (0, 1), (1, 0), (1, 1)], [(2, 0), (2, 1)]]
    # max_rows = n: one prompt's group a batch (prompt by prompt)
    assert batch_rows([5, 5], 3, 3) == [[(0, 0), (0, 1), (0, 2)], [(1, 0), (1, 1), (1, 2)]]
    # a group larger than the cap is split
    assert batch_rows([5, 5], 5, 2) == [[(0, 0), (0, 1)], [(0, 2), (0, 3)], [(0, 4)],
                                        [(1, 0), (1, 1)], [(1, 2), (1, 3)], [(1, 4)]]
    assert batch_rows([4, 4, 9], 1, 64) == [[(0, 0), (1, 0)], [(2, 0)]]
    assert batch_rows([], 4, 64) == []


def test_a_policy_needs_a_row_a_batch(tiny: ModelSource) -> None:
    with pytest.raises(PolicyError, match="max_rows=0"):
        LocalPolicy(ShardBlock(tiny, 0, 4), Head(tiny), max_rows=0)


# ---- batched equals prompt by prompt ----------------------------------------------------


async def test_equal_lengths_prefill_once_and_decode_every_row_in_one_forward(
        policy: LocalPolicy) -> None:
    with Shapes(policy) as shapes:
        got = await generate(policy, EQUAL, 64, temperature=0.0, max_tokens=6, eos_ids=set())
    # one prefill of the 4 prompts, then the 16 rows a token (none stops: no EOS)
    assert shapes.seen == [(4, 7, 64)] + [(16, 1, 64)] * 5
    with Shapes(policy) as shapes:
        expected = await generate(policy, EQUAL, 4, temperature=0.0, max_tokens=6,
                                  eos_ids=set())
    assert shapes.seen == ([(1, 7, 64)] + [(4, 1, 64)] * 5) * 4
    assert_same(got, expected)


@pytest.mark.parametrize("prompts", [EQUAL, MIXED], ids=["equal", "mixed"])
async def test_greedy_batched_is_prompt_by_prompt(policy: LocalPolicy,
                                                  prompts: list[list[int]]) -> None:
    got = await generate(policy, prompts, 64, temperature=0.0)
    assert_same(got, await generate(policy, prompts, 4, temperature=0.0))
    assert len(set(completions(got))) >= len(prompts) - 1  # prompts' own completions


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("prompts", [EQUAL, MIXED], ids=["equal", "mixed"])
async def test_sampled_batched_is_prompt_by_prompt(policy: LocalPolicy,
                                                   prompts: list[list[int]], seed: int) -> None:
    got = await generate(policy, prompts, 64, seed=seed)
    assert_same(got, await generate(policy, prompts, 4, seed=seed))
    assert len(set(completions(got))) > len(prompts)  # sampled, not one per prompt


async def test_rows_finishing_early_leave_the_batch(policy: LocalPolicy) -> None:
    stops = set(range(0, 384, 16))  # a sixteenth of the vocabulary ends a completion
    with Shapes(policy) as shapes:
        got = await generate(policy, EQUAL, 64, seed=5, max_tokens=12, eos_ids=stops)
    lengths = [len(ids) for ids in completions(got)]
    assert min(lengths) < 12 and max(lengths) == 12  # some stopped, some ran to the end
    for ids in completions(got):
        assert len(ids) == 12 or ids[-1] in stops
        assert not stops & set(ids[:-1])
    # the batch shrank as rows stopped: rows a forward never grow, and end below 16
    rows = [s[0] for s in shapes.seen[1:]]
    assert rows == sorted(rows, reverse=True) and rows[-1] < 16
    assert_same(got, await generate(policy, EQUAL, 4, seed=5, max_tokens=12, eos_ids=stops))


async def test_one_completion_a_prompt(policy: LocalPolicy) -> None:
    with Shapes(policy) as shapes:
        got = await generate(policy, MIXED, 64, n=1, max_tokens=5, eos_ids=set())
    # three lengths, 7, 3 and 1 tokens: three batches of their prompts' single rows,
    # each a prefill and 4 steps
    assert shapes.seen == ([(3, 7, 64)] + [(3, 1, 64)] * 4 + [(2, 3, 64)] + [(2, 1, 64)] * 4
                           + [(1, 1, 64)] * 5)
    assert_same(got, await generate(policy, MIXED, 1, n=1, max_tokens=5, eos_ids=set()))


@pytest.mark.parametrize("max_rows", [2, 5, 8])
async def test_the_row_cap_splits_a_batch(policy: LocalPolicy, max_rows: int) -> None:
    with Shapes(policy) as shapes:
        got = await generate(policy, EQUAL, max_rows, n=3, seed=9, eos_ids=set())
    assert max(s[0] for s in shapes.seen) <= max_rows
    prefills = [s for s in shapes.seen if s[1] > 1]
    expected_prefills = {2: [(1, 7, 64)] * 8, 5: [(1, 7, 64)] * 4, 8: [(2, 7, 64)] * 2}
    assert prefills == expected_prefills[max_rows]
    assert_same(got, await generate(policy, EQUAL, 3, n=3, seed=9, eos_ids=set()))
    # and the same tokens as the whole request in one batch
    assert_same(got, await generate(policy, EQUAL, 64, n=3, seed=9, eos_ids=set()))


async def test_a_prompt_index_keeps_its_seed_in_any_batch(policy: LocalPolicy) -> None:
    # prompt 0 alone is prompt 0 of the batched request; a prompt's completions are its
    # own whatever the other prompts of its batch
    alone = await policy.generate(EQUAL[0], n=4, temperature=1.0, top_p=0.9, max_tokens=10,
                                  seed=7, eos_ids=EOS)
    together = await generate(policy, EQUAL, 64)
    assert [c.ids for c in together.groups[0]] == [c.ids for c in alone]


@pytest.mark.parametrize("prompts", [EQUAL, MIXED], ids=["equal", "mixed"])
async def test_with_a_seed_a_prompt_each_prompt_draws_as_it_would_alone(
        policy: LocalPolicy, prompts: list[list[int]]) -> None:
    # a trainer puts several slots' prompts in one request, each with its slot's seed:
    # every prompt's completions are those of a request of that prompt alone
    seeds = [1000 + 17 * i for i in range(len(prompts))]
    together = await generate(policy, prompts, 64, seeds=seeds)
    for i, prompt in enumerate(prompts):
        alone = await generate(policy, [prompt], 4, seed=seeds[i])
        assert_same(Generation(together.version, [together.groups[i]]), alone)
    # without seeds, prompt i draws from (seed, i): other tokens than its own seed gives
    assert list(completions(await generate(policy, prompts, 64, seed=seeds[0]))) != \
        list(completions(together))
    with pytest.raises(PolicyError, match="2 seeds for"):
        await generate(policy, prompts, 64, seeds=seeds[:2])
