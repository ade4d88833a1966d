"""The ledger over HTTP: `GET /ledger` (every live entry) and `GET /peers` (our
connections, named as the ledger knows them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

if TYPE_CHECKING:
    from peerd.ledger.gossip import LedgerGossip


def routes(gossip: LedgerGossip) -> list[Route]:
    async def ledger(request: Request) -> Response:
        return JSONResponse(gossip.ledger_view())

    async def peers(request: Request) -> Response:
        return JSONResponse(gossip.peers_view())

    return [Route("/ledger", ledger), Route("/peers", peers)]
