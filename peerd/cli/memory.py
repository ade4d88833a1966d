"""`peerd memory`: the peer's self-evolving memory (SEDM, peerd/memory/).

`add` offers an item (it is admitted only if a replay shows it helps), `search` shows
what a task would be given, `show`, `delete`, `stats`, `log` (every decision, refusals
with their measured utility), `prune` (consolidate now), `learn` (scored runs of a
task that teach the memory), `export` / `import` (JSONL).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import click
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from peerd.cli.client import client_options, console, emit, fail, make_client

POLL_S = 0.5
KINDS = ("example", "rule", "correction", "insight")


@click.group()
def memory() -> None:
    """The memory: items admitted only when a replay proves they help."""


def _fmt(value: Any, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _candidate(c: dict[str, Any]) -> None:
    u = c.get("utility") or {}
    verdict = {"admitted": "[green]admitted[/]", "refused": "[red]refused[/]"}.get(
        c["state"], c["state"])
    console.print(f"{verdict} ({escape(c['reason'])}): utility {_fmt(u.get('total'))} "
                  f"(score {_fmt(u.get('score'))}, prompt tokens "
                  f"{_fmt(u.get('prompt_tokens'))}) over {c['tasks']} tasks"
                  + (f"; item {c['item_id'][:12]}" if c.get("item_id") else ""),
                  highlight=False)


@memory.command()
@client_options
@click.argument("text")
@click.option("--domain", default="general", show_default=True,
              help="e.g. arithmetic, gsm8k: the tasks it is judged on.")
@click.option("--kind", type=click.Choice(KINDS), default="example", show_default=True)
@click.option("--origin", default="", help="The hash of the recorded run it came from.")
@click.option("--no-wait", is_flag=True, help="Queue it and return at once.")
def add(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
        text: str, domain: str, kind: str, origin: str, no_wait: bool) -> None:
    """Offer TEXT to the memory; it is replayed on similar tasks without and with it,
    and admitted only if it helps."""
    c = make_client(data_dir, api, token)
    cand = c.request("POST", "/v1/memory", {"text": text, "domain": domain, "kind": kind,
                                            "origin": origin})
    path = f"/v1/memory/candidates/{cand['id']}"
    if not no_wait:
        with console.status("replaying tasks without and with it...",
                            spinner="dots") if not as_json else _null():
            while cand["state"] in ("queued", "judging"):
                time.sleep(POLL_S)
                cand = c.request("GET", path)
    emit(cand, as_json, _candidate)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _items_table(items: list[dict[str, Any]], *, scored: bool) -> Table:
    cols = ["id", "domain", "kind", "weight", "uses"]
    table = Table(*cols, *(["similarity", "score"] if scored else []), "text")
    for it in items:
        text = it["text"].replace("\n", " / ")
        row = [it["id"][:12], escape(it["domain"]), it["kind"],
               _fmt(it.get("weight", it["stats"]["weight"])), str(it["stats"]["uses"])]
        if scored:
            row += [_fmt(it["similarity"]), _fmt(it["score"])]
        table.add_row(*row, escape(text[:80] + ("..." if len(text) > 80 else "")))
    return table


@memory.command()
@client_options
@click.argument("query")
@click.option("-k", "k", type=click.IntRange(1, 32), default=3, show_default=True)
@click.option("--domain", default=None)
def search(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
           query: str, k: int, domain: str | None) -> None:
    """The items a task on QUERY would be given, best first (similarity x weight)."""
    params = {"q": query, "k": k, **({"domain": domain} if domain else {})}
    found = make_client(data_dir, api, token).request(
        "GET", "/v1/memory/search?" + urlencode(params))
    emit(found, as_json, lambda f: console.print(
        _items_table(f, scored=True) if f else "nothing in the memory is close enough"))


@memory.command()
@client_options
@click.argument("item_id")
def show(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
         item_id: str) -> None:
    """One item in full."""
    item = make_client(data_dir, api, token).request("GET", f"/v1/memory/items/{item_id}")

    def render(it: dict[str, Any]) -> None:
        s = it["stats"]
        console.print(f"[bold]{it['id']}[/] ({escape(it['domain'])}, {it['kind']}) by "
                      f"{escape(it['author'])}\nweight {_fmt(s['weight'])}, admitted at "
                      f"utility {_fmt(s['admitted_utility'])}, {s['uses']} uses, from "
                      f"{escape(s['source'])}\n\n{escape(it['text'])}", highlight=False)

    emit(item, as_json, render)


@memory.command()
@client_options
@click.argument("item_id")
def delete(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
           item_id: str) -> None:
    """Forget an item."""
    emit(make_client(data_dir, api, token).request("DELETE", f"/v1/memory/items/{item_id}"),
         as_json, lambda r: console.print(f"deleted {r['deleted'][:12]}"))


@memory.command()
@client_options
@click.argument("item_id")
@click.option("--domain", required=True, help="Where the insight must prove itself.")
@click.option("--no-wait", is_flag=True, help="Queue it and return at once.")
def abstract(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
             item_id: str, domain: str, no_wait: bool) -> None:
    """Rewrite ITEM_ID as a general insight and offer it to DOMAIN, where it is admitted
    only by its own replay there."""
    c = make_client(data_dir, api, token)
    cand = c.request("POST", f"/v1/memory/items/{item_id}/abstract", {"domain": domain})
    if not no_wait:
        with console.status("replaying the insight on that domain's runs...",
                            spinner="dots") if not as_json else _null():
            while cand["state"] in ("queued", "judging"):
                time.sleep(POLL_S)
                cand = c.request("GET", f"/v1/memory/candidates/{cand['id']}")
    def render(x: dict[str, Any]) -> None:
        console.print(escape(x["text"]), highlight=False)
        _candidate(x)

    emit(cand, as_json, render)


@memory.command()
@client_options
def stats(data_dir: Path | None, api: str | None, token: str | None, as_json: bool) -> None:
    """Items by domain, decisions so far, the no-memory baselines."""
    def render(s: dict[str, Any]) -> None:
        table = Table("domain", "items", "uses", "mean weight", "no-memory score", "runs")
        domains = sorted(set(s["domains"]) | set(s["baseline"]))
        for d in domains:
            row, base = s["domains"].get(d, {}), s["baseline"].get(d, {})
            table.add_row(escape(d), str(row.get("items", 0)), str(row.get("uses", 0)),
                          _fmt(row.get("mean_weight")), _fmt(base.get("mean")),
                          str(base.get("runs", 0)))
        console.print(table)
        console.print(f"{s['items']} items, {s['waiting']} candidates waiting; decisions: "
                      + (", ".join(f"{k} {v}" for k, v in sorted(s["decisions"].items()))
                         or "none yet"), highlight=False)

    emit(make_client(data_dir, api, token).request("GET", "/v1/memory/stats"), as_json,
         render)


@memory.command("log")
@client_options
@click.option("-n", "limit", type=click.IntRange(1, 10_000), default=20, show_default=True)
@click.option("--action", default=None, help="admitted, refused, merged, pruned, ...")
def log_(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
         limit: int, action: str | None) -> None:
    """The decision log, newest first: every admission and refusal with its utility."""
    params = {"limit": limit, **({"action": action} if action else {})}
    rows = make_client(data_dir, api, token).request("GET", "/v1/memory/log?"
                                                     + urlencode(params))

    def render(rs: list[dict[str, Any]]) -> None:
        table = Table("when", "action", "reason", "utility", "item", "text")
        for r in rs:
            table.add_row(time.strftime("%H:%M:%S", time.localtime(r["at"])), r["action"],
                          escape(str(r.get("reason", ""))), _fmt(r.get("utility")),
                          r["item_id"][:12], escape(str(r.get("text", ""))[:60]))
        console.print(table)

    emit(rows, as_json, render)


@memory.command()
@client_options
def prune(data_dir: Path | None, api: str | None, token: str | None, as_json: bool) -> None:
    """Consolidate now: merge near-duplicates, prune what decayed, evict over the cap."""
    done = make_client(data_dir, api, token).request("POST", "/v1/memory/consolidate")
    emit(done, as_json, lambda d: console.print(
        "\n".join(escape(a["message"]) for a in d) or "nothing to merge, prune or evict"))


@memory.command()
@client_options
@click.option("--task", default="add", show_default=True,
              help="add, add:LO-HI, gsm8k or FILE.jsonl of {prompt, answer} rows.")
@click.option("-n", "n", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="Scored runs.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("-k", "k", type=click.IntRange(0, 32), default=None,
              help="Items a run is given [the memory's top k].")
@click.option("--max-tokens", type=click.IntRange(1, 1024), default=64, show_default=True)
def learn(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
          task: str, n: int, seed: int, k: int | None, max_tokens: int) -> None:
    """Teach the memory from N scored runs of TASK on this peer's model, live."""
    if task.endswith(".jsonl"):
        task = str(Path(task).resolve())
    body: dict[str, Any] = {"task": task, "n": n, "seed": seed, "max_tokens": max_tokens}
    if k is not None:
        body["k"] = k
    c = make_client(data_dir, api, token)
    job = c.request("POST", "/v1/memory/learn", body)
    try:
        if not as_json:
            with Live(_job_line(job), console=console, refresh_per_second=4,
                      transient=True) as live:
                while job["state"] == "running":
                    time.sleep(POLL_S)
                    job = c.request("GET", "/v1/memory/learn")
                    live.update(_job_line(job))
        while job["state"] == "running":
            time.sleep(POLL_S)
            job = c.request("GET", "/v1/memory/learn")
    except KeyboardInterrupt:  # stop the job too: what it learnt so far stays
        console.print("stopping after the run in hand...")
        c.request("POST", "/v1/memory/learn/stop")
        while job["state"] == "running":
            time.sleep(POLL_S)
            job = c.request("GET", "/v1/memory/learn")
    emit(job, as_json, lambda j: console.print(_job_line(j)))
    if job["state"] == "failed":
        fail(f"learning failed: {job['error']}")


def _job_line(j: dict[str, Any]) -> str:
    refused = ", ".join(f"{k} {v}" for k, v in sorted(j["refused"].items())) or "none"
    return (f"{j['state']}: {j['runs']}/{j['spec']['n']} runs ({j['passed']} passed, "
            f"{j['with_memory']} given memory); {j['proposed']} proposed, {j['admitted']} "
            f"admitted, refused: {refused}")


@memory.command()
@client_options
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path), required=False)
def export(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
           out: Path | None) -> None:
    """Every item as JSONL (to OUT, or standard output)."""
    text = make_client(data_dir, api, token).exchange("GET", "/v1/memory/export",
                                                      timeout_s=120.0).text
    if out is None:
        sys.stdout.write(text)
        return
    out.write_text(text)
    count = sum(1 for line in text.splitlines() if line.strip())
    emit({"items": count, "path": str(out)}, as_json,
         lambda r: console.print(f"{r['items']} items written to {escape(r['path'])}"))


@memory.command("import")
@client_options
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def import_(data_dir: Path | None, api: str | None, token: str | None, as_json: bool,
            path: Path) -> None:
    """Items from a JSONL export: this peer's come back as they were; others' are
    admitted only by replay here."""
    r = make_client(data_dir, api, token).exchange("POST", "/v1/memory/import",
                                                   content=path.read_bytes(),
                                                   timeout_s=300.0).json()

    def render(s: dict[str, Any]) -> None:
        console.print(f"{s['restored']} restored, {s['queued_for_admission']} queued for "
                      f"admission, {s['already_here']} already here, {s['bad']} bad lines",
                      highlight=False)
        for b in s["bad_lines"]:
            console.print(f"  line {b['line']}: {escape(b['error'])}", highlight=False)

    emit(r, as_json, render)
