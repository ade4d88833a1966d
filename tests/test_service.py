"""The kernel and the Service shape, on real in-process nodes: what a service adds to
the ledger entry, its routes and status in the API, lookup, a service that fails to
start, and the rule that the kernel imports no system."""

from __future__ import annotations

import ast
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from trio_typing import TaskStatus

from peerd.api.app import create_app
from peerd.identity import ensure_data_dir, load_or_create_key
from peerd.ledger.gossip import LedgerGossip
from peerd.node import open_node
from peerd.service import EntryFields, Service
from tests.harness import book, connect, gossip, has_entry, node_config, swarm, wait_for

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "t0ken"


class Probe(Service):
    """A system that advertises what it is told and serves one route."""

    def __init__(self, name: str, fields: EntryFields, ledger: LedgerGossip | None = None,
                 fail_to_start: bool = False) -> None:
        self.name = name
        self.fields = fields
        self.ledger = ledger
        self.fail_to_start = fail_to_start

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        if self.fail_to_start:
            raise RuntimeError(f"{self.name} cannot start")
        if self.ledger is not None:
            self.ledger.refresh()  # as a system does when others should hear at once
        task_status.started()

    def entry_fields(self) -> EntryFields:
        return dict(self.fields)  # type: ignore[return-value]

    def routes(self) -> Sequence[BaseRoute]:
        async def hello(request: Request) -> Response:
            return JSONResponse({"hello": self.name})

        return [Route(f"/{self.name}", hello)]

    def status(self) -> dict[str, Any]:
        return {f"{self.name}_status": "fine"}


async def test_a_service_advertises_its_fields_from_its_first_entry(tmp_path: Path) -> None:
    async with swarm(2, tmp_path) as (a, b):
        before = book(a).get(a.peer_id)
        await a.start(Probe("probe", {"skills": ("cartography",), "features": ("probe.x",)},
                            gossip(a)))
        own = book(a).get(a.peer_id)
        assert own is not None and before is not None and own.seq > before.seq
        assert own.skills == ("cartography",)
        assert "probe.x" in own.features
        # the other peer learns it over gossip, without a refresh of its own
        await wait_for(lambda: has_entry(b, a.peer_id, skills=("cartography",)), 10,
                       "b to hear a's skills")


async def test_services_started_together_are_in_the_first_entry(tmp_path: Path) -> None:
    """As the daemon starts them: the ledger's first entry, signed as the ledger's
    service starts, already has the fields of the services handed over with it."""
    ensure_data_dir(tmp_path / "n")
    key_pair = load_or_create_key(tmp_path / "n")
    async with open_node(node_config(tmp_path / "n"), key_pair) as node:
        ledger = LedgerGossip(node)
        late = Probe("late", {"features": ("late.x",)})  # never refreshes by itself
        await node.start(ledger, Probe("probe", {"skills": ("first",)}), late)
        assert node.services[0] is ledger and node.services[-1] is late
        own = ledger.book.get(node.peer_id)
        assert own is not None and own.skills == ("first",) and "late.x" in own.features


async def test_features_merge_and_each_other_field_has_one_owner(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with swarm(1, tmp_path) as (a,):
        await a.start(Probe("first", {"skills": ("one",), "features": ("f.a", "f.b")}))
        await a.start(Probe("second", {"skills": ("two",), "features": ("f.b", "f.c")}))
        with caplog.at_level(logging.ERROR, logger="peerd.ledger.gossip"):
            entry = gossip(a).refresh()
        assert entry.skills == ("one",)  # the first owner's value stands
        assert entry.features == ("f.a", "f.b", "f.c")
        assert "both set the ledger field 'skills'" in caplog.text


async def test_a_service_is_found_by_its_type(tmp_path: Path) -> None:
    async with swarm(1, tmp_path) as (a,):
        probe = Probe("probe", {})
        await a.start(probe)
        assert a.service(LedgerGossip) is gossip(a)
        assert a.service(Probe) is probe
        with pytest.raises(LookupError):
            a.service(type("Absent", (Probe,), {}))


async def test_a_service_that_fails_to_start_is_not_kept_and_the_node_goes_on(
        tmp_path: Path) -> None:
    async with swarm(2, tmp_path, connect="none") as (a, b):
        broken = Probe("broken", {"skills": ("never",)}, gossip(a), fail_to_start=True)
        with pytest.raises(RuntimeError, match="broken cannot start"):
            await a.start(broken)
        assert broken not in a.services
        assert "never" not in gossip(a).refresh().skills
        await connect(b, a)  # the kernel and the ledger still serve
        await wait_for(lambda: has_entry(b, a.peer_id) and has_entry(a, b.peer_id), 10)


async def test_the_api_mounts_every_service_behind_the_token(tmp_path: Path) -> None:
    async with swarm(1, tmp_path) as (a,):
        await a.start(Probe("probe", {}))
        app = create_app(a, TOKEN)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://peerd") as client:
            assert (await client.get("/probe")).status_code == 401
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert (await client.get("/probe", headers=auth)).json() == {"hello": "probe"}
            status = (await client.get("/status", headers=auth)).json()
            assert status["probe_status"] == "fine"
            assert status["peer_id"] == a.peer_id and status["ledger_size"] == 1
            ledger = (await client.get("/ledger", headers=auth)).json()
            assert [row["peer_id"] for row in ledger] == [a.peer_id]


KERNEL = ["peerd/node.py", "peerd/host.py", "peerd/service.py", "peerd/events.py",
          "peerd/metrics.py", "peerd/loopback.py", "peerd/turns.py"]
SYSTEMS = ("peerd.ledger", "peerd.inference", "peerd.agents", "peerd.api", "peerd.cli",
           "peerd.daemon")


@pytest.mark.parametrize("module", KERNEL)
def test_the_kernel_imports_no_system(module: str) -> None:
    """STYLE habit 14: a system plugs into the kernel through the Service shape only."""
    tree = ast.parse((ROOT / module).read_text())
    imported = [node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and node.module] + \
               [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names]
    assert not [m for m in imported if m.startswith(SYSTEMS)], imported
