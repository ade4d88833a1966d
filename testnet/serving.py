"""Waiting until a testnet serves its model: every stage loaded, every ledger aware.

A request can enter at any peer only once (1) every peer has loaded its stage
(GET /status `model.state` is "ready") and (2) every peer's ledger lists every
peer's stage: the entry peer routes from its ledger. Both waits poll with a deadline
and fail with what the user needs: which peer, what it said, the tail of its log.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx

from peerd.identity import read_token
from testnet import procs
from testnet.peer_api import http_client, map_peers
from testnet.plan import ModelPlan
from testnet.state import PeerRecord, RunState, TestnetError

POLL_S = 0.5

Stage = tuple[str, int, int]  # (peer id, layer_start, layer_end) as a ledger lists it


def raise_if_exited(records: list[PeerRecord], doing: str) -> None:
    """TestnetError with the log tail of the first of `records` whose process is gone."""
    procs.reap()
    for rec in records:
        if not rec.proc.alive:
            raise TestnetError(f"{rec.name} exited {doing}; last lines of {rec.log_path}:\n"
                               f"{procs.tail(rec.log_path)}")


def wait_models_ready(state: RunState, plan: ModelPlan, deadline: float, timeout_s: float) -> None:
    """Until every peer's model slot is "ready"; TestnetError on "failed", on a peer
    that exits, or at `deadline` (`timeout_s` is what the message reports)."""
    pending = list(state.peers)
    while pending:
        raise_if_exited(pending, f"while loading {plan.spec}")
        models = map_peers(pending, model_status)
        for rec, model in zip(pending, models, strict=True):
            if model.get("state") == "failed":
                raise TestnetError(
                    f"{rec.name} could not load layers {_span(rec.layers)} of {plan.spec}: "
                    f"{model.get('error') or 'no reason given'}; last lines of "
                    f"{rec.log_path}:\n{procs.tail(rec.log_path)}"
                )
        left = [(rec, m) for rec, m in zip(pending, models, strict=True)
                if m.get("state") != "ready"]  # fmt: skip
        pending = [rec for rec, _ in left]
        if pending and time.monotonic() > deadline:
            doing = "; ".join(
                f"{rec.name}: {m.get('state', 'no answer')} {m.get('phase', '')}".rstrip()
                for rec, m in left
            )
            slow = pending[0]
            raise TestnetError(
                f"the model was not ready on every peer within {timeout_s:.0f} s ({doing}); "
                f"pass a longer --model-timeout-s or fewer --peers. Last lines of "
                f"{slow.log_path}:\n{procs.tail(slow.log_path)}"
            )
        if pending:
            time.sleep(POLL_S)


def wait_ledgers_list_models(
    state: RunState, plan: ModelPlan, deadline: float, timeout_s: float
) -> None:
    """Until every peer's ledger lists every peer's stage of the model."""
    want = {(rec.peer_id, *rec.layers) for rec in state.peers if rec.layers is not None}
    names = {rec.peer_id: rec.name for rec in state.peers}
    pending = list(state.peers)
    while pending:
        held = map_peers(pending, lambda rec: stages_in_ledger(rec, plan.model_id))
        missing = {rec.name: want - stages for rec, stages in zip(pending, held, strict=True)}
        pending = [rec for rec in pending if missing[rec.name]]
        if pending and time.monotonic() > deadline:
            rec = pending[0]
            lacks = ", ".join(
                f"{names.get(pid, pid)} [{a}, {b})" for pid, a, b in sorted(missing[rec.name])
            )
            raise TestnetError(
                f"every peer loaded its stage, but after {timeout_s:.0f} s {rec.name}'s "
                f"ledger still lacks {lacks}: gossip does not reach it; see {rec.log_path}"
            )
        if pending:
            time.sleep(POLL_S / 2)


def model_status(rec: PeerRecord) -> dict[str, Any]:
    """The `model` object of the peer's GET /status; {} if the peer did not answer."""
    model = _get(rec, "/status")
    model = model.get("model") if isinstance(model, dict) else None
    return model if isinstance(model, dict) else {}


def stages_in_ledger(rec: PeerRecord, model_id: str) -> set[Stage]:
    """Every stage of `model_id` that rec's ledger lists; empty if it did not answer."""
    entries = _get(rec, "/ledger")
    if not isinstance(entries, list):
        return set()
    return {(e["peer_id"], m["layer_start"], m["layer_end"])
            for e in entries for m in e.get("models") or []
            if m.get("model_id") == model_id}  # fmt: skip


def _get(rec: PeerRecord, path: str) -> Any:
    token = read_token(Path(rec.data_dir)) or ""
    try:
        reply = http_client().get(
            rec.api + path, timeout=5.0, headers={"Authorization": f"Bearer {token}"}
        )
        reply.raise_for_status()
        return reply.json()
    except (httpx.HTTPError, ValueError):
        return None


def _span(layers: tuple[int, int] | None) -> str:
    return f"[{layers[0]}, {layers[1]})" if layers else "(none)"
