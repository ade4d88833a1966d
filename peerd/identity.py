"""The peer's identity: an ed25519 key persisted in the data dir (mode 0600).

The key fixes the peer id. A key file that exists but cannot be read is an error
naming the file, never a silently minted new identity: other peers know us by it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.identity_utils import load_identity, save_identity
from libp2p.peer.id import ID

from peerd.datadir import KEY_FILE as KEY_FILE
from peerd.datadir import TOKEN_FILE as TOKEN_FILE
from peerd.datadir import read_token as read_token


class IdentityError(RuntimeError):
    """The identity key or API token file exists but is unusable."""


def ensure_data_dir(data_dir: Path) -> None:
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise IdentityError(f"cannot create data dir {data_dir}: {exc.strerror}") from None
    if not os.access(data_dir, os.W_OK):
        raise IdentityError(f"data dir {data_dir} is not writable")


def load_or_create_key(data_dir: Path) -> KeyPair:
    path = data_dir / KEY_FILE
    if not path.exists():
        ensure_data_dir(data_dir)
        kp = create_new_key_pair()
        save_identity(kp, path)
        return kp
    try:
        kp = load_identity(path)
    except (OSError, ValueError) as exc:
        raise IdentityError(
            f"identity key {path} is unreadable or corrupt ({exc}). Restore it from a "
            "backup, or delete it to start as a NEW peer with a new peer id."
        ) from None
    if kp.private_key.get_type().name != "Ed25519":
        raise IdentityError(f"identity key {path} is not an ed25519 key")
    return kp


def peer_id_of(kp: KeyPair) -> ID:
    return ID.from_pubkey(kp.public_key)


def load_or_create_token(data_dir: Path) -> str:
    """The bearer token for the local API, created at first start (0600)."""
    path = data_dir / TOKEN_FILE
    if path.exists():
        try:
            token = path.read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise IdentityError(f"API token file {path} is unreadable: {exc}") from None
        if len(token) < 16 or not token.isascii() or not token.isprintable():
            raise IdentityError(
                f"API token file {path} is corrupt; delete it and restart to make a new one"
            )
        return token
    ensure_data_dir(data_dir)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, token.encode() + b"\n")
    finally:
        os.close(fd)
    return token
