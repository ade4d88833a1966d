"""A model served by a testnet of real `peerd` processes, through the OpenAI API.

The distributed path is held against single-process transformers: a greedy chat
completion through a 3-stage pipeline of 3 processes gives the same tokens as
`model.generate` on the whole model. Fault tolerance: with a replicated stage, killing
the replica that serves a streaming request mid-way re-routes it to the other one and
the text is the same as undisturbed.

The `slow` tests start real daemons in a run dir under tmp_path, on ports drawn at
random and checked free, and always call `down`. Model loading on a shared 2-core
machine is slow, hence the generous timeouts: they catch hangs, they time nothing.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from testnet import PeerInfo, TestnetError, api_request, down, kill, status, up
from testnet.plan import default_torch_threads, stage_layers
from testnet.state import free_base_port

MODEL = "smollm2"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
QUESTION_TOKENS = 24
# Long enough an answer that 40 tokens come before end-of-sequence.
STORY = [{"role": "user", "content": "Write a long story about a robot who learns to paint."}]
STORY_TOKENS = 40
KILL_AFTER_CHUNKS = 5
TESTNET_TIMEOUT_S = 600  # per test: three to four model loads on two shared cores
REQUEST_TIMEOUT_S = 300.0




# ---- the stage split, without processes ------------------------------------------------


def test_stage_split_is_contiguous_and_as_equal_as_possible() -> None:
    assert stage_layers(30, 3) == [(0, 10), (10, 20), (20, 30)]
    assert stage_layers(30, 4) == [(0, 8), (8, 16), (16, 23), (23, 30)]
    assert stage_layers(30, 1) == [(0, 30)]
    assert stage_layers(3, 3) == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(TestnetError, match="--stages"):
        stage_layers(30, 31)
    with pytest.raises(TestnetError, match="--stages"):
        stage_layers(30, 0)


def test_torch_threads_share_the_cores() -> None:
    assert default_torch_threads(1, cores=2) == 2
    assert default_torch_threads(3, cores=2) == 1
    assert default_torch_threads(4, cores=16) == 4


def test_model_options_are_checked_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(TestnetError, match="only apply with --model"):
        up(2, tmp_path / "a", free_base_port(2), stages=2)
    with pytest.raises(TestnetError, match="only apply with --model"):
        up(2, tmp_path / "a", free_base_port(2), dtype="bfloat16")
    with pytest.raises(TestnetError, match="--dtype must be one of auto, float32"):
        up(1, tmp_path / "a", free_base_port(1), model=MODEL, dtype="int8")
    with pytest.raises(TestnetError, match="needs at least 3 peers"):
        up(2, tmp_path / "b", free_base_port(2), model=MODEL, stages=3)
    with pytest.raises(TestnetError, match="cannot serve --model"):
        up(1, tmp_path / "c", free_base_port(1), model=str(tmp_path / "missing.gguf"))
    assert not (tmp_path / "c" / "peers").exists()


# ---- a served model ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Greedy:
    text: str
    prompt_tokens: int
    completion_tokens: int  # the end-of-sequence token included, as the server counts


@pytest.fixture(scope="module")
def reference() -> Greedy:
    """Single-process transformers, greedy, on QUESTION: what the swarm must reproduce.

    Computed before any testnet starts (they would share the two cores) and the model
    is dropped afterwards."""
    import torch

    from peerd.inference.model.source import load_tokenizer, reference_model, resolve
    from peerd.inference.runtime import eos_ids

    source = resolve(MODEL)
    tokenizer = load_tokenizer(source)
    model = reference_model(source)
    prompt = tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.inference_mode():
        out = model.generate(
            **prompt,
            do_sample=False,
            max_new_tokens=QUESTION_TOKENS,
            eos_token_id=sorted(eos_ids(tokenizer, model.config)),  # stop where the server does
        )
    n_prompt = int(prompt["input_ids"].shape[1])
    new = out[0, n_prompt:].tolist()  # [completion tokens]
    del model
    gc.collect()
    return Greedy(tokenizer.decode(new, skip_special_tokens=True), n_prompt, len(new))


@pytest.fixture(scope="module")
def pipeline3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """3 peers serving smollm2 in 3 stages; the run dir."""
    run_dir = tmp_path_factory.mktemp("pipeline3") / "run"
    try:
        up(3, run_dir, free_base_port(3), model=MODEL, stages=3)
        yield run_dir
    finally:
        down(run_dir)


def chat(peer: PeerInfo, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    reply: dict[str, Any] = api_request(
        peer, "POST", "/v1/chat/completions", json=body, timeout_s=REQUEST_TIMEOUT_S
    )
    return reply


def names_by_id(run_dir: Path) -> dict[str, str]:
    return {p.peer_id: p.name for p in status(run_dir)}


def route_of(reply: dict[str, Any], names: dict[str, str]) -> list[tuple[str, list[int]]]:
    return [(names[hop["peer_id"]], hop["layers"]) for hop in reply["peerd"]["route"]]


@pytest.mark.slow
@pytest.mark.timeout(TESTNET_TIMEOUT_S)
def test_greedy_chat_through_three_stages_matches_transformers(
    reference: Greedy, pipeline3: Path
) -> None:
    entry = status(pipeline3)[0]
    reply = chat(entry, QUESTION, QUESTION_TOKENS)

    assert reply["choices"][0]["message"]["content"] == reference.text
    assert reply["usage"]["prompt_tokens"] == reference.prompt_tokens
    assert reply["usage"]["completion_tokens"] == reference.completion_tokens
    route = route_of(reply, names_by_id(pipeline3))
    assert [layers for _, layers in route] == [[0, 10], [10, 20], [20, 30]], route
    assert reply["peerd"]["reroutes"] == 0


def first_divergence_gap(messages: list[dict[str, str]], expected: str, got: str) -> float:
    """Where two greedy answers part, the reference's top-2 logit gap after the common
    prefix (token ids re-derived from the texts)."""
    import torch

    from peerd.inference.model.source import load_tokenizer, reference_model, resolve

    source = resolve(MODEL)
    tokenizer = load_tokenizer(source)
    a = tokenizer(expected, add_special_tokens=False)["input_ids"]
    b = tokenizer(got, add_special_tokens=False)["input_ids"]
    i = next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a),
                                                                                     len(b)))
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           tokenize=False)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] + a[:i]
    model = reference_model(source)
    with torch.inference_mode():
        top2 = torch.topk(model(torch.tensor([ids])).logits[0, -1], 2).values
    del model
    gc.collect()
    return float(top2[0] - top2[1])


@pytest.mark.slow
@pytest.mark.timeout(TESTNET_TIMEOUT_S)
@pytest.mark.parametrize("draft", ["ngram", "eagle"])
def test_greedy_dsd_through_three_stages_matches_transformers(
    reference: Greedy, pipeline3: Path, draft: str
) -> None:
    """Lossless: greedy speculative decoding gives plain greedy's answer. A divergence
    is excused only where the target's top two logits were within 1e-4 (verifying
    several positions in one pass may flip such a tie), and it is reported."""
    entry = status(pipeline3)[0]
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": QUESTION_TOKENS,
            "temperature": 0, "speculative": {"draft": draft, "verify": "greedy"}}
    reply = api_request(entry, "POST", "/v1/chat/completions", json=body,
                        timeout_s=REQUEST_TIMEOUT_S)
    text = reply["choices"][0]["message"]["content"]
    spec = reply["peerd"]["speculative"]
    print(f"{draft}: {spec['rounds']} rounds, {spec['tokens_per_round']} tokens/round")
    assert spec["draft"] == draft and spec["rounds"] >= 1
    if text != reference.text:
        gap = first_divergence_gap(QUESTION, reference.text, text)
        print(f"{draft}: diverged where the top-2 logit gap was {gap:.2e}")
        assert gap < 1e-4, (text, reference.text)
    else:
        assert reply["usage"]["completion_tokens"] == reference.completion_tokens


@pytest.mark.slow
@pytest.mark.timeout(TESTNET_TIMEOUT_S)
def test_status_json_shows_each_peers_stage(pipeline3: Path) -> None:
    listed = subprocess.run(
        [sys.executable, "-m", "testnet", "status", "--json", "--run-dir", str(pipeline3)],
        capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["layers"], r["model_state"]) for r in rows] == [
        ("peer0", [0, 10], "ready"),
        ("peer1", [10, 20], "ready"),
        ("peer2", [20, 30], "ready"),
    ]


@pytest.mark.slow
@pytest.mark.timeout(TESTNET_TIMEOUT_S)
def test_killing_a_replica_mid_stream_reroutes_to_the_other(tmp_path: Path) -> None:
    # 4 peers, 3 stages: peer0 and peer3 both serve [0, 10). The entry, peer1, is not
    # one of them, so killing the one on its route leaves the entry and a replica up.
    run_dir = tmp_path / "run"
    try:
        up(4, run_dir, free_base_port(4), model=MODEL, stages=3)
        peers = {p.name: p for p in status(run_dir)}
        assert peers["peer0"].layers == peers["peer3"].layers == [0, 10]
        entry = peers["peer1"]
        names = names_by_id(run_dir)

        undisturbed = chat(entry, STORY, STORY_TOKENS)
        expected = undisturbed["choices"][0]["message"]["content"]
        assert undisturbed["usage"]["completion_tokens"] == STORY_TOKENS, (
            "the story ended before the kill could land; pick a longer prompt"
        )
        assert undisturbed["peerd"]["reroutes"] == 0
        replicas = [peers["peer0"], peers["peer3"]]
        # the first request's session stays open, pooled at the entry, on one replica
        before = [serving_sessions(p) for p in replicas]
        assert sorted(before) == [0, 1], f"sessions on peer0, peer3: {before}"
        killed: list[str] = []

        def kill_the_serving_replica(chunks: int) -> None:
            # The stream reuses the pooled session, or (if the ledger's throughput
            # figures moved the best route to the other replica) opens one there.
            if chunks != KILL_AFTER_CHUNKS:
                return
            sessions = [serving_sessions(p) for p in replicas]
            opened = [now - then for now, then in zip(sessions, before, strict=True)]
            assert sorted(opened) == [0, 0] or sorted(opened) == [0, 1], (before, sessions)
            victim = replicas[opened.index(1) if 1 in opened else before.index(1)].name
            assert kill(run_dir, victim), f"{victim} was not running"
            killed.append(victim)

        text, final = stream_chat(entry, STORY, STORY_TOKENS, kill_the_serving_replica)
        assert killed, "the stream ended before the kill"
        assert not {p.name: p for p in status(run_dir)}[killed[0]].alive
        assert text == expected
        assert final["peerd"]["reroutes"] >= 1
        survivor = {"peer0": "peer3", "peer3": "peer0"}[killed[0]]
        assert (survivor, [0, 10]) in route_of(final, names)
    finally:
        down(run_dir)


def serving_sessions(peer: PeerInfo) -> int:
    """Pipeline sessions open on the peer's shard now (GET /status)."""
    return int(api_request(peer, "GET", "/status")["model"]["sessions"])


def stream_chat(
    peer: PeerInfo,
    messages: list[dict[str, str]],
    max_tokens: int,
    on_chunk: Callable[[int], None],
) -> tuple[str, dict[str, Any]]:
    """POST a streaming chat completion, calling `on_chunk(n)` after the n-th chunk of
    content. Returns the concatenated text and the final chunk (the one with "peerd")."""
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
            "stream": True}  # fmt: skip
    parts: list[str] = []
    final: dict[str, Any] | None = None
    with httpx.stream(
        "POST", peer.api + "/v1/chat/completions", json=body,
        headers={"Authorization": f"Bearer {peer.token}"}, timeout=REQUEST_TIMEOUT_S,
    ) as reply:  # fmt: skip
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: "):
                continue
            data = line.removeprefix("data: ")
            if data == "[DONE]":
                break
            event = json.loads(data)
            assert "error" not in event, event["error"]
            delta = event["choices"][0].get("delta", {}).get("content")
            if delta:
                parts.append(delta)
                on_chunk(len(parts))
            if "peerd" in event:
                final = event
    assert final is not None, "the stream ended without its final chunk"
    return "".join(parts), final
