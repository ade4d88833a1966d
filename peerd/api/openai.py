"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models.

Any peer that holds the model's head (every model peer does) takes a request,
routes it through the swarm's shards and answers in OpenAI's format, streamed as
Server-Sent Events when asked. Each response also carries a `peerd` object: the
route, tokens/s and where the time went. Errors use OpenAI's error shape.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from peerd.inference.face import (
    Completion,
    LanguageModel,
    ModelUnavailable,
    OnText,
    Refused,
    SwarmUnavailable,
)
from peerd.inference.options import (
    MAX_COMPLETION_LOGPROBS,
    MAX_GAMMA,
    MAX_STOP_CHARS,
    MAX_TOP_LOGPROBS,
    SamplingParams,
    SpeculativeOptions,
)
from peerd.inference.request import GenerationRequest, GenerationStats, TokenLogprob
from peerd.inference.swarm.routing import NoRoute, find_route, servers_by_model
from peerd.inference.text import token_text
from protocols.ledger import LedgerEntry

if TYPE_CHECKING:
    from peerd.inference.slot import ModelSlot

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_PROMPT_CHARS = 200_000


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.body()}, status_code=self.status)

    def body(self) -> dict[str, Any]:
        return {"message": str(self), "type": self.type, "param": self.param, "code": self.code}


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """A validated request, chat or plain."""

    chat: bool
    model: str
    messages: list[dict[str, str]]
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    speculative: Any = None  # the raw "speculative" object; _prepare resolves it
    logprobs: int | None = None  # None: none reported; else alternatives per token


def parse(body: Any, *, chat: bool) -> ApiRequest:
    """Validate an OpenAI request body; ApiError(400) names the bad parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (see GET /v1/models)", param="model")
    messages: list[dict[str, str]] = []
    prompt = ""
    if chat:
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise ApiError(400, "'messages' must be a non-empty list", param="messages")
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant",
                               param="messages")
            messages.append({"role": m["role"], "content": _content(m.get("content"), i)})
        size = sum(len(m["content"]) for m in messages)
    else:
        raw_prompt = body.get("prompt")
        if isinstance(raw_prompt, list) and len(raw_prompt) == 1:
            raw_prompt = raw_prompt[0]
        if not isinstance(raw_prompt, str) or not raw_prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
        prompt = raw_prompt
        size = len(prompt)
    if size > MAX_PROMPT_CHARS:
        raise ApiError(400, f"the prompt is over {MAX_PROMPT_CHARS} characters")
    default_max = 256 if chat else 16
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", default_max))
    max_tokens = default_max if max_tokens is None else max_tokens
    if not _is_int(max_tokens) or not 1 <= max_tokens <= 8192:
        raise ApiError(400, "'max_tokens' must be an integer in 1..8192", param="max_tokens")
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise ApiError(400, "'top_p' must be above 0", param="top_p")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise ApiError(400, "'seed' must be a non-negative integer", param="seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stops = tuple(stop)
    else:
        raise ApiError(400, "'stop' must be a string or a list of strings", param="stop")
    if len(stops) > 4 or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"'stop' takes up to 4 non-empty strings of at most "
                       f"{MAX_STOP_CHARS} characters", param="stop")
    n = body.get("n", 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return ApiRequest(chat, model, messages, prompt, max_tokens, temperature, top_p, seed,
                      stops, stream, include_usage, body.get("speculative"),
                      _logprobs(body, chat=chat))


def _logprobs(body: dict[str, Any], *, chat: bool) -> int | None:
    """How many alternatives per token to report, None for no log-probabilities. Chat:
    "logprobs": bool and "top_logprobs": 0..20; completions: "logprobs": 0..5."""
    if not chat:
        top = body.get("logprobs")
        if top is not None and (not _is_int(top) or not 0 <= top <= MAX_COMPLETION_LOGPROBS):
            raise ApiError(400, f"'logprobs' must be an integer in 0..{MAX_COMPLETION_LOGPROBS}",
                           param="logprobs")
        return top
    wanted, top = body.get("logprobs") or False, body.get("top_logprobs")
    if not isinstance(wanted, bool):
        raise ApiError(400, "'logprobs' must be true or false", param="logprobs")
    if top is not None and (not _is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise ApiError(400, f"'top_logprobs' must be an integer in 0..{MAX_TOP_LOGPROBS}",
                       param="top_logprobs")
    if top is not None and not wanted:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def _speculative(raw: Any, default: SpeculativeOptions) -> SpeculativeOptions:
    """peerd's extension {"draft", "verify", "gamma": int | "auto", "tree": bool}; what
    it leaves out comes from the peer's default (`peerd start --speculative`)."""
    if raw is None:
        return default
    if not isinstance(raw, dict) or set(raw) - {"draft", "verify", "gamma", "tree"}:
        raise ApiError(400, "'speculative' must be an object with draft, verify, gamma and "
                       "tree (e.g. {\"draft\": \"eagle\", \"verify\": \"greedy\", "
                       "\"gamma\": \"auto\"})", param="speculative")
    draft, verify = raw.get("draft", default.draft), raw.get("verify", default.verify)
    gamma = raw.get("gamma", "auto" if default.gamma is None else default.gamma)
    tree = raw.get("tree", default.tree)
    if not isinstance(draft, str) or not isinstance(verify, str):
        raise ApiError(400, "speculative.draft and speculative.verify must be strings",
                       param="speculative")
    if gamma != "auto" and not _is_int(gamma):
        raise ApiError(400, f"speculative.gamma must be an integer in 1..{MAX_GAMMA} or "
                       "\"auto\"", param="speculative")
    if not isinstance(tree, bool):
        raise ApiError(400, "speculative.tree must be true or false", param="speculative")
    try:
        return SpeculativeOptions(draft, verify, None if gamma == "auto" else gamma, tree)
    except ValueError as exc:
        raise ApiError(400, f"speculative: {exc}", param="speculative") from None


def _content(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        if all(isinstance(p, str) for p in parts) and len(parts) == len(content):
            return "".join(parts)  # type: ignore[arg-type]
    raise ApiError(400, f"messages[{i}].content must be text", param="messages")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name, default)
    v = default if v is None else v
    # The range test comes first: math.isfinite overflows on a huge JSON integer.
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi \
            or not math.isfinite(v):
        raise ApiError(400, f"'{name}' must be a number in {lo}..{hi}", param=name)
    return float(v)


def model_layers(entries: Sequence[LedgerEntry], model_id: str) -> int:
    return max((m.num_layers for e in entries for m in e.models if m.model_id == model_id),
               default=0)


def routes(models: ModelSlot) -> list[Route]:
    async def list_models(request: Request) -> Response:
        data = []
        entries = models.ledger.book.entries()
        for model_id, servers in sorted(servers_by_model(entries).items()):
            layers = model_layers(entries, model_id)
            if layers and not isinstance(find_route(servers, layers), NoRoute):
                data.append({"id": model_id, "object": "model", "created": 0,
                             "owned_by": "peerd", "peerd": {"num_layers": layers,
                                                             "servers": len(servers)}})
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(request: Request) -> Response:
        return await _complete(request, chat=True)

    async def completions(request: Request) -> Response:
        return await _complete(request, chat=False)

    async def _complete(request: Request, *, chat: bool) -> Response:
        try:
            body = await read_json(request)
            req = parse(body, chat=chat)
            model = _model(models, req.model)
            prepared = await _prepare(model, req)
        except ApiError as exc:
            return exc.response()
        if req.stream:
            return StreamingResponse(_stream(models.node.nursery, model, req, prepared),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            done = await _run(model, req, prepared, None)
        except ApiError as exc:
            return exc.response()
        return JSONResponse(_final(model, req, done))

    return [
        Route("/v1/models", list_models),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
    ]


async def read_json(request: Request, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The request body as JSON, read with a size cap; ApiError(413/400) otherwise."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > max_bytes:
            raise ApiError(413, f"request body over {max_bytes} bytes")
    try:
        return json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None


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
    spec = _speculative(req.speculative, model.default_speculative)
    try:
        if req.chat:
            return await model.prepare_chat(req.messages, params, spec)
        return await model.prepare_text(req.prompt, params, spec)
    except Refused as exc:
        raise ApiError(400, str(exc), param=exc.param) from None
    except SwarmUnavailable as exc:
        raise ApiError(503, str(exc), "service_unavailable", code=exc.code) from None


async def _run(model: LanguageModel, req: ApiRequest, prepared: GenerationRequest,
               on_text: OnText | None) -> Completion:
    try:
        return await model.complete(prepared, on_text=on_text, logprobs=req.logprobs)
    except SwarmUnavailable as exc:
        raise ApiError(503, str(exc), "service_unavailable", code=exc.code) from None


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


async def _send_quietly(send: trio.MemorySendChannel[tuple[str, Any]],
                        item: tuple[str, Any]) -> None:
    try:
        await send.send(item)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


def _ids(req: ApiRequest) -> tuple[str, str, str]:
    if req.chat:
        return "chatcmpl-" + secrets.token_hex(12), "chat.completion", "chat.completion.chunk"
    return "cmpl-" + secrets.token_hex(12), "text_completion", "text_completion"


def _usage(stats: GenerationStats) -> dict[str, Any]:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
            "total_tokens": stats.prompt_tokens + stats.completion_tokens,
            # as OpenAI reports its prompt caching: prompt tokens not computed again
            "prompt_tokens_details": {"cached_tokens": stats.cached_tokens}}


def _final(model: LanguageModel, req: ApiRequest, done: Completion) -> dict[str, Any]:
    cid, obj, _ = _ids(req)
    choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason,
                              "logprobs": None if req.logprobs is None else _logprobs_json(
                                  model, done.logprobs, chat=req.chat)}
    if req.chat:
        choice["message"] = {"role": "assistant", "content": done.text}
    else:
        choice["text"] = done.text
    return {"id": cid, "object": obj, "created": int(time.time()), "model": model.model_id,
            "choices": [choice], "usage": _usage(done.stats), "peerd": done.stats.to_json()}


async def _stream(nursery: trio.Nursery, model: LanguageModel, req: ApiRequest,
                  prepared: GenerationRequest) -> AsyncIterator[str]:
    """SSE chunks in OpenAI's format, ending with `data: [DONE]`. Generation runs in the
    node's nursery and hands text over a channel, so a client that disconnects stops it."""
    cid, _, chunk_obj = _ids(req)
    created = int(time.time())
    send, recv = trio.open_memory_channel[tuple[str, Any]](64)

    offset = 0  # characters of the tokens reported so far (the legacy text_offset)

    def chunk(delta: dict[str, Any] | str | None, finish: str | None = None,
              logprobs: Sequence[TokenLogprob] | None = None, **extra: Any) -> str:
        nonlocal offset
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
        if logprobs is not None and req.logprobs is not None:
            choice["logprobs"] = found = _logprobs_json(model, logprobs, chat=req.chat,
                                                        offset=offset)
            if found.get("tokens"):
                offset = found["text_offset"][-1] + len(found["tokens"][-1])
        if req.chat:
            choice["delta"] = delta if isinstance(delta, dict) else (
                {"content": delta} if delta else {})
        else:
            choice["text"] = delta if isinstance(delta, str) else ""
        body = {"id": cid, "object": chunk_obj, "created": created, "model": model.model_id,
                "choices": [choice], **extra}
        return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"

    async def produce() -> None:
        async with send:
            async def emit(delta: str, logprobs: Sequence[TokenLogprob]) -> bool:
                try:
                    await send.send(("text", (delta, logprobs)))
                    return True
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return False

            try:
                done = await _run(model, req, prepared, emit)
                await send.send(("done", done.stats))
            except ApiError as exc:
                await _send_quietly(send, ("error", exc))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception:  # runs in the node's nursery: must never escape
                log.exception("streamed generation failed")
                await _send_quietly(send, ("error", ApiError(
                    500, "generation failed on this peer; see its log", "server_error")))

    nursery.start_soon(produce)
    async with recv:
        if req.chat:
            yield chunk({"role": "assistant", "content": ""})
        async for kind, value in recv:
            if kind == "text":
                delta, logprobs = value
                yield chunk(delta, logprobs=logprobs)
            elif kind == "error":
                yield f"data: {json.dumps({'error': value.body()})}\n\n"
            else:
                extra: dict[str, Any] = {"peerd": value.to_json()}
                if req.include_usage:
                    extra["usage"] = _usage(value)
                yield chunk(None, value.finish_reason, **extra)
        yield "data: [DONE]\n\n"
