"""Errors of the local API in OpenAI's shape, and reading a request body with caps on
its size and on how deeply its JSON nests (Python's parser recurses: a body of 50,000
`[` would otherwise end in a RecursionError, a 500), and refusing the lone surrogates
JSON allows."""

from __future__ import annotations

import itertools
import json
import math
import operator
import re
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

MAX_BODY_BYTES = 1 << 20
MAX_JSON_DEPTH = 32  # nesting of arrays and objects; the deepest body we take needs 4

# a string, or one left open (it runs to the end): every match attempt that starts at a
# quote succeeds, so `sub` stays linear (an unclosed string made it quadratic: each
# escaped quote after it started an attempt that scanned to the end)
_STRING = re.compile(rb'"[^"\\]*(?:\\[\s\S][^"\\]*)*(?:"|\\?\Z)')
_NOT_BRACKETS = bytes(c for c in range(256) if c not in b"[]{}")
# an opening bracket steps 2, a closing one 0: after k brackets, depth = their sum - k
_STEPS = bytes.maketrans(b"[]{}", b"\x02\x00\x02\x00")


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code
        self.retry_after_s = retry_after_s  # sent as Retry-After (whole seconds)

    def response(self) -> JSONResponse:
        headers = (None if self.retry_after_s is None
                   else {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))})
        return JSONResponse({"error": self.body()}, status_code=self.status, headers=headers)

    def body(self) -> dict[str, Any]:
        return {"message": str(self), "type": self.type, "param": self.param, "code": self.code}


def json_object(body: Any, fields: set[str] | frozenset[str]) -> dict[str, Any]:
    """A request body that must be a JSON object of known `fields`; ApiError(400) naming
    the first unknown one."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise ApiError(400, f"unknown parameter {unknown[0]!r}; known: "
                       f"{', '.join(sorted(fields))}", param=unknown[0])
    return body


Endpoint = Callable[[Request], Awaitable[Response]]


def answering(endpoint: Endpoint) -> Endpoint:
    """The endpoint, its ApiError answered in OpenAI's shape (Starlette would make it
    a 500)."""

    async def answer(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as exc:
            return exc.response()

    return answer


async def read_body(request: Request, max_bytes: int, too_big: str = "",
                    what: str = "body") -> bytes:
    """The request body, read with a size cap: ApiError 413 (`too_big`, or saying the
    cap) past it, 400 when the client leaves before the end."""
    raw = bytearray()  # appended in place: `bytes +=` copies the whole body a chunk
    try:
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > max_bytes:
                raise ApiError(413, too_big or f"request body over {max_bytes} bytes")
    except ClientDisconnect:  # nobody reads the answer; not a crash of ours to log
        raise ApiError(400, f"the client left before sending the whole {what}") from None
    return bytes(raw)


async def read_json(request: Request, max_bytes: int = MAX_BODY_BYTES) -> Any:
    """The request body as JSON, read with a size cap; ApiError(413/400) otherwise."""
    raw = await read_body(request, max_bytes)
    if json_depth(raw) > MAX_JSON_DEPTH:
        raise ApiError(400, f"request body nests JSON more than {MAX_JSON_DEPTH} levels deep")
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    try:
        # JSON takes "\ud800" alone (and the parser passes raw surrogate bytes); Python
        # makes a str of it that no tokenizer, signature or store can encode. A whole
        # pair ("\ud83d\ude00") is one character: it encodes.
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise ApiError(400, "request body holds a lone UTF-16 surrogate (a \\ud800-\\udfff "
                       "escape outside a pair), which is not text: send the character "
                       "itself, or both halves of its pair") from None
    return body


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in `raw` (brackets inside strings do not
    count; malformed input gives some number, and the parser refuses it after). In C
    loops only: a megabyte of brackets takes milliseconds."""
    steps = _STRING.sub(b"", raw).translate(_STEPS, _NOT_BRACKETS)
    return max(map(operator.sub, itertools.accumulate(steps), itertools.count(1)), default=0)
