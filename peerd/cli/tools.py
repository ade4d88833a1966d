"""`peerd tools`: the swarm's typed tools (peerd/plans/), and calling one.

`peerd tools` lists every tool in the ledger (peer, name, schema hash, capacity);
`--peer P` shows that peer's tools in full, asked of it. `peerd tools call NAME --args
JSON [--peer P]` calls one, on the best peer offering it unless one is named; a call
that fails prints what went wrong and whose word that is, and exits 1.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from rich.markup import escape
from rich.table import Table

from peerd.cli.client import client_options, console, emit, fail, make_client
from protocols.tool import MAX_DEADLINE_S

CALL_MARGIN_S = 20.0  # past the call's deadline: fetching the schema, a retry elsewhere


@click.group(invoke_without_command=True)
@client_options
@click.option("--peer", metavar="PEER", help="Show this peer's tools in full (id or name).")
@click.pass_context
def tools(ctx: click.Context, data_dir: Path | None, api: str | None, token: str | None,
          as_json: bool, peer: str | None) -> None:
    """The swarm's typed tools: who offers which, at what capacity."""
    if ctx.invoked_subcommand is not None:
        return
    c = make_client(data_dir, api, token)
    if peer is not None:
        full = c.request("GET", f"/v1/tools?peer={quote(peer, safe='')}")
        emit(full, as_json, _render_full)
        return
    emit(c.request("GET", "/v1/tools"), as_json, _render_rows)


def _render_rows(rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print("no peer offers tools yet (a peer offers calculator and memory_search "
                      "unless its --tools says otherwise)")
        return
    t = Table(title=f"{len(rows)} tools in the ledger")
    for col in ("tool", "peer", "capacity", "schema"):
        t.add_column(col)
    for r in rows:
        who = escape(r["peer_name"] or r["peer_id"][-8:]) + (" (this peer)" if r["self"] else "")
        t.add_row(escape(r["tool"]), who, str(r["capacity"]), r["schema"][:12])
    console.print(t)


def _render_full(full: dict[str, Any]) -> None:
    console.print(f"[bold]{full['peer_id']}[/]: {len(full['tools'])} tools", highlight=False)
    for tool in full["tools"]:
        console.print(f"\n[bold]{escape(tool['name'])}[/] (capacity {tool['capacity']}, "
                      f"schema {tool['schema'][:12]}) {escape(tool['description'])}",
                      highlight=False)
        for what in ("inputSchema", "outputSchema"):
            console.print(f"  {what}: {json.dumps(tool[what], sort_keys=True)}",
                          highlight=False, markup=False)


@tools.command("call")
@client_options
@click.argument("name")
@click.option("--args", "arguments", default="{}", metavar="JSON",
              help='The arguments as a JSON object, e.g. \'{"expression": "6 * 7"}\'.')
@click.option("--peer", metavar="PEER", help="Run it on this peer (id or name) [the best "
              "peer offering it: free capacity, then the nearest].")
@click.option("--deadline-s", default=30.0, show_default=True,
              type=click.FloatRange(0, MAX_DEADLINE_S, min_open=True),
              help="The tool's time to answer.")
def call(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
         name: str, arguments: str, peer: str | None, deadline_s: float) -> None:
    """Call tool NAME with --args JSON."""
    try:
        parsed = json.loads(arguments)
    except ValueError as exc:
        fail(f"--args is not JSON ({exc}); give an object such as "
             "'{\"expression\": \"6 * 7\"}'", 2)
    if not isinstance(parsed, dict):
        fail("--args must be a JSON object of the tool's arguments ({...}); `peerd tools "
             "--peer P` shows each tool's inputSchema", 2)
    c = make_client(data_dir, api, token)
    body: dict[str, Any] = {"tool": name, "arguments": parsed, "deadline_s": deadline_s}
    if peer is not None:
        body["peer"] = peer
    out = c.exchange("POST", "/v1/tools/call", json=body,
                     timeout_s=deadline_s + CALL_MARGIN_S).json()
    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
    elif out["ok"]:
        console.print(json.dumps(out["result"], indent=2, sort_keys=True), highlight=False,
                      markup=False)
        console.print(f"[dim]{escape(name)} on {out['peer'][-8:]} in "
                      f"{1000 * out['elapsed_s']:.1f} ms[/]", highlight=False)
    if not out["ok"]:
        error = out["error"]
        whose = "the peer says" if error["by"] == "callee" else "checked here"
        fail(f"{name} on {out['peer'][-8:]} failed: {error['code']} ({whose}): "
             f"{error['message']}")


@tools.command("dispatch")
@client_options
@click.option("--calls", "calls", required=True, metavar="JSON",
              help='The calls as a JSON list, e.g. \'[{"tool": "calculator", "arguments": '
              '{"expression": "6 * 7"}}]\'.')
@click.option("--deadline-s", default=30.0, show_default=True,
              type=click.FloatRange(0, MAX_DEADLINE_S, min_open=True),
              help="Each attempt's time to answer.")
@click.option("--max-attempts", default=3, show_default=True, type=click.IntRange(1, 10))
def dispatch(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
             calls: str, deadline_s: float, max_attempts: int) -> None:
    """Run a batch of calls at once across the swarm, with retry elsewhere."""
    try:
        parsed = json.loads(calls)
    except ValueError as exc:
        fail(f"--calls is not JSON ({exc})", 2)
    c = make_client(data_dir, api, token)
    body = {"calls": parsed, "deadline_s": deadline_s, "max_attempts": max_attempts}
    out = c.exchange("POST", "/v1/tools/dispatch", json=body,
                     timeout_s=max_attempts * (deadline_s + CALL_MARGIN_S)).json()
    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
    else:
        t = Table(title=f"{len(out['results'])} calls")
        for col in ("tool", "peer", "attempts", "ms", "result or error"):
            t.add_column(col)
        for r in out["results"]:
            what = json.dumps(r["result"], sort_keys=True) if r["ok"] else \
                f"{r['error']['code']}: {r['error']['message']}"
            t.add_row(escape(r["tool"]), r["peer"][-8:], str(len(r["attempts"])),
                      f"{1000 * r['elapsed_s']:.1f}", escape(what))
        console.print(t)
    if not all(r["ok"] for r in out["results"]):
        raise SystemExit(1)
