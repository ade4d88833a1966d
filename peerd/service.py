"""The Service shape: the one way a system plugs into a peer.

The node (node.py) is the kernel: the libp2p host, streams, its nursery, connectivity,
RTT and offences. It knows no system. Everything else (the ledger's gossip, the model,
Symphony, and the systems to come) is a `Service`, and plugs in the same way:

- `run(task_status=...)` is started in the node's nursery (`Node.start`). Before
  `task_status.started()` it registers its stream handlers (against declarations in
  `protocols/`) and gossip topics; then it runs its own loops until cancelled.
  Cancellation is shutdown: a service flushes what it keeps in its `finally`, off the
  event loop (`trio.to_thread`, shielded).
- `entry_fields()` is its part of this peer's own ledger entry. The ledger's gossip
  service asks every service the node holds each time it builds the entry: the first
  time as it starts (the daemon hands the node all its services at once, so the first
  entry is whole), then every heartbeat and on `LedgerGossip.refresh()`, which a
  service calls when others should hear of a change at once (a model loaded, skills
  changed). Each field has one owner; `features` are the union of all.
- `routes()` are its routes in the local HTTP API; api/app.py mounts every service's
  behind the bearer token.
- `status()` are its keys in `GET /status`.

A system's CLI group, if it has one, is a module of peerd/cli/. ARCHITECTURE.md has the
steps to add a system.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

import trio
from trio_typing import TaskStatus  # trio-stubs (with libp2p) lack trio.TaskStatus

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from protocols.ledger import Hardware, Load, ModelServed
    from protocols.tool import ToolBrief


class EntryFields(TypedDict, total=False):
    """The fields of `protocols.ledger.LedgerEntry` that services fill in."""

    hardware: Hardware  # the accelerator a model runs on (else the CPU, filled in)
    models: tuple[ModelServed, ...]
    skills: tuple[str, ...]
    load: Load  # sessions and queue; the gossip adds the CPU load
    reputation: dict[str, float]
    features: tuple[str, ...]  # optional wire fields this peer understands
    weights_http_port: int  # where our weight chunks are served over HTTP (0: nowhere)
    tools: tuple[ToolBrief, ...]  # typed tools this peer runs for others


class Service(Protocol):
    """A system on a node. Subclass it to inherit the defaults (no entry fields, no
    routes, no status) and write `run`."""

    name: str  # short and stable: logs, errors

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None: ...

    def entry_fields(self) -> EntryFields:
        return {}

    def routes(self) -> Sequence[BaseRoute]:
        return ()

    def status(self) -> dict[str, Any]:
        return {}
