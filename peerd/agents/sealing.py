"""Signed messages: a message's canonical bytes and its author's signature over them.

Bids and answers are kept and shown by the requester, so like ledger entries they
carry their author's ed25519 signature, checked against the public key embedded in
the author's peer id before anything else looks at them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from libp2p.crypto.keys import PrivateKey
from libp2p.peer.id import ID

from protocols.codec import Message, decode, encode
from protocols.errors import PeerError

M = TypeVar("M", bound=Message)


def seal(msg: Message, key: PrivateKey) -> tuple[bytes, bytes]:
    """(body, signature)."""
    body = encode(msg)
    return body, key.sign(body)


def unseal(body: bytes, sig: bytes, cls: type[M], author: Callable[[M], str]) -> M:
    """Decode `body` as `cls` and check `sig` against `author(msg)`'s key. Raises
    PeerError ("malformed", "bad_peer_id", "bad_signature")."""
    msg = decode(body, cls)
    try:
        pub = ID.from_base58(author(msg)).extract_public_key()
    except Exception:
        pub = None
    if pub is None:
        raise PeerError(f"{cls.KIND} author {author(msg)!r:.60} embeds no public key",
                        reason="bad_peer_id")
    try:
        ok = pub.verify(body, sig)
    except Exception:
        ok = False
    if not ok:
        raise PeerError(f"bad signature on a {cls.KIND} of {author(msg)}",
                        reason="bad_signature")
    return msg
