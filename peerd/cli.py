"""The `peerd` command line: run a peer, and administer the local one over its API.

Every command that prints data prints a readable table, or JSON with `--json`. A bad
flag or setting is one line naming it, exit code 2; a daemon that does not answer
says how to start one.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
import httpx
from rich.console import Console
from rich.table import Table

from peerd import __version__
from peerd.config import DEFAULT_API, ConfigError, default_data_dir, load_config
from peerd.datadir import read_runtime_file, read_token

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
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[auto]")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Compute dtype [auto: float32 on CPU, bfloat16/float16 on CUDA].")
@click.option("--torch-threads", type=int, help="torch intra-op threads [all cores]; set it "
              "when several peers share a machine.")
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
    sys.exit(code)


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


def client_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)
    fn = click.option("--token", envvar="PEERD_TOKEN", help="API bearer token "
                      "[<data dir>/api_token].")(fn)
    fn = click.option("--api", "api", envvar="PEERD_API_URL", metavar="URL",
                      help="API base URL [from <data dir>/daemon.json].")(fn)
    fn = click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
                      help="The daemon's data dir [$PEERD_HOME or ~/.local/share/peerd].")(fn)
    return fn


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


if __name__ == "__main__":
    main()
