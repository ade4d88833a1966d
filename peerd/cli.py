"""The `peerd` command line: run a peer, and administer the local one over its API.

Every command that prints data prints a readable table, or JSON with `--json`. A bad
flag or setting is one line naming it, exit code 2; a daemon that does not answer
says how to start one.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote

import click
import httpx
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from peerd import __version__
from peerd.config import (
    DEFAULT_API,
    DEVICES,
    DTYPES,
    ConfigError,
    default_data_dir,
    load_config,
)
from peerd.datadir import read_runtime_file, read_token
from peerd.inference.speculative.vocab import DRAFT_VOCAB_SIZE

# Piped output gets a wide fixed width: rich would squeeze tables into 80 columns.
console = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]peerd:[/] {message}", highlight=False, soft_wrap=True)
    sys.exit(code)


class Group(click.Group):
    """Usage errors as one line (plus a hint), exit code 2."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            return super().main(*args, **kwargs)
        except click.UsageError as exc:
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
            fail(f"{exc.format_message()}{hint}", 2)
        except click.Abort:
            fail("aborted", 130)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            fail(exc.format_message(), exc.exit_code)


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="peerd")
def main() -> None:
    """peerd: a peer-to-peer daemon for decentralized LLM work."""


# ---- peerd start ----------------------------------------------------------------------


@main.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the identity, token and ledger live [$PEERD_HOME or "
              "~/.local/share/peerd].")
@click.option("--listen", multiple=True, metavar="MULTIADDR",
              help="libp2p listen address (repeatable) [/ip4/0.0.0.0/tcp/4001].")
@click.option("--announce", multiple=True, metavar="MULTIADDR",
              help="Address to advertise instead of the listen addresses (repeatable).")
@click.option("--bootstrap", multiple=True, metavar="MULTIADDR",
              help="A peer to join through, /ip4/H/tcp/P/p2p/ID (repeatable).")
@click.option("--api", metavar="HOST:PORT", help=f"Local HTTP API address [{DEFAULT_API}].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML config file [<data dir>/config.toml if present].")
@click.option("--name", help="Human-readable peer name [short peer id].")
@click.option("--skill", "skills", multiple=True, help="Advertise a skill (repeatable).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log verbosity [info].")
@click.option("--heartbeat-s", type=float, help="Ledger heartbeat in seconds [10].")
@click.option("--model", metavar="SPEC", help="Serve a model: smollm2, a .gguf file, a model "
              "directory or a cached Hugging Face repo id.")
@click.option("--layers", metavar="A:B", help="Serve decoder layers [A, B) [the least-served "
              "window that fits memory].")
@click.option("--device", type=click.Choice(DEVICES), help="[auto]")
@click.option("--dtype", type=click.Choice(DTYPES),
              help="Compute dtype [auto: float32 on CPU, bfloat16/float16 on CUDA].")
@click.option("--torch-threads", type=int, help="torch intra-op threads [all cores]; set it "
              "when several peers share a machine.")
@click.option("--speculative", metavar="DRAFT[,VERIFY[,GAMMA]]",
              help="Decode speculatively by default: DRAFT is ngram, eagle, eagle:PATH or "
              "model:SPEC; VERIFY greedy, sample or adaptive [auto]; GAMMA 1-16 [auto]. "
              "Requests may override it.")
@click.option("--prompt-cache/--no-prompt-cache", default=None,
              help="API requests reuse the KV a pooled pipeline session holds of their prompt "
              "(earlier chat turns) [off; greedy output may then part from a fresh "
              "prefill's at a near-tie].")
def start(config_file: Path | None, **flags: Any) -> None:
    """Run a peer in the foreground until SIGINT or SIGTERM."""
    from peerd.daemon import StartupError, run

    try:
        config = load_config(flags, config_file=config_file)
    except ConfigError as exc:
        fail(str(exc), 2)

    def announce(info: dict[str, Any]) -> None:
        console.print(f"[bold green]peerd {__version__}[/] peer [bold]{info['name']}[/]")
        console.print(f"  peer id  {info['peer_id']}", highlight=False)
        for addr in info["addrs"]:
            console.print(f"  listen   {addr}", highlight=False)
        console.print(f"  api      {info['api']}", highlight=False)
        console.print(f"  data dir {config.data_dir}", highlight=False)
        console.file.flush()

    def progress(phase: str) -> None:
        console.print(f"  [cyan]model[/]    {phase}", highlight=False)
        console.file.flush()

    try:
        code = run(config, announce=announce, progress=progress)
    except StartupError as exc:
        fail(str(exc), 1)
    # Everything is flushed and closed by now. Skip the interpreter's teardown: with a
    # model loaded, its garbage collection alone took seconds, past the 2 s we promise.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---- talking to the local daemon -------------------------------------------------------


class Client:
    def __init__(self, api: str, token: str | None) -> None:
        self.api = api.rstrip("/")
        self.token = token

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def request(self, method: str, path: str, body: Any = None) -> Any:
        try:
            r = httpx.request(method, self.api + path, headers=self._headers(), json=body,
                              timeout=10.0)
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
        return r.json()

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


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True))
    else:
        render(data)


def _ago(ts: float | None) -> str:
    return "-" if ts is None else f"{max(0.0, time.time() - ts):.1f}s ago"


@main.command("id")
@client_options
def id_(data_dir: Path | None, api: str | None, token: str | None, as_json: bool) -> None:
    """The local peer's id and addresses."""
    c = make_client(data_dir, api, token)
    s = c.request("GET", "/status")
    data = {"peer_id": s["peer_id"], "name": s["name"], "addrs": s["addrs"], "api": c.api}

    def render(d: dict[str, Any]) -> None:
        console.print(f"[bold]{d['name']}[/]  {d['peer_id']}", highlight=False)
        for a in d["addrs"]:
            console.print(f"  {a}", highlight=False)

    emit(data, as_json, render)


@main.command()
@client_options
def status(data_dir: Path | None, api: str | None, token: str | None, as_json: bool) -> None:
    """Health of the local peer."""
    s = make_client(data_dir, api, token).request("GET", "/status")

    def render(d: dict[str, Any]) -> None:
        t = Table(show_header=False, box=None)
        for k in ("name", "peer_id", "version", "uptime_s", "peers", "ledger_size", "skills",
                  "data_dir", "api"):
            v = d.get(k)
            t.add_row(f"[bold]{k}[/]", ", ".join(v) if isinstance(v, list) else str(v))
        for a in d["addrs"]:
            t.add_row("[bold]addr[/]", a)
        console.print(t)

    emit(s, as_json, render)


@main.command()
@client_options
def peers(data_dir: Path | None, api: str | None, token: str | None, as_json: bool) -> None:
    """Connected peers with their measured round trip."""
    rows = make_client(data_dir, api, token).request("GET", "/peers")

    def render(rows: list[dict[str, Any]]) -> None:
        t = Table(title=f"{len(rows)} connected peers")
        for col in ("name", "peer id", "rtt ms", "address", "offences"):
            t.add_column(col)
        for r in rows:
            rtt = "-" if r["rtt_ms"] is None else f"{r['rtt_ms']:.1f}"
            t.add_row(r["name"] or "?", r["peer_id"], rtt, (r["addrs"] or ["?"])[0],
                      str(r["offences"]))
        console.print(t)

    emit(rows, as_json, render)


@main.command()
@client_options
def ledger(data_dir: Path | None, api: str | None, token: str | None, as_json: bool) -> None:
    """The capability ledger as this peer sees it."""
    rows = make_client(data_dir, api, token).request("GET", "/ledger")

    def render(rows: list[dict[str, Any]]) -> None:
        t = Table(title=f"ledger: {len(rows)} peers")
        for col in ("name", "peer id", "seq", "device", "cpus", "skills", "models",
                    "expires", "received"):
            t.add_column(col)
        for r in rows:
            hw = r.get("hardware", {})
            models = ", ".join(f"{m['model_id']}[{m['layer_start']}:{m['layer_end']}]"
                               for m in r.get("models", []))
            name = r["name"] + (" (self)" if r.get("self") else "")
            t.add_row(name, r["peer_id"][-12:], str(r["seq"]), hw.get("device", "?"),
                      str(hw.get("cpu_count", "?")), ", ".join(r.get("skills", [])) or "-",
                      models or "-", f"{r['expires_in_s']:.1f}s", _ago(r.get("received_at")))
        console.print(t)

    emit(rows, as_json, render)


@main.command()
@client_options
@click.option("--type", "types", default="", help="Only these event types (comma-separated).")
@click.option("--replay", default=0, type=click.IntRange(0, 256),
              help="First show this many recent events.")
@click.option("--count", default=0, type=click.IntRange(0), help="Stop after N events.")
def events(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
           types: str, replay: int, count: int) -> None:
    """Follow the peer's events (connections, ledger accept/reject) until Ctrl-C."""
    c = make_client(data_dir, api, token)
    seen = 0
    try:
        for ev in c.stream_events(types, replay):
            if as_json:
                click.echo(json.dumps(ev, sort_keys=True))
            else:
                extra = " ".join(f"{k}={v}" for k, v in ev.items()
                                 if k not in ("id", "type", "ts"))
                stamp = time.strftime("%H:%M:%S", time.localtime(ev["ts"]))
                console.print(f"{stamp} [bold]{ev['type']:<18}[/] {extra}", highlight=False)
            seen += 1
            if count and seen >= count:
                break
    except KeyboardInterrupt:
        pass


@main.command()
@client_options
@click.option("--skill", "skills", multiple=True, required=True,
              help="The full new list of skills (repeatable).")
def advertise(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
              skills: tuple[str, ...]) -> None:
    """Change the skills this peer advertises; every peer sees it within a second."""
    r = make_client(data_dir, api, token).request("POST", "/capabilities",
                                                  {"skills": list(skills)})
    emit(r, as_json, lambda d: console.print(
        f"advertising {', '.join(d['skills'])} (seq {d['seq']})", highlight=False))


# ---- generation through the local daemon's OpenAI API ----------------------------------

GENERATE_TIMEOUT_S = 600.0  # a whole non-streamed answer from a slow swarm
CHUNK_TIMEOUT_S = 300.0  # between two streamed chunks (the first waits for the prefill)


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


def served_model(c: Client) -> str:
    """The model the local daemon serves; one line and exit 1 if none is ready."""
    m = c.request("GET", "/status").get("model") or {}
    state = m.get("state", "none")
    if state == "ready" and m.get("model_id"):
        return str(m["model_id"])
    if state == "loading":
        fail(f"the daemon at {c.api} is still loading {m.get('spec', 'its model')} "
             f"({m.get('phase') or 'starting'}); try again shortly")
    if state == "failed":
        fail(f"the daemon at {c.api} failed to load its model ({m.get('error', '?')}); see "
             "its log, or restart it with another --model")
    fail(f"the daemon at {c.api} serves no model; restart it with `peerd start --model SPEC` "
         "(e.g. --model smollm2)")


def answer_text(response: dict[str, Any]) -> str:
    choice = (response.get("choices") or [{}])[0]
    if "message" in choice:
        return str(choice["message"].get("content") or "")
    return str(choice.get("text") or "")


def route_line(c: Client, response: dict[str, Any]) -> str:
    """route alpha [0, 2) -> beta [2, 4) · 41.3 tokens/s · 5 tokens"""
    info = response.get("peerd") or {}
    names: dict[str, str] = {}
    try:  # names are a nicety: the answer is already out, so never fail over them
        r = httpx.get(c.api + "/ledger", headers=c._headers(), timeout=5.0)
        if r.status_code == 200:
            names = {row["peer_id"]: row.get("name") or "" for row in r.json()}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        pass
    hops = " -> ".join(f"{names.get(h['peer_id']) or h['peer_id'][-8:]} "
                       f"[{h['layers'][0]}, {h['layers'][1]})"
                       for h in info.get("route", []))
    tokens = (response.get("usage") or {}).get("completion_tokens", "?")
    finish = (response.get("choices") or [{}])[0].get("finish_reason")
    spec = info.get("speculative") or {}
    drafted = ""
    if spec.get("draft", "none") != "none":
        shape = f", trees of {spec.get('mean_nodes', 0.0):.0f} nodes" if spec.get("tree") else ""
        drafted = (f" | {spec['draft']}/{spec.get('verify')}: {spec.get('rounds', 0)} rounds, "
                   f"{spec.get('tokens_per_round', 0.0):.2f} tokens/round{shape}, "
                   f"{spec.get('draft_ms', 0.0):.0f} ms drafting")
    return (f"route {hops or '?'} | {info.get('tokens_per_s', 0.0):.1f} tokens/s | "
            f"{tokens} tokens" + (f" ({finish})" if finish else "") + drafted)


def note(text: str) -> None:
    """A dim line on stderr, so that stdout carries the answer alone."""
    err_console.print(text, style="dim", highlight=False, markup=False, soft_wrap=True)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@main.command()
@client_options
@click.argument("prompt")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1, 8192),
              help="Most tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 2),
              help="0 is greedy.")
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling mass [1].")
@click.option("--seed", type=click.IntRange(0, 2**63 - 1), help="Sampling seed [random].")
@click.option("--stop", multiple=True, help="Stop before this text (repeatable, up to 4).")
@click.option("--stream/--no-stream", default=False, help="Print tokens as they arrive.")
@click.option("--raw", is_flag=True, help="Send the prompt as is (/v1/completions), "
              "not as a chat message.")
@click.option("--model", "model_id", metavar="ID", help="[the model the daemon serves]")
@click.option("--draft", metavar="DRAFTER", help="Decode speculatively: none, ngram, eagle, "
              "eagle:PATH or model:SPEC [the daemon's --speculative].")
@click.option("--verify", type=click.Choice(["auto", "greedy", "sample", "adaptive"]),
              help="How drafts are verified [auto: greedy at temperature 0, else sample].")
@click.option("--gamma", metavar="N|auto", help="Tokens drafted per round (a tree's "
              "depth), 1-16 [auto].")
@click.option("--tree/--chain", default=None, help="Draft a token tree (eagle, greedy or "
              "adaptive) or a single chain [tree].")
@click.option("--logprobs", "top", type=click.IntRange(0, 20), metavar="N",
              help="Show each token's log-probability and its N most likely alternatives "
              "(0-20; with --raw 0-5).")
def generate(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
             prompt: str, max_tokens: int, temperature: float, top_p: float | None,
             seed: int | None, stop: tuple[str, ...], stream: bool, raw: bool,
             model_id: str | None, draft: str | None, verify: str | None,
             gamma: str | None, tree: bool | None, top: int | None) -> None:
    """Generate text from PROMPT through the swarm."""
    if raw and top is not None and top > 5:
        fail("with --raw, --logprobs takes 0-5 (the completions API's limit)", 2)
    c = make_client(data_dir, api, token)
    body: dict[str, Any] = {"model": model_id or served_model(c), "max_tokens": max_tokens,
                            "temperature": temperature}
    if draft is not None or verify is not None or gamma is not None or tree is not None:
        if gamma not in (None, "auto") and not gamma.isdigit():
            fail("--gamma takes an integer 1-16 or auto", 2)
        spec: dict[str, Any] = {}  # what is left out, the daemon's default fills in
        if draft is not None:
            spec["draft"] = draft
        if verify is not None:
            spec["verify"] = verify
        if gamma is not None:
            spec["gamma"] = gamma if gamma == "auto" else int(gamma)
        if tree is not None:
            spec["tree"] = tree
        body["speculative"] = spec
    if top_p is not None:
        body["top_p"] = top_p
    if seed is not None:
        body["seed"] = seed
    if stop:
        body["stop"] = list(stop)
    if top is not None:
        body.update({"logprobs": top} if raw else {"logprobs": True, "top_logprobs": top})
    if raw:
        path, body["prompt"] = "/v1/completions", prompt
    else:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": prompt}]
    try:
        if stream:
            response = stream_completion(c, path, body, (lambda _: None) if as_json else _write)
            if not as_json:
                _write("\n")
        else:
            response = post_completion(c, path, body)
            if not as_json:
                click.echo(answer_text(response))
    except CompletionFailed as exc:
        if stream and not as_json:
            _write("\n")
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(response, indent=2, sort_keys=True))
    else:
        if top is not None:
            console.print(logprobs_table(response))
        note(route_line(c, response))


def token_rows(logprobs: dict[str, Any] | None) -> list[tuple[str, float, dict[str, float]]]:
    """(token, log-probability, alternatives) from either API's logprobs object."""
    if not logprobs:
        return []
    if "content" in logprobs:  # chat
        return [(e["token"], e["logprob"], {a["token"]: a["logprob"]
                                              for a in e.get("top_logprobs") or []})
                for e in logprobs["content"] or []]
    return [(t, lp, alts or {}) for t, lp, alts in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"],
        strict=True)]


def logprobs_table(response: dict[str, Any]) -> Table:
    choice = (response.get("choices") or [{}])[0]
    rows = token_rows(choice.get("logprobs"))
    t = Table(title=f"{len(rows)} tokens: log-probability, probability, alternatives")
    for column in ("token", "logprob", "p", "alternatives"):
        t.add_column(column, justify="right" if column in ("logprob", "p") else "left")
    for token, logprob, alternatives in rows:
        t.add_row(escape(repr(token)), f"{logprob:.3f}", f"{math.exp(logprob):.3f}",
                  escape("  ".join(f"{a!r} {lp:.2f}" for a, lp in alternatives.items())))
    return t


@main.command()
@connection_options
@click.option("--max-tokens", default=512, show_default=True, type=click.IntRange(1, 8192),
              help="Most tokens per answer.")
@click.option("--temperature", default=0.7, show_default=True, type=click.FloatRange(0, 2))
@click.option("--system", metavar="TEXT", help="A system message to start with.")
@click.option("--model", "model_id", metavar="ID", help="[the model the daemon serves]")
def chat(data_dir: Path | None, api: str | None, token: str | None, max_tokens: int,
         temperature: float, system: str | None, model_id: str | None) -> None:
    """Talk with the model; /reset forgets the conversation, /exit, Ctrl-D or Ctrl-C
    leave."""
    c = make_client(data_dir, api, token)
    model = model_id or served_model(c)
    interactive = sys.stdin.isatty()  # piped: no prompt, stdout is the answers alone
    try:  # from the first line out: Ctrl-C any time after it is a clean exit
        note(f"chatting with {model} at {c.api}; /reset forgets, /exit leaves")
        _converse(c, model, system, max_tokens, temperature, "> " if interactive else "")
    except (EOFError, KeyboardInterrupt):
        if interactive:
            _write("\n")


def _converse(c: Client, model: str, system: str | None, max_tokens: int,
              temperature: float, prompt: str) -> None:
    """Read a line, stream the answer, repeat; returns on /exit or Ctrl-C during an answer
    (raises EOFError on Ctrl-D, KeyboardInterrupt on Ctrl-C at the prompt)."""
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    shown: list[str] = []  # of the answer being streamed

    def show(piece: str) -> None:
        shown.append(piece)
        _write(piece)

    while True:
        line = input(prompt).strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = list(start)
            note("(history cleared)")
            continue
        history.append({"role": "user", "content": line})
        body = {"model": model, "messages": history, "max_tokens": max_tokens,
                "temperature": temperature}
        shown.clear()
        try:
            response = stream_completion(c, "/v1/chat/completions", body, show)
        except CompletionFailed as exc:
            history.pop()  # the user can ask again
            if shown:
                _write("\n")
            err_console.print(f"[bold red]peerd:[/] {escape(str(exc))}", highlight=False,
                              soft_wrap=True)
            continue
        except KeyboardInterrupt:  # leaving mid-answer: end its line, then leave
            if shown:
                _write("\n")
            return
        _write("\n")
        history.append({"role": "assistant", "content": answer_text(response)})
        note(route_line(c, response))


# ---- which peers serve which layers ------------------------------------------------------


def shard_map(ledger_rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """{model_id: {num_layers, servers (by layer start), missing}} from GET /ledger;
    `missing` is None when no peer advertises the model's layer count."""
    from peerd.inference.swarm.routing import Server, coverage_gaps  # pure: no torch

    out: dict[str, dict[str, Any]] = {}
    for row in ledger_rows:
        for m in row.get("models", []):
            entry = out.setdefault(m["model_id"], {"num_layers": 0, "servers": []})
            entry["num_layers"] = max(entry["num_layers"], int(m.get("num_layers") or 0))
            entry["servers"].append({
                "peer_id": row["peer_id"], "name": row.get("name", ""),
                "layer_start": m["layer_start"], "layer_end": m["layer_end"],
                "dtype": m.get("dtype", ""), "tokens_per_s": m.get("tokens_per_s", 0.0)})
    for entry in out.values():
        entry["servers"].sort(key=lambda s: (s["layer_start"], s["layer_end"], s["name"],
                                             s["peer_id"]))
        spans = [Server(s["peer_id"], s["layer_start"], s["layer_end"])
                 for s in entry["servers"]]
        entry["missing"] = ([list(gap) for gap in coverage_gaps(spans, entry["num_layers"])]
                            if entry["num_layers"] else None)
    return dict(sorted(out.items()))


def coverage_text(entry: dict[str, Any]) -> str:
    layers = entry["num_layers"]
    if entry["missing"] is None:
        return "coverage unknown: no peer advertises the model's layer count"
    if not entry["missing"]:
        return f"complete: layers 0..{layers - 1} covered"
    gaps = ", ".join(f"[{a}, {b})" for a, b in entry["missing"])
    return f"missing layers {gaps} of {layers}"


@main.command()
@client_options
def shards(data_dir: Path | None, api: str | None, token: str | None, as_json: bool) -> None:
    """Which peers serve which layers of which model, and what is missing."""
    data = shard_map(make_client(data_dir, api, token).request("GET", "/ledger"))

    def render(d: dict[str, dict[str, Any]]) -> None:
        if not d:
            console.print("no peer in the swarm serves a model")
        for model_id, entry in d.items():
            t = Table(title=f"{escape(model_id)} ({entry['num_layers'] or '?'} layers)")
            for col in ("peer", "peer id", "layers", "dtype", "tokens/s"):
                t.add_column(col)
            for s in entry["servers"]:
                t.add_row(escape(s["name"] or "?"), s["peer_id"][-12:],
                          f"[{s['layer_start']}, {s['layer_end']})", s["dtype"] or "?",
                          f"{s['tokens_per_s']:.1f}")
            console.print(t)
            style = "green" if entry["missing"] == [] else "yellow"
            console.print(coverage_text(entry), style=style, highlight=False)

    emit(data, as_json, render)


# ---- peerd draft: speculative-decoding drafters ------------------------------------------


@main.group()
def draft() -> None:
    """Drafters for speculative decoding: train an EAGLE draft head, set its draft
    vocabulary."""


@draft.command("train")
@click.option("--model", "spec", required=True, metavar="SPEC",
              help="The target: smollm2, a .gguf file, a model directory or a cached repo id.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the head (fp16 .safetensors).")
@click.option("--prompts", "prompt_files", multiple=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL prompts, \"prompt\" or \"question\" per line (repeatable) "
                   "[peerd's own draft_prompts.jsonl].")
@click.option("--steps", default=600, show_default=True, type=click.IntRange(1),
              help="Optimiser steps.")
@click.option("--per-file", type=click.IntRange(1), metavar="N",
              help="Train on at most N prompts of each file [all].")
@click.option("--holdout", default=24, show_default=True, type=click.IntRange(1),
              help="Prompts of each file held out to measure acceptance.")
@click.option("--max-new-tokens", default=160, show_default=True, type=click.IntRange(8, 2048),
              help="Length of the target's answers trained on.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Keep the generated answers here, and reuse them when it exists.")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1),
              help="torch threads.")
@click.option("--vocab-size", default=DRAFT_VOCAB_SIZE, show_default=True,
              type=click.IntRange(1), metavar="N",
              help="Draft over the N tokens most frequent in the training answers (the "
                   "model's vocabulary size or more: all of them).")
@click.option("--init", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="FILE", help="Fine-tune this head (one for the same model) instead "
                                   "of training a new one.")
@click.option("--unroll", default=1, show_default=True, type=click.IntRange(1, 8),
              metavar="D", help="Draft depths trained per position: depth 2 and deeper "
                                "feed the head its own features, as drafting does (each "
                                "depth costs a step).")
@click.option("--lr", default=1e-3, show_default=True,
              type=click.FloatRange(0, 1, min_open=True), help="Peak learning rate.")
@click.option("--batch-size", default=8, show_default=True,
              type=click.IntRange(1), help="Answers per step.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def draft_train(spec: str, out: Path, prompt_files: tuple[Path, ...], steps: int,
                per_file: int | None, holdout: int, max_new_tokens: int, data: Path | None,
                threads: int, vocab_size: int, init: Path | None, unroll: int, lr: float,
                batch_size: int, as_json: bool) -> None:
    """Train an EAGLE draft head on the target's own greedy answers (CPU, minutes), and
    measure its acceptance on held-out prompts against prompt lookup."""
    from peerd.inference.model.source import ModelError
    from peerd.inference.speculative.drafters import DraftError
    from peerd.inference.speculative.eagle_train import TrainConfig, train_eagle

    files = list(prompt_files) or [Path(__file__).parent / "data" / "draft_prompts.jsonl"]
    cfg = TrainConfig(steps=steps, unroll=unroll, lr=lr, batch_size=batch_size)
    try:
        report = train_eagle(spec, out, files, cfg, per_file=per_file, holdout=holdout,
                             max_new_tokens=max_new_tokens, data=data, threads=threads,
                             vocab_size=vocab_size, init=init)
    except (ModelError, DraftError, ValueError, OSError) as exc:
        fail(str(exc))

    def render(r: dict[str, Any]) -> None:
        t = Table(title="held-out acceptance (greedy): tokens per round, and per draft "
                        "position given the earlier ones accepted")
        for col in ("drafter", "γ", "rounds", "tokens/round", "by position"):
            t.add_column(col)
        for key, a in r["acceptance"].items():
            name = key.split("@")[0]
            label = f"{name} ({key.split(':')[1]})" if ":" in key else name
            t.add_row(escape(label), str(a["gamma"]), str(a["rounds"]),
                      f"{a['tokens_per_round']:.2f}",
                      " ".join(f"{x:.2f}" for x in a["acceptance_by_position"]))
        console.print(t)
        losses = "; ".join(f"depth {d + 1}: smooth-L1 {s['reg']:.3f} CE {s['ce']:.2f} "
                           f"top-1 {s['top1']:.2f}" for d, s in enumerate(r["final_losses"]))
        console.print(f"{r['train_examples']} answers ({r['train_tokens']} tokens) of "
                      f"{r['model_id']}, {r['held_out_examples']} held out; "
                      f"{r['config']['steps']} steps"
                      + (f", {r['config']['unroll']} depths unrolled"
                         if r["config"]["unroll"] > 1 else "")
                      + (f", fine-tuned from {r['init']['path']}" if r["init"] else "")
                      + f"; final {losses}", highlight=False)
        console.print(f"data {r['data_s']:.0f} s, training {r['train_s']:.0f} s, total "
                      f"{r['total_s']:.0f} s; wrote {r['out']} ({r['bytes'] / 1e6:.1f} MB)",
                      highlight=False)

    emit(report, as_json, render)


@draft.command("vocab")
@click.option("--model", "spec", required=True, metavar="SPEC",
              help="The target the head drafts for (its tokenizer counts the text).")
@click.option("--head", "head_file", required=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The EAGLE head file to rewrite.")
@click.option("--text", "text_files", multiple=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text to count tokens in (repeatable): .jsonl (every string value) or "
                   "any text file.")
@click.option("--size", default=DRAFT_VOCAB_SIZE, show_default=True, type=click.IntRange(1),
              help="Ids to keep (the model's vocabulary size or more: all of them).")
@click.option("--none", "clear", is_flag=True, help="Remove the draft vocabulary instead.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def draft_vocab(spec: str, head_file: Path, text_files: tuple[Path, ...], size: int,
                clear: bool, as_json: bool) -> None:
    """Give an EAGLE head a draft vocabulary: its drafts are scored over the SIZE tokens
    most frequent in the text (plus the request's own context tokens), not the whole
    vocabulary; one lm_head call is most of a draft step. Verification is unchanged."""
    from peerd.inference.model.head import Head
    from peerd.inference.model.source import ModelError, load_tokenizer, resolve
    from peerd.inference.speculative.drafters import DraftError
    from peerd.inference.speculative.eagle_file import set_vocab
    from peerd.inference.speculative.eagle_train import progress_bar
    from peerd.inference.speculative.vocab import VocabError, count_files, coverage, pick

    if not clear and not text_files:
        fail("give --text FILE (repeatable) to count tokens in, or --none to remove the "
             "draft vocabulary")
    try:
        source = resolve(spec)
        head = Head(source)
        if clear:
            set_vocab(head_file, head, None)
            emit({"head": str(head_file), "size": head.vocab_size, "removed": True},
                 as_json, lambda r: console.print(f"{r['head']}: drafts over the whole "
                                                  f"vocabulary ({r['size']})"))
            return
        tokenizer = load_tokenizer(source)
        with progress_bar(not as_json) as bar:
            task = bar.add_task("counting", total=len(text_files), info="")
            counts = count_files(
                text_files, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                lambda _: bar.update(task, advance=1))
        ids = pick(counts, head.vocab_size, size, always=tokenizer.all_special_ids)
        info = {"counted": f"{len(text_files)} text files", "tokens": sum(counts.values()),
                "coverage": round(coverage(ids, counts), 4)}
        set_vocab(head_file, head, ids, info)
    except (ModelError, DraftError, VocabError, OSError, UnicodeDecodeError) as exc:
        fail(str(exc))
    report = {"head": str(head_file), "size": len(ids), "vocab_size": head.vocab_size, **info}
    emit(report, as_json, lambda r: console.print(
        f"{r['head']}: drafts over {r['size']} of {r['vocab_size']} tokens, covering "
        f"{100 * r['coverage']:.2f}% of the {r['tokens']} counted", highlight=False))


# ---- Symphony: a task for elected workers -------------------------------------------------


@main.command()
@client_options
@click.argument("question", required=False)
@click.option("--get", "task_id", metavar="ID", help="Show task ID (one this peer asked, "
              "running or finished) instead of asking a question.")
@click.option("--workers", default=3, show_default=True, type=click.IntRange(1, 16),
              help="How many peers to elect.")
@click.option("--requirement", metavar="TEXT", help="What the workers' skills should match "
              "[the question].")
@click.option("--format", "answer_format", default="text", show_default=True,
              type=click.Choice(["number", "choice", "text"]), help="The answer's form.")
@click.option("--deadline-s", default=120.0, show_default=True,
              type=click.FloatRange(0, 600, min_open=True),
              help="Each worker's time to answer; a late worker is replaced.")
@click.option("--max-tokens", default=256, show_default=True, type=click.IntRange(1, 2048),
              help="Most tokens per chain of thought.")
def task(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
         question: str | None, task_id: str | None, workers: int, requirement: str | None,
         answer_format: str, deadline_s: float, max_tokens: int) -> None:
    """Ask the swarm QUESTION: elected peers answer with chains of thought, and a
    reputation-weighted vote settles the answer. With --get ID, show an earlier task."""
    if (question is None) == (task_id is None):
        fail("give a QUESTION to ask, or --get ID to show an earlier task (not both)")
    c = make_client(data_dir, api, token)
    if task_id is not None:
        result = c.request("GET", f"/v1/tasks/{quote(task_id, safe='')}")
    else:
        body: dict[str, Any] = {"question": question, "workers": workers,
                                "answer_format": answer_format, "deadline_s": deadline_s,
                                "max_tokens": max_tokens}
        if requirement:
            body["requirement"] = requirement
        # The vote can take every worker's deadline, twice over when workers are replaced.
        try:
            result = post_completion(c, "/v1/tasks", body,
                                     read_timeout_s=3 * deadline_s + 30.0)
        except CompletionFailed as exc:
            fail(str(exc))
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    names = _peer_names(c)

    def name(peer: str | None) -> str:
        return "nobody" if peer is None else escape(names.get(peer) or peer[-8:])

    status = result.get("status", "done")
    if status == "done":
        console.print(f"[bold]{escape(str(result['answer']))}[/]", highlight=False)
    elif status == "failed":
        console.print(f"[red]failed: {escape(result.get('error') or 'no answer')}[/]",
                      highlight=False)
    else:
        console.print(f"[yellow]{escape(status)}[/] (ask again with --get {result['id']})",
                      highlight=False)
    console.print(vote_table(result["votes"], name,
                             f"task {result['id']}: {len(result['votes'])} votes"))
    console.print(f"elected {', '.join(name(p) for p in result['elected'])}", highlight=False)
    for f in result["fallbacks"]:
        console.print(f"seat {f['seat']}: {name(f['peer_id'])} dropped ({f['reason']}), "
                      f"replaced by {name(f['replacement'])}", highlight=False)
    timings = result["timings"]
    console.print(f"beacon {timings['beacon_ms']:.0f} ms | solve {timings['solve_ms']:.0f} ms"
                  f" | total {timings['total_ms']:.0f} ms", highlight=False)


def vote_table(votes: list[dict[str, Any]], name: Callable[[str], str], title: str
               ) -> Table:
    """A task's votes (as /v1/tasks gives them), heaviest first; `name` shows a peer.
    "measured" is the requester's own measure of a chain ("-": it had no model)."""
    t = Table(title=title)
    for col in ("peer", "answer", "confidence", "measured", "weight", "chain of thought"):
        t.add_column(col)
    for v in sorted(votes, key=lambda v: -v["weight"]):
        cot = " ".join(v["cot"].split())
        measured = "-" if v.get("measured") is None else f"{v['measured']:.2f}"
        t.add_row(name(v["peer_id"]), escape(str(v["answer"])), f"{v['confidence']:.2f}",
                  measured, f"{v['weight']:.3f}",
                  escape(cot[:80] + ("…" if len(cot) > 80 else "")))
    return t


def _peer_names(c: Client) -> dict[str, str]:
    """peer id -> name from the ledger; names are a nicety, so never fail over them."""
    try:
        r = httpx.get(c.api + "/ledger", headers=c._headers(), timeout=5.0)
        if r.status_code == 200:
            return {row["peer_id"]: row.get("name") or "" for row in r.json()}
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        pass
    return {}


if __name__ == "__main__":
    main()
