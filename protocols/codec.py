"""Typed, versioned wire messages encoded as canonical msgpack.

Every message is a frozen, slotted dataclass deriving from `Message`. On the wire
it is a msgpack map `{"t": KIND, "v": VERSION, <fields>}`. Encoding is canonical
(map keys sorted at every level, no floats-vs-ints ambiguity beyond msgpack's own)
so the same value always yields the same bytes: signatures are taken over them.

Requests decode strictly (unknown fields, a missing field or another version is a
`WireError`); long-lived records (`STRICT = False`) decode tolerantly, ignoring
fields a newer peer added, so a mixed-version swarm keeps working.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, ClassVar, Self, TypeVar, Union

import msgpack

from protocols.errors import UnsupportedVersion, WireError, WrongMessageType

M = TypeVar("M", bound="Message")


class Message:
    """Base of all wire messages and nested records. Subclass as a frozen dataclass."""

    KIND: ClassVar[str] = ""
    VERSION: ClassVar[int] = 1
    STRICT: ClassVar[bool] = True
    # fields added to a request after it shipped: left off the wire while they hold
    # their default, so a peer that does not know them still accepts the message
    OPTIONAL: ClassVar[frozenset[str]] = frozenset()
    # the most items a list or map field may hold, checked before any item is: a peer's
    # frame of a million tiny items would otherwise hold the event loop for seconds
    # while each is type-checked, only for a later rule to refuse the count
    MAX_ITEMS: ClassVar[Mapping[str, int]] = {}

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            if f.name in self.OPTIONAL and value == f.default:
                continue
            out[f.name] = _to_plain(value)
        if self.KIND:
            out["t"] = self.KIND
            out["v"] = self.VERSION
        return out

    @classmethod
    def from_wire(cls, obj: Any) -> Self:
        if not isinstance(obj, Mapping):
            raise WireError(f"{cls.__name__}: expected a map, got {type(obj).__name__}")
        if cls.KIND:
            if obj.get("t") != cls.KIND:
                raise WrongMessageType(f"expected message {cls.KIND!r}, got {obj.get('t')!r:.60}")
            version = obj.get("v")
            if not isinstance(version, int) or isinstance(version, bool):
                raise WireError(f"{cls.KIND}: missing or bad version field")
            if version != cls.VERSION and (cls.STRICT or version < cls.VERSION):
                raise UnsupportedVersion(
                    f"{cls.KIND}: version {version} not supported (we speak {cls.VERSION})"
                )
        hints = _hints(cls)  # type: ignore[arg-type]
        known = set(hints)
        if cls.STRICT:
            extra = set(obj) - known - {"t", "v"}
            if extra:
                names = sorted(f"{k!s:.40}" for k in extra)
                more = f" and {len(names) - 5} more" if len(names) > 5 else ""
                raise WireError(f"{cls.__name__}: unknown fields {names[:5]}{more}")
        for name, most in cls.MAX_ITEMS.items():
            items = obj.get(name)
            if isinstance(items, list | tuple | Mapping) and len(items) > most:
                raise WireError(f"{cls.__name__}.{name}: {len(items)} items (at most {most})")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name in obj:
                kwargs[f.name] = _check(hints[f.name], obj[f.name], f"{cls.__name__}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise WireError(f"{cls.__name__}: missing field {f.name!r}")
        return cls(**kwargs)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _to_plain(value: Any) -> Any:
    if isinstance(value, Message):
        return value.to_wire()
    if isinstance(value, tuple | list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


def _check(tp: Any, value: Any, where: str) -> Any:
    """Validate `value` against the annotation `tp`, converting lists to tuples."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None):
                if value is None:
                    return None
                continue
            try:
                return _check(arm, value, where)
            except WireError as exc:
                errors.append(str(exc))
        raise WireError(f"{where}: {value!r:.60} matches no allowed type")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise WireError(f"{where}: expected a list")
        return tuple(_check(args[0], v, f"{where}[]") for v in value)
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise WireError(f"{where}: expected a map")
        return {_check(kt, k, f"{where}.key"): _check(vt, v, f"{where}.value")
                for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Message):
        return tp.from_wire(value)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise WireError(f"{where}: expected a number")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise WireError(f"{where}: expected an integer")
    if tp in (str, bytes, bool):
        if type(value) is tp:
            return value
        raise WireError(f"{where}: expected {tp.__name__}")
    raise TypeError(f"{where}: unsupported annotation {tp!r}")  # our bug, not the peer's


def _canonical(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _canonical(value[k]) for k in sorted(value, key=_sort_key)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _sort_key(k: Any) -> tuple[str, Any]:
    return (type(k).__name__, k)


def packb(obj: Any) -> bytes:
    """Canonical msgpack: sorted map keys, bin type for bytes, no ext types."""
    return msgpack.packb(_canonical(obj), use_bin_type=True)  # type: ignore[no-any-return]


# msgpack makes each 1-byte map or array a Python container of 60-70 bytes: a frame of
# nothing else took 72 times its size in memory (16 MiB: 1.2 GB, and a second of CPU).
# A frame may hold one container per BYTES_A_CONTAINER bytes, beyond a floor; honest
# frames hold at most one per 15 bytes (the densest over the suite's protocols, a small
# rollout batch), the large ones one per 26 or more (a ledger snapshot).
CONTAINERS_FLOOR = 1024
BYTES_A_CONTAINER = 8


def unpackb(data: bytes) -> Any:
    budget = CONTAINERS_FLOOR + len(data) // BYTES_A_CONTAINER
    count = 0

    def counted(container: Any) -> Any:
        nonlocal count
        count += 1
        if count > budget:
            raise WireError(f"more than {budget} maps and arrays in a frame of "
                            f"{len(data)} bytes")
        return container

    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True,
                               list_hook=counted, object_hook=counted)
    except WireError:
        raise
    except Exception as exc:  # msgpack raises a zoo of types for garbage
        raise WireError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None


def encode(msg: Message) -> bytes:
    return packb(msg.to_wire())


M2 = TypeVar("M2", bound="Message")
M3 = TypeVar("M3", bound="Message")


@typing.overload
def decode(data: bytes, a: type[M], /) -> M: ...
@typing.overload
def decode(data: bytes, a: type[M], b: type[M2], /) -> M | M2: ...
@typing.overload
def decode(data: bytes, a: type[M], b: type[M2], c: type[M3], /) -> M | M2 | M3: ...
def decode(data: bytes, *expected: type[Message]) -> Message:
    """Decode one message that must be of one of the `expected` types."""
    obj = unpackb(data)
    if not isinstance(obj, Mapping):
        raise WireError("a message must be a msgpack map")
    kind = obj.get("t")
    for cls in expected:
        if kind == cls.KIND:
            return cls.from_wire(obj)
    names = ", ".join(repr(c.KIND) for c in expected)
    raise WrongMessageType(f"unexpected message type {kind!r:.60}; expected one of {names}")
