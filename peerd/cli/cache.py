"""`peerd cache`: the model cache on this machine (peerd/inference/model/gguf_cache.py):
`list` its entries, `clear` them (all, or only those no load will read again)."""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from peerd.cli.client import console, emit, fail

STALE = ("outdated", "orphaned", "partial")


@click.group()
def cache() -> None:
    """The model cache: each GGUF file's metadata, converted once per machine."""


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _ago(t: float) -> str:
    s = max(0.0, time.time() - t)
    for unit, span in (("d", 86400), ("h", 3600), ("min", 60)):
        if s >= span:
            return f"{s / span:.0f} {unit} ago"
    return "just now"


@cache.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
def list_(as_json: bool) -> None:
    """Show the cache's entries: the file each was converted from, whether a load still
    reads it, its size and when it was last used."""
    from peerd.inference.model.gguf_cache import cache_root, entries

    root = cache_root()
    try:
        found = entries(root)
    except OSError as exc:
        fail(f"cannot read the model cache {root}: {exc} (PEERD_CACHE_DIR sets where "
             "it is)")
    data = {"root": str(root), "entries": [asdict(e) for e in found],
            "bytes": sum(e.bytes for e in found)}

    def render(d: dict[str, Any]) -> None:
        if not d["entries"]:
            console.print(f"the model cache {escape(d['root'])} is empty", highlight=False)
            return
        t = Table(title=f"model cache: {escape(d['root'])}")
        for col in ("entry", "converted from", "state", "size", "last used"):
            t.add_column(col)
        for e in d["entries"]:
            colour = "green" if e["state"] == "current" else "yellow"
            t.add_row(escape(e["name"]), escape(e["source"] or "-"),
                      f"[{colour}]{e['state']}[/]", _size(e["bytes"]), _ago(e["used"]))
        console.print(t)
        stale = sum(e["state"] in STALE for e in d["entries"])
        console.print(f"{len(d['entries'])} entries, {_size(d['bytes'])}"
                      + (f"; {stale} no load will read again (peerd cache clear --stale)"
                         if stale else ""), highlight=False)

    emit(data, as_json, render)


@cache.command()
@click.option("--stale", is_flag=True,
              help="Only the entries no load will read again: of a file since changed "
                   "or removed, or left by a conversion that was killed.")
@click.option("--json", "as_json", is_flag=True, help="Print what was removed as JSON.")
def clear(stale: bool, as_json: bool) -> None:
    """Remove the cache's entries. Safe while peers run: a process that needs an entry
    again converts its file again (seconds)."""
    from peerd.inference.model.gguf_cache import cache_root, entries, remove

    root = cache_root()
    try:
        gone = [e for e in entries(root)
                if e.state != "converting" and (not stale or e.state in STALE)]
        freed = remove([e.name for e in gone], root)
    except (OSError, ValueError) as exc:
        fail(f"cannot clear the model cache {root}: {exc}")
    data = {"root": str(root), "removed": [e.name for e in gone], "bytes": freed}
    emit(data, as_json, lambda d: console.print(
        f"removed {len(d['removed'])} entries ({_size(d['bytes'])}) from "
        f"{escape(d['root'])}", highlight=False))
