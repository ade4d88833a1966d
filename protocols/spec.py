"""Protocols declared as data: id, message types, limits, deadlines.

Two shapes: `RequestResponse` (one request, one response, then the stream closes) and
`SessionStream` (an opening exchange, then frames both ways until one side closes).
Handlers in `peerd/` register against these declarations; the serving and calling
code (size caps, strict decoding, deadlines, error replies, the opening handshake) is
written once, in `peerd/rpc.py` and `peerd/streams.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

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


@dataclass(frozen=True, slots=True)
class SessionStream:
    """A long-lived stream protocol: an opening exchange, then frames until CLOSE, EOF
    or a deadline. The shard session is one; a chunked, hashed transfer (a manifest in
    answer to the opening, then chunks) is another.

    The dialer writes one of `opens`; the listener answers `opened`, and the stream is
    open, or it answers one of `refusals` and closes. An opening that is a one-way
    notice gets no answer: which openings are notices is said where the protocol is
    declared. Once open, the dialer writes `dialer_sends` and the listener
    `listener_sends`.

    Size caps: an opening, its answer and a refusal (at any time) are control frames,
    at most `max_control_bytes`; every other frame after the opening may be up to
    `max_data_bytes`. Each side reads with the cap of the largest frame it may get.
    How many sessions a peer holds at once is the serving side's capacity (memory a
    session reserves), not a property of the protocol: it refuses an opening it cannot
    hold with one of `refusals`.
    """

    id: str  # /peerd/<name>/<major>.<minor>.<patch>
    opens: tuple[type[Message], ...]  # the dialer's first frame
    opened: type[Message]  # the listener's acceptance
    refusals: tuple[type[Message], ...]  # the listener's refusal, then it closes; each
    # says why in a `code` (short, stable) and a `message`, as ErrorReply does
    dialer_sends: tuple[type[Message], ...]  # after the opening, dialer -> listener
    listener_sends: tuple[type[Message], ...]  # after the opening, listener -> dialer
    max_control_bytes: int
    max_data_bytes: int
    open_timeout_s: float  # the opening exchange, dial included, on either side
    step_timeout_s: float  # one step: a data frame written and what it causes read back

    def __post_init__(self) -> None:
        if not self.id.startswith("/peerd/"):
            raise ValueError(f"protocol id {self.id!r} must start with /peerd/")
        if not self.opens:
            raise ValueError(f"{self.id}: a session stream needs at least one opening")
        if self.opened in self.refusals:
            raise ValueError(f"{self.id}: {self.opened.__name__} cannot both accept and refuse")
        for refusal in self.refusals:
            names = {f.name for f in fields(refusal)}  # type: ignore[arg-type]
            if not {"code", "message"} <= names:
                raise ValueError(f"{self.id}: refusal {refusal.__name__} needs a code and a "
                                 "message")
        if not 0 < self.max_control_bytes <= self.max_data_bytes:
            raise ValueError(f"{self.id}: need 0 < max_control_bytes <= max_data_bytes")
        if not (self.open_timeout_s > 0 and self.step_timeout_s > 0):
            raise ValueError(f"{self.id}: deadlines must be positive")
