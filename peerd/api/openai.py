"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

Any peer that holds the model's head (every model peer does) takes a request,
routes it through the swarm's shards and answers in OpenAI's format, streamed as
Server-Sent Events when asked. Each response also carries a `peerd` object: the
route, tokens/s and where the time went; when it is done, the same goes on /events as
`inference.completed` (the web view shows the routes of recent requests). Errors use
OpenAI's error shape.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from peerd.api.errors import ApiError, read_json
from peerd.api.openai_request import ApiRequest, notes_for, parse, speculative_options
from peerd.api.recall import Note, Recall
from peerd.api.server import client_stall_s
from peerd.events import EventBus
from peerd.inference.face import (
    Completion,
    LanguageModel,
    ModelUnavailable,
    OnText,
    Refused,
    SwarmUnavailable,
)
from peerd.inference.options import (
    SamplingParams,
)
from peerd.inference.request import GenerationRequest, GenerationStats, TokenLogprob
from peerd.inference.swarm.routing import NoRoute, find_route, servers_by_model
from peerd.inference.text import token_text
from peerd.memory.prompting import with_notes
from protocols.ledger import LedgerEntry

if TYPE_CHECKING:
    from peerd.inference.slot import ModelSlot

log = logging.getLogger(__name__)



def model_layers(entries: Sequence[LedgerEntry], model_id: str) -> int:
    return max((m.num_layers for e in entries for m in e.models if m.model_id == model_id),
               default=0)


def routes(models: ModelSlot) -> list[Route]:
    def served() -> list[dict[str, Any]]:
        """The models the swarm serves whole (some route covers every layer)."""
        data = []
        entries = models.ledger.book.entries()
        for model_id, servers in sorted(servers_by_model(entries).items()):
            layers = model_layers(entries, model_id)
            if layers and not isinstance(find_route(servers, layers), NoRoute):
                data.append({"id": model_id, "object": "model", "created": 0,
                             "owned_by": "peerd", "peerd": {"num_layers": layers,
                                                             "servers": len(servers)}})
        return data

    async def list_models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": served()})

    async def get_model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        for model in served():
            if model["id"] == model_id:
                return JSONResponse(model)
        return ApiError(404, f"model {model_id!r:.200} is not served by this swarm (see "
                             "GET /v1/models)", param="model",
                        code="model_not_found").response()

    async def chat_completions(request: Request) -> Response:
        return await _complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(request, chat=False)

    async def _complete(request: Request, *, chat: bool) -> Response:
        try:
            body = await read_json(request)
            req = parse(body, chat=chat)
            model = _model(models, req.model)
            req, notes = await _with_memory(models.recall, req)
            prepared = _choices(await _prepare(model, req), req.n)
        except ApiError as exc:
            return exc.response()
        if req.stream:
            return StreamingResponse(_stream(models.node.nursery, model, req, prepared,
                                             notes, models.node.events),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        done: list[Completion | None] = [None] * len(prepared)
        failed: list[ApiError] = []

        async def one(i: int, cancel: trio.CancelScope) -> None:
            try:
                done[i] = await _run(model, req, prepared[i], None, models.node.events)
            except ApiError as exc:
                failed.append(exc)
                cancel.cancel()

        async with trio.open_nursery() as watching:
            watching.start_soon(_until_left, request, watching.cancel_scope, failed)
            async with trio.open_nursery() as nursery:
                for i in range(len(prepared)):
                    nursery.start_soon(one, i, nursery.cancel_scope)
            watching.cancel_scope.cancel()
        if failed:
            return failed[0].response()
        return JSONResponse(_final(model, req, [d for d in done if d is not None], notes))

    return [
        Route("/v1/models", list_models),
        Route("/v1/models/{model_id:path}", get_model),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]


async def _until_left(request: Request, cancel: trio.CancelScope,
                      failed: list[ApiError]) -> None:
    """Cancel `cancel` (the choices' generation) once the client has closed the
    connection: the server says so on `receive`, the body having been read. Without
    it, an abandoned request went on to its last token, for nobody."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    failed.append(ApiError(400, "the client left before the answer"))
    cancel.cancel()


async def _with_memory(recall: Recall | None, req: ApiRequest
                       ) -> tuple[ApiRequest, list[Note] | None]:
    """The request with the memory's notes before its (last user) message, as the
    memory's own replays put them (peerd/memory/prompting.py), and the notes."""
    if req.memory is None:
        return req, None
    users = [i for i, m in enumerate(req.messages) if m["role"] == "user"]
    if req.chat and not users:
        raise ApiError(400, "'memory' needs a user message to draw notes for",
                       param="memory")
    text = req.messages[users[-1]]["content"] if req.chat else req.prompt
    notes = await notes_for(recall, req.memory, text)
    texts = [n.text for n in notes]
    if req.chat:
        messages = [dict(m) for m in req.messages]
        messages[users[-1]]["content"] = with_notes(text, texts)
        return replace(req, messages=messages), notes
    return replace(req, prompt=with_notes(text, texts)), notes


def _model(models: ModelSlot, model: str) -> LanguageModel:
    try:
        return models.face(model)
    except ModelUnavailable as exc:
        if exc.state == "other":
            raise ApiError(404, str(exc), code="model_not_found", param="model") from None
        raise ApiError(503, str(exc), "service_unavailable") from None


async def _prepare(model: LanguageModel, req: ApiRequest) -> GenerationRequest:
    """Tokenise and settle everything that can refuse the request before any streaming
    starts: 400 naming what to change, 503 if the swarm does not cover the model."""
    params = SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature,
                            top_p=req.top_p, seed=req.seed, stop=req.stop)
    spec = speculative_options(req.speculative, model.default_speculative)
    try:
        if req.chat:
            return await model.prepare_chat(req.messages, params, spec)
        return await model.prepare_text(req.prompt, params, spec)
    except Refused as exc:
        raise ApiError(400, str(exc), param=exc.param) from None
    except SwarmUnavailable as exc:
        raise ApiError(503, str(exc), "service_unavailable", code=exc.code,
                       retry_after_s=exc.retry_after_s) from None


def _choices(prepared: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The request of each of `n` choices: choice i draws with the seed + i (a seed
    given), else with a seed of its own; so choice 0 is what n = 1 would answer."""
    params = prepared.params
    return [prepared if i == 0 else replace(prepared, params=replace(
        params, seed=None if params.seed is None else params.seed + i)) for i in range(n)]


async def _run(model: LanguageModel, req: ApiRequest, prepared: GenerationRequest,
               on_text: OnText | None, events: EventBus) -> Completion:
    try:
        done = await model.complete(prepared, on_text=on_text, logprobs=req.logprobs)
    except SwarmUnavailable as exc:
        raise ApiError(503, str(exc), "service_unavailable", code=exc.code,
                       retry_after_s=exc.retry_after_s) from None
    events.publish("inference.completed", **completed_event(model.model_id, req, done.stats))
    return done


def completed_event(model_id: str, req: ApiRequest, stats: GenerationStats
                    ) -> dict[str, Any]:
    """What `inference.completed` says of a finished request: its route (a hop per
    shard: peer and layers [start, end)) and where the time went."""
    return {"model": model_id, "chat": req.chat, "stream": req.stream,
            "route": stats.route, "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "tokens_per_s": round(stats.tokens_per_s, 3), "wall_ms": round(stats.wall_ms, 3),
            "pipeline_ms": round(stats.pipeline_ms, 3),
            "compute_ms": round(stats.compute_ms, 3), "head_ms": round(stats.head_ms, 3),
            "draft_ms": round(stats.draft_ms, 3), "steps": stats.steps,
            "reroutes": stats.reroutes, "cached_tokens": stats.cached_tokens,
            "draft": stats.draft, "finish_reason": stats.finish_reason}


def _logprobs_json(model: LanguageModel, entries: Sequence[TokenLogprob], *, chat: bool,
                   offset: int = 0) -> dict[str, Any]:
    """Log-probabilities in OpenAI's shape: chat's {"content": [{token, logprob, bytes,
    top_logprobs}]}, or the legacy completion's parallel lists (text_offset counted
    from the completion's start, `offset` characters in)."""
    def piece(token: int) -> tuple[str, bytes]:
        data = model.token_bytes(token)
        return token_text(data), data

    if chat:
        def one(token: int, logprob: float) -> dict[str, Any]:
            string, data = piece(token)
            return {"token": string, "logprob": logprob, "bytes": list(data)}

        return {"content": [{**one(e.token, e.logprob),
                             "top_logprobs": [one(t, lp) for t, lp in e.top]}
                            for e in entries], "refusal": None}
    tokens = [piece(e.token)[0] for e in entries]
    offsets = []
    for string in tokens:
        offsets.append(offset)
        offset += len(string)
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{piece(t)[0]: lp for t, lp in e.top} for e in entries],
            "text_offset": offsets}


async def _hand_over(send: trio.MemorySendChannel[tuple[int, str, Any]],
                     item: tuple[int, str, Any]) -> bool:
    """Give the response an item; False if the client has left: it disconnected, or
    it has read nothing for `client_stall_s()` (the channel stayed full), which would
    otherwise hold the generation and its sessions on every peer of the route for as
    long as the client holds its connection."""
    with trio.move_on_after(client_stall_s()):
        try:
            await send.send(item)
            return True
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return False
    return False


def _ids(req: ApiRequest) -> tuple[str, str, str]:
    if req.chat:
        return "chatcmpl-" + secrets.token_hex(12), "chat.completion", "chat.completion.chunk"
    return "cmpl-" + secrets.token_hex(12), "text_completion", "text_completion"


def _usage(stats: Sequence[GenerationStats]) -> dict[str, Any]:
    """The prompt counted once (as OpenAI counts it for n choices), every choice's
    completion tokens."""
    prompt = stats[0].prompt_tokens
    completion = sum(s.completion_tokens for s in stats)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            # as OpenAI reports its prompt caching: prompt tokens not computed again
            "prompt_tokens_details": {"cached_tokens": stats[0].cached_tokens}}


def _peerd(stats: Sequence[GenerationStats], notes: list[Note] | None) -> dict[str, Any]:
    """One choice's route and timings; of several, a list of them under "choices"."""
    out = stats[0].to_json() if len(stats) == 1 else {"choices": [s.to_json() for s in stats]}
    if notes is not None:
        out["memory"] = [n.to_json() for n in notes]
    return out


def _final(model: LanguageModel, req: ApiRequest, done: Sequence[Completion],
           notes: list[Note] | None = None) -> dict[str, Any]:
    cid, obj, _ = _ids(req)
    choices = []
    for i, d in enumerate(done):
        choice: dict[str, Any] = {"index": i, "finish_reason": d.finish_reason,
                                  "logprobs": None if req.logprobs is None else
                                  _logprobs_json(model, d.logprobs, chat=req.chat)}
        if req.chat:
            choice["message"] = {"role": "assistant", "content": d.text}
        else:
            choice["text"] = d.text
        choices.append(choice)
    stats = [d.stats for d in done]
    return {"id": cid, "object": obj, "created": int(time.time()), "model": model.model_id,
            "choices": choices, "usage": _usage(stats), "peerd": _peerd(stats, notes)}


async def _stream(nursery: trio.Nursery, model: LanguageModel, req: ApiRequest,
                  prepared: Sequence[GenerationRequest], notes: list[Note] | None,
                  events: EventBus) -> AsyncIterator[str]:
    """SSE chunks in OpenAI's format, ending with `data: [DONE]`. Each choice's
    generation runs in the node's nursery and hands text over a channel, so a client
    that disconnects, or reads nothing for `client_stall_s()`, stops them; the chunks
    of several choices interleave, each naming its `index`. One choice: its last chunk
    carries the finish reason, `peerd` and the usage asked for. Several: each its own
    last chunk with its `peerd`, then one chunk of no choices with the usage (as OpenAI
    sends it)."""
    cid, _, chunk_obj = _ids(req)
    created = int(time.time())
    send, recv = trio.open_memory_channel[tuple[int, str, Any]](64)
    offsets = [0] * len(prepared)  # characters each choice reported (the legacy text_offset)

    def chunk(index: int, delta: dict[str, Any] | str | None, finish: str | None = None,
              logprobs: Sequence[TokenLogprob] | None = None, **extra: Any) -> str:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish, "logprobs": None}
        if logprobs is not None and req.logprobs is not None:
            choice["logprobs"] = found = _logprobs_json(model, logprobs, chat=req.chat,
                                                        offset=offsets[index])
            if found.get("tokens"):
                offsets[index] = found["text_offset"][-1] + len(found["tokens"][-1])
        if req.chat:
            choice["delta"] = delta if isinstance(delta, dict) else (
                {"content": delta} if delta else {})
        else:
            choice["text"] = delta if isinstance(delta, str) else ""
        return body(choices=[choice], **extra)

    def body(**fields: Any) -> str:
        out = {"id": cid, "object": chunk_obj, "created": created, "model": model.model_id,
               **fields}
        return f"data: {json.dumps(out, separators=(',', ':'))}\n\n"

    left = False  # a choice found the client gone: the stream ends without [DONE]

    async def produce(index: int, send: trio.MemorySendChannel[tuple[int, str, Any]]
                      ) -> None:
        nonlocal left
        async with send:
            async def emit(delta: str, logprobs: Sequence[TokenLogprob]) -> bool:
                nonlocal left
                if left or not await _hand_over(send, (index, "text", (delta, logprobs))):
                    left = True  # the generation stops, as on a disconnect
                return not left

            try:
                done = await _run(model, req, prepared[index], emit, events)
                if not left and not await _hand_over(send, (index, "done", done.stats)):
                    left = True
            except ApiError as exc:
                if not left:
                    await _hand_over(send, (index, "error", exc))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception:  # runs in the node's nursery: must never escape
                log.exception("streamed generation failed")
                if not left:
                    await _hand_over(send, (index, "error", ApiError(
                        500, "generation failed on this peer; see its log", "server_error")))

    async with send:
        for i in range(len(prepared)):
            nursery.start_soon(produce, i, send.clone())
    finished: list[GenerationStats] = []
    async with recv:
        if req.chat:
            for i in range(len(prepared)):
                yield chunk(i, {"role": "assistant", "content": ""})
        async for index, kind, value in recv:
            if kind == "text":
                delta, logprobs = value
                yield chunk(index, delta, logprobs=logprobs)
            elif kind == "error":  # (the others stop as the channel closes)
                yield f"data: {json.dumps({'error': value.body()})}\n\n"
                break
            else:
                finished.append(value)
                extra: dict[str, Any] = {"peerd": _peerd([value], notes)}
                if req.include_usage and len(prepared) == 1:
                    extra["usage"] = _usage([value])
                yield chunk(index, None, value.finish_reason, **extra)
        else:
            if left:  # (a client back from its stall must not take this as the whole)
                return
            if req.include_usage and len(prepared) > 1:
                yield body(choices=[], usage=_usage(finished))
        yield "data: [DONE]\n\n"
