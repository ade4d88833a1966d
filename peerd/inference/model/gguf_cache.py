"""A GGUF file's metadata, parsed once per machine instead of once per process.

Reading a GGUF's config, tokenizer or tensor table parses its whole metadata, the
vocabulary included: seconds each, even for SmolLM2, paid again by every peer, trainer
and test process that loads the file (bench/README.md, "Loading a model"). The tensors
themselves are cheap (memory-mapped, only the bytes a shard needs are dequantised).

So the first load converts the metadata into plain files, in one directory per GGUF
file under the cache root:

    config.json, tokenizer files    transformers' own `save_pretrained` of what it
                                    parsed from the GGUF: loaded back in milliseconds
    tensors.json                    {architecture, tensors: {gguf name: ggml type, byte
                                    offset, numpy dtype and shape}}: gguf-py's reader
                                    table, enough to memory-map each tensor again

The directory is named by a hash of the file's absolute path, the transformers / gguf
versions and this format's version, and a hash of the file's size and modification
time: a file replaced, or a library upgraded, is converted afresh (a replaced file's
older entry is removed); nothing is ever read from an entry that does not match. An entry is written
into a private directory and renamed into place, so concurrent processes each see a
whole entry or none (the loser of a race discards its own). An unreadable entry is
converted again; an unwritable cache root converts into a directory of this process's
own.

The root: $PEERD_CACHE_DIR, else $XDG_CACHE_HOME/peerd, else ~/.cache/peerd.
`peerd cache list` shows the entries (`entries`), `peerd cache clear` removes them.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1  # bump when what an entry holds changes
CONVERTING_S = 3600.0  # a private directory this young may be a conversion under way
TENSORS = "tensors.json"
T = TypeVar("T")


def cache_root() -> Path:
    explicit = os.environ.get("PEERD_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "peerd"


@dataclass(frozen=True, slots=True)
class GGUFTensor:
    """What `gguf.quants.dequantize` needs of one tensor: its raw data (a read-only
    memory-mapped view) and its ggml type."""

    data: np.ndarray[Any, Any]
    tensor_type: Any  # gguf.GGMLQuantizationType


def converted(gguf_path: Path) -> Path:
    """The directory holding `gguf_path`'s config.json, tokenizer files and tensors.json,
    converted now if this machine has not yet."""
    return _converted(str(gguf_path.resolve()))


def is_converted(gguf_path: Path) -> bool:
    """Whether this machine holds `gguf_path`'s conversion (a load will take no seconds
    parsing)."""
    return _complete(cache_root() / "gguf" / _key(gguf_path.resolve()))


def load(gguf_path: Path, loader: Callable[[Path], T]) -> T:
    """`loader(entry)` on `gguf_path`'s converted directory; an entry that cannot be
    loaded (a disk fault, a hand edit) is converted afresh, once."""
    entry = converted(gguf_path)
    try:
        return loader(entry)
    except (OSError, ValueError) as exc:
        log.warning("the cached conversion %s cannot be read (%s); converting again",
                    entry, exc)
        shutil.rmtree(entry, ignore_errors=True)
        _converted.cache_clear()
        return loader(converted(gguf_path))


@functools.lru_cache(maxsize=8)
def _converted(path: str) -> Path:
    entry = cache_root() / "gguf" / _key(Path(path))
    if _complete(entry):
        with contextlib.suppress(OSError):  # `peerd cache list` shows when it was used
            os.utime(entry)
        return entry
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    except OSError as exc:
        log.warning("cannot write the model cache under %s (%s); converting %s for this "
                    "process only (set PEERD_CACHE_DIR to a writable directory)",
                    entry.parent, exc, Path(path).name)
        private = Path(tempfile.mkdtemp(prefix="peerd-gguf-"))
        atexit.register(shutil.rmtree, private, ignore_errors=True)
        _convert(Path(path), private)
        return private
    try:
        _convert(Path(path), work)
        if entry.exists():  # stale (an earlier crash left a part) or a race lost
            if _complete(entry):
                return entry
            shutil.rmtree(entry, ignore_errors=True)
        try:
            work.rename(entry)
        except OSError:  # another process renamed its entry into place first
            if not _complete(entry):
                raise
        _drop_stale(entry, Path(path))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return entry


def _key(path: Path) -> str:
    """"<stem>-<the path's and libraries' hash>-<the file's size and mtime hash>": the
    entries of one file under the same libraries share all but the last part, so a newer
    file's entry replaces the older one. Libraries are in the shared part: two
    environments with different transformers versions keep an entry each instead of
    converting over each other."""
    return f"{_path_prefix(path)}{_file_hash(path)}"


def _file_hash(path: Path) -> str:
    stat = path.stat()
    ident = json.dumps([stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(ident.encode()).hexdigest()[:12]


def _path_prefix(path: Path) -> str:
    import gguf
    import transformers

    gguf_version = getattr(gguf, "__version__", None) or _dist_version("gguf")
    ident = json.dumps([FORMAT, str(path), transformers.__version__, gguf_version])
    return f"{path.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:8]}-"


def _drop_stale(entry: Path, path: Path) -> None:
    """Remove the entries this path had before (an older file, older libraries)."""
    prefix = _path_prefix(path)
    for old in entry.parent.glob(f"{glob_escape(prefix)}*"):
        if old != entry and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _dist_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _complete(entry: Path) -> bool:
    """An entry holds a whole conversion: tensors.json is written last, and parses."""
    try:
        table = json.loads((entry / TENSORS).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(table, dict) and table.get("format") == FORMAT


def _convert(path: Path, into: Path) -> None:
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer

    log.info("parsing %s's metadata once for this machine (seconds; cached in %s)",
             path.name, into.parent)
    config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    config.save_pretrained(str(into))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tokenizer.save_pretrained(str(into))
    reader = GGUFReader(str(path))
    field = reader.fields.get("general.architecture")
    table = {
        "format": FORMAT,
        "source": source_record(path),
        "architecture": None if field is None else str(field.contents()),
        "tensors": {t.name: {"type": int(t.tensor_type), "offset": int(t.data_offset),
                             "dtype": t.data.dtype.str, "shape": list(t.data.shape)}
                    for t in reader.tensors},
    }
    (into / TENSORS).write_text(json.dumps(table))  # last: marks the entry whole


@dataclass(frozen=True, slots=True)
class Entry:
    """One converted file in the cache, as `peerd cache list` shows it."""

    name: str
    source: str | None  # the GGUF it was converted from (None: an entry that predates it)
    state: str  # current | other-libraries (another environment's: its file as it is, its
    # transformers or gguf not ours) | outdated (its file changed) | orphaned (its file is
    # gone) | converting (a process is writing it) | partial (a conversion was killed)
    bytes: int
    used: float  # when a process last converted or read it (unix seconds)


def entries(root: Path | None = None) -> list[Entry]:
    """The cache's entries, oldest use first; a leftover of a crashed conversion too."""
    base = (root or cache_root()) / "gguf"
    found = []
    for entry in sorted(base.iterdir()) if base.is_dir() else []:
        if not entry.is_dir():
            continue
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        source, state = None, "partial"
        if entry.name.startswith("."):  # a conversion's private directory
            if time.time() - entry.stat().st_mtime < CONVERTING_S:
                state = "converting"
        elif _complete(entry):
            src = json.loads((entry / TENSORS).read_text()).get("source") or {}
            source = src.get("path") if isinstance(src, dict) else None
            state = _state(entry, source)
        found.append(Entry(entry.name, source, state, size, entry.stat().st_mtime))
    return sorted(found, key=lambda e: e.used)


def _state(entry: Path, source: str | None) -> str:
    if source is None:
        return "current"  # cannot tell: only a load of its file will
    path = Path(source)
    try:
        if entry.name == _key(path):
            return "current"
        # the file as it is now, converted under other transformers / gguf versions
        return "other-libraries" if entry.name.endswith(_file_hash(path)) else "outdated"
    except OSError:
        return "orphaned"


def remove(names: list[str], root: Path | None = None) -> int:
    """Remove these entries (a process that reads one later converts its file again: a
    running peer has read its entry already); returns the bytes freed."""
    base = (root or cache_root()) / "gguf"
    freed = 0
    for name in names:
        entry = base / name
        if name in ("", ".", "..") or Path(name).name != name or not entry.is_dir():
            raise ValueError(f"{name!r} is not an entry of the model cache {base}")
        freed += sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        shutil.rmtree(entry, ignore_errors=True)
    _converted.cache_clear()
    return freed


def source_record(path: Path) -> dict[str, Any]:
    """What tensors.json records of the file it was converted from."""
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@functools.lru_cache(maxsize=4)
def tensor_table(gguf_path: str) -> tuple[str | None, dict[str, GGUFTensor]]:
    """(gguf architecture, {gguf tensor name: GGUFTensor}) for a GGUF file, each
    tensor's data a view of one read-only memory map: pages are read only when a
    tensor is dequantised."""
    from gguf import GGMLQuantizationType

    table = json.loads((converted(Path(gguf_path)) / TENSORS).read_text())
    raw = np.memmap(gguf_path, dtype=np.uint8, mode="r")
    tensors: dict[str, GGUFTensor] = {}
    for name, t in table["tensors"].items():
        dtype = np.dtype(t["dtype"])
        count = int(np.prod(t["shape"], dtype=np.int64))
        begin = int(t["offset"])
        data = raw[begin:begin + count * dtype.itemsize].view(dtype).reshape(t["shape"])
        tensors[name] = GGUFTensor(data, GGMLQuantizationType(t["type"]))
    return table["architecture"], tensors
