"""Protocols declared as data: id, request and response types, limits, deadline.

Handlers in `peerd/` register against these declarations; the serving and calling
code (size caps, strict decoding, deadlines, error replies) is written once.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocols.codec import Message


@dataclass(frozen=True, slots=True)
class ErrorReply(Message):
    """Sent instead of a response when a request is refused or fails."""

    KIND = "error"
    code: str  # short, stable: "malformed", "oversized", "busy", "internal", ...
    message: str


@dataclass(frozen=True, slots=True)
class RequestResponse:
    """A one-request, one-response stream protocol."""

    id: str  # /peerd/<name>/<major>.<minor>.<patch>
    request: type[Message]
    response: type[Message]
    max_request_bytes: int
    max_response_bytes: int
    timeout_s: float  # deadline for a whole exchange, both sides
    max_concurrent: int = 32  # streams served at once, all peers together
    max_concurrent_per_peer: int = 4

    def __post_init__(self) -> None:
        if not self.id.startswith("/peerd/"):
            raise ValueError(f"protocol id {self.id!r} must start with /peerd/")
