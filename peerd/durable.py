"""Writing files so that a crash leaves the old version or the new, never half of one:
write beside, fsync, rename into place, fsync the directory. The RL checkpoints, the
memory's index and its baselines use it."""

from __future__ import annotations

import errno
import os
from pathlib import Path


def fsync(path: Path) -> None:
    """Flush a file (or a directory: its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make renames in `path` durable; some filesystems refuse to fsync a directory,
    which is harmless."""
    try:
        fsync(path)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EISDIR):
            raise


def replace_text(path: Path, text: str) -> None:
    """Put `text` at `path` atomically and durably."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
