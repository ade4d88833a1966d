"""`peerd task`: Symphony, a question answered by elected workers and a
reputation-weighted vote."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import click
from rich.markup import escape
from rich.table import Table

from peerd.cli.client import (
    CompletionFailed,
    client_options,
    console,
    fail,
    make_client,
    post_completion,
)
from protocols.memory import SCORERS


@click.command()
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
@click.option("--reference", metavar="ANSWER", help="The expected answer: the settled one "
              "is scored against it (no worker sees it) and the run kept by this peer's "
              "memory.")
@click.option("--scorer", type=click.Choice(list(SCORERS)), help="How --reference scores "
              "the answer [number].")
@click.option("--domain", metavar="NAME", help="The memory domain the scored run is kept "
              "under [general].")
def task(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
         question: str | None, task_id: str | None, workers: int, requirement: str | None,
         answer_format: str, deadline_s: float, max_tokens: int, reference: str | None,
         scorer: str | None, domain: str | None) -> None:
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
        for key, value in (("reference", reference), ("scorer", scorer), ("domain", domain)):
            if value is not None:  # the API says what is wrong with them, and which
                body[key] = value
        # The vote can take every worker's deadline, twice over when workers are replaced.
        try:
            result = post_completion(c, "/v1/tasks", body,
                                     read_timeout_s=3 * deadline_s + 30.0)
        except CompletionFailed as exc:
            fail(str(exc))
    if as_json:
        click.echo(json.dumps(result, indent=2, sort_keys=True))
        return
    names = c.peer_names()

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
    if result.get("score") is not None:
        scec = f"kept as SCEC {result['scec'][:12]}" if result.get("scec") else \
            "not kept (no memory here)"
        console.print(f"score {result['score']} against {escape(repr(result['reference']))} "
                      f"({result['scorer']}); {scec}", highlight=False)
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
