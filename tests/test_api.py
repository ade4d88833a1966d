"""The local HTTP API of real `peerd` processes: two daemons, B bootstrapped to A.

The pair is shared by the module; tests that change state (skills) only check what
they changed.
"""

from __future__ import annotations

import functools
import json
import socket
import stat
import uuid
from collections.abc import Iterator
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemons import (  # noqa: F401  (daemon_logs_on_failure is an autouse fixture)
    Daemon,
    connected_pair,
    daemon_logs_on_failure,
    metric_value,
    running,
    wait_for,
)

PROTECTED = [("GET", "/status"), ("GET", "/peers"), ("GET", "/ledger"), ("GET", "/metrics"),
             ("GET", "/events"), ("POST", "/capabilities"), ("GET", "/no-such-path")]
STATUS_FIELDS = {"peer_id", "name", "addrs", "uptime_s", "peers", "ledger_size", "seq",
                 "skills", "version", "data_dir", "api"}
PEER_FIELDS = {"peer_id", "name", "addrs", "rtt_ms", "connections", "offences"}
LEDGER_FIELDS = {"peer_id", "seq", "timestamp", "ttl_s", "name", "addrs", "hardware",
                 "models", "skills", "load", "reputation", "software", "features",
                 "expires_in_s", "received_at", "self"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Daemon, Daemon]]:
    a, b = connected_pair(tmp_path_factory.mktemp("api"))
    with running(a, b):
        yield a, b


def sse_events(daemon: Daemon, query: str, want: set[str], timeout_s: float = 15.0,
               ) -> list[tuple[str, dict[str, Any]]]:
    """Read `GET /events?QUERY` until every type in `want` was seen; (event, data) pairs.

    Also checks each SSE block's framing: `id:`, `event:` and `data:` lines that agree.
    """
    seen: list[tuple[str, dict[str, Any]]] = []
    block: dict[str, str] = {}
    headers = {"Authorization": f"Bearer {daemon.token}"}
    try:
        with httpx.stream("GET", f"{daemon.url}/events?{query}", headers=headers,
                          timeout=httpx.Timeout(5.0, read=timeout_s)) as r:
            assert r.status_code == 200, r.read()
            assert r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith(":"):
                    continue
                if line:
                    field, _, value = line.partition(": ")
                    block[field] = value
                    continue
                if not block:
                    continue
                data = json.loads(block["data"])
                assert block["event"] == data["type"], block
                assert int(block["id"]) == data["id"], block
                assert isinstance(data["ts"], float)
                seen.append((block["event"], data))
                block = {}
                if want <= {e for e, _ in seen}:
                    break
    except httpx.ReadTimeout:
        pass
    missing = want - {e for e, _ in seen}
    assert not missing, f"no {sorted(missing)} event on /events?{query}; got {seen}" \
        f"{daemon.describe()}"
    return seen


# ---- authentication ------------------------------------------------------------------


def test_health_is_open_and_names_the_peer(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    r = a.request("GET", "/health", token=None)
    assert r.status_code == 200
    assert r.json() == {"ok": True, "peer_id": a.peer_id, "name": "alpha"}


def test_token_file_is_private(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    mode = stat.S_IMODE((a.data_dir / "api_token").stat().st_mode)
    assert mode == 0o600, oct(mode)
    assert len(a.token) >= 32


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-0123456789", "Basic dXNlcjpwYXNz",
                                  "Bearer", "Token {token}", "{token}"],
                         ids=["none", "wrong", "basic", "empty", "other-scheme", "no-scheme"])
def test_everything_but_health_needs_the_token(pair: tuple[Daemon, Daemon],
                                               auth: str | None) -> None:
    a, _ = pair
    before = a.metric("peerd_rejections_total", reason="api_unauthorized")
    for method, path in PROTECTED:
        headers = {"Authorization": auth.format(token=a.token)} if auth is not None else {}
        r = httpx.request(method, a.url + path, headers=headers, json={"skills": ["evil"]},
                          timeout=5.0)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["www-authenticate"] == "Bearer"
        assert r.json()["error"]["type"] == "authentication_error"
        assert "api_token" in r.json()["error"]["message"]
    after = a.metric("peerd_rejections_total", reason="api_unauthorized")
    assert after == before + len(PROTECTED)
    assert "evil" not in a.get("/status")["skills"]


def test_a_token_with_a_prefix_or_suffix_is_refused(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    for token in (a.token + "x", a.token[:-1], "x" + a.token):
        assert a.request("GET", "/status", token=token).status_code == 401


def test_the_scheme_is_case_insensitive(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    r = httpx.get(a.url + "/status", headers={"Authorization": f"bearer {a.token}"})
    assert r.status_code == 200, r.text


# ---- queries -------------------------------------------------------------------------


def test_status_has_the_documented_fields(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    s = a.get("/status")
    assert set(s) >= STATUS_FIELDS, STATUS_FIELDS - set(s)
    assert s["peer_id"] == a.peer_id
    assert s["name"] == "alpha"
    assert a.p2p_addr in s["addrs"]
    assert s["api"] == a.url
    assert Path(s["data_dir"]) == a.data_dir
    assert s["peers"] == 1
    assert s["ledger_size"] == 2
    assert s["uptime_s"] > 0
    assert isinstance(s["skills"], list)
    assert isinstance(s["version"], str) and s["version"]


def test_each_peer_lists_the_other_with_a_round_trip_time(
        pair: tuple[Daemon, Daemon]) -> None:
    def measured(x: Daemon) -> list[dict[str, Any]]:
        return [r for r in x.get("/peers") if r["rtt_ms"] is not None]

    for x, y in (pair, pair[::-1]):
        rows = wait_for(functools.partial(measured, x), 15.0,
                        f"an RTT measurement on {x.peer_id}", pair)
        assert [r["peer_id"] for r in rows] == [y.peer_id]
        row = rows[0]
        assert set(row) >= PEER_FIELDS
        assert row["name"] == ("beta" if y is pair[1] else "alpha")
        assert 0 < row["rtt_ms"] < 1000
        assert row["connections"] >= 1
        assert row["offences"] == 0
        assert y.p2p_addr in row["addrs"]


def test_each_ledger_holds_both_entries(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    for x in pair:
        rows = {r["peer_id"]: r for r in x.get("/ledger")}
        assert set(rows) == {a.peer_id, b.peer_id}
        for pid, row in rows.items():
            assert set(row) >= LEDGER_FIELDS, LEDGER_FIELDS - set(row)
            assert row["self"] is (pid == x.peer_id)
            assert "task.prompt" in row["features"]  # optional wire fields it takes
            assert 0 < row["expires_in_s"] <= row["ttl_s"]
            assert row["hardware"]["cpu_count"] >= 1
            assert row["software"].startswith("peerd/")
        assert rows[a.peer_id]["name"] == "alpha"
        assert rows[b.peer_id]["name"] == "beta"
        assert a.p2p_addr in rows[a.peer_id]["addrs"]


# ---- changes -------------------------------------------------------------------------


def test_new_skills_reach_the_other_peer(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    skills = ["x", f"skill-{uuid.uuid4().hex[:8]}"]
    seq_before = a.get("/status")["seq"]
    r = a.request("POST", "/capabilities", json={"skills": skills})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body == {"peer_id": a.peer_id, "seq": body["seq"], "skills": skills}
    assert body["seq"] > seq_before
    assert a.get("/status")["skills"] == skills

    def a_as_b_sees_it() -> dict[str, Any] | None:
        row = next(r for r in b.get("/ledger") if r["peer_id"] == a.peer_id)
        return row if row["skills"] == skills else None

    row = wait_for(a_as_b_sees_it, 10.0, "B to learn A's new skills", pair)
    assert row["seq"] >= body["seq"]


@pytest.mark.parametrize("body", [
    b"{not json", b"\xff\xfe\x00", b"", b"null", b"[]", b'"skills"', b"{}",
    b'{"skills": "x"}', b'{"skills": [1]}', b'{"skills": [""]}', b'{"skills": {"a": 1}}',
    json.dumps({"skills": ["s"] * 65}).encode(), json.dumps({"skills": ["s" * 201]}).encode(),
    b'{"skills": ["a"], "skils": ["b"]}',
    # 64 skills of 200 four-byte characters: 51 KB in our entry, which could not be
    # signed; the request was a 500, the skills stayed, and the next heartbeat's
    # re-signing ended the gossip service, and the daemon with it
    json.dumps({"skills": ["\U0001F600" * 200] * 64}, ensure_ascii=False).encode(),
], ids=["broken", "not-utf8", "empty", "null", "list", "string", "no-skills", "str-skills",
        "int-skill", "empty-skill", "dict-skills", "too-many", "too-long", "unknown-field",
        "too-many-bytes"])
def test_bad_capabilities_are_refused_and_the_daemon_keeps_serving(
        pair: tuple[Daemon, Daemon], body: bytes) -> None:
    a, _ = pair
    skills_before = a.get("/status")["skills"]
    r = a.request("POST", "/capabilities", content=body,
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if body.startswith(b"{") and b"skil" in body:
        assert error["param"] in ("skills", "skils"), error  # names what to change
    assert a.request("GET", "/health", token=None).status_code == 200
    assert a.get("/status")["skills"] == skills_before


NESTED = [b"[" * 50_000, b'{"a":' * 10_000, b'{"skills": ' + b"[" * 40 + b"]" * 40 + b"}",
          b'{"model": "m", "messages": [' + b"[" * 50_000 + b"]}"]


@pytest.mark.parametrize("path", ["/capabilities", "/v1/chat/completions", "/v1/completions",
                                  "/v1/tasks"])
@pytest.mark.parametrize("body", NESTED, ids=["arrays", "objects", "40-deep", "in-messages"])
def test_deeply_nested_json_is_a_400_on_every_endpoint_that_reads_a_body(
        pair: tuple[Daemon, Daemon], path: str, body: bytes) -> None:
    """Python's JSON parser recurses: without a depth cap such a body was a 500."""
    a, _ = pair
    r = a.request("POST", path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "nests JSON" in error["message"]
    assert a.request("GET", "/health", token=None).status_code == 200


def test_json_depth_counts_brackets_outside_strings() -> None:
    from peerd.api.errors import json_depth

    assert json_depth(b"") == json_depth(b'"[[["') == 0
    assert json_depth(b"[]") == json_depth(b'{"a": "\\"}') == 1
    assert json_depth(b'{"a": [1, {"b": "[[[[\\"[["}]}') == 3
    assert json_depth(b"[[]][[[]]]") == 3
    assert json_depth(b"[" * 100_000) == 100_000


def test_json_depth_reads_an_unclosed_string_to_the_end() -> None:
    from peerd.api.errors import json_depth

    assert json_depth(b'["abc') == json_depth(b'["a\\"[[') == json_depth(b'["a\\') == 1
    assert json_depth(b'{"a": "[", "b": [["') == 3


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/capabilities"])
def test_an_unclosed_string_of_escaped_quotes_is_refused_at_once(
        pair: tuple[Daemon, Daemon], path: str) -> None:
    """The depth check's string pattern backtracked to the end of the body from every
    escaped quote of an unclosed string: a body under the endpoint's cap held the event
    loop (the API, gossip, heartbeats) for minutes to an hour. The client gives up
    after 10 s."""
    a, _ = pair
    cap = 1 << 20 if path.startswith("/v1") else 64 * 1024
    body = b'"' + b'\\"' * ((cap - 2) // 2)
    r = a.request("POST", path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"], r.text
    assert a.request("GET", "/health", token=None).status_code == 200


def test_an_oversized_body_is_refused(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    big = json.dumps({"skills": ["s"], "pad": "x" * 100_000}).encode()
    r = a.request("POST", "/capabilities", content=big,
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert "bytes" in r.json()["error"]["message"]
    assert a.get("/status")["peer_id"] == a.peer_id


def test_capabilities_is_post_only(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    assert a.request("GET", "/capabilities").status_code == 405


@pytest.mark.parametrize("path", ["/capabilities", "/v1/chat/completions", "/v1/completions",
                                  "/v1/tasks", "/v1/plans", "/v1/memory", "/v1/rl/runs",
                                  "/v1/tools/call"])
def test_a_lone_surrogate_is_a_400_on_every_endpoint_that_reads_a_body(
        pair: tuple[Daemon, Daemon], path: str) -> None:
    """JSON lets a string hold half a UTF-16 pair ("\\ud800"); Python parses it into a str
    that no tokenizer, signature or store can encode: it was a 500, and /capabilities
    kept it as our skills, so every later re-signing of our entry failed."""
    a, _ = pair
    skills_before = a.get("/status")["skills"]
    text = "a@b"  # "@" becomes the lone surrogate's escape once the body is JSON
    body = {"/capabilities": {"skills": [text]},
            "/v1/chat/completions": {"model": text,
                                     "messages": [{"role": "user", "content": text}]},
            "/v1/completions": {"model": text, "prompt": text},
            "/v1/tasks": {"question": text}, "/v1/plans": {"goal": text},
            "/v1/memory": {"text": text}, "/v1/rl/runs": {"model": text},
            "/v1/tools/call": {"tool": "calculator", "arguments": {"expression": text}}}[path]
    content = json.dumps(body).replace("@", "\\ud800").encode()
    r = a.request("POST", path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and "surrogate" in error["message"]
    assert a.get("/status")["skills"] == skills_before
    # a character outside the BMP, escaped as its (whole) pair, is text like any other
    r = a.request("POST", "/capabilities", content=b'{"skills": ["\\ud83d\\ude00"]}',
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 200 and r.json()["skills"] == ["\U0001f600"], r.text
    assert a.request("POST", "/capabilities", json={"skills": skills_before}).status_code == 200


@pytest.mark.parametrize(("method", "path", "status"), [
    ("GET", "/no-such-path", 404), ("GET", "/v1/tasks/..%2F..%2Fetc", 404),
    ("GET", "/v1/chat/completions/x", 404), ("POST", "/v1/models", 405),
    ("GET", "/v1/chat/completions", 405), ("DELETE", "/status", 405),
    ("DELETE", "/v1/plans", 405), ("GET", "/mcp", 405)])
def test_an_unknown_path_or_method_is_a_json_error(pair: tuple[Daemon, Daemon], method: str,
                                                   path: str, status: int) -> None:
    """Starlette answers these itself in plain text; a client reads `error` from JSON.
    /mcp is stateless: it has no stream to open on a GET (which held the connection
    open, silent, until the client gave up)."""
    a, _ = pair
    r = a.request(method, path)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    if status == 405:
        allow = r.headers["allow"].split(", ")
        assert allow and all(m in error["message"] for m in allow)
        assert path != "/v1/plans" or {"GET", "POST"} <= set(allow)  # two routes
    else:
        assert "README" in error["message"]
    assert a.request("GET", "/health", token=None).status_code == 200


@pytest.mark.parametrize(("raw", "status", "words"), [
    (b"GET /status HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n", 431,
     "send fewer or shorter headers"),
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "send a well-formed request"),
    (b"POST /capabilities HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n", 400,
     "send a well-formed request"),
    (b"GET /status HTTP/1.1\r\nHost: x\r\nBad Header Name: 1\r\n\r\n", 400,
     "send a well-formed request")], ids=["headers too large", "no request line",
                                          "a length not a number", "a malformed header"])
def test_a_request_that_is_not_http_is_answered_in_words(
        pair: tuple[Daemon, Daemon], raw: bytes, status: int, words: str) -> None:
    """h11 refuses these before the app sees them; hypercorn's own answers were an
    empty 400 or 431. The daemon keeps serving."""
    a, _ = pair
    with socket.create_connection(("127.0.0.1", a.api_port), timeout=10) as sock:
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()), head
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert words in error["message"] and error["code"] == "bad_http", error
    assert a.request("GET", "/health", token=None).status_code == 200


async def test_a_client_that_leaves_mid_body_is_an_api_error() -> None:
    """Not an exception out of the endpoint (logged as a crash of the ASGI app)."""
    from starlette.requests import Request

    from peerd.api.errors import ApiError, read_json

    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b'{"skills": [', "more_body": True},
        {"type": "http.disconnect"}]

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    request = Request({"type": "http", "method": "POST", "headers": []}, receive)
    with pytest.raises(ApiError, match="left"):
        await read_json(request)


# ---- events and metrics ----------------------------------------------------------------


def test_events_replay_the_connection_and_the_ledger(pair: tuple[Daemon, Daemon]) -> None:
    a, b = pair
    seen = sse_events(a, "replay=50", {"peer.connected", "ledger.accepted"})
    connected = [d for e, d in seen if e == "peer.connected"]
    accepted = [d for e, d in seen if e == "ledger.accepted"]
    assert b.peer_id in {d["peer_id"] for d in connected}
    assert b.peer_id in {d["peer_id"] for d in accepted}
    first = next(d for d in accepted if d["peer_id"] == b.peer_id)
    assert first["name"] == "beta"
    assert first["new"] is True
    assert first["via"] in ("gossip", "sync")


def test_events_filter_by_type(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    seen = sse_events(a, "replay=50&types=ledger.accepted", {"ledger.accepted"})
    assert {e for e, _ in seen} == {"ledger.accepted"}


def test_events_stream_live_changes(pair: tuple[Daemon, Daemon]) -> None:
    """A change made while a subscriber is attached arrives on its stream."""
    a, b = pair
    skills = [f"live-{uuid.uuid4().hex[:8]}"]
    headers = {"Authorization": f"Bearer {a.token}"}
    with httpx.stream("GET", f"{a.url}/events?types=ledger.accepted", headers=headers,
                      timeout=httpx.Timeout(5.0, read=15.0)) as r:
        lines = r.iter_lines()
        assert next(lines).startswith(":")  # the stream is open: subscribed
        assert b.request("POST", "/capabilities", json={"skills": skills}).status_code == 200
        for line in lines:
            if line.startswith("data: "):
                data = json.loads(line[6:])
                if data["peer_id"] == b.peer_id and data["changed"]:
                    break
        else:
            pytest.fail(f"the stream ended without B's change{a.describe()}")
    assert a.get("/status")["peer_id"] == a.peer_id


def test_events_refuse_a_bad_replay(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    r = a.request("GET", "/events?replay=lots")
    assert r.status_code == 400
    assert "replay" in r.json()["error"]["message"]


def test_metrics_are_prometheus_text(pair: tuple[Daemon, Daemon]) -> None:
    a, _ = pair
    r = a.request("GET", "/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name, kind in (("peerd_peers", "gauge"), ("peerd_ledger_entries", "gauge"),
                       ("peerd_messages_total", "counter"),
                       ("peerd_rejections_total", "counter")):
        assert f"# TYPE {name} {kind}" in text, name
    assert metric_value(text, "peerd_peers") == 1
    assert metric_value(text, "peerd_ledger_entries") == 2
    assert metric_value(text, "peerd_messages_total", direction="in",
                        kind="ledger.gossip") >= 1
    assert metric_value(text, "peerd_messages_total", direction="out",
                        kind="ledger.gossip") >= 1
