"""Signed messages: a message's canonical bytes and its author's signature over them.

Bids and answers are kept and shown by the requester, so like ledger entries they
carry their author's ed25519 signature, checked against the public key embedded in
the author's peer id before anything else looks at them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from libp2p.crypto.keys import PrivateKey, PublicKey
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
    check_signature(author(msg), body, sig, f"a {cls.KIND}")
    return msg


def check_signature(peer_id: str, body: bytes, sig: bytes, what: str) -> None:
    """`sig` is `peer_id`'s over `body` (`what` names it in the error), checked against
    the key embedded in the peer id; callers that know the signer check this before
    decoding. PeerError ("bad_peer_id", "bad_signature") otherwise."""
    pub = _public_key(peer_id)
    if pub is None:
        raise PeerError(f"{what}'s author {peer_id!r:.60} embeds no public key",
                        reason="bad_peer_id")
    try:
        ok = pub.verify(body, sig)
    except Exception:
        ok = False
    if not ok:
        raise PeerError(f"bad signature on {what} of {peer_id:.60}", reason="bad_signature")


@functools.lru_cache(maxsize=64)
def _public_key(peer_id: str) -> PublicKey | None:
    try:
        return ID.from_base58(peer_id).extract_public_key()
    except Exception:
        return None
