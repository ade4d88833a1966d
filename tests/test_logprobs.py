"""Token log-probabilities from a generation across the pipeline: the tiny random Llama
split 3 ways on real in-process hosts, against the one-process reference's
log-softmax at each position (tolerance LOGPROB_TOL), with plain decoding and with
every way speculation commits tokens (a greedy token tree, rejection sampling)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from peerd.inference.host import SpeculativeOptions
from peerd.inference.runtime import ModelRuntime
from peerd.inference.sampling import Logprobs, SamplingParams, token_logprobs
from peerd.inference.source import reference_model, resolve
from tests.models import tiny_llama_dir
from tests.test_dsd import SPLITS, TEMPERATURE, untrained_eagle
from tests.test_pipeline import PROMPT, model_swarm

N = 16
TOP = 3
LOGPROB_TOL = 1e-4  # float32 through 3 shards vs one process


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(tiny: Path) -> torch.nn.Module:
    return reference_model(resolve(str(tiny)))


def reference_logprobs(model: torch.nn.Module, prompt: Sequence[int], tokens: list[int]
                       ) -> torch.Tensor:
    """[len(tokens), V]: the reference's log-softmax at the position of each token."""
    with torch.inference_mode():
        logits = model(torch.tensor([[*prompt, *tokens]])).logits[0]  # type: ignore[operator]
    return torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)  # [n, V]


async def run(runtime: ModelRuntime, spec: SpeculativeOptions | None, **sampling: float
              ) -> tuple[list[int], Logprobs]:
    tokens: list[int] = []
    logprobs = Logprobs(top=TOP)

    async def collect(token: int) -> bool:
        # a streaming caller finds the token's entry already there
        assert logprobs.entries[-1].token == token and len(logprobs.entries) == len(tokens) + 1
        tokens.append(token)
        return True

    params = SamplingParams(max_tokens=N, seed=7, **sampling)  # type: ignore[arg-type]
    await runtime.generator.generate(list(PROMPT), params, collect, spec, logprobs=logprobs)
    return tokens, logprobs


def check(reference: torch.nn.Module, tokens: list[int], logprobs: Logprobs) -> None:
    assert len(tokens) == N and [e.token for e in logprobs.entries] == tokens
    want = reference_logprobs(reference, PROMPT, tokens)  # [N, V]
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
        plain, logprobs = await run(entry, None)
        check(reference, plain, logprobs)
        greedy = [e.top[0][0] for e in logprobs.entries]
        assert greedy == plain, "greedy decoding commits the most likely token"
        head = untrained_eagle(entry, tmp_path / "eagle.safetensors")
        for spec, sampling in [
                (SpeculativeOptions(f"eagle:{head}", "greedy", None, True), {}),
                (SpeculativeOptions("ngram", "greedy", 4, False), {}),
                (SpeculativeOptions(f"model:{tiny}", "sample", 4, False),
                 {"temperature": TEMPERATURE}),
                (SpeculativeOptions(f"model:{tiny}", "adaptive", 4, True), {})]:
            tokens, logprobs = await run(entry, spec, **sampling)
            print(spec.draft.split("/")[-1], spec.verify, [round(e.logprob, 3)
                                                           for e in logprobs.entries[:4]])
            check(reference, tokens, logprobs)
        # without a sink nothing is computed and nothing changes
        again, _ = await run(entry, None)
        assert again == plain


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
