"""`read_file`'s rule: a file inside one configured directory, and nothing else.

Refused, each with words that say why: an absolute path; a path with a `..` part; a
path that resolves outside the directory (a symlink out of it, at any depth); what is
not a regular file; a file over MAX_FILE_BYTES. The file is opened by its resolved path
with O_NOFOLLOW and checked again by its descriptor (a symlink swapped in after the
check is not followed). At most `max_bytes` of it are returned; the result says when
it was cut.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

MAX_FILE_BYTES = 8 * 2**20  # a larger file is refused, not read in part
MAX_RETURN_BYTES = 32 * 1024  # the most one call returns (under the wire's result cap)
MAX_PATH_CHARS = 1024


class ReadRefused(Exception):
    """The path is not one read_file may read; the message says why."""


@dataclass(frozen=True, slots=True)
class Read:
    path: str  # as asked, relative to the directory
    size: int  # of the whole file, in bytes
    text: str  # its first max_bytes, decoded as UTF-8 (bad bytes replaced)
    truncated: bool


def resolve_inside(root: Path, path: str) -> Path:
    """The real path of `path` under `root`, or ReadRefused."""
    if not path or len(path) > MAX_PATH_CHARS or "\x00" in path:
        raise ReadRefused(f"a path of 1..{MAX_PATH_CHARS} characters, without NUL, please")
    pure = PurePosixPath(path)
    if pure.is_absolute() or path.startswith("~"):
        raise ReadRefused(f"{path!r:.100} is absolute: give a path relative to the tools "
                          "directory")
    if ".." in pure.parts:
        raise ReadRefused(f"{path!r:.100} climbs out with '..': paths stay inside the tools "
                          "directory")
    base = root.resolve()
    try:
        real = (base / pure).resolve(strict=True)
    except FileNotFoundError:
        raise ReadRefused(f"no file {path!r:.100} in the tools directory") from None
    except (OSError, RuntimeError) as exc:  # a symlink loop, a permission
        raise ReadRefused(f"{path!r:.100} cannot be resolved: {exc}") from None
    if not real.is_relative_to(base):
        raise ReadRefused(f"{path!r:.100} leads outside the tools directory (a symlink out "
                          "of it)")
    return real


def read_inside(root: Path, path: str, max_bytes: int) -> Read:
    """Read `path` under `root` by the rules above (blocking: run it in a thread)."""
    real = resolve_inside(root, path)
    try:
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ReadRefused(f"{path!r:.100} cannot be opened: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ReadRefused(f"{path!r:.100} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as f:
        if info.st_size > MAX_FILE_BYTES:
            raise ReadRefused(f"{path!r:.100} is {info.st_size} bytes; read_file reads files "
                              f"of at most {MAX_FILE_BYTES}")
        data = f.read(max_bytes + 1)
    return Read(path=path, size=info.st_size,
                text=data[:max_bytes].decode("utf-8", errors="replace"),
                truncated=len(data) > max_bytes)
