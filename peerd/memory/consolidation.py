"""Consolidation, applied: the controller's plan (merge near-duplicates, prune what
decayed under the floor, evict above the cap) carried out on the store.

The plan is pure (controller.plan_consolidation); this module gathers what it needs
(every item and its near neighbours from the index) and applies each decision in the
plan's order, logging each in the store's decision log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from peerd.memory.controller import ControllerSettings, Merge, plan_consolidation

if TYPE_CHECKING:
    from peerd.memory.store import MemoryStore

NEIGHBOURS = 4  # index hits per item looked at for near-duplicates


@dataclass(frozen=True, slots=True)
class Applied:
    action: str  # merged, pruned, evicted
    item_id: str  # the item removed
    detail: dict[str, Any]
    message: str

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "item_id": self.item_id, "message": self.message,
                **self.detail}


async def run(store: MemoryStore, now: float, settings: ControllerSettings, *,
              merges: bool = True) -> list[Applied]:
    """Plan and apply; without `merges`, only prune and evict (no neighbour searches:
    what an admission that took the store over its cap needs at once)."""
    records = await store.records()
    neighbours: dict[str, list[tuple[str, float]]] = {}
    for rec in records if merges else ():
        vector = await store.embedding(rec.item.id)
        if vector is None:
            continue
        hits = await store.search(vector, NEIGHBOURS + 1, rec.item.domain,
                                  exclude=(rec.item.id,))
        neighbours[rec.item.id] = [(r.item.id, s) for r, s in hits
                                   if s >= settings.merge_threshold]
    applied: list[Applied] = []
    for decision in plan_consolidation(records, neighbours, now, settings):
        if isinstance(decision, Merge):
            await store.update_stats(decision.keep, decision.stats)
            removed = decision.drop
        else:
            removed = decision.item_id
        detail = {k: v for k, v in decision.detail().items() if k != "stats"}
        await store.delete(removed)
        await store.log(decision.action, removed, None, detail)
        applied.append(Applied(decision.action, removed, detail, str(decision)))
    return applied
