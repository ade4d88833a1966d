"""Typed tools on the wire: `/peerd/tool/1.0.0` (Gradientsys).

A tool is typed as the Model Context Protocol defines it: a name, a description, an
`inputSchema` and an `outputSchema` (JSON Schema objects). A peer's ledger entry lists
its tools compactly (`ToolBrief`: name, schema hash, capacity); the full schemas and the
calls travel over this protocol, which like MCP has two methods on one endpoint:

- `tools/list`: the caller sends `ToolRequest(method="tools/list")`; the peer answers
  `ToolReply(tools=...)`, every tool's `ToolSpec`.
- `tools/call`: the caller sends `ToolRequest(method="tools/call", call=ToolCall(...))`
  (the tool, the schema hash it validated its arguments against, the arguments, a call
  id and a deadline); the peer answers `ToolReply(result=SignedResult(...))`: the
  canonical bytes of a `CallResult` signed by the executing peer. Every outcome, a
  refusal included, is a signed result, so a caller can tell the callee's word from a
  forgery; a request that does not decode gets the usual `ErrorReply`.

The result names the call id, the caller and the executing peer, so it cannot be
replayed onto another call or to another caller.

A schema hash (`ToolBrief.schema`, `ToolCall.schema`) is the sha256, in hex, of the
canonical JSON (sorted keys, no spaces, UTF-8) of `{"name", "inputSchema",
"outputSchema"}`: it names one version of a tool's contract.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from protocols.codec import Message
from protocols.errors import WireError
from protocols.spec import RequestResponse

MAX_TOOLS = 64  # a peer offers at most this many
MAX_NAME_CHARS = 64
NAME = re.compile(r"[a-zA-Z][a-zA-Z0-9_.-]{0,63}")  # MCP's tool names, bounded
MAX_DESCRIPTION_CHARS = 2000
MAX_SCHEMA_BYTES = 16 * 1024  # canonical JSON of one inputSchema or outputSchema
MAX_ARGUMENTS_BYTES = 64 * 1024  # canonical JSON of one call's arguments
MAX_RESULT_BYTES = 64 * 1024  # canonical JSON of one result: a larger one is refused
MAX_MESSAGE_CHARS = 1000  # an error's message
MAX_CAPACITY = 1024
MAX_CALL_ID_CHARS = 64
MAX_DEADLINE_S = 60.0  # a call's deadline; the callee stops the tool after it
HASH = re.compile(r"[0-9a-f]{64}")

LIST = "tools/list"
CALL = "tools/call"
METHODS = (LIST, CALL)

# A call's outcome, as the executing peer signs it. All but "ok" are observations a
# planner can act on: fix the arguments, fetch the new schema, try another peer.
OK = "ok"
UNKNOWN_TOOL = "unknown_tool"  # this peer offers no tool of that name
SCHEMA_MISMATCH = "schema_mismatch"  # the tool's schema hash is not the one named
INVALID_ARGUMENTS = "invalid_arguments"  # the arguments break the inputSchema
BUSY = "busy"  # the tool is at its capacity: refused at once, never queued
DEADLINE = "deadline"  # the tool did not finish within the call's deadline
TOOL_ERROR = "tool_error"  # the tool refused or raised
INVALID_RESULT = "invalid_result"  # the tool's result breaks its outputSchema
OVERSIZED_RESULT = "oversized_result"  # the result is over MAX_RESULT_BYTES
OUTCOMES = (OK, UNKNOWN_TOOL, SCHEMA_MISMATCH, INVALID_ARGUMENTS, BUSY, DEADLINE,
            TOOL_ERROR, INVALID_RESULT, OVERSIZED_RESULT)


@dataclass(frozen=True, slots=True)
class ToolBrief(Message):
    """One tool as a ledger entry lists it. Part of a long-lived record: tolerant."""

    STRICT = False
    name: str
    schema: str  # the schema hash
    capacity: int = 1  # calls the peer runs at once; beyond it, "busy"


@dataclass(frozen=True, slots=True)
class ToolSpec(Message):
    """One tool in full, as `tools/list` returns it."""

    STRICT = False
    name: str
    description: str
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]
    schema: str  # the schema hash of the above (the caller recomputes it)
    capacity: int = 1


@dataclass(frozen=True, slots=True)
class ToolCall(Message):
    STRICT = True
    call_id: str
    tool: str
    schema: str  # the schema hash the caller validated `arguments` against
    arguments: dict[str, Any]
    deadline_s: float

    def check(self) -> None:
        if not 0 < len(self.call_id) <= MAX_CALL_ID_CHARS:
            raise WireError("call id is empty or too long")
        if not 0 < len(self.tool) <= MAX_NAME_CHARS:
            raise WireError("tool name is empty or too long")
        if not HASH.fullmatch(self.schema):
            raise WireError("schema hash is not 64 lowercase hex digits")
        if not (math.isfinite(self.deadline_s) and 0 < self.deadline_s <= MAX_DEADLINE_S):
            raise WireError(f"deadline {self.deadline_s} s outside (0, {MAX_DEADLINE_S}]")


@dataclass(frozen=True, slots=True)
class ToolRequest(Message):
    KIND = "tool.req"
    method: str  # LIST or CALL
    call: ToolCall | None = None  # with CALL only

    def check(self) -> None:
        if self.method not in METHODS:
            raise WireError(f"method {self.method!r:.40} unknown; one of {', '.join(METHODS)}")
        if (self.call is not None) != (self.method == CALL):
            raise WireError(f"{CALL} takes a call and {LIST} none")
        if self.call is not None:
            self.call.check()


@dataclass(frozen=True, slots=True)
class CallResult(Message):
    """What the executing peer did with one call. Signed by `peer` (SignedResult)."""

    KIND = "tool.result"
    call_id: str
    caller: str  # the peer that asked
    peer: str  # the peer that ran it (the signer)
    tool: str
    schema: str  # the tool's schema hash at this peer (a mismatch says which it has)
    outcome: str  # one of OUTCOMES
    result: dict[str, Any] = field(default_factory=dict)  # with OK: the validated result
    message: str = ""  # otherwise: what went wrong, in words
    elapsed_s: float = 0.0

    def check(self) -> None:
        if self.outcome not in OUTCOMES:
            raise WireError(f"outcome {self.outcome!r:.40} unknown")
        if len(self.message) > MAX_MESSAGE_CHARS:
            raise WireError("error message too long")
        if not math.isfinite(self.elapsed_s) or self.elapsed_s < 0:
            raise WireError("elapsed_s out of range")


@dataclass(frozen=True, slots=True)
class SignedResult(Message):
    KIND = "tool.result.signed"
    body: bytes  # canonical msgpack of a CallResult
    sig: bytes  # the executing peer's ed25519 signature over body


@dataclass(frozen=True, slots=True)
class ToolReply(Message):
    KIND = "tool.reply"
    tools: tuple[ToolSpec, ...] = ()  # to LIST
    result: SignedResult | None = None  # to CALL


TOOL = RequestResponse(
    id="/peerd/tool/1.0.0",
    request=ToolRequest,
    response=ToolReply,
    max_request_bytes=MAX_ARGUMENTS_BYTES + 4096,
    # a list: every tool's two schemas; a result: one result and its envelope
    max_response_bytes=MAX_TOOLS * (2 * MAX_SCHEMA_BYTES + MAX_DESCRIPTION_CHARS * 4 + 512),
    timeout_s=MAX_DEADLINE_S + 10.0,  # the callee answers a late tool at its deadline
    max_concurrent=64,  # the tools' own capacities refuse sooner
    max_concurrent_per_peer=16,
)
