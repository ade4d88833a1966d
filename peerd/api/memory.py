"""The memory over HTTP: `/v1/memory` (SEDM, peerd/memory/).

- `POST /v1/memory` {text, domain, kind?, origin?, wait?}: a candidate for admission.
  202 with the candidate (queued, or already refused: a near-duplicate, a full queue);
  with `wait: true`, 200 once it is decided (admitted or refused, with its utility).
- `GET /v1/memory/candidates/{id}`: a candidate as it stands.
- `GET /v1/memory/search?q=&k=&domain=`: the items a task on `q` would be given, best
  first, with similarity, weight and score.
- `GET|DELETE /v1/memory/items/{id}`: one item, or forget it.
- `POST /v1/memory/items/{id}/abstract` {domain, wait?}: this peer's model rewrites the
  item as a general insight, offered to `domain`, where its own replay decides it.
- `GET /v1/memory/stats`: counts by domain, the decision counts, the baseline.
- `GET /v1/memory/log?limit=&action=`: the decision log, newest first.
- `POST /v1/memory/consolidate`: merge, prune and evict now; the decisions.
- `POST /v1/memory/learn` {task, n, seed?, k?}: run n scored tasks with the memory,
  record them and propose what they teach; 202, progress on /events (`memory.learn`);
  `GET /v1/memory/learn` the job; `POST /v1/memory/learn/stop` stops it after the run
  in hand.
- `GET /v1/memory/export`: every item as JSONL (signed body, signature, statistics);
  `POST /v1/memory/import` the same JSONL: items signed by this peer come back as they
  were; any other goes through admission, like a peer's.

Errors are in OpenAI's shape, naming the bad field.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from peerd.api.errors import ApiError, answering, json_object, read_body, read_json
from peerd.inference.face import ModelUnavailable
from peerd.memory.item import Record
from protocols.errors import WireError
from protocols.memory import DOMAIN, ITEM_ID, KINDS, SCEC_HASH

if TYPE_CHECKING:
    from peerd.memory.admissions import Candidate
    from peerd.memory.service import Memory

MAX_BODY_BYTES = 64 * 1024
ADD_FIELDS = frozenset({"text", "domain", "kind", "origin", "wait"})
ABSTRACT_FIELDS = frozenset({"domain", "wait"})
MAX_IMPORT_BYTES = 64 * 2**20
MAX_K = 32
WAIT_S = 600.0


def record_json(rec: Record, **extra: Any) -> dict[str, Any]:
    item, s = rec.item, rec.stats
    return {"id": item.id, "text": item.text, "domain": item.domain, "kind": item.kind,
            "author": item.author, "origin": item.origin or None,
            "parent": item.parent or None, "created": item.created,
            "stats": {"weight": s.weight, "admitted_utility": s.admitted_utility,
                      "uses": s.uses, "delta_sum": s.delta_sum, "last_used": s.last_used,
                      "admitted_at": s.admitted_at, "source": s.source}, **extra}


def routes(memory: Memory) -> list[BaseRoute]:
    from peerd.api.memory_io import export_lines, import_lines
    from peerd.memory.learning import LearnSpec, SpecError

    def store_ready() -> None:
        if memory.store is None:
            raise ApiError(503, "the memory is still opening; try again in a moment",
                           "service_unavailable")

    async def add(request: Request) -> Response:
        store_ready()
        body = json_object(await _body(request), ADD_FIELDS)
        text = _str(body, "text", required=True, max_len=4000)
        domain = _domain(body.get("domain", "general"))
        kind = body.get("kind", "example")
        if kind not in KINDS:
            raise ApiError(400, f"kind: one of {', '.join(KINDS)}", param="kind")
        origin = body.get("origin", "") or ""
        if not isinstance(origin, str) or (origin and not SCEC_HASH.fullmatch(origin)):
            raise ApiError(400, "origin: the hash of a recorded run (64 hex digits)",
                           param="origin")
        wait = _wait(body)
        try:
            c = await memory.propose(text, domain, kind, origin=origin)
        except WireError as exc:
            raise ApiError(400, str(exc), param="text") from None
        return await _answer(c, wait)

    async def candidate(request: Request) -> Response:
        store_ready()
        assert memory.admissions is not None
        c = memory.admissions.get(request.path_params["cid"])
        if c is None:
            raise ApiError(404, "no such candidate here (decided ones are kept for a "
                           "while; `peerd memory log` has them all)", code="not_found")
        return JSONResponse(c.to_json())

    async def search(request: Request) -> Response:
        store_ready()
        q = request.query_params.get("q", "")
        if not q.strip() or len(q) > 4000:
            raise ApiError(400, "q: the text to search for (1..4000 characters)", param="q")
        k = _int_param(request, "k", memory.settings.top_k, 1, MAX_K)
        raw_domain = request.query_params.get("domain")
        domain = _domain(raw_domain) if raw_domain else None
        found = await memory.recall(q, k, domain)
        return JSONResponse([record_json(r.record, similarity=r.similarity,
                                         weight=r.weight, score=r.score) for r in found])

    async def item(request: Request) -> Response:
        store_ready()
        item_id = request.path_params["item_id"]
        if not ITEM_ID.fullmatch(item_id):
            raise ApiError(400, "an item id is 64 hex digits", param="id")
        store = memory.live_store()
        if request.method == "DELETE":
            if not await store.delete(item_id):
                raise ApiError(404, f"no item {item_id[:12]} here", code="not_found")
            await store.log("deleted", item_id, None, {"by": "user"})
            memory.decisions.labels("deleted", "user").inc()
            memory.node.events.publish("memory.deleted", item_id=item_id)
            return JSONResponse({"deleted": item_id})
        rec = await store.get(item_id)
        if rec is None:
            raise ApiError(404, f"no item {item_id[:12]} here", code="not_found")
        return JSONResponse(record_json(rec))

    async def abstract(request: Request) -> Response:
        store_ready()
        item_id = request.path_params["item_id"]
        if not ITEM_ID.fullmatch(item_id):
            raise ApiError(400, "an item id is 64 hex digits", param="id")
        body = json_object(await _body(request), ABSTRACT_FIELDS)
        domain = _domain(body.get("domain"))
        wait = _wait(body)
        try:
            c = await memory.abstract(item_id, domain)
        except KeyError:
            raise ApiError(404, f"no item {item_id[:12]} here", code="not_found") from None
        except ModelUnavailable as exc:
            raise ApiError(503, str(exc), "service_unavailable") from None
        except ValueError as exc:
            raise ApiError(422, str(exc), code="no_insight") from None
        return await _answer(c, wait)

    async def stats(request: Request) -> Response:
        store_ready()
        return JSONResponse(await memory.stats())

    async def decision_log(request: Request) -> Response:
        store_ready()
        limit = _int_param(request, "limit", 50, 1, 10_000)
        action = request.query_params.get("action") or None
        rows = await memory.live_store().decisions(limit, action)
        return JSONResponse([{"seq": d.seq, "at": d.at, "action": d.action,
                              "item_id": d.item_id, "utility": d.utility, **d.detail}
                             for d in rows])

    async def consolidate(request: Request) -> Response:
        store_ready()
        return JSONResponse([a.to_json() for a in await memory.consolidate()])

    async def learn(request: Request) -> Response:
        store_ready()
        if request.method == "GET":
            job = memory.learning
            if job is None:
                raise ApiError(404, "no learning job has run here", code="not_found")
            return JSONResponse(job.to_json())
        body = await _body(request)
        try:
            job = await memory.learn(LearnSpec.parse(body))
        except SpecError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        except ModelUnavailable as exc:
            raise ApiError(503, str(exc), "service_unavailable") from None
        except RuntimeError as exc:
            raise ApiError(409, str(exc), code="busy") from None
        return JSONResponse(job.to_json(), status_code=202)

    async def stop_learning(request: Request) -> Response:
        store_ready()
        job = memory.learning
        if job is None or job.state != "running":
            raise ApiError(409, "no learning job is running here", code="not_running")
        job.stopping = True
        return JSONResponse(job.to_json(), status_code=202)

    async def export(request: Request) -> Response:
        store_ready()
        lines = await export_lines(memory.live_store())
        return Response("".join(lines), media_type="application/x-ndjson")

    async def import_(request: Request) -> Response:
        store_ready()
        raw = await read_body(request, MAX_IMPORT_BYTES,
                              f"an import over {MAX_IMPORT_BYTES} bytes: split it", "import")
        try:
            summary = await import_lines(memory, raw.decode().splitlines())
        except UnicodeDecodeError:
            raise ApiError(400, "the import is not UTF-8 JSONL") from None
        return JSONResponse(summary)

    return [Route("/v1/memory", answering(add), methods=["POST"]),
            Route("/v1/memory/candidates/{cid}", answering(candidate), methods=["GET"]),
            Route("/v1/memory/search", answering(search), methods=["GET"]),
            Route("/v1/memory/items/{item_id}", answering(item), methods=["GET", "DELETE"]),
            Route("/v1/memory/items/{item_id}/abstract", answering(abstract),
                  methods=["POST"]),
            Route("/v1/memory/stats", answering(stats), methods=["GET"]),
            Route("/v1/memory/log", answering(decision_log), methods=["GET"]),
            Route("/v1/memory/consolidate", answering(consolidate), methods=["POST"]),
            Route("/v1/memory/learn", answering(learn), methods=["GET", "POST"]),
            Route("/v1/memory/learn/stop", answering(stop_learning), methods=["POST"]),
            Route("/v1/memory/export", answering(export), methods=["GET"]),
            Route("/v1/memory/import", answering(import_), methods=["POST"])]


def _wait(body: dict[str, Any]) -> bool:
    wait = body.get("wait", False)
    if not isinstance(wait, bool):
        raise ApiError(400, "wait: true or false", param="wait")
    return wait


async def _answer(c: Candidate, wait: bool) -> Response:
    """A candidate: 200 once decided (waiting for it with `wait`), else 202 queued."""
    if wait:
        with trio.move_on_after(WAIT_S):
            await c.done.wait()
    return JSONResponse(c.to_json(), status_code=200 if c.done.is_set() else 202)


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await read_json(request, MAX_BODY_BYTES)
    except ApiError as exc:
        exc.param = exc.param or "body"
        raise
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object", param="body")
    return body


def _str(body: dict[str, Any], name: str, *, required: bool, max_len: int) -> str:
    value = body.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or not value.strip() or len(value) > max_len:
        raise ApiError(400, f"{name}: a non-empty string of at most {max_len} characters",
                       param=name)
    return value


def _domain(value: Any) -> str:
    if not isinstance(value, str) or not DOMAIN.fullmatch(value):
        raise ApiError(400, "domain: 1-32 of a-z 0-9 . _ - (e.g. arithmetic, gsm8k)",
                       param="domain")
    return value


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = lo - 1
    if not lo <= value <= hi:
        raise ApiError(400, f"{name}: an integer in {lo}..{hi}", param=name)
    return value

