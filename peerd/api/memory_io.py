"""The memory as JSONL: `GET /v1/memory/export` and `POST /v1/memory/import`.

A line is one item: its signed body and signature (base64), its id, and this peer's
statistics. On import every line is verified (signature, id) before anything is kept:
an item signed by this peer comes back with its statistics (a backup restored); any
other goes to the admission desk like a peer's item, because another peer's measured
utility is never taken on its word. A bad line is reported by number and skipped; the
rest go on.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from peerd.memory.item import ItemStats, Record, verify_item
from protocols.errors import PeerError
from protocols.memory import SignedItem

if TYPE_CHECKING:
    from peerd.memory.service import Memory
    from peerd.memory.store import MemoryStore

MAX_REPORTED = 20  # bad lines listed in an import's answer


async def export_lines(store: MemoryStore) -> list[str]:
    out = []
    for rec in await store.records():
        s = rec.stats
        out.append(json.dumps({
            "id": rec.item.id, "body": base64.b64encode(rec.signed.body).decode(),
            "sig": base64.b64encode(rec.signed.sig).decode(), "domain": rec.item.domain,
            "text": rec.item.text,
            "stats": {"weight": s.weight, "admitted_utility": s.admitted_utility,
                      "uses": s.uses, "delta_sum": s.delta_sum, "last_used": s.last_used,
                      "admitted_at": s.admitted_at, "source": s.source}}) + "\n")
    return out


def _stats(raw: Any) -> ItemStats:
    if not isinstance(raw, dict):
        raise ValueError("stats: an object")
    nums = {}
    for name in ("weight", "admitted_utility", "delta_sum", "last_used", "admitted_at"):
        v = raw.get(name)
        if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
            raise ValueError(f"stats.{name}: a finite number")
        nums[name] = float(v)
    uses = raw.get("uses")
    # (SQLite keeps a signed 64-bit integer: a larger one raised OverflowError there)
    if not isinstance(uses, int) or isinstance(uses, bool) or not 0 <= uses < 2**63:
        raise ValueError("stats.uses: a count below 2**63")
    source = raw.get("source", "local")
    if not isinstance(source, str) or len(source) > 128:
        raise ValueError("stats.source: a string")
    return ItemStats(uses=uses, source=source, **nums)


def _text(message: str) -> str:
    """An error's message as the answer can carry it: it may echo a line's values, and a
    JSON line may hold a lone surrogate ("\\ud800"), which no UTF-8 answer encodes: such
    a character is written as its escape."""
    return message[:300].encode("utf-8", "backslashreplace").decode("utf-8")


async def import_lines(memory: Memory, lines: Sequence[str]) -> dict[str, Any]:
    store = memory.live_store()
    restored = queued = known = failed = 0
    bad: list[dict[str, Any]] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("a line is a JSON object")
            signed = SignedItem(body=base64.b64decode(row["body"], validate=True),
                                sig=base64.b64decode(row["sig"], validate=True))
            item = verify_item(signed, item_id=row.get("id"))
            if await store.get(item.id) is not None:
                known += 1
                continue
            if item.author == memory.node.peer_id:
                record = Record(item, signed, _stats(row.get("stats")))
                await store.put(record, (await store.embed([item.text]))[0])
                await store.log("imported", item.id, record.stats.admitted_utility,
                                {"source": "export of this peer"})
                restored += 1
            else:
                await memory.desk().submit(
                    item.text, item.domain, item.kind, source=f"import:{item.author}",
                    item=item, signed=signed)
                queued += 1
        except (ValueError, KeyError, TypeError, binascii.Error, PeerError,
                RecursionError) as exc:
            failed += 1
            if len(bad) < MAX_REPORTED:
                bad.append({"line": lineno, "error": _text(f"{type(exc).__name__}: {exc}")})
    return {"restored": restored, "queued_for_admission": queued, "already_here": known,
            "bad": failed, "bad_lines": bad}
