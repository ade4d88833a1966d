"""`peerd plan`: a goal reached by a ReAct plan over the swarm's tools (peerd/plans/).

`peerd plan "GOAL"` starts a plan on the local daemon and waits for its end: the answer
(exit 0) or why it failed (exit 1). `--follow` shows every step live as the daemon
streams it (the thought, each call with its peer and time, retries, replans, the
answer); `--json` prints the final record. `peerd plan show ID` and `peerd plan list`
read earlier plans.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
import httpx
from rich.markup import escape
from rich.table import Table

from peerd.cli.client import Client, client_options, console, emit, fail, make_client
from protocols.memory import SCORERS

OBSERVATION_CHARS = 160  # of a result, on one line of --follow


class _PlanGroup(click.Group):
    """`peerd plan GOAL ...` runs a plan; `peerd plan show|list` read them."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_PlanGroup)
def plan() -> None:
    """Reach a goal with a plan over the swarm's tools: `peerd plan "GOAL" [--tools A,B]
    [--steps N] [--tokens N] [--mode sync|async] [--memory] [--reference ANSWER] [--follow]
    [--json]`; `peerd plan show ID`, `peerd plan list`."""


@plan.command("run", hidden=True)
@client_options
@click.argument("goal")
@click.option("--tools", "tool_names", metavar="A,B", help="Only these tools [every tool "
              "in the ledger].")
@click.option("--steps", type=click.IntRange(1, 64), help="At most this many steps [8].")
@click.option("--tokens", type=click.IntRange(1, 65536), help="The planner's model writes "
              "at most this many tokens in all [4096].")
@click.option("--mode", type=click.Choice(["sync", "async"]), default="sync",
              show_default=True, help="async: go on with the first results while long "
              "calls run.")
@click.option("--follow", is_flag=True, help="Show each step live.")
@click.option("--unconstrained", is_flag=True, help="Let the model write its steps freely "
              "(no grammar): they may not parse.")
@click.option("--memory", "use_memory", is_flag=True, help="Give the planner this peer's "
              "memory's notes for the goal.")
@click.option("--memory-k", type=click.IntRange(1, 32), help="At most this many notes "
              "(implies --memory) [the memory's top_k].")
@click.option("--reference", metavar="ANSWER", help="The expected answer: the plan's is "
              "scored against it and the run kept by this peer's memory.")
@click.option("--scorer", type=click.Choice(list(SCORERS)), help="How --reference scores "
              "the answer [number].")
@click.option("--domain", metavar="NAME", help="The memory domain the scored run is kept "
              "under [plans].")
def run(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
        goal: str, tool_names: str | None, steps: int | None, tokens: int | None,
        mode: str, follow: bool, unconstrained: bool, use_memory: bool,
        memory_k: int | None, reference: str | None, scorer: str | None,
        domain: str | None) -> None:
    c = make_client(data_dir, api, token)
    body: dict[str, Any] = {"goal": goal, "mode": mode}
    if memory_k is not None:
        body["memory"] = {"k": memory_k}
    elif use_memory:
        body["memory"] = True
    for key, value in (("reference", reference), ("scorer", scorer), ("domain", domain)):
        if value is not None:  # the API says what is wrong with them, and which
            body[key] = value
    if unconstrained:
        body["constrained"] = False
    if tool_names:
        body["tools"] = [t.strip() for t in tool_names.split(",") if t.strip()]
    budget = {k: v for k, v in (("steps", steps), ("tokens", tokens)) if v is not None}
    if budget:
        body["budget"] = budget
    plan_id = c.request("POST", "/v1/plans", body)["id"]
    names = c.peer_names() if follow else {}
    for event in _events(c, plan_id):
        if follow and not as_json:
            _show(event, names)
    record = c.request("GET", f"/v1/plans/{quote(plan_id, safe='')}")
    if as_json:
        emit(record, True, _render)
    elif not follow:
        _render(record)
    if record["status"] != "answered":
        raise SystemExit(1)


@plan.command()
@client_options
@click.argument("plan_id", metavar="ID")
def show(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
         plan_id: str) -> None:
    """Show plan ID: its steps, calls and answer."""
    c = make_client(data_dir, api, token)
    emit(c.request("GET", f"/v1/plans/{quote(plan_id, safe='')}"), as_json, _render)


@plan.command("list")
@client_options
def list_(data_dir: Path | None, api: str | None, token: str | None, as_json: bool) -> None:
    """The latest plans asked of this peer."""
    c = make_client(data_dir, api, token)
    emit(c.request("GET", "/v1/plans"), as_json, _render_list)


def _events(c: Client, plan_id: str) -> Iterator[dict[str, Any]]:
    """The plan's events until its end (the daemon ends the stream then)."""
    path = f"/v1/plans/{quote(plan_id, safe='')}/events"
    try:
        with httpx.stream("GET", c.api + path, headers=c._headers(),
                          timeout=httpx.Timeout(10.0, read=None)) as r:
            if r.status_code != 200:
                fail(f"GET {path} failed ({r.status_code})")
            for line in r.iter_lines():
                if line.startswith("data: "):
                    yield json.loads(line[6:])
    except httpx.HTTPError as exc:
        fail(f"lost the plan's event stream from {c.api} ({type(exc).__name__}); `peerd "
             f"plan show {plan_id}` shows where it got to")


def _attempts(n: int) -> str:
    return "1 attempt" if n == 1 else f"{n} attempts"


def _peer(peer: str, names: dict[str, str]) -> str:
    return escape(names.get(peer) or peer[-8:]) if peer else "-"


def _show(e: dict[str, Any], names: dict[str, str]) -> None:
    kind, out = e.get("type"), console.print
    if kind == "plan.created":
        b = e["budget"]
        out(f"[bold]plan {e['plan']}[/] ({e['mode']}; budget {b['steps']} steps, "
            f"{b['tokens']} tokens, {b['wall_s']:g} s, {b['calls']} calls): "
            f"{escape(e['goal'])}", highlight=False)
    elif kind == "plan.thought":
        out(f"\n[bold cyan]step {e['step']}[/] [dim]({e['tokens']} tokens; "
            f"{e['elapsed_s']:.2f} s into the plan)[/] {escape(e['text'])}", highlight=False)
    elif kind == "plan.call":
        out(f"  [yellow]→ {e['call_id']}[/] {escape(e['tool'])} "
            f"{escape(json.dumps(e['arguments'], ensure_ascii=False))}", highlight=False)
    elif kind == "plan.retry":
        out(f"  [magenta]↻ {e['call_id']}[/] attempt {e['attempt']} after "
            f"{_peer(e['peer'], names)}: {escape(e['reason'])}", highlight=False)
    elif kind == "plan.result":
        mark = "[green]✓" if e["ok"] else "[red]✗"
        out(f"  {mark} {e['call_id']}[/] {escape(e['tool'])} on {_peer(e['peer'], names)} "
            f"[dim]({e['elapsed_s']:.2f} s, {_attempts(e['attempts'])})[/] "
            f"{escape(e['observation'][:OBSERVATION_CHARS])}", highlight=False)
    elif kind == "plan.replan":
        out(f"  [magenta]↺ replan:[/] {escape(e['reason'])}", highlight=False)
    elif kind == "plan.answer":
        out(f"\n[bold green]answer:[/] {escape(e['text'])}", highlight=False)
    elif kind == "plan.failed":
        out(f"\n[bold red]failed:[/] {escape(e['reason'])}", highlight=False)


def _render(r: dict[str, Any]) -> None:
    used, budget = r["used"], r["budget"]
    console.print(f"[bold]plan {r['id']}[/] {r['status']} ({r['mode']}): "
                  f"{escape(r['goal'])}", highlight=False)
    console.print(f"used {used['steps']}/{budget['steps']} steps, {used['tokens']}/"
                  f"{budget['tokens']} tokens, {used['wall_s']:.2f}/{budget['wall_s']:g} s, "
                  f"{used['calls']}/{budget['calls']} calls", highlight=False)
    for step in r["steps"]:
        console.print(f"[bold cyan]step {step['step']}[/] {escape(step['thought'])}",
                      highlight=False)
        for call in step["calls"]:
            mark = {True: "[green]✓[/]", False: "[red]✗[/]"}.get(call["ok"], "…")
            console.print(f"  {mark} {call['call_id']} {escape(call['tool'])} "
                          f"{escape(json.dumps(call['arguments'], ensure_ascii=False))} "
                          f"[dim]{call['peer'][-8:]} {call['elapsed_s']:.2f} s[/] "
                          f"{escape(call['observation'][:OBSERVATION_CHARS])}",
                          highlight=False)
    if r["status"] == "answered":
        console.print(f"[bold green]answer:[/] {escape(r['answer'] or '')}", highlight=False)
    elif r["status"] == "failed":
        console.print(f"[bold red]failed:[/] {escape(r['reason'])}", highlight=False)
    if r.get("memory"):
        console.print(f"memory notes given: {len(r['memory'])}", highlight=False)
    if r.get("score") is not None:
        kept = f"kept as SCEC {r['scec'][:12]}" if r.get("scec") else "not kept by a memory"
        console.print(f"score {r['score']:g} against {escape(repr(r['reference']))} "
                      f"({r['scorer']}, domain {r['domain']}; {kept})", highlight=False)


def _render_list(rows: list[dict[str, Any]]) -> None:
    if not rows:
        console.print('no plans yet: `peerd plan "GOAL"` starts one')
        return
    t = Table(title=f"{len(rows)} plans")
    for col in ("id", "status", "goal"):
        t.add_column(col)
    for row in rows:
        t.add_row(row["id"], row["status"], escape(row["goal"][:80]))
    console.print(t)
