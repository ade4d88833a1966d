"""Two exception families (STYLE.md habit 5).

`PeerError`: the remote peer misbehaved (bad frame, forged signature, wrong type).
Count it against that peer, reply with an error, close the stream, keep serving.
Anything else raised while handling a request is our own bug: log it loudly, fail
that one request, keep serving.
"""

from __future__ import annotations


class PeerError(Exception):
    """The remote peer sent something it must not. `reason` is a short metric label."""

    reason: str = "peer_error"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class WireError(PeerError):
    """A frame or message that does not decode to what the protocol allows."""

    reason = "malformed"


class FrameTooLarge(WireError):
    reason = "oversized"


class WrongMessageType(WireError):
    reason = "wrong_type"


class UnsupportedVersion(WireError):
    reason = "unsupported_version"


class RemoteError(Exception):
    """The remote peer answered our request with an error reply."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
