"""Speculative decoding across the pipeline (DSD) over real in-process hosts: a tiny
random Llama split 3 ways. Greedy DSD must reproduce plain greedy with every drafter;
the shards' caches must hold exactly the committed positions; sampling must follow
the target's distribution; a failing shard mid-round must not change the output; the
tokens' log-probabilities, plain or speculative, must be one process's."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from peerd.inference.model.shard import ShardBlock
from peerd.inference.model.source import reference_model, resolve
from peerd.inference.options import SamplingParams, SpeculativeOptions
from peerd.inference.request import GenerationStats, Logprobs
from peerd.inference.runtime import ModelRuntime
from peerd.inference.sampling import distribution, token_logprobs
from peerd.inference.speculative.drafters import DraftError
from tests.models import tiny_llama_dir
from tests.test_pipeline import PROMPT, model_swarm, reference_tokens

SPLITS = [(0, 1), (1, 3), (3, 4)]
NEAR_TIE = 1e-4  # a divergence is excused only where the target's top two were this close
N = 24
TEMPERATURE = 0.15  # concentrates the tiny model's next token on a handful of candidates
SCORED = 16  # tokens generated with their log-probabilities reported
TOP = 3  # alternatives reported per token
LOGPROB_TOL = 1e-4  # float32 through 3 shards vs one process


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def other_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same tokenizer, other weights: a drafter that is often wrong."""
    return tiny_llama_dir(tmp_path_factory, seed=1, layers=1)


@pytest.fixture(scope="module")
def reference(tiny: Path) -> torch.nn.Module:
    return reference_model(resolve(str(tiny)))


async def run(runtime: ModelRuntime, spec: SpeculativeOptions | None, n: int = N,
              prompt: Sequence[int] = PROMPT, **sampling: Any
              ) -> tuple[list[int], GenerationStats]:
    tokens: list[int] = []

    async def collect(token: int) -> bool:
        tokens.append(token)
        return True

    request = await runtime.generator.prepare(list(prompt), SamplingParams(max_tokens=n,
                                                                           **sampling), spec)
    stats = await runtime.generator.generate(request, collect)
    return tokens, stats


def check_same_or_near_tie(model: torch.nn.Module, prompt: Sequence[int], got: list[int],
                           expected: list[int]) -> None:
    """Equal, or the first divergence is where the target's top two logits were within
    NEAR_TIE (verifying several positions at once may flip such a tie): reported."""
    if got == expected:
        return
    i = next(k for k, (a, b) in enumerate(zip(got, expected, strict=False)) if a != b)
    with torch.inference_mode():
        logits = model(torch.tensor([[*prompt, *expected[:i]]])).logits[0, -1]  # type: ignore[operator]
    top2 = torch.topk(logits, 2).values
    gap = float(top2[0] - top2[1])
    print(f"divergence at token {i}: top-2 logit gap {gap:.2e}")
    assert gap < NEAR_TIE, f"output diverged at token {i} with a top-2 gap of {gap:.2e}"


def untrained_eagle(runtime: ModelRuntime, path: Path,
                    vocab: list[int] | None = None) -> Path:
    """An EAGLE head for the tiny target, random weights: wrong most of the time, which
    exercises rejection and rollback as much as a good one exercises acceptance."""
    from peerd.inference.model.source import load_config
    from peerd.inference.speculative.eagle import EagleConfig, EagleHead
    from peerd.inference.speculative.eagle_file import save_eagle

    torch.manual_seed(0)
    eagle = EagleHead(EagleConfig.from_target(load_config(runtime.source)))
    save_eagle(eagle, runtime.head, path, vocab=vocab)
    return path


async def test_greedy_dsd_equals_plain_greedy_with_every_drafter(
        tmp_path: Path, tiny: Path, other_tiny: Path, reference: torch.nn.Module) -> None:
    expected = reference_tokens(reference, PROMPT, N)
    repeat_prompt = PROMPT * 3  # something for prompt lookup to find
    expected_repeat = reference_tokens(reference, repeat_prompt, N)
    async with model_swarm(tmp_path, tiny, SPLITS) as (_, runtimes):
        entry = runtimes[0]
        plain, stats = await run(entry, None)
        assert plain == expected and stats.rounds[0].drafted == 0
        head = untrained_eagle(entry, tmp_path / "eagle.safetensors")
        # drafting over the odd token ids only (and the context's own tokens)
        odd = untrained_eagle(entry, tmp_path / "odd.safetensors",
                              vocab=list(range(1, entry.head.vocab_size, 2)))
        for draft, gamma, tree in [("ngram", None, True), (f"eagle:{head}", 4, True),
                                   (f"eagle:{head}", None, True), (f"eagle:{head}", 4, False),
                                   (f"eagle:{odd}", None, True), (f"eagle:{odd}", 4, False),
                                   (f"model:{other_tiny}", 3, True),
                                   (f"model:{tiny}", None, True), (f"model:{tiny}", 8, True)]:
            spec = SpeculativeOptions(draft, "greedy", gamma, tree)
            for prompt, want in [(PROMPT, expected), (repeat_prompt, expected_repeat)]:
                tokens, stats = await run(entry, spec, prompt=prompt)
                check_same_or_near_tie(reference, prompt, tokens, want)
                info = stats.speculative_json()
                print(f"{draft.split('/')[-1]} γ={gamma or 'auto'} tree={tree}: "
                      f"{info['rounds']} rounds, {info['tokens_per_round']} tokens/round")
                assert info["rounds"] == len(stats.rounds) >= 1
                trees = [r for r in stats.rounds if r.nodes > r.drafted]
                if draft.startswith("eagle") and tree:
                    assert trees, "eagle drafts token trees"
                if draft.startswith("model") or not tree:
                    assert not trees, "chains only"
        # the target drafting for itself is accepted (almost) always: few rounds
        _, stats = await run(entry, SpeculativeOptions(f"model:{tiny}", "greedy", 8))
        assert stats.speculative_json()["tokens_per_round"] > 4


async def test_greedy_dsd_in_bfloat16_equals_plain_bit_for_bit(tmp_path: Path,
                                                                 tiny: Path) -> None:
    """In bfloat16 on CPU the shards' attention is exact (attention.py): every drafter
    reproduces plain bfloat16 greedy decoding token for token, with no near-tie excused,
    though bfloat16 logits tie far more often than float32 ones."""
    repeat_prompt = PROMPT * 3
    async with model_swarm(tmp_path, tiny, SPLITS, dtype="bfloat16") as (_, runtimes):
        entry = runtimes[0]
        assert entry.head.dtype == torch.bfloat16
        expected = {tuple(p): (await run(entry, None, prompt=p))[0]
                    for p in (PROMPT, repeat_prompt)}
        head = untrained_eagle(entry, tmp_path / "eagle.safetensors")
        for draft, gamma, tree in [("ngram", None, True), (f"eagle:{head}", None, True),
                                   (f"eagle:{head}", 4, False), (f"model:{tiny}", 8, True)]:
            for prompt, want in expected.items():
                tokens, stats = await run(entry, SpeculativeOptions(draft, "greedy", gamma, tree),
                                          prompt=prompt)
                print(f"bfloat16 {draft.split('/')[-1]} γ={gamma or 'auto'}: "
                      f"{stats.speculative_json()['tokens_per_round']} tokens/round")
                assert tokens == want, f"{draft} γ={gamma}: diverged from plain greedy"


async def test_caches_hold_exactly_the_committed_positions(
        tmp_path: Path, tiny: Path, other_tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every FORWARD after the prompt's starts where the committed sequence ends (the
    last committed token is the one being sent): rejected drafts were rolled back by
    `keep` on the same request, at every shard."""
    committed = [0]
    seen: list[tuple[int, int, int]] = []  # (start_pos, committed before, cache len after)
    begin = ShardBlock.begin  # where every forward starts (after rolling back to keep)

    def recording(self: ShardBlock, hidden: torch.Tensor, start_pos: int, cache: Any,
                  keep: int | None = None, span: Any = None, tree: Any = ()) -> Any:
        step = begin(self, hidden, start_pos, cache, keep, span, tree)
        seen.append((start_pos, committed[0], self.cache_len(cache)))
        return step

    monkeypatch.setattr(ShardBlock, "begin", recording)
    async with model_swarm(tmp_path, tiny, SPLITS) as (_, runtimes):
        entry = runtimes[0]

        async def count(token: int) -> bool:
            committed[0] += 1
            return True

        committed[0] = len(PROMPT)
        seen.clear()  # (start-up measured throughput through forward too)
        stats = await entry.generator.generate(await entry.generator.prepare(
            list(PROMPT), SamplingParams(max_tokens=N),
            SpeculativeOptions(f"model:{other_tiny}", "greedy", 4)), count)
    rejected = [r for r in stats.rounds if r.accepted < r.drafted]
    assert rejected, "the test needs rounds with rejected drafts"
    decode = [s for s in seen if s[0] > 0]
    assert len(decode) == 3 * len(stats.rounds)  # every round at every shard
    for start_pos, before, cache_before in decode:
        # before: tokens committed so far (prompt + generated); the newest is in flight
        assert start_pos == before - 1 == cache_before


async def test_tree_rounds_keep_only_a_chain_prefix_and_resend_the_rest(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With token trees, each FORWARD starts where the caches' valid chain ends: what
    the tree accepted off its first chain of slots is sent again with the next round,
    and the output is still plain greedy's."""
    committed = [0]
    seen: list[tuple[int, int, int, int]] = []  # (start_pos, committed, cache after keep, T)
    begin = ShardBlock.begin  # where every forward starts (after rolling back to keep)

    def recording(self: ShardBlock, hidden: torch.Tensor, start_pos: int, cache: Any,
                  keep: int | None = None, span: Any = None, tree: Any = ()) -> Any:
        step = begin(self, hidden, start_pos, cache, keep, span, tree)
        seen.append((start_pos, committed[0], self.cache_len(cache), len(tree)))
        return step

    monkeypatch.setattr(ShardBlock, "begin", recording)
    prompt = PROMPT * 3
    async with model_swarm(tmp_path, tiny, SPLITS) as (_, runtimes):
        entry = runtimes[0]
        head = untrained_eagle(entry, tmp_path / "eagle.safetensors")
        tokens: list[int] = []

        async def count(token: int) -> bool:
            committed[0] += 1
            tokens.append(token)
            return True

        committed[0] = len(prompt)
        seen.clear()
        stats = await entry.generator.generate(await entry.generator.prepare(
            list(prompt), SamplingParams(max_tokens=N),
            SpeculativeOptions(f"eagle:{head}", "greedy", 4)), count)
    check_same_or_near_tie(reference, prompt, tokens, reference_tokens(reference, prompt, N))
    decode = [s for s in seen if s[0] > 0]
    assert len(decode) == 3 * len(stats.rounds)
    assert any(t > 0 for *_, t in decode), "the rounds should have sent trees"
    for start_pos, before, cache_before, _ in decode:
        assert start_pos == cache_before <= before - 1  # a valid chain prefix, no more
    resent = [s for s in decode if s[0] < s[1] - 1]
    print(f"{len(stats.rounds)} rounds, {len(resent) // 3} resent accepted tokens")


def second_token_marginal(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """Exact P(second generated token) under the target's sampling [V], summing over
    the first token's 64 likeliest values (the rest weigh < 0.1% on this model)."""
    params = SamplingParams(temperature=TEMPERATURE)
    with torch.inference_mode():
        p1 = distribution(model(torch.tensor([prompt])).logits[0, -1], params)  # type: ignore[operator]
        top = torch.topk(p1, 64)
        rows = torch.tensor([[*prompt, int(t)] for t in top.indices])  # [64, T+1]
        p2 = torch.stack([distribution(r, params)
                          for r in model(rows).logits[:, -1]])  # type: ignore[operator]
    return (top.values.unsqueeze(1) * p2).sum(0)  # [V]


CHI2_999_DF10 = 29.59  # 99.9% quantile of chi-square with 10 degrees of freedom


def chi_square_binned(counts: dict[int, int], probs: torch.Tensor, bins: int = 10) -> float:
    """Pearson's statistic over the `bins` likeliest tokens plus one bin for the rest."""
    n = sum(counts.values())
    top = torch.topk(probs, bins).indices.tolist()
    observed = [counts.get(t, 0) for t in top]
    expected = [float(probs[t]) * n for t in top]
    observed.append(n - sum(observed))
    expected.append(n - sum(expected))
    return sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))


async def test_sampling_dsd_follows_the_targets_distribution(
        tmp_path: Path, tiny: Path, other_tiny: Path, reference: torch.nn.Module) -> None:
    """The second generated token (the first one drafted and verified) under
    speculative sampling, over 400 seeds, against its exact distribution under the
    target: Pearson's chi-square over the 10 likeliest tokens + the rest stays under
    the 99.9% quantile (a sampler that kept every draft scores in the hundreds here).
    Plain sampling is held to the same test as a control."""
    prompt = PROMPT[:4]
    exact = second_token_marginal(reference, prompt)
    async with model_swarm(tmp_path, tiny, [(0, 4)]) as (_, runtimes):
        entry = runtimes[0]
        spec = SpeculativeOptions(f"model:{other_tiny}", "sample", 2)
        counts: dict[str, dict[int, int]] = {"plain": {}, "speculative": {}}
        for seed in range(400):
            for name, how in (("plain", None), ("speculative", spec)):
                # n=3: the 2nd token is drafted (no draft may run past max_tokens)
                tokens, stats = await run(entry, how, n=3, prompt=prompt,
                                          temperature=TEMPERATURE, seed=seed)
                if len(tokens) >= 2:  # (an EOS first would end the request)
                    counts[name][tokens[1]] = counts[name].get(tokens[1], 0) + 1
        assert stats.verify == "sample" and stats.rounds[0].drafted == 1
        # repeatable: the same seed gives the same speculative sample
        again, _ = await run(entry, spec, n=6, prompt=prompt, temperature=TEMPERATURE, seed=7)
        first, _ = await run(entry, spec, n=6, prompt=prompt, temperature=TEMPERATURE, seed=7)
        assert again == first
    stat = {name: chi_square_binned(c, exact) for name, c in counts.items()}
    print(f"chi-square vs the exact marginal: plain {stat['plain']:.1f}, speculative "
          f"{stat['speculative']:.1f} (99.9% bound {CHI2_999_DF10})")
    assert stat["plain"] < CHI2_999_DF10
    assert stat["speculative"] < CHI2_999_DF10


@pytest.mark.parametrize("drafter", ["model", "eagle tree"])
async def test_failed_shard_mid_round_replays_without_changing_the_output(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module, drafter: str) -> None:
    expected = reference_tokens(reference, PROMPT, N)
    async with model_swarm(tmp_path, tiny, [(0, 2), (2, 4), (2, 4)]) as (_, runtimes):
        entry = runtimes[0]
        draft = (f"model:{tiny}" if drafter == "model"
                 else f"eagle:{untrained_eagle(entry, tmp_path / 'eagle.safetensors')}")
        route = entry.generator.route()
        serving = route.spans[-1].peer_id  # type: ignore[union-attr]
        victim = next(r for r in runtimes if r.node.peer_id == serving)
        produced = [0]
        tokens: list[int] = []

        async def collect(token: int) -> bool:
            tokens.append(token)
            produced[0] += 1
            if produced[0] == 6:  # mid-generation, between two rounds: next round fails
                def broken(*args: object, **kwargs: object) -> None:
                    raise RuntimeError("simulated GPU fault")
                victim.server.block.begin = broken  # type: ignore[method-assign]
            return True

        stats = await entry.generator.generate(await entry.generator.prepare(
            list(PROMPT), SamplingParams(max_tokens=N),
            SpeculativeOptions(draft, "greedy", 4)), collect)
        assert stats.reroutes >= 1
        assert stats.tree == (drafter == "eagle tree")
        check_same_or_near_tie(reference, PROMPT, tokens, expected)


async def test_bad_speculative_requests_are_refused_clearly(
        tmp_path: Path, tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other_vocab = tiny_llama_dir(tmp_path_factory, vocab=300, layers=1)
    async with model_swarm(tmp_path, tiny, [(0, 4)]) as (_, runtimes):
        entry = runtimes[0]
        with pytest.raises(DraftError, match="vocabulary"):
            await run(entry, SpeculativeOptions(f"model:{other_vocab}"))
        with pytest.raises(DraftError, match="draft model"):
            await run(entry, SpeculativeOptions("model:/no/such/model"))
        with pytest.raises(DraftError, match="EAGLE"):  # no head ships for a tiny model
            await run(entry, SpeculativeOptions("eagle"))
        with pytest.raises(DraftError, match="temperature 0"):
            await run(entry, SpeculativeOptions("ngram", "adaptive"), temperature=0.7)
        with pytest.raises(DraftError, match="temperature 0"):
            await run(entry, SpeculativeOptions("ngram", "greedy"), temperature=0.7)
        tokens, _ = await run(entry, SpeculativeOptions("ngram"))  # still serving
        assert len(tokens) == N


class Told:
    """Wraps a real drafter: records what each of its sessions is told."""

    def __init__(self, drafter: Any) -> None:
        self.drafter = drafter
        self.name = drafter.name
        self.tokens: list[int] = []
        self.features: list[torch.Tensor] = []

    def start(self) -> Any:
        session = self.drafter.start()
        self.tokens, self.features = [], []
        extend = session.extend

        def told(tokens: Sequence[int], features: torch.Tensor | None) -> None:
            self.tokens += list(tokens)
            if features is not None:
                self.features.append(features.reshape(-1, features.shape[-1]).clone())
            extend(tokens, features)

        session.extend = told
        return session


async def test_a_speculative_request_reuses_a_pooled_prefix_with_its_features(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module) -> None:
    """reuse_prefix under DSD: the pooled session kept the target's features for the
    positions its caches hold, so the drafter is told the same tokens and features as
    when everything is computed afresh, and greedy output is still plain greedy's."""
    async with model_swarm(tmp_path, tiny, SPLITS) as (_, runtimes):
        entry = runtimes[0]
        head = untrained_eagle(entry, tmp_path / "eagle.safetensors")
        spec = SpeculativeOptions(f"eagle:{head}", "greedy", 4, False)
        assert entry.generator.drafters is not None
        spy = Told(entry.generator.drafters.get(spec.draft))
        entry.generator.drafters._built[spec.draft] = spy

        async def told(prompt: list[int], reuse: bool) -> tuple[list[int], int, torch.Tensor]:
            tokens: list[int] = []

            async def collect(token: int) -> bool:
                tokens.append(token)
                return True

            request = await entry.generator.prepare(prompt, SamplingParams(max_tokens=8), spec)
            stats = await entry.generator.generate(request, collect, reuse_prefix=reuse)
            check_same_or_near_tie(reference, prompt, tokens,
                                   reference_tokens(reference, prompt, 8))
            # what it drafted on: a prefix of the history (a round that does not draft,
            # as the last one with no room left, does not feed the drafter)
            assert len(prompt) < len(spy.tokens) < len(prompt) + len(tokens)
            assert spy.tokens == [*prompt, *tokens][:len(spy.tokens)]
            return tokens, stats.cached_tokens, torch.cat(spy.features)

        first, cached, _ = await told(PROMPT, True)
        assert cached == 0
        resumed = [*PROMPT, *first[:4], 42]
        _, cached, features = await told(resumed, True)
        assert cached == len(PROMPT) + 4
        _, cached, fresh = await told(resumed, False)
        assert cached == 0
        n = min(len(features), len(fresh))
        assert n > len(PROMPT) + 4
        assert torch.allclose(features[:n], fresh[:n], atol=1e-4)
        # a plain request pools no features: a speculative one after it reuses nothing
        await run(entry, None, n=4, prompt=resumed)
        _, cached, _ = await told(resumed, True)
        assert cached == 0


# ---- log-probabilities: what verification saw, against one process ----------------------


def reference_logprobs(model: torch.nn.Module, prompt: Sequence[int], tokens: list[int]
                       ) -> torch.Tensor:
    """[len(tokens), V]: the reference's log-softmax at the position of each token."""
    with torch.inference_mode():
        logits = model(torch.tensor([[*prompt, *tokens]])).logits[0]  # type: ignore[operator]
    return torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)  # [n, V]


async def run_scored(runtime: ModelRuntime, spec: SpeculativeOptions | None, **sampling: float
              ) -> tuple[list[int], Logprobs]:
    tokens: list[int] = []
    logprobs = Logprobs(top=TOP)

    async def collect(token: int) -> bool:
        # a streaming caller finds the token's entry already there
        assert logprobs.entries[-1].token == token and len(logprobs.entries) == len(tokens) + 1
        tokens.append(token)
        return True

    params = SamplingParams(max_tokens=SCORED, seed=7, **sampling)  # type: ignore[arg-type]
    request = await runtime.generator.prepare(list(PROMPT), params, spec)
    await runtime.generator.generate(request, collect, logprobs=logprobs)
    return tokens, logprobs


def check_logprobs(reference: torch.nn.Module, tokens: list[int], logprobs: Logprobs) -> None:
    assert len(tokens) == SCORED and [e.token for e in logprobs.entries] == tokens
    want = reference_logprobs(reference, PROMPT, tokens)  # [SCORED, V]
    for i, entry in enumerate(logprobs.entries):
        assert abs(entry.logprob - float(want[i, entry.token])) < LOGPROB_TOL, i
        values, ids = want[i].topk(TOP + 1)
        assert len(entry.top) == TOP
        for k, (token, logprob) in enumerate(entry.top):
            assert abs(logprob - float(values[k])) < LOGPROB_TOL, (i, k)
            if float(values[k] - values[k + 1]) > LOGPROB_TOL and (
                    k == 0 or float(values[k - 1] - values[k]) > LOGPROB_TOL):
                assert token == int(ids[k]), (i, k)  # the order, where it is not a tie


async def test_logprobs_match_one_process_plain_and_speculative(
        tmp_path: Path, tiny: Path, reference: torch.nn.Module) -> None:
    async with model_swarm(tmp_path, tiny, SPLITS) as (_, runtimes):
        entry = runtimes[0]
        plain, logprobs = await run_scored(entry, None)
        check_logprobs(reference, plain, logprobs)
        greedy = [e.top[0][0] for e in logprobs.entries]
        assert greedy == plain, "greedy decoding commits the most likely token"
        head = untrained_eagle(entry, tmp_path / "eagle.safetensors")
        for spec, sampling in [
                (SpeculativeOptions(f"eagle:{head}", "greedy", None, True), {}),
                (SpeculativeOptions("ngram", "greedy", 4, False), {}),
                (SpeculativeOptions(f"model:{tiny}", "sample", 4, False),
                 {"temperature": TEMPERATURE}),
                (SpeculativeOptions(f"model:{tiny}", "adaptive", 4, True), {})]:
            tokens, logprobs = await run_scored(entry, spec, **sampling)
            print(spec.draft.split("/")[-1], spec.verify, [round(e.logprob, 3)
                                                           for e in logprobs.entries[:4]])
            check_logprobs(reference, tokens, logprobs)
        # without a sink nothing is computed and nothing changes
        again, _ = await run_scored(entry, None)
        assert again == plain
        # scoring a given continuation: all of it in one pass, against one process
        want = reference_logprobs(reference, PROMPT, plain)  # [SCORED, V]
        for _ in range(2):  # the second reuses the first's pooled prefix
            scored = await entry.generator.score(list(PROMPT), plain)
            assert len(scored) == len(plain)
            for i, (token, logprob) in enumerate(zip(plain, scored, strict=True)):
                assert abs(logprob - float(want[i, token])) < LOGPROB_TOL, i
        assert await entry.generator.score(list(PROMPT), []) == []
        with pytest.raises(ValueError, match="more than a session holds"):
            await entry.generator.score(list(PROMPT), [1] * entry.generator.max_session_length)


def test_token_logprobs_is_the_log_softmax_at_each_row() -> None:
    torch.manual_seed(0)
    rows = torch.randn(4, 50)
    entries = token_logprobs(rows, [3, 9, 0], 2)  # a 4th row (a rejected tail) unused
    assert len(entries) == 3
    for i, e in enumerate(entries):
        lp = torch.log_softmax(rows[i], -1)
        assert e.logprob == pytest.approx(float(lp[e.token]), abs=1e-6)
        assert [t for t, _ in e.top] == lp.topk(2).indices.tolist()
    assert token_logprobs(rows, [1], 0)[0].top == ()
    with pytest.raises(ValueError, match="between 0 and 20"):
        Logprobs(top=21)
