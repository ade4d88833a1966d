"""The OpenAI-compatible API of real `peerd start` processes serving a tiny random Llama.

A two-peer swarm splits the model [0, 2) + [2, 4). The official `openai` client talks
to it unchanged, and its greedy output is held against single-process transformers
for the same prompt ids. Errors come in OpenAI's shape; a swarm that cannot cover the
model, and a peer without a model, answer 503 saying why; a client that leaves in the
middle of a stream, or stops reading it, costs the daemon nothing and cannot stall its
shutdown.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import httpx
import openai
import pytest
import torch
import trio
import trio.testing
from daemons import (  # noqa: F401  (daemon_logs_on_failure is an autouse fixture)
    Daemon,
    daemon_logs_on_failure,
    run_cli,
    running,
    start_daemon,
    wait_for,
)
from models import tiny_llama_dir
from openai.types.chat import ChatCompletionMessageParam

from peerd import proven
from peerd.api.openai import _stream
from peerd.api.openai_request import parse
from peerd.api.server import TEST_STALL_ENV, client_stall_s
from peerd.inference.face import Completion
from peerd.inference.model.source import load_tokenizer, reference_model, resolve
from peerd.inference.request import GenerationStats
from peerd.proven import Proof, ProvenBook

READY_TIMEOUT_S = 60.0  # model load + ledger gossip on a loaded CI box
HELLO: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}]


@dataclass
class Swarm:
    a: Daemon  # layers [0, 2): the entry peer the client talks to, --no-prompt-cache
    b: Daemon  # layers [2, 4)
    partial: Daemon  # alone in its own swarm with layers [0, 2) of another model
    bare: Daemon  # in A's swarm, serving no model
    cached: Daemon  # alone with the whole model, --prompt-cache
    model_id: str

    def client(self, daemon: Daemon | None = None, **kwargs: Any) -> openai.OpenAI:
        d = daemon or self.a
        return openai.OpenAI(base_url=d.url + "/v1", api_key=d.token, max_retries=0,
                             timeout=60.0, **kwargs)


LIAR = "12D3KooWLiarLiarLiarLiarLiarLiarLiarLiarLiarLiarLiarL"


def model_flags(model: Path, layers: str) -> tuple[str, ...]:
    return ("--model", str(model), "--layers", layers, "--torch-threads", "1")


def model_state(d: Daemon) -> dict[str, Any]:
    state: dict[str, Any] = d.get("/status")["model"]
    return state


def model_peers(d: Daemon) -> set[str]:
    return {row["peer_id"] for row in d.get("/ledger") if row.get("models")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, tiny: Path) -> Iterator[Swarm]:
    tmp = tmp_path_factory.mktemp("openai")
    other = tiny_llama_dir(tmp_path_factory, seed=1)  # different weights, different id
    with contextlib.ExitStack() as stack:
        # (the prompt cache would be on by default here, float32: A turns it off)
        a = start_daemon(tmp / "a", "--name", "alpha", *model_flags(tiny, "0:2"),
                         "--no-prompt-cache")
        stack.enter_context(running(a))
        # "cached" starts with a record of a peer its audits proved wrong twice (as a
        # restart finds it: proven.py), whose day-long ban it must keep
        (tmp / "cached").mkdir(mode=0o700)
        book = ProvenBook({LIAR: Proof(2, time.time() - 60, time.time() + 23.9 * 3600,
                                       "it lied")})
        proven.save(tmp / "cached" / proven.PROVEN_FILE, book.to_json())
        # The others start side by side: a daemon's start-up is mostly imports.
        with ThreadPoolExecutor(4) as pool:
            futures = [
                pool.submit(start_daemon, tmp / "b", "--name", "beta", "--bootstrap",
                            a.p2p_addr, *model_flags(tiny, "2:4")),
                pool.submit(start_daemon, tmp / "partial", "--name", "partial",
                            *model_flags(other, "0:2")),
                pool.submit(start_daemon, tmp / "bare", "--name", "bare", "--bootstrap",
                            a.p2p_addr),
                pool.submit(start_daemon, tmp / "cached", "--name", "cached",
                            *model_flags(tiny, "0:4"), "--prompt-cache"),
            ]
        for future in futures:  # stop whatever started, even if another failed
            with contextlib.suppress(Exception):
                stack.enter_context(running(future.result()))
        b, partial, bare, cached = (future.result() for future in futures)  # re-raises
        everyone = (a, b, partial, bare, cached)
        wait_for(lambda: all(model_state(d)["state"] == "ready" for d in (a, b, partial, cached)),
                 READY_TIMEOUT_S, "the four model peers to load", everyone)
        wait_for(lambda: all(model_peers(d) >= {a.peer_id, b.peer_id} for d in (a, b)),
                 READY_TIMEOUT_S, "A and B to list both model peers", everyone)
        yield Swarm(a, b, partial, bare, cached, model_state(a)["model_id"])


# ---- the reference: the whole model in this process -------------------------------------


@dataclass
class Reference:
    model: Any  # LlamaForCausalLM
    tokenizer: Any

    def chat_ids(self, messages: Any) -> list[int]:
        """What the server does to a chat request."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def greedy(self, ids: list[int], max_tokens: int) -> tuple[list[int], str]:
        """Generated ids (stopping after EOS, as the server does) and their text."""
        with torch.inference_mode():
            out = self.model.generate(torch.tensor([ids]), do_sample=False,
                                      max_new_tokens=max_tokens)
        new = [int(t) for t in out[0, len(ids):]]
        return new, self.tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="module")
def reference(tiny: Path) -> Reference:
    source = resolve(str(tiny))
    return Reference(reference_model(source), load_tokenizer(source))


# ---- the official client against the two-peer swarm --------------------------------------


def test_models_lists_the_tiny_model(swarm: Swarm) -> None:
    models = swarm.client().models.list()
    assert [m.id for m in models.data] == [swarm.model_id]
    assert models.data[0].owned_by == "peerd"
    # A swarm that covers only part of a model does not offer it.
    assert swarm.client(swarm.partial).models.list().data == []
    # retrieve: the listed model, and a 404 in OpenAI's shape for any other
    model = swarm.client().models.retrieve(swarm.model_id)
    assert model.id == swarm.model_id and model.owned_by == "peerd"
    for other in ("gpt-4o", "org/some-model"):
        with pytest.raises(openai.NotFoundError) as caught:
            swarm.client().models.retrieve(other)
        assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        swarm.client(swarm.partial).models.retrieve(swarm.model_id)


def test_chat_matches_single_process_transformers(swarm: Swarm, reference: Reference) -> None:
    ids = reference.chat_ids(HELLO)
    tokens, text = reference.greedy(ids, 8)
    r = swarm.client().chat.completions.create(model=swarm.model_id, messages=HELLO,
                                               max_tokens=8, temperature=0)
    assert r.object == "chat.completion"
    assert r.model == swarm.model_id
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.choices[0].finish_reason == ("stop" if len(tokens) < 8 else "length")
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(tokens) <= 8
    assert r.usage.total_tokens == len(ids) + len(tokens)
    peerd = r.model_extra["peerd"]  # type: ignore[index]
    assert [(hop["peer_id"], hop["layers"]) for hop in peerd["route"]] == [
        (swarm.a.peer_id, [0, 2]), (swarm.b.peer_id, [2, 4])]
    assert peerd["steps"] == len(tokens)


def test_prompt_cache_computes_only_the_new_turn(swarm: Swarm, reference: Reference) -> None:
    """--prompt-cache: the second turn of a chat reuses the KV the first left in the
    pooled session (OpenAI's usage.prompt_tokens_details.cached_tokens says how much)
    and still decodes what one process does; a peer without it reuses nothing."""
    assert model_state(swarm.cached)["prompt_cache"] is True
    assert model_state(swarm.a)["prompt_cache"] is False
    for daemon, reuses in [(swarm.cached, True), (swarm.a, False)]:
        client = swarm.client(daemon)
        first = client.chat.completions.create(model=swarm.model_id, messages=HELLO,
                                               max_tokens=8, temperature=0)
        turn: list[Any] = [*HELLO, {"role": "assistant",
                                    "content": first.choices[0].message.content},
                           {"role": "user", "content": "And of Italy?"}]
        ids = reference.chat_ids(turn)
        _, text = reference.greedy(ids, 8)
        r = client.chat.completions.create(model=swarm.model_id, messages=turn, max_tokens=8,
                                           temperature=0)
        assert r.choices[0].message.content == text
        assert r.usage is not None and r.usage.prompt_tokens == len(ids)
        details = r.usage.prompt_tokens_details
        assert details is not None
        if reuses:
            assert details.cached_tokens is not None
            assert len(reference.chat_ids(HELLO)) <= details.cached_tokens < len(ids)
        else:
            assert details.cached_tokens == 0
        assert r.model_extra["peerd"]["cached_tokens"] == details.cached_tokens  # type: ignore[index]


def test_stream_concatenates_to_the_same_text(swarm: Swarm) -> None:
    client = swarm.client()
    whole = client.chat.completions.create(model=swarm.model_id, messages=HELLO,
                                           max_tokens=8, temperature=0)
    chunks = list(client.chat.completions.create(
        model=swarm.model_id, messages=HELLO, max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.usage is not None and whole.usage is not None
    assert last.usage.completion_tokens == whole.usage.completion_tokens
    assert [hop["layers"] for hop in last.model_extra["peerd"]["route"]] == [[0, 2], [2, 4]]  # type: ignore[index]


def test_completions_match_single_process_transformers(swarm: Swarm,
                                                       reference: Reference) -> None:
    prompt = "The quick brown fox"
    ids = reference.prompt_ids(prompt)
    tokens, text = reference.greedy(ids, 8)
    client = swarm.client()
    r = client.completions.create(model=swarm.model_id, prompt=prompt, max_tokens=8,
                                  temperature=0)
    assert r.object == "text_completion"
    assert r.choices[0].text == text
    assert r.usage is not None
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(tokens))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=swarm.model_id, prompt=prompt, max_tokens=8, temperature=0, stream=True))
    assert streamed == text


def test_a_seed_makes_sampling_repeatable(swarm: Swarm) -> None:
    client = swarm.client()

    def sample(seed: int) -> str | None:
        r = client.chat.completions.create(model=swarm.model_id, messages=HELLO,
                                           max_tokens=12, temperature=0.8, seed=seed)
        return r.choices[0].message.content

    first = sample(1234)
    assert first
    assert sample(1234) == first


def test_n_choices_each_draw_as_a_request_of_their_own(swarm: Swarm) -> None:
    """n = 3 with seed 7: choice i is what n = 1 with seed 7 + i answers; the prompt is
    counted once in the usage, every choice's tokens; `peerd` lists each choice's
    route. Streamed, the choices' chunks interleave by index and add up to the same
    texts, then one chunk of no choices carries the usage. Greedy choices agree."""
    client = swarm.client()
    ask: dict[str, Any] = {"model": swarm.model_id, "messages": HELLO, "max_tokens": 10,
                           "temperature": 1.0, "seed": 7}
    alone = [client.chat.completions.create(**{**ask, "seed": 7 + i}) for i in range(3)]
    many = client.chat.completions.create(**ask, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    texts = [c.message.content for c in many.choices]
    assert texts == [r.choices[0].message.content for r in alone]
    assert len(set(texts)) > 1  # (sampled: the seeds differ, and so do the answers)
    assert many.usage is not None and all(r.usage is not None for r in alone)
    assert many.usage.prompt_tokens == alone[0].usage.prompt_tokens  # type: ignore[union-attr]
    assert many.usage.completion_tokens == sum(
        r.usage.completion_tokens for r in alone)  # type: ignore[union-attr]
    peerd = many.model_extra["peerd"]  # type: ignore[index]
    assert len(peerd["choices"]) == 3 and all(c["route"] for c in peerd["choices"])

    chunks = list(client.chat.completions.create(
        **ask, n=3, stream=True, stream_options={"include_usage": True}))
    streamed = ["", "", ""]
    finished = set()
    for c in chunks:
        for choice in c.choices:
            streamed[choice.index] += choice.delta.content or ""
            if choice.finish_reason is not None:
                finished.add(choice.index)
    assert streamed == texts and finished == {0, 1, 2}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == many.usage.completion_tokens

    greedy = client.completions.create(model=swarm.model_id, prompt="The quick brown fox",
                                       max_tokens=6, temperature=0, n=2)
    assert greedy.choices[0].text == greedy.choices[1].text


def test_a_stop_string_cuts_the_text_before_it(swarm: Swarm) -> None:
    client = swarm.client()
    free = client.completions.create(model=swarm.model_id, prompt="The quick brown fox",
                                     max_tokens=16, temperature=0).choices[0].text
    # A printable ASCII character first seen past the start (a stop at 0 would leave
    # nothing to compare; a multi-byte character could be split across tokens).
    stop = next((ch for i, ch in enumerate(free)
                 if i > 0 and ch.isascii() and ch.isprintable() and free.index(ch) == i), None)
    assert stop is not None, f"pick another prompt: no ASCII character in {free!r}"
    expected = free[:free.index(stop)]
    r = client.completions.create(model=swarm.model_id, prompt="The quick brown fox",
                                  max_tokens=16, temperature=0, stop=[stop])
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "stop"
    # log-probabilities stop with the text: the token that completed the stop is left out
    scored = client.completions.create(model=swarm.model_id, prompt="The quick brown fox",
                                       max_tokens=16, temperature=0, stop=[stop], logprobs=0)
    found = scored.choices[0].logprobs
    assert found is not None and found.tokens is not None
    joined = b"".join(codecs.escape_decode(t.encode())[0] for t in found.tokens)  # type: ignore[attr-defined]
    assert expected.startswith(joined.decode(errors="replace")) and len(found.tokens) < 16
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=swarm.model_id, prompt="The quick brown fox", max_tokens=16, temperature=0,
        stop=stop, stream=True))
    assert streamed == expected


LOGPROB_TOL = 1e-4  # float32 through two peers vs one process


def test_logprobs_in_openais_shape_match_one_process(swarm: Swarm,
                                                     reference: Reference) -> None:
    client = swarm.client()
    ids = reference.chat_ids(HELLO)
    r = client.chat.completions.create(model=swarm.model_id, messages=HELLO, max_tokens=8,
                                       temperature=0, logprobs=True, top_logprobs=2)
    text = r.choices[0].message.content
    found = r.choices[0].logprobs
    assert found is not None and found.content is not None and r.usage is not None
    content = found.content
    assert len(content) == r.usage.completion_tokens  # (no EOS within 8 tokens)
    assert "".join(t.token for t in content) == text
    assert b"".join(bytes(t.bytes or []) for t in content).decode() == text
    tokens = [reference.tokenizer.convert_tokens_to_ids(
        reference.tokenizer.convert_ids_to_tokens(reference.tokenizer.encode(
            t.token, add_special_tokens=False)))[0] for t in content[:1]]
    generated, _ = reference.greedy(ids, len(content))
    assert tokens[0] == generated[0]
    with torch.inference_mode():
        logits = reference.model(torch.tensor([ids + generated])).logits[0]
    want = torch.log_softmax(logits[len(ids) - 1:-1].float(), dim=-1)  # [n, V]
    for i, (t, g) in enumerate(zip(content, generated, strict=True)):
        assert abs(t.logprob - float(want[i, g])) < LOGPROB_TOL, i
        assert len(t.top_logprobs) == 2
        assert t.top_logprobs[0].token == t.token  # greedy: the most likely one
        assert abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6
        assert t.top_logprobs[1].logprob <= t.logprob
    # streamed: the chunks carry the same entries, each with the text it came with
    chunks = list(client.chat.completions.create(
        model=swarm.model_id, messages=HELLO, max_tokens=8, temperature=0, logprobs=True,
        top_logprobs=2, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs
                for t in c.choices[0].logprobs.content or []]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert all(abs(a.logprob - b.logprob) < LOGPROB_TOL for a, b in zip(streamed, content,
                                                                      strict=True))
    # not asked for: none
    plain = client.chat.completions.create(model=swarm.model_id, messages=HELLO,
                                           max_tokens=4, temperature=0)
    assert plain.choices[0].logprobs is None

    # the legacy completions shape: parallel lists, offsets into the text
    prompt = "The quick brown fox"
    done = client.completions.create(model=swarm.model_id, prompt=prompt, max_tokens=8,
                                     temperature=0, logprobs=2)
    legacy = done.choices[0].logprobs
    assert legacy is not None and legacy.tokens and legacy.token_logprobs
    assert legacy.top_logprobs is not None and legacy.text_offset is not None
    # a token holding part of a character shows its bytes as \xNN, as OpenAI does
    raw = b"".join(codecs.escape_decode(t.encode())[0] for t in legacy.tokens)  # type: ignore[attr-defined]
    assert raw.decode(errors="replace") == done.choices[0].text
    assert legacy.text_offset == [len("".join(legacy.tokens[:i]))
                                  for i in range(len(legacy.tokens))]
    assert all(len(top) == 2 and max(top.values()) == pytest.approx(lp, abs=1e-6)
               for top, lp in zip(legacy.top_logprobs, legacy.token_logprobs, strict=True))
    pieces = [c.choices[0].logprobs for c in client.completions.create(
        model=swarm.model_id, prompt=prompt, max_tokens=8, temperature=0, logprobs=2,
        stream=True) if c.choices[0].logprobs is not None]
    assert [t for p in pieces for t in p.tokens or []] == legacy.tokens
    assert [o for p in pieces for o in p.text_offset or []] == legacy.text_offset
    bad = swarm.a.request("POST", "/v1/completions", json={
        "model": swarm.model_id, "prompt": prompt, "logprobs": 6})
    assert openai_error(bad, 400)["param"] == "logprobs"


# ---- errors in OpenAI's shape -------------------------------------------------------------


def openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


GOOD_CHAT = {"messages": HELLO, "max_tokens": 4, "temperature": 0}
BAD_CHAT: list[tuple[str, dict[str, Any], str | None]] = [
    ("max_tokens=0", {**GOOD_CHAT, "max_tokens": 0}, "max_tokens"),
    ("max_tokens=x", {**GOOD_CHAT, "max_tokens": "x"}, "max_tokens"),
    ("temperature=5", {**GOOD_CHAT, "temperature": 5}, "temperature"),
    ("top_p=0", {**GOOD_CHAT, "top_p": 0}, "top_p"),
    ("n=0", {**GOOD_CHAT, "n": 0}, "n"),
    ("n=9", {**GOOD_CHAT, "n": 9}, "n"),
    ("n=true", {**GOOD_CHAT, "n": True}, "n"),
    ("n='2'", {**GOOD_CHAT, "n": "2"}, "n"),
    ("no messages", {"max_tokens": 4}, "messages"),
    ("empty messages", {**GOOD_CHAT, "messages": []}, "messages"),
    ("bad role", {**GOOD_CHAT, "messages": [{"role": "wizard", "content": "hi"}]},
     "messages"),
    ("5 stop strings", {**GOOD_CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("a long stop string", {**GOOD_CHAT, "stop": "x" * 201}, "stop"),
    ("a huge integer", {**GOOD_CHAT, "temperature": 10**400}, "temperature"),
    ("logprobs not a bool", {**GOOD_CHAT, "logprobs": "yes"}, "logprobs"),
    ("top_logprobs 21", {**GOOD_CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs without logprobs", {**GOOD_CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("a misspelt parameter", {**GOOD_CHAT, "max_token": 2}, "max_token"),
    ("another server's extension", {**GOOD_CHAT, "top_k": 5}, "top_k"),
    # what peerd does not do: refused, not silently ignored
    ("tools", {**GOOD_CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "tools"),
    ("json mode", {**GOOD_CHAT, "response_format": {"type": "json_object"}},
     "response_format"),
    ("a logit bias", {**GOOD_CHAT, "logit_bias": {"5": 100}}, "logit_bias"),
    ("a penalty", {**GOOD_CHAT, "presence_penalty": 0.5}, "presence_penalty"),
    ("echo", {**GOOD_CHAT, "echo": True}, "echo"), ("best_of", {**GOOD_CHAT, "best_of": 3},
                                                     "best_of"),
    # DSD: peerd's "speculative" extension
    ("speculative not an object", {**GOOD_CHAT, "speculative": "eagle"}, "speculative"),
    ("speculative unknown key", {**GOOD_CHAT, "speculative": {"drafts": "ngram"}},
     "speculative"),
    ("unknown drafter", {**GOOD_CHAT, "speculative": {"draft": "magic"}}, "speculative"),
    ("unknown verify", {**GOOD_CHAT, "speculative": {"draft": "ngram", "verify": "fast"}},
     "speculative"),
    ("gamma 0", {**GOOD_CHAT, "speculative": {"draft": "ngram", "gamma": 0}}, "speculative"),
    ("gamma 99", {**GOOD_CHAT, "speculative": {"draft": "ngram", "gamma": 99}}, "speculative"),
    ("gamma x", {**GOOD_CHAT, "speculative": {"draft": "ngram", "gamma": "x"}}, "speculative"),
    ("gamma true", {**GOOD_CHAT, "speculative": {"draft": "ngram", "gamma": True}},
     "speculative"),
    ("tree not a bool", {**GOOD_CHAT, "speculative": {"draft": "ngram", "tree": "yes"}},
     "speculative"),
    ("adaptive when sampling", {**GOOD_CHAT, "temperature": 0.7,
                                "speculative": {"draft": "ngram", "verify": "adaptive"}},
     "speculative"),
    ("no head for this model", {**GOOD_CHAT, "speculative": {"draft": "eagle"}},
     "speculative"),
    ("a head file that is not there", {**GOOD_CHAT,
                                       "speculative": {"draft": "eagle:/no/such/head"}},
     "speculative"),
    ("a draft model that is not there", {**GOOD_CHAT,
                                         "speculative": {"draft": "model:/no/such/model"}},
     "speculative"),
]


@pytest.mark.parametrize(("body", "param"), [(b, p) for _, b, p in BAD_CHAT],
                         ids=[name for name, _, _ in BAD_CHAT])
def test_a_bad_parameter_is_a_400_naming_it(swarm: Swarm, body: dict[str, Any],
                                            param: str) -> None:
    r = swarm.a.request("POST", "/v1/chat/completions",
                        json={"model": swarm.model_id, **body})
    error = openai_error(r, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize(("fields", "expected"), [
    ({"max_tokens": 4, "max_completion_tokens": None}, 4),
    ({"max_tokens": None, "max_completion_tokens": 3}, 3),
    ({"max_tokens": 9, "max_completion_tokens": 2}, 2), ({"max_tokens": None}, 256), ({}, 256)])
def test_a_null_max_completion_tokens_leaves_max_tokens_in_force(fields: dict[str, Any],
                                                                 expected: int) -> None:
    """Clients that send every field send the one they leave unset as null: with
    max_tokens 4 and max_completion_tokens null, the answer ran to 256 tokens."""
    from peerd.api.openai_request import parse

    req = parse({"model": "m", "messages": HELLO, **fields}, chat=True)
    assert req.max_tokens == expected


def test_what_peerd_does_not_do_is_taken_at_its_neutral_value() -> None:
    """Clients that send every field send these so: nothing to refuse; nor in who asks
    or where OpenAI would store it."""
    from peerd.api.openai_request import parse

    neutral: dict[str, Any] = {
        "tools": [], "functions": None, "response_format": {"type": "text"}, "logit_bias": {},
        "presence_penalty": 0, "frequency_penalty": 0.0, "echo": False, "best_of": 1,
        "suffix": "", "user": "u-1", "metadata": {"a": "b"}, "store": False,
        "tool_choice": "none", "parallel_tool_calls": True, "service_tier": "auto"}
    assert parse({"model": "m", "messages": HELLO, **neutral}, chat=True).max_tokens == 256


def test_null_is_the_default_of_every_optional_openai_field() -> None:
    """OpenAI documents them as "... or null": a client may send each unset one so."""
    from peerd.api.openai_request import parse

    nulls = dict.fromkeys(["max_tokens", "max_completion_tokens", "temperature", "top_p",
                           "n", "seed", "stop", "stream", "stream_options", "logprobs",
                           "top_logprobs"])
    req = parse({"model": "m", "messages": HELLO, **nulls}, chat=True)
    assert (req.max_tokens, req.temperature, req.top_p, req.n, req.seed, req.stop,
            req.stream, req.include_usage, req.logprobs) == \
        (256, 1.0, 1.0, 1, None, (), False, False, None)
    assert parse({"model": "m", "prompt": "hi", **nulls}, chat=False).max_tokens == 16


def test_a_completion_without_a_prompt_is_a_400(swarm: Swarm) -> None:
    r = swarm.a.request("POST", "/v1/completions", json={"model": swarm.model_id})
    assert openai_error(r, 400)["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        swarm.client().completions.create(model=swarm.model_id, prompt="", max_tokens=4)


@pytest.mark.parametrize("content", [b'{"model": "x", "messages": [', b"\xff\xfe", b"[1, 2]",
                                     b'"a string"', b"null"],
                         ids=["truncated", "not utf-8", "a list", "a string", "null"])
def test_a_body_that_is_not_a_json_object_is_a_400(swarm: Swarm, content: bytes) -> None:
    r = swarm.a.request("POST", "/v1/chat/completions", content=content,
                        headers={"Content-Type": "application/json"})
    assert openai_error(r, 400)["type"] == "invalid_request_error"


def test_an_unknown_model_is_a_404(swarm: Swarm) -> None:
    r = swarm.a.request("POST", "/v1/chat/completions",
                        json={**GOOD_CHAT, "model": "no-such-model"})
    error = openai_error(r, 404)
    assert error["code"] == "model_not_found"
    assert swarm.model_id in error["message"]  # says what is served instead
    with pytest.raises(openai.NotFoundError):
        swarm.client().chat.completions.create(model="no-such-model", messages=HELLO,
                                               max_tokens=4)


def test_a_missing_or_wrong_token_is_a_401(swarm: Swarm) -> None:
    for token in (None, "not-the-token"):
        r = swarm.a.request("POST", "/v1/chat/completions", token=token,
                            json={**GOOD_CHAT, "model": swarm.model_id})
        assert r.status_code == 401
        assert r.json()["error"]["type"] == "authentication_error"
    wrong = openai.OpenAI(base_url=swarm.a.url + "/v1", api_key="not-the-token",
                          max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=swarm.model_id, messages=HELLO, max_tokens=4)


def test_a_swarm_missing_layers_is_a_503_naming_them(swarm: Swarm) -> None:
    model_id = model_state(swarm.partial)["model_id"]
    assert model_id != swarm.model_id
    for stream in (False, True):
        r = swarm.partial.request("POST", "/v1/chat/completions",
                                  json={**GOOD_CHAT, "model": model_id, "stream": stream})
        error = openai_error(r, 503)
        assert error["code"] == "missing_layers"
        assert "[2, 4)" in error["message"]
    with pytest.raises(openai.InternalServerError, match=r"\[2, 4\)"):
        swarm.client(swarm.partial).completions.create(model=model_id, prompt="hi",
                                                       max_tokens=4)


def test_a_peer_without_a_model_is_a_503_with_advice(swarm: Swarm) -> None:
    r = swarm.bare.request("POST", "/v1/chat/completions",
                           json={**GOOD_CHAT, "model": swarm.model_id})
    error = openai_error(r, 503)
    assert "serves no model" in error["message"]
    assert "--model" in error["message"]


def test_speculative_decoding_gives_the_same_text_and_reports_its_rounds(
        swarm: Swarm, tiny: Path) -> None:
    client = swarm.client()
    plain = client.chat.completions.create(model=swarm.model_id, messages=HELLO,
                                           max_tokens=12, temperature=0)
    for draft in ("ngram", f"model:{tiny}"):
        r = client.chat.completions.create(
            model=swarm.model_id, messages=HELLO, max_tokens=12, temperature=0,
            extra_body={"speculative": {"draft": draft, "verify": "greedy", "gamma": 4}})
        assert r.choices[0].message.content == plain.choices[0].message.content
        spec = r.model_extra["peerd"]["speculative"]  # type: ignore[index]
        assert spec["draft"] == draft and spec["verify"] == "greedy"
        assert spec["rounds"] >= 1 and spec["drafted_tokens"] >= 0
        assert {"tokens_per_round", "accepted_per_round", "draft_ms", "pipeline_ms",
                "acceptance_by_position"} <= set(spec)
    # the target drafting for itself: everything accepted, far fewer rounds than tokens
    assert spec["tokens_per_round"] > 2


@pytest.mark.parametrize("what", ["corrupt head", "other vocabulary"])
def test_a_drafter_that_cannot_serve_this_model_is_a_400(
        swarm: Swarm, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
        what: str) -> None:
    if what == "corrupt head":
        path = tmp_path / "head.safetensors"
        path.write_bytes(b"\x00\x01 not a safetensors file" * 10)
        draft, words = f"eagle:{path}", "EAGLE"
    else:
        draft = f"model:{tiny_llama_dir(tmp_path_factory, vocab=300, layers=1)}"
        words = "vocabulary"
    r = swarm.a.request("POST", "/v1/chat/completions", json={
        "model": swarm.model_id, **GOOD_CHAT, "speculative": {"draft": draft}})
    error = openai_error(r, 400)
    assert error["param"] == "speculative" and words in error["message"]


def test_the_daemon_still_answers_after_bad_requests(swarm: Swarm) -> None:
    for body in [b for _, b, _ in BAD_CHAT] + [{"stream": True, "messages": "hi"}]:
        swarm.a.request("POST", "/v1/chat/completions", json={"model": swarm.model_id, **body})
    r = swarm.client().chat.completions.create(model=swarm.model_id, messages=HELLO,
                                               max_tokens=4, temperature=0)
    assert r.usage is not None and r.usage.completion_tokens >= 1
    assert swarm.a.alive() and swarm.b.alive()


# ---- a client that leaves in the middle of a stream ---------------------------------------


def test_a_client_leaving_mid_stream_frees_its_session(swarm: Swarm) -> None:
    """8000 tokens (greedy: no EOS in sight) take the tiny model over half a minute even
    on an idle machine, so sessions that drop to 0 within seconds mean the generation
    stopped when the client left."""
    body = {"model": swarm.model_id, "messages": HELLO, "max_tokens": 8000,
            "temperature": 0, "stream": True}
    headers = {"Authorization": f"Bearer {swarm.a.token}"}
    with httpx.stream("POST", swarm.a.url + "/v1/chat/completions", json=body,
                      headers=headers, timeout=30.0) as r:
        assert r.status_code == 200
        data = (line for line in r.iter_lines() if line.startswith("data: "))
        first, second = json.loads(next(data)[6:]), json.loads(next(data)[6:])
        assert first["choices"][0]["delta"]["role"] == "assistant"
        assert "choices" in second
        # generating while we left: one session beyond those A keeps idle for reuse
        state = model_state(swarm.a)
        assert state["sessions"] == state["pooled_sessions"] + 1

    wait_for(lambda: only_pooled(swarm), 10.0, "the abandoned stream's sessions to close",
             (swarm.a, swarm.b))
    r2 = swarm.client().chat.completions.create(model=swarm.model_id, messages=HELLO,
                                                max_tokens=4, temperature=0)
    assert r2.choices[0].finish_reason in ("stop", "length")
    assert swarm.a.alive() and swarm.b.alive()


def only_pooled(swarm: Swarm) -> bool:
    """No session is generating: A (the only entry peer) holds only its pooled ones, and
    B holds A's sessions alone."""
    pooled = model_state(swarm.a)["pooled_sessions"]
    return bool(model_state(swarm.a)["sessions"] == model_state(swarm.b)["sessions"]
                == pooled)


def test_a_client_leaving_before_the_answer_frees_its_sessions(swarm: Swarm) -> None:
    """The same without streaming: the request's choices stop generating when its
    connection closes (they went on to the last token, for nobody)."""
    body = json.dumps({"model": swarm.model_id, "messages": HELLO, "max_tokens": 8000,
                       "temperature": 0, "n": 2}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: peerd\r\n"
            f"Authorization: Bearer {swarm.a.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()

    def generating() -> bool:
        state = model_state(swarm.a)
        return bool(state["sessions"] > state["pooled_sessions"])

    with socket.create_connection(("127.0.0.1", swarm.a.api_port), timeout=10) as sock:
        sock.sendall(head + body)
        wait_for(generating, 10.0, "the request's choices to start", (swarm.a, swarm.b))

    wait_for(lambda: only_pooled(swarm), 10.0, "the abandoned request's sessions to close",
             (swarm.a, swarm.b))
    r = swarm.client().chat.completions.create(model=swarm.model_id, messages=HELLO,
                                               max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_status_metrics_and_the_cli_show_who_holds_what(swarm: Swarm) -> None:
    """After a request through B, B lends a session to A (its entry): /status, /metrics
    and `peerd status` show it, in fair shares of the capacity."""
    swarm.client().chat.completions.create(model=swarm.model_id, messages=HELLO, max_tokens=2)
    status = swarm.b.get("/status")
    lent = status["lent"]
    assert status["routed_around"] == []  # nobody failed B's requests
    assert lent["sessions"]["capacity"] == 32 and lent["kv_bytes"]["capacity"] > 0
    assert swarm.a.peer_id in lent["sessions"]["held"]  # A's pooled session, still open
    assert swarm.a.peer_id in lent["compute"]["peers"]
    metrics = swarm.b.request("GET", "/metrics").text
    assert 'peerd_lent_capacity{resource="sessions"} 32.0' in metrics
    assert f'peerd_lent{{peer="{swarm.a.peer_id}",resource="sessions"}}' in metrics
    assert f'peerd_compute_turns_total{{peer="{swarm.a.peer_id}"}}' in metrics
    done = run_cli("status", "--data-dir", str(swarm.b.data_dir), env={"COLUMNS": "250"})
    assert done.returncode == 0, done.stderr
    assert "lent to peers" in done.stdout and "sessions" in done.stdout


def test_a_proof_outlives_a_restart_until_the_operator_forgives_its_peer(swarm: Swarm
                                                                         ) -> None:
    """A peer proven wrong twice before a restart is still routed around after it, for
    what is left of its day; `peerd forgive` lets it back and forgets its proofs, and
    says in words when there is nothing to forgive."""
    d = swarm.cached
    banned = {row["peer_id"]: row for row in d.get("/status")["routed_around"]}
    assert set(banned) == {LIAR}
    assert banned[LIAR]["why"] == "wrong_output" and banned[LIAR]["remaining_s"] > 23 * 3600
    done = run_cli("forgive", LIAR, "--json", "--data-dir", str(d.data_dir))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"peer_id": LIAR, "was_routed_around": True,
                                       "proofs_forgotten": 2}
    assert d.get("/status")["routed_around"] == []
    assert proven.load(d.data_dir / proven.PROVEN_FILE, time.time()).proven == {}
    again = run_cli("forgive", LIAR, "--data-dir", str(d.data_dir))
    assert again.returncode != 0 and "is not routed around" in again.stderr, again.stderr
    bare = run_cli("forgive", LIAR, "--data-dir", str(swarm.bare.data_dir))
    assert bare.returncode != 0 and "serves no model" in bare.stderr, bare.stderr


# ---- a client that stops reading ----------------------------------------------------------


class EndlessModel:
    """Streams "x" until told the client has gone; then says how many it handed over."""

    model_id = "endless"

    def __init__(self) -> None:
        self.pieces = 0
        self.ended = trio.Event()

    async def complete(self, request: Any, *, on_text: Any, logprobs: Any) -> Completion:
        while await on_text("x", []):
            self.pieces += 1
        self.ended.set()
        return Completion("x" * self.pieces, GenerationStats(finish_reason="length"))


async def test_a_stream_nobody_reads_stops_its_generation(
        autojump_clock: trio.testing.MockClock) -> None:
    """The generation hands text over a bounded channel; a response that stops taking it
    (its client reads nothing) must not hold the generation, and its sessions on every
    peer of the route, for as long as the client holds its connection."""
    model = EndlessModel()
    req = parse({"model": "endless", "messages": HELLO, "stream": True}, chat=True)
    async with trio.open_nursery() as nursery:
        chunks = _stream(nursery, cast(Any, model), req, [cast(Any, None)], None,
                         cast(Any, SimpleNamespace(publish=lambda *a, **k: None)))
        assert "assistant" in await chunks.__anext__()
        assert '"x"' in await chunks.__anext__()  # then the client reads no more
        with trio.move_on_after(client_stall_s() * 2):
            await model.ended.wait()
        assert model.ended.is_set(), "the generation waits for a client that reads nothing"
        assert model.pieces < 100  # (the channel's 64 and no more)
        await chunks.aclose()


def test_a_client_that_stops_reading_neither_holds_sessions_nor_stops_shutdown(
        tiny: Path, tmp_path: Path) -> None:
    """A streaming client that never reads: once its socket buffers fill, the response
    waits on it; within the client-stall bound (shortened here) the generation ends and
    the daemon stops on SIGTERM, the client still connected."""
    d = start_daemon(tmp_path / "d", "--name", "stall", *model_flags(tiny, "0:4"),
                     "--no-prompt-cache", env={TEST_STALL_ENV: "3"})
    with running(d), unread_stream(d) as generating:
        wait_for(lambda: not generating(), 60.0, "the unread stream's generation to end",
                 (d,))
        assert d.stop() == 0  # (raises if it does not exit within the harness's bound)


def test_a_signal_stops_the_daemon_at_once_while_a_client_holds_a_write(
        tiny: Path, tmp_path: Path) -> None:
    """The stall bound left at its default (30 s): a response blocked on a client that
    does not read must not hold the daemon's shutdown for it."""
    d = start_daemon(tmp_path / "d", "--name", "held", *model_flags(tiny, "0:4"),
                     "--no-prompt-cache")
    with running(d), unread_stream(d):
        time.sleep(1.0)  # the client's window shut, the daemon's buffer full
        assert d.stop() == 0  # within the harness's bound (5 s), not after 30


@contextlib.contextmanager
def unread_stream(d: Daemon) -> Iterator[Callable[[], bool]]:
    """A streaming chat request to the ready daemon `d` from a client that never reads
    (log-probabilities make each chunk large, so the buffers fill long before 8000
    tokens); yields once it is generating, a check of whether it still is."""
    wait_for(lambda: model_state(d)["state"] == "ready", READY_TIMEOUT_S, "the model to load",
             (d,))
    body = json.dumps({"model": model_state(d)["model_id"], "messages": HELLO,
                       "max_tokens": 8000, "temperature": 0, "stream": True,
                       "logprobs": True, "top_logprobs": 20}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: peerd\r\n"
            f"Authorization: Bearer {d.token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()

    def generating() -> bool:
        state = model_state(d)
        return bool(state["sessions"] > state["pooled_sessions"])

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect
        sock.connect(("127.0.0.1", d.api_port))
        sock.sendall(head + body)  # and never reads
        wait_for(generating, 30.0, "the stream to start generating", (d,))
        yield generating
