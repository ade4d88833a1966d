"""Constrained decoding (peerd/plans/constrain.py and the generation loop): the token
mask equals the brute-force one (every token's text run through the automaton); a
random tiny Llama sampling at temperature 1 under the step grammar always writes a
step that parses, names an offered tool and validates, within max_tokens; through the
swarm's own generation loop too, where no drafter drafts (one asked for is not used)
and greedy decoding drafts the grammar's forced text, writing what a plain loop
under the mask writes, in fewer passes on SmolLM2."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from peerd.inference.model.source import load_tokenizer, reference_model, resolve
from peerd.inference.options import SamplingParams, SpeculativeOptions
from peerd.inference.sampling import distribution, make_generator
from peerd.plans.constrain import FAR, GrammarConstraint, Vocab
from peerd.plans.grammar import JsonGrammar, StepGrammar
from tests.harness import serve_model, swarm
from tests.models import tiny_llama_dir
from tests.test_grammar import PERSON, TOOLS
from tests.test_inference_model import needs_smollm2


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """A tiny model's steps are microseconds: torch's thread pool on a busy machine
    would make them milliseconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def vocab(tiny: Path) -> Vocab:
    return Vocab.from_tokenizer(load_tokenizer(resolve(str(tiny))))


def brute_force(constraint: GrammarConstraint, remaining: int) -> torch.Tensor:
    """The mask by running every token's text through the automaton."""
    state, vocab = constraint.state, constraint.vocab
    cost = torch.full((vocab.size,), FAR, dtype=torch.int32)
    for token, text in enumerate(vocab.texts):
        if text is not None and not (after := state.advance(text)).dead:
            cost[token] = after.shortest()
    allowed = cost <= remaining - 1
    if not bool(allowed.any()):
        allowed = cost == int(cost.min())
    if state.complete:
        allowed[list(vocab.eos)] = True
    return allowed


@pytest.mark.parametrize("seed", range(6))
def test_the_mask_is_the_brute_force_mask(vocab: Vocab, seed: int) -> None:
    """Along random constrained paths, with a budget that tightens to the end."""
    rng = random.Random(seed)
    grammar = StepGrammar.for_tools(TOOLS) if seed % 2 else JsonGrammar.for_schema(PERSON)
    constraint = GrammarConstraint(grammar, vocab)
    budget = 60 + 10 * seed
    for used in range(budget):
        mask = constraint.allowed_mask(budget - used)
        assert torch.equal(mask, brute_force(constraint, budget - used)), constraint.text
        allowed = mask.nonzero()[:, 0].tolist()
        constraint.advance(rng.choice(allowed))
        if constraint.finished:
            break
    assert constraint.finished and constraint.complete
    grammar.check(constraint.text)


def sample_under(model: Any, vocab: Vocab, grammar: JsonGrammar, prompt: list[int],
                 params: SamplingParams, forced: Sequence[int] = ()) -> tuple[str, int]:
    """A plain decoding loop over a transformers model, the mask before sampling;
    `forced`: tokens written first (the prompt's tail), the model going on after."""
    constraint = GrammarConstraint(grammar, vocab)
    for token in forced:
        constraint.advance(token)
    gen = make_generator(params)
    ids, past, n = torch.tensor([[*prompt, *forced]]), None, 0
    with torch.inference_mode():
        while n < params.max_tokens and not constraint.finished:
            out = model(ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            logits = out.logits[0, -1]  # [V]
            mask = constraint.allowed_mask(params.max_tokens - n)
            logits = logits.masked_fill(~mask[:logits.shape[0]], float("-inf"))
            token = int(torch.multinomial(distribution(logits, params), 1, generator=gen))
            constraint.advance(token)
            ids, n = torch.tensor([[token]]), n + 1
    return constraint.text, n


def test_a_random_model_sampling_at_temperature_one_always_writes_a_valid_step(
        tiny: Path, vocab: Vocab) -> None:
    """A random model never ends its thought by itself (the budget ends it, with the
    shortest step, an answer): half the runs start the calls for it, and it writes
    them, random tools with random arguments."""
    model = reference_model(resolve(str(tiny)))
    tokenizer = load_tokenizer(resolve(str(tiny)))
    grammar = StepGrammar.for_tools(TOOLS)
    names = {t.name for t in TOOLS}
    calling = tokenizer('{"thought":"","calls":[{"tool":"', add_special_tokens=False)
    called: set[str] = set()
    for seed in range(24):
        max_tokens = 40 + 8 * (seed % 8)  # budgets that force closure, and roomier ones
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed)
        forced = calling["input_ids"] if seed % 2 else []
        text, n = sample_under(model, vocab, grammar, [5, 17, 33, seed], params, forced)
        step = grammar.check(text)  # parses; each call validates against its tool
        assert n <= max_tokens
        assert all(call["tool"] in names for call in step.get("calls", ())), text
        called |= {call["tool"] for call in step.get("calls", ())}
    assert called == names  # every tool was called with arguments its schema takes


async def test_the_generation_loop_decodes_plain_under_the_mask(tmp_path: Path, tiny: Path,
                                                                vocab: Vocab) -> None:
    """A drafter asked for does not draft; greedy decoding drafts the forced text
    instead, and writes what a plain loop under the mask writes."""
    grammar = StepGrammar.for_tools(TOOLS[:1])  # one tool: its name is forced too
    model = reference_model(resolve(str(tiny)))
    async with swarm(1, tmp_path) as (node,):
        runtime = await serve_model(node, _options(tiny))
        generator = runtime.generator
        for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0), (3, 0.0)):
            params = SamplingParams(max_tokens=48 + 8 * seed, temperature=temperature,
                                    seed=seed)
            prompt = [5, 17, 33, seed]
            request = await generator.prepare(prompt, params, SpeculativeOptions(draft="ngram"))
            constraint = GrammarConstraint(grammar, vocab)
            tokens: list[int] = []
            stats = await generator.generate(request, collector(tokens), constraint=constraint)
            assert stats.finish_reason == "stop" and len(tokens) <= params.max_tokens
            assert constraint.finished
            grammar.check(constraint.text)
            text = runtime.tokenizer.decode(tokens)
            assert text == constraint.text
            if temperature:
                assert stats.draft == "none" and all(r.drafted == 0 for r in stats.rounds)
                continue
            assert stats.draft == "grammar" and any(r.drafted for r in stats.rounds)
            want, n = sample_under(model, vocab, grammar, prompt, params)
            assert (text, len(tokens)) == (want, n)  # greedy: the plain loop's output


@pytest.mark.slow  # loads SmolLM2: not beside the other in-process tests
@needs_smollm2
async def test_smollm2_takes_the_forced_text_in_fewer_passes(tmp_path: Path) -> None:
    """On a real model the forced text's drafts are accepted: a planner's step under
    one tool's grammar takes fewer passes than tokens (a key and the punctuation
    around it come several tokens a pass), and the step is the one decoding without
    them writes."""
    from peerd.inference.served import ServedModel
    from peerd.inference.slot import ModelOptions
    from peerd.plans.builtins import CalculatorArgs
    from peerd.plans.planner import Transcript
    from peerd.plans.thinker import messages_of

    @dataclass(frozen=True)
    class Tool:
        name: str
        description: str
        input_schema: dict[str, Any]

    calculator = Tool("calculator", "Evaluate an arithmetic expression.",
                      CalculatorArgs.model_json_schema())
    async with swarm(1, tmp_path) as (node,):
        face = ServedModel(await serve_model(node, ModelOptions("smollm2", torch_threads=2)))
        transcript = Transcript("What is 23 * 47? Use the calculator.", (calculator,), (), (),
                                max_tokens=64, step=1)
        request = await face.prepare_chat(messages_of(transcript),
                                          SamplingParams(max_tokens=64, temperature=0.0))
        grammar = StepGrammar.for_tools([calculator])
        vocab = Vocab.from_tokenizer(face.tokenizer)
        texts, passes = [], []
        for forcing in (True, False):
            constraint = GrammarConstraint(grammar, vocab)
            if not forcing:
                constraint.forced = lambda limit: []  # type: ignore[method-assign]
            done = await face.complete(request, constraint=constraint)
            texts.append(done.text)
            passes.append(done.stats.steps)
        print("passes with and without forced drafts:", passes, texts[0])
        assert texts[0] == texts[1]
        assert passes[1] == done.stats.completion_tokens  # one pass a token without
        assert passes[0] <= passes[1] - 3, passes


def collector(tokens: list[int]) -> Callable[[int], Awaitable[bool]]:
    async def collect(token: int) -> bool:
        tokens.append(token)
        return True
    return collect


def _options(tiny: Path) -> Any:
    from peerd.inference.slot import ModelOptions

    return ModelOptions(str(tiny))
