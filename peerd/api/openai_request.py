"""An OpenAI chat or completions request body, validated: `parse` returns an
`ApiRequest` or raises ApiError(400) naming the bad parameter."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from peerd.api.errors import ApiError
from peerd.api.recall import Note, Recall
from peerd.inference.face import ModelUnavailable
from peerd.inference.options import (
    MAX_COMPLETION_LOGPROBS,
    MAX_GAMMA,
    MAX_STOP_CHARS,
    MAX_TOP_LOGPROBS,
    SpeculativeOptions,
)
from protocols.memory import DOMAIN

MAX_PROMPT_CHARS = 200_000
MAX_MEMORY_K = 32
MAX_N = 8  # choices a request may ask for: each is a generation of its own
# OpenAI parameters peerd does not implement, by what they ask for. Sent at their
# neutral value (what clients that send every field send) they are nothing to refuse;
# any other value would get an answer that silently ignores it.
UNSUPPORTED = {"tools": "function calling", "functions": "function calling",
               "response_format": "a response format", "logit_bias": "logit biases",
               "presence_penalty": "repetition penalties",
               "frequency_penalty": "repetition penalties", "echo": "echoing the prompt",
               "best_of": "best-of sampling (ask for n choices instead)",
               "suffix": "a suffix"}
# What either endpoint reads, and OpenAI's parameters that change nothing here (who
# asks, storage, service tiers, options of what is refused above). Any other name is a
# 400, as OpenAI answers an unrecognised one: a misspelt "max_token" was dropped.
FIELDS = frozenset({
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "seed", "stop", "n", "stream", "stream_options", "logprobs", "top_logprobs",
    "speculative", "memory", *UNSUPPORTED,
    "user", "metadata", "store", "service_tier", "parallel_tool_calls", "tool_choice",
    "function_call", "modalities", "audio", "prediction", "reasoning_effort", "verbosity",
    "prompt_cache_key", "safety_identifier", "web_search_options"})


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
    memory: MemoryAsk | None = None  # notes from the peer's memory before the prompt
    n: int = 1  # choices, each generated on its own (choice i draws with seed + i)


@dataclass(frozen=True, slots=True)
class MemoryAsk:
    """`"memory": true` or `{"k": K, "domain": D}`: put the memory's best items for the
    (last user) message before it; the response lists them under `peerd.memory`."""

    k: int | None = None  # the memory's own top k when None
    domain: str | None = None  # any domain when None


def parse(body: Any, *, chat: bool) -> ApiRequest:
    """Validate an OpenAI request body; ApiError(400) names the bad parameter."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r:.80}: OpenAI's, 'speculative' "
                       "and 'memory' are taken (README, the local API)", param=unknown[0])
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "'model' is required (see GET /v1/models)", param="model")
    for name, what in UNSUPPORTED.items():
        if not _neutral(name, body.get(name)):
            raise ApiError(400, f"peerd does not do {what}: drop '{name}'", param=name)
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
    max_tokens = body.get("max_completion_tokens")  # OpenAI's newer name wins
    max_tokens = body.get("max_tokens") if max_tokens is None else max_tokens
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
    if n is None:
        n = 1
    if not _is_int(n) or not 1 <= n <= MAX_N:
        raise ApiError(400, f"'n' must be an integer from 1 to {MAX_N}", param="n")
    stream = body.get("stream")
    stream = False if stream is None else stream
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false", param="stream")
    options = body.get("stream_options") or {}
    include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    return ApiRequest(chat, model, messages, prompt, max_tokens, temperature, top_p, seed,
                      stops, stream, include_usage, body.get("speculative"),
                      _logprobs(body, chat=chat), parse_memory(body.get("memory")), n)


async def notes_for(recall: Recall | None, ask: MemoryAsk, text: str) -> list[Note]:
    """The memory's notes for `text`, as `ask` asks: what a request's `memory` option
    gives (chat, completions, tasks, plans). ApiError 400 on a peer that keeps no
    memory, 503 while it is opening."""
    if recall is None:
        raise ApiError(400, "this peer keeps no memory to draw on; drop 'memory'",
                       param="memory")
    try:
        return await recall.notes(text, ask.k, ask.domain)
    except ModelUnavailable as exc:
        raise ApiError(503, str(exc), "service_unavailable") from None


def parse_memory(raw: Any) -> MemoryAsk | None:
    """A request's `memory` field; ApiError(400) naming it when malformed."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return MemoryAsk()
    if not isinstance(raw, dict) or set(raw) - {"k", "domain"}:
        raise ApiError(400, "'memory' must be true, false or {\"k\": 1..32, \"domain\": "
                       "name}", param="memory")
    k, domain = raw.get("k"), raw.get("domain")
    if k is not None and (not _is_int(k) or not 1 <= k <= MAX_MEMORY_K):
        raise ApiError(400, f"'memory.k' must be an integer in 1..{MAX_MEMORY_K}",
                       param="memory")
    if domain is not None and (not isinstance(domain, str) or not DOMAIN.fullmatch(domain)):
        raise ApiError(400, "'memory.domain' must be a domain name (a-z 0-9 . _ -, at most "
                       "32)", param="memory")
    return MemoryAsk(k, domain)


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


def speculative_options(raw: Any, default: SpeculativeOptions) -> SpeculativeOptions:
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


def _neutral(name: str, v: Any) -> bool:
    """Whether an UNSUPPORTED parameter's value asks for nothing."""
    if v is None or v == [] or v == {} or v == "" or v == {"type": "text"}:
        return True
    if name in ("presence_penalty", "frequency_penalty"):
        return isinstance(v, int | float) and not isinstance(v, bool) and v == 0
    return (name == "echo" and v is False) or (name == "best_of" and _is_int(v) and v == 1)


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
