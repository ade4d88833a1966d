"""Administering the local peer over its API: id, status, peers, ledger, events,
advertise."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from rich.table import Table

from peerd.cli.client import client_options, console, emit, make_client


def _ago(ts: float | None) -> str:
    return "-" if ts is None else f"{max(0.0, time.time() - ts):.1f}s ago"


@click.command("id")
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


@click.command()
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
        if d.get("lent"):
            console.print(lent_table(d["lent"], names=_peer_names(d)))
        if d.get("routed_around"):
            console.print(routed_around_table(d["routed_around"]))
        if d.get("audits"):
            console.print(audits_line(d["audits"]))

    emit(s, as_json, render)


def audits_line(audits: dict[str, Any]) -> str:
    """How this peer's audits of its requests' routes came out (audit.py)."""
    counts = ", ".join(f"{audits[k]} {k}" for k in ("agreed", "blamed", "disputed",
                                                     "inconclusive", "failed", "unauditable")
                       if audits.get(k))
    running = "; one running" if audits.get("running") else ""
    return (f"[bold]audits[/] of routes after {audits['rate']:.0%} of requests: "
            f"{counts or 'none yet'}{running}")


def routed_around_table(banned: list[dict[str, Any]]) -> Table:
    """The peers this peer's requests route around now: each failed one (the code
    says how: `stalled`, `unreachable`, `malformed`...) and is banned a while, longer
    the more often it fails."""
    t = Table(title="routed around (failed our requests)",
              caption="`peerd forgive PEER_ID` lets one back")
    for col in ("peer", "why", "for", "bans in a row"):
        t.add_column(col)
    for row in banned:
        t.add_row(row["peer_id"], row["why"], _for(row["remaining_s"]), str(row["strikes"]))
    return t


def _for(seconds: float) -> str:
    """A ban's time left, in the unit that reads best: 9 s, 5 min, 23.9 h."""
    if seconds >= 7200:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 120 else f"{seconds:.0f} s"


def _peer_names(status: dict[str, Any]) -> dict[str, str]:
    return {status["peer_id"]: f"{status['name']} (this peer)"}


def lent_table(lent: dict[str, Any], names: dict[str, str]) -> Table:
    """Who holds what this peer lends: a row per resource and holder, with its share of
    the capacity (the compute: turns and cost served, time waited, jobs queued)."""
    t = Table(title="lent to peers (fair shares)")
    for col in ("resource", "peer", "holds", "of", "notes"):
        t.add_column(col)
    for resource, r in lent.items():
        if resource == "compute":
            for peer, c in r.get("peers", {}).items():
                t.add_row("compute", names.get(peer, peer[-12:]), f"{c['cost']} cost",
                          f"{c['turns']} turns", f"waited {c['waited_s']} s, queued "
                          f"{c['queued']}")
            continue
        held = r.get("held", {})
        if not held:
            t.add_row(resource, "-", "0", str(r.get("capacity")), "")
        for peer, amount in sorted(held.items(), key=lambda kv: -kv[1]):
            t.add_row(resource, names.get(peer, peer[-12:]), str(amount), str(r.get("capacity")),
                      f"{100 * amount / max(1, r.get('capacity') or 1):.0f}%")
    return t


@click.command()
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


@click.command()
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


@click.command()
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


@click.command()
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


@click.command()
@client_options
@click.argument("peer_id")
def forgive(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
            peer_id: str) -> None:
    """Let this peer's requests take PEER_ID again: its ban (`peerd status`, "routed
    around") and any audit's proofs of wrong output against it are forgotten."""
    r = make_client(data_dir, api, token).request(
        "DELETE", f"/routed-around/{quote(peer_id, safe='')}")

    def render(d: dict[str, Any]) -> None:
        was = "no longer routed around" if d["was_routed_around"] else "was not routed around"
        proofs = d["proofs_forgotten"]
        console.print(f"{d['peer_id']} {was}" + (f"; {proofs} proof(s) of wrong output "
                                                   "forgotten" if proofs else ""),
                      highlight=False)

    emit(r, as_json, render)
