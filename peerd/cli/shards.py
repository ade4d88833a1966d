"""`peerd shards`: which peers serve which layers of which model, read from the ledger."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from peerd.cli.client import client_options, console, emit, make_client


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


@click.command()
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
