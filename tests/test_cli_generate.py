"""`peerd generate`, `peerd chat` and `peerd shards`, run as subprocesses against real
daemons: one serving all of a tiny random Llama, one serving a part of another model,
one serving no model, all in one swarm."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from daemons import (  # noqa: F401  (daemon_logs_on_failure is an autouse fixture)
    CLEAN_ENV,
    Daemon,
    daemon_logs_on_failure,
    peerd_command,
    run_cli,
    running,
    start_daemon,
    wait_for,
)
from models import tiny_llama_dir

READY_TIMEOUT_S = 60.0
WIDE = {"COLUMNS": "250"}


@dataclass
class Swarm:
    full: Daemon  # all 4 layers of the tiny model
    partial: Daemon  # layers [0, 1) of another tiny model
    bare: Daemon  # no model
    model_id: str
    other_id: str


def model_state(d: Daemon) -> dict[str, Any]:
    state: dict[str, Any] = d.get("/status")["model"]
    return state


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swarm]:
    tiny = tiny_llama_dir(tmp_path_factory)
    other = tiny_llama_dir(tmp_path_factory, seed=1)
    tmp = tmp_path_factory.mktemp("cli-generate")
    with contextlib.ExitStack() as stack:
        full = start_daemon(tmp / "full", "--name", "full", "--model", str(tiny),
                            "--layers", "0:4", "--torch-threads", "1")
        stack.enter_context(running(full))
        join = ("--bootstrap", full.p2p_addr)
        with ThreadPoolExecutor(2) as pool:
            futures = [
                pool.submit(start_daemon, tmp / "partial", "--name", "partial", *join,
                            "--model", str(other), "--layers", "0:1", "--torch-threads", "1"),
                pool.submit(start_daemon, tmp / "bare", "--name", "bare", *join),
            ]
        for future in futures:  # stop whatever started, even if another failed
            with contextlib.suppress(Exception):
                stack.enter_context(running(future.result()))
        partial, bare = (future.result() for future in futures)
        everyone = (full, partial, bare)
        wait_for(lambda: all(model_state(d)["state"] == "ready" for d in (full, partial)),
                 READY_TIMEOUT_S, "both model peers to load", everyone)
        wait_for(lambda: sum(bool(r["models"]) for r in full.get("/ledger")) == 2,
                 READY_TIMEOUT_S, "the full peer to list both model peers", everyone)
        yield Swarm(full, partial, bare, model_state(full)["model_id"],
                    model_state(partial)["model_id"])


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, (result.returncode, result.stdout, result.stderr)
    return result.stdout


def cli(d: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--data-dir", str(d.data_dir), env=WIDE, timeout_s=60.0)


def chat(d: Daemon, stdin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(peerd_command("chat", "--data-dir", str(d.data_dir), *args),
                          input=stdin, capture_output=True, text=True, timeout=60.0,
                          env={**CLEAN_ENV, **WIDE})


GREEDY = ("--max-tokens", "5", "--temperature", "0")


def test_generate_prints_the_text_and_the_route(swarm: Swarm) -> None:
    r = cli(swarm.full, "generate", "hi", *GREEDY)
    text = ok(r)
    assert text.endswith("\n") and text.strip()
    data = json.loads(ok(cli(swarm.full, "generate", "hi", *GREEDY, "--json")))
    assert text == data["choices"][0]["message"]["content"] + "\n"
    # The route line goes to stderr, so that stdout is the answer alone.
    route = r.stderr.strip()
    assert route.startswith("route full [0, 4)"), r.stderr
    assert "tokens/s" in route
    assert f"{data['usage']['completion_tokens']} tokens" in route


def test_generate_json_is_an_openai_object(swarm: Swarm) -> None:
    data = json.loads(ok(cli(swarm.full, "generate", "hi", *GREEDY, "--json")))
    assert data["object"] == "chat.completion"
    assert data["model"] == swarm.model_id
    assert data["choices"][0]["message"]["role"] == "assistant"
    assert 1 <= data["usage"]["completion_tokens"] <= 5
    assert data["peerd"]["route"] == [{"peer_id": swarm.full.peer_id, "layers": [0, 4]}]
    raw = json.loads(ok(cli(swarm.full, "generate", "hi", *GREEDY, "--raw", "--json")))
    assert raw["object"] == "text_completion"
    assert isinstance(raw["choices"][0]["text"], str)


def test_generate_stream_prints_the_same_text(swarm: Swarm) -> None:
    whole = ok(cli(swarm.full, "generate", "hi", *GREEDY))
    streamed = cli(swarm.full, "generate", "hi", *GREEDY, "--stream")
    assert ok(streamed) == whole
    assert streamed.stderr.startswith("route full [0, 4)"), streamed.stderr
    data = json.loads(ok(cli(swarm.full, "generate", "hi", *GREEDY, "--stream", "--json")))
    assert data["choices"][0]["message"]["content"] + "\n" == whole
    assert data["peerd"]["route"][0]["layers"] == [0, 4]
    assert 1 <= data["usage"]["completion_tokens"] <= 5


def test_generate_options_reach_the_api(swarm: Swarm) -> None:
    def text(*args: str) -> str:
        data = json.loads(ok(cli(swarm.full, "generate", "The quick", "--raw", "--json",
                                 "--max-tokens", "12", *args)))
        return str(data["choices"][0]["text"])

    seeded = ("--temperature", "0.9", "--top-p", "0.9", "--seed", "7")
    assert text(*seeded) == text(*seeded)
    free = text("--temperature", "0")
    stop = next((ch for i, ch in enumerate(free)
                 if i > 0 and ch.isascii() and ch.isprintable() and free.index(ch) == i), None)
    assert stop is not None, f"pick another prompt: no ASCII character in {free!r}"
    assert text("--temperature", "0", "--stop", stop) == free[:free.index(stop)]


def test_generate_speculative_options_reach_the_api(swarm: Swarm) -> None:
    plain = ok(cli(swarm.full, "generate", "hi", "--max-tokens", "12", "--temperature", "0"))
    r = cli(swarm.full, "generate", "hi", "--max-tokens", "12", "--temperature", "0",
            "--draft", "ngram", "--verify", "greedy", "--gamma", "3", "--chain")
    assert ok(r) == plain  # greedy DSD is lossless
    assert "ngram/greedy:" in r.stderr and "tokens/round" in r.stderr, r.stderr
    data = json.loads(ok(cli(swarm.full, "generate", "hi", "--max-tokens", "12",
                             "--temperature", "0", "--draft", "ngram", "--json")))
    assert data["peerd"]["speculative"]["draft"] == "ngram"
    bad = cli(swarm.full, "generate", "hi", "--draft", "magic")
    assert bad.returncode != 0 and "unknown drafter" in bad.stderr
    assert cli(swarm.full, "generate", "hi", "--gamma", "x").returncode == 2


def test_generate_logprobs_shows_each_token_and_its_alternatives(swarm: Swarm) -> None:
    data = json.loads(ok(cli(swarm.full, "generate", "hi", *GREEDY, "--logprobs", "2",
                             "--json")))
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == data["usage"]["completion_tokens"]
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in content)
    # streamed, the chunks' entries add up to the same list
    streamed = json.loads(ok(cli(swarm.full, "generate", "hi", *GREEDY, "--logprobs", "2",
                                 "--stream", "--json")))
    assert [e["token"] for e in streamed["choices"][0]["logprobs"]["content"]] == [
        e["token"] for e in content]
    table = ok(cli(swarm.full, "generate", "hi", *GREEDY, "--logprobs", "1"))
    assert f"{len(content)} tokens: log-probability" in table
    assert f"{content[0]['logprob']:.3f}" in table
    raw = json.loads(ok(cli(swarm.full, "generate", "The quick", *GREEDY, "--raw",
                            "--logprobs", "3", "--json")))
    legacy = raw["choices"][0]["logprobs"]
    assert "".join(legacy["tokens"]) and len(legacy["top_logprobs"][0]) == 3
    assert cli(swarm.full, "generate", "hi", "--raw", "--logprobs", "6").returncode == 2
    assert cli(swarm.full, "generate", "hi", "--logprobs", "21").returncode == 2


def test_chat_answers_through_stdin_and_exits(swarm: Swarm) -> None:
    expected = ok(cli(swarm.full, "generate", "hello", *GREEDY))
    r = chat(swarm.full, "hello\n/exit\n", *GREEDY)
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert r.stdout == expected  # piped: the answer alone, no prompt
    assert "route full [0, 4)" in r.stderr
    assert "Traceback" not in r.stderr


def test_chat_keeps_the_history_until_reset(swarm: Swarm) -> None:
    """The second answer depends on the first turn; after /reset it is a first answer."""
    first = ok(cli(swarm.full, "generate", "hello", *GREEDY)).strip()
    r = chat(swarm.full, "hello\nhello\n/reset\nhello\n", *GREEDY)  # EOF leaves
    assert r.returncode == 0, (r.stdout, r.stderr)
    # Piped, stdout is the answers alone, each ending in a newline.
    assert r.stdout.startswith(first + "\n") and r.stdout.endswith("\n" + first + "\n")
    assert r.stdout[len(first) + 1:-(len(first) + 1)].endswith("\n")  # a second answer
    assert r.stderr.count("route full") == 3
    assert "history cleared" in r.stderr


def test_chat_leaves_on_ctrl_c(swarm: Swarm) -> None:
    proc = subprocess.Popen(peerd_command("chat", "--data-dir", str(swarm.full.data_dir)),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**CLEAN_ENV, **WIDE})
    try:
        assert proc.stderr is not None
        assert "chatting with" in proc.stderr.readline()  # then it waits for a line
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, (out, err)
    assert "Traceback" not in err and "aborted" not in err


def test_shards_shows_layers_and_coverage(swarm: Swarm) -> None:
    out = ok(cli(swarm.full, "shards"))
    assert swarm.model_id in out and swarm.other_id in out
    assert "[0, 4)" in out and "[0, 1)" in out
    assert "complete: layers 0..3 covered" in out
    assert "missing layers [1, 4)" in out
    data = json.loads(ok(cli(swarm.bare, "shards", "--json")))  # any peer sees the swarm
    assert set(data) == {swarm.model_id, swarm.other_id}
    full, part = data[swarm.model_id], data[swarm.other_id]
    assert (full["num_layers"], full["missing"]) == (4, [])
    assert (part["num_layers"], part["missing"]) == (4, [[1, 4]])
    assert [(s["name"], s["layer_start"], s["layer_end"]) for s in full["servers"]] == [
        ("full", 0, 4)]
    assert part["servers"][0]["peer_id"] == swarm.partial.peer_id
    assert {"dtype", "tokens_per_s"} <= set(part["servers"][0])


def test_shard_map_without_daemons() -> None:
    """Several gaps; servers by layer start; a model nobody gave a layer count for."""
    from peerd.cli.shards import coverage_text, shard_map

    def row(peer: str, model: str, a: int, b: int, layers: int = 0) -> dict[str, Any]:
        return {"peer_id": peer, "name": peer.upper(), "models": [
            {"model_id": model, "layer_start": a, "layer_end": b, "dtype": "float32",
             "tokens_per_s": 1.0, "num_layers": layers}]}

    data = shard_map([row("x", "m", 2, 4, 6), row("y", "m", 0, 1), row("z", "old", 0, 1),
                      {"peer_id": "w", "name": "W", "models": []}])
    assert list(data) == ["m", "old"]
    assert [s["peer_id"] for s in data["m"]["servers"]] == ["y", "x"]
    assert data["m"]["missing"] == [[1, 2], [4, 6]]
    assert coverage_text(data["m"]) == "missing layers [1, 2), [4, 6) of 6"
    assert data["old"]["missing"] is None
    assert "unknown" in coverage_text(data["old"])
    assert coverage_text(shard_map([row("x", "m", 0, 6, 6)])["m"]).startswith("complete")


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("peerd: "), lines[0]
    return lines[0]


def test_generate_without_a_model_is_one_line(swarm: Swarm) -> None:
    for command in (["generate", "hi"], ["generate", "hi", "--stream"], ["chat"]):
        line = one_line_error(cli(swarm.bare, *command))
        assert "serves no model" in line
        assert "--model" in line


def test_generate_with_a_wrong_token_is_one_line(swarm: Swarm) -> None:
    for extra in ((), ("--model", swarm.model_id), ("--model", swarm.model_id, "--stream")):
        r = run_cli("generate", "hi", "--api", swarm.full.url, "--token", "not-the-token",
                    *extra)
        assert "refused the token" in one_line_error(r)


def test_generate_with_missing_layers_is_one_line(swarm: Swarm) -> None:
    for stream in ("--no-stream", "--stream"):
        line = one_line_error(cli(swarm.partial, "generate", "hi", stream))
        assert "503" in line and "[1, 4)" in line
