"""What the command modules share: the consoles, one-line failures, and the client of
the local daemon's API (its options, plain requests, OpenAI completions posted whole or
streamed).

A daemon that does not answer is one line saying how to start one, exit code 1.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
from rich.console import Console

from peerd.config import DEFAULT_API, default_data_dir
from peerd.datadir import read_runtime_file, read_token

# Piped output gets a wide fixed width: rich would squeeze tables into 80 columns.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)

GENERATE_TIMEOUT_S = 600.0  # a whole non-streamed answer from a slow swarm
CHUNK_TIMEOUT_S = 300.0  # between two streamed chunks (the first waits for the prefill)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]peerd:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        render(data)


# ---- talking to the local daemon -------------------------------------------------------


class Client:
    def __init__(self, api: str, token: str | None) -> None:
        self.api = api.rstrip("/")
        self.token = token

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return self.exchange(method, path, json=body).json()

    def exchange(self, method: str, path: str, *, json: Any = None,
                 content: bytes | None = None, timeout_s: float = 10.0) -> httpx.Response:
        """The daemon's answer to a request (a JSON body, or raw `content`); an error
        answer ends the command with its message."""
        try:
            r = httpx.request(method, self.api + path, headers=self._headers(), json=json,
                              content=content, timeout=timeout_s)
        except httpx.HTTPError as exc:
            self._unreachable(exc)
        if r.status_code == 401:
            fail(f"the daemon at {self.api} refused the token; pass --token or --data-dir "
                 "of that daemon")
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except Exception:
                message = r.text[:200]
            fail(f"{method} {path} failed ({r.status_code}): {message}")
        return r

    def _unreachable(self, exc: Exception) -> NoReturn:
        fail(f"no peerd daemon answers at {self.api} ({type(exc).__name__}); start one "
             "with `peerd start`, or point at it with --api/--data-dir")

    def stream_events(self, types: str, replay: int) -> Iterator[dict[str, Any]]:
        params = {"replay": str(replay), **({"types": types} if types else {})}
        try:
            with httpx.stream("GET", self.api + "/events", headers=self._headers(),
                              params=params, timeout=httpx.Timeout(10.0, read=None)) as r:
                if r.status_code == 401:
                    fail(f"the daemon at {self.api} refused the token")
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        yield json.loads(line[6:])
        except httpx.ConnectError as exc:  # nothing listens: same advice as request()
            self._unreachable(exc)
        except httpx.HTTPError as exc:
            fail(f"lost the event stream from {self.api} ({type(exc).__name__})")

    def peer_names(self) -> dict[str, str]:
        """peer id -> name from the ledger; names are a nicety (the caller's result is
        already in hand), so never fail over them."""
        try:
            r = httpx.get(self.api + "/ledger", headers=self._headers(), timeout=5.0)
            if r.status_code == 200:
                return {row["peer_id"]: row.get("name") or "" for row in r.json()}
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            pass
        return {}


def connection_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Where the daemon is: --data-dir, or --api and --token."""
    fn = click.option("--token", envvar="PEERD_TOKEN", help="API bearer token "
                      "[<data dir>/api_token].")(fn)
    fn = click.option("--api", "api", envvar="PEERD_API_URL", metavar="URL",
                      help="API base URL [from <data dir>/daemon.json].")(fn)
    fn = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                      help="The daemon's data dir [$PEERD_HOME or ~/.local/share/peerd].")(fn)
    return fn


def client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """connection_options plus --json, for commands that print data."""
    return connection_options(click.option("--json", "as_json", is_flag=True,
                                           help="Print JSON.")(fn))


def make_client(data_dir: Path | None, api: str | None, token: str | None) -> Client:
    data_dir = data_dir or default_data_dir()
    if api is None:
        runtime = read_runtime_file(data_dir)
        api = runtime["api"] if runtime else f"http://{DEFAULT_API}"
    elif not api.startswith(("http://", "https://")):
        api = "http://" + api
    return Client(api, token or read_token(data_dir))


# ---- completions through the OpenAI API (generate, chat, and a task's vote) -------------


class CompletionFailed(Exception):
    """The API refused or broke off a completion; the message is one line."""


def _api_error(c: Client, path: str, r: httpx.Response) -> CompletionFailed:
    if r.status_code == 401:
        return CompletionFailed(f"the daemon at {c.api} refused the token; pass --token or "
                                "--data-dir of that daemon")
    try:
        message = r.json()["error"]["message"]
    except Exception:
        message = r.text[:200]
    return CompletionFailed(f"POST {path} failed ({r.status_code}): {message}")


def post_completion(c: Client, path: str, body: dict[str, Any],
                    read_timeout_s: float = GENERATE_TIMEOUT_S) -> dict[str, Any]:
    """One non-streamed completion: the OpenAI response object."""
    try:
        r = httpx.post(c.api + path, headers=c._headers(), json=body,
                       timeout=httpx.Timeout(10.0, read=read_timeout_s))
    except httpx.ConnectError as exc:
        c._unreachable(exc)
    except httpx.HTTPError as exc:
        raise CompletionFailed(f"lost the connection to {c.api} ({type(exc).__name__})"
                               ) from None
    if r.status_code != 200:
        raise _api_error(c, path, r)
    result: dict[str, Any] = r.json()
    return result


def stream_completion(c: Client, path: str, body: dict[str, Any],
                      on_text: Callable[[str], None]) -> dict[str, Any]:
    """A streamed completion: `on_text` gets each piece of text as it arrives; returns
    the response object assembled from the chunks (text, finish reason, usage, peerd)."""
    chat = path.endswith("/chat/completions")
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    parts: list[str] = []
    final: dict[str, Any] = {}  # id, model, finish_reason, usage, peerd: wherever they came
    logprobs: dict[str, list[Any]] = {}  # the chunks' logprobs, list by list
    try:
        with httpx.stream("POST", c.api + path, headers=c._headers(), json=body,
                          timeout=httpx.Timeout(10.0, read=CHUNK_TIMEOUT_S)) as r:
            if r.status_code != 200:
                r.read()
                raise _api_error(c, path, r)
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    message = chunk["error"].get("message", "unknown error")
                    raise CompletionFailed(f"the answer broke off: {message}")
                final.update({k: chunk[k] for k in ("id", "created", "model", "usage", "peerd")
                              if chunk.get(k) is not None})
                for part in chunk.get("choices", []):
                    piece = (part.get("delta", {}).get("content") if chat
                             else part.get("text")) or ""
                    if piece:
                        parts.append(piece)
                        on_text(piece)
                    for key, values in (part.get("logprobs") or {}).items():
                        if isinstance(values, list):
                            logprobs.setdefault(key, []).extend(values)
                    if part.get("finish_reason"):
                        final["finish_reason"] = part["finish_reason"]
    except httpx.ConnectError as exc:
        c._unreachable(exc)
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        raise CompletionFailed(f"lost the stream from {c.api} ({type(exc).__name__})"
                               ) from None
    if "finish_reason" not in final:
        raise CompletionFailed(f"the stream from {c.api} ended before the answer did")
    text = "".join(parts)
    choice: dict[str, Any] = {"index": 0, "finish_reason": final["finish_reason"],
                              "logprobs": logprobs or None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": final.get("id"), "object": "chat.completion" if chat else "text_completion",
            "created": final.get("created"), "model": final.get("model"), "choices": [choice],
            "usage": final.get("usage"), "peerd": final.get("peerd", {})}
