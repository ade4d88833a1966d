"""A JSON Schema compiled into what the automaton (automaton.py) writes: compact JSON
(no whitespace), objects' properties in schema order, every size bounded.

The subset understood: type (one or a list), object (properties, required;
additionalProperties false or a schema), string (minLength, maxLength), integer
(minimum, maximum, exclusive ones: enforced exactly), number (a sign and digit caps
only), boolean, null, array (items, minItems, maxItems), enum and const of any JSON
value, anyOf and oneOf, allOf of one schema, local $ref. Anything else (pattern,
format, prefixItems, not, if/then, ...) is either ignored within a known type or
becomes "any JSON value", bounded; the result is validated against the schema
afterwards in any case. Pure: no torch, no I/O.

The grammar is a graph, not a tree: a subschema is compiled once per depth and shared
by every use there (recursion is unrolled to MAX_DEPTH, a shared node per level), and
an anyOf holds its branches' anyOfs merged. Its size, as `grammar_size` counts it,
grows with the schema's text and is capped at MAX_NODES: past it the schema is any
JSON value (a peer's tool is refused before that: plans/service.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

STRING_CAP = 128  # characters of a string with no maxLength
ARRAY_CAP = 16  # items of an array with no maxItems
ANY_DEPTH = 2  # nesting of a value of a schema we do not understand
ANY_MEMBERS = 8  # members of such an object or array
INT_DIGITS = 15  # digits of an unbounded integer (exact in a double)
NUMBER_DIGITS = (12, 6, 2)  # integer part, fraction, exponent
MAX_DEPTH = 12  # $ref and nesting, beyond which values are scalars
MAX_NODES = 100_000  # of one schema's grammar, as `grammar_size` counts it


def dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@dataclass(eq=False)
class Node:
    """A compiled schema; `shortest`: the fewest characters of a whole value."""

    shortest: int = field(init=False, default=0)


@dataclass(eq=False)
class Literal(Node):
    texts: tuple[str, ...]

    def __post_init__(self) -> None:
        self.shortest = min(len(t) for t in self.texts)


@dataclass(eq=False)
class String(Node):
    min_length: int = 0
    max_length: int = STRING_CAP

    def __post_init__(self) -> None:
        self.shortest = 2 + self.min_length


@dataclass(eq=False)
class Integer(Node):
    low: int
    high: int
    max_digits: int

    def __post_init__(self) -> None:
        self.shortest = integer_completion(self, False, 0, 0)


@dataclass(eq=False)
class Number(Node):
    negative: bool = True
    int_digits: int = NUMBER_DIGITS[0]
    frac_digits: int = NUMBER_DIGITS[1]
    exp_digits: int = NUMBER_DIGITS[2]

    def __post_init__(self) -> None:
        self.shortest = 1


@dataclass(eq=False)
class AnyOf(Node):
    branches: tuple[Node, ...]

    def __post_init__(self) -> None:
        self.shortest = min(b.shortest for b in self.branches)


@dataclass(eq=False)
class Array(Node):
    item: Node
    min_items: int = 0
    max_items: int = ARRAY_CAP

    def __post_init__(self) -> None:
        self.shortest = 2 + self.min_items * self.item.shortest + max(0, self.min_items - 1)


@dataclass(eq=False)
class FreeObject(Node):
    value: Node
    max_members: int = ANY_MEMBERS
    key: String = field(default_factory=lambda: String(0, 64))

    def __post_init__(self) -> None:
        self.shortest = 2


@dataclass(eq=False)
class Object(Node):
    """Declared properties in order: their quoted keys, value nodes, required flags."""

    keys: tuple[str, ...]
    values: tuple[Node, ...]
    required: tuple[bool, ...]
    _windows: list[tuple[int, ...]] = field(init=False, repr=False)
    _rest: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        n = len(self.keys)
        # the properties that may come next after property `at - 1`: up to and
        # including the first required one (a required property is never skipped)
        self._windows = []
        for at in range(n + 1):
            j, window = at, []
            while j < n:
                window.append(j)
                if self.required[j]:
                    break
                j += 1
            self._windows.append(tuple(window))
        # characters to close once properties before `at` are written, writing only
        # the required ones left (each after a comma)
        self._rest = [1] * (n + 1)
        for at in range(n - 1, -1, -1):
            member = 1 + len(self.keys[at]) + 1 + self.values[at].shortest
            self._rest[at] = self._rest[at + 1] + (member if self.required[at] else 0)
        self.shortest = 1 + self._rest[0] - (1 if any(self.required) else 0)

    def window(self, at: int) -> tuple[int, ...]:
        return self._windows[at]

    def may_close(self, at: int) -> bool:
        return not any(self.required[at:])

    def rest(self, at: int) -> int:
        return self._rest[at]


# ---- integers within bounds ----------------------------------------------------------

def _spans(negative: bool, value: int, digits: int, most: int
           ) -> Iterator[tuple[int, int, int]]:
    """(more digits, lowest, highest) signed values reachable from a prefix."""
    if digits == 0:
        spans = [(k, 0 if k == 1 else 10 ** (k - 1), 10 ** k - 1) for k in range(1, most + 1)]
    elif value == 0:
        spans = [(0, 0, 0)]  # a leading zero is the whole number
    else:
        spans = [(k, value * 10 ** k, (value + 1) * 10 ** k - 1)
                 for k in range(most - digits + 1)]
    for k, lo, hi in spans:
        yield (k, -hi, -lo) if negative else (k, lo, hi)


def feasible_integer(node: Integer, negative: bool, value: int, digits: int) -> bool:
    return any(lo <= node.high and hi >= node.low
               for _, lo, hi in _spans(negative, value, digits, node.max_digits))


def integer_completion(node: Integer, negative: bool, value: int, digits: int) -> int:
    """Characters to an in-range integer from a prefix (the start: 0 digits, no '-')."""
    def first(neg: bool) -> int:
        return min((k for k, lo, hi in _spans(neg, value, digits, node.max_digits)
                    if lo <= node.high and hi >= node.low), default=10 ** 6)

    if digits == 0 and not negative:
        return min(first(False), 1 + first(True) if node.low < 0 else 10 ** 6)
    return first(negative)


# ---- the compiler ----------------------------------------------------------------------

_ANY: dict[int, Node] = {}


def any_value(depth: int = ANY_DEPTH) -> Node:
    """Any JSON value, bounded: strings of STRING_CAP, arrays and objects of
    ANY_MEMBERS, nested `depth` deep."""
    if depth not in _ANY:
        scalars: list[Node] = [String(), Number(), Literal(("true", "false", "null"))]
        if depth > 0:
            inner = any_value(depth - 1)
            scalars += [Array(inner, 0, ANY_MEMBERS), FreeObject(inner, ANY_MEMBERS)]
        _ANY[depth] = AnyOf(tuple(scalars))
    return _ANY[depth]


def compile_schema(schema: Any, root: Any = None, *, string_cap: int = STRING_CAP,
                   depth: int = 0) -> Node:
    """`schema` as a node; `root`: the document its local $refs point into. A schema
    whose grammar would pass MAX_NODES nodes is any bounded value instead (validated
    afterwards all the same); where a tool can be refused, `grammar_size` says so first."""
    try:
        return _Compiler(schema if root is None else root, string_cap).compile(schema, depth)
    except GrammarTooLarge:
        return any_value()


def grammar_size(schema: Any, *, string_cap: int = STRING_CAP) -> int:
    """The size of `schema`'s grammar, as its compile counts it: each subschema compiled
    (once per depth), each reference to one (a property, an item, a branch, a $ref),
    each branch gathered into an anyOf; GrammarTooLarge past MAX_NODES."""
    compiler = _Compiler(schema, string_cap)
    compiler.compile(schema, 0)
    return compiler.size


class GrammarTooLarge(ValueError):
    """A schema whose grammar passes MAX_NODES (counted as `grammar_size` does)."""


class _Compiler:
    """One schema's compile. Each subschema is compiled once per depth and its node
    shared by every use at that depth ($refs to one definition, above all), and an
    anyOf's branches that are anyOfs are merged into it, each node once (the automaton
    starts an anyOf as all its branches' starts: the same set). Copied at every use
    and nested, a grammar grew as the product of the anyOfs it went through: an anyOf
    of k references to itself was k**6 nodes by MAX_DEPTH, started k**6 ways. Shared
    and merged, it grows with the schema's text, which `size` caps all the same."""

    def __init__(self, root: Any, string_cap: int, max_nodes: int = MAX_NODES) -> None:
        self.root, self.string_cap, self.max_nodes = root, string_cap, max_nodes
        self.size = 0  # subschemas compiled, subschemas referred to, branches gathered
        # (id of a subschema, depth) -> (the subschema, held so that its id stays its
        # own while we compile: a `type` list's variants are made here, then dropped)
        self._done: dict[tuple[int, int], tuple[Any, Node]] = {}

    def compile(self, schema: Any, depth: int) -> Node:
        if depth > MAX_DEPTH or not isinstance(schema, dict) or not schema:
            return any_value(0 if depth > MAX_DEPTH else ANY_DEPTH)
        done = self._done.get((id(schema), depth))
        if done is not None:
            return done[1]
        self._grow(1)
        node = self._compile(schema, depth)
        self._done[id(schema), depth] = (schema, node)
        return node

    def _grow(self, by: int) -> None:
        self.size += by
        if self.size > self.max_nodes:
            raise GrammarTooLarge(f"its grammar passes {self.max_nodes} nodes (anyOfs "
                                  "multiplied through $refs?)")

    def _any_of(self, nodes: Iterable[Node]) -> AnyOf:
        gathered: list[Node] = []
        for node in nodes:
            branches = node.branches if isinstance(node, AnyOf) else (node,)
            self._grow(len(branches))  # before they are copied: each may be many
            gathered += branches
        return AnyOf(tuple(dict.fromkeys(gathered)))  # nodes hash by identity (eq=False)

    def _compile(self, schema: dict[str, Any], depth: int) -> Node:
        def sub(s: Any) -> Node:
            self._grow(1)
            return self.compile(s, depth + 1)

        if "const" in schema:
            return Literal((dump(schema["const"]),))
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return Literal(tuple(dict.fromkeys(dump(v) for v in schema["enum"])))
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = _resolve(self.root, ref)
            return sub(target) if target is not None else any_value()
        for key in ("anyOf", "oneOf"):  # oneOf's exclusivity is left to the validator
            if isinstance(schema.get(key), list) and schema[key]:
                return self._any_of(sub(s) for s in schema[key])
        if isinstance(schema.get("allOf"), list) and len(schema["allOf"]) == 1:
            return sub(schema["allOf"][0])
        kind = schema.get("type")
        if isinstance(kind, list) and kind:
            return self._any_of(sub({**schema, "type": k}) for k in dict.fromkeys(kind))
        if kind is None:
            kind = "object" if "properties" in schema else \
                "array" if "items" in schema else None
        if kind == "string":
            shortest = _int(schema.get("minLength"), 0)
            return String(shortest, max(shortest, _int(schema.get("maxLength"),
                                                       self.string_cap)))
        if kind == "integer":
            return _integer(schema)
        if kind == "number":
            low = _num(schema, "minimum", "exclusiveMinimum")
            high = _num(schema, "maximum", "exclusiveMaximum", upper=True)
            if low is None and high is None:
                return Number()
            # bounded: no exponent, the integer part no longer than the bounds' (the
            # validator judges the rest)
            most = max(len(str(abs(b))) for b in (low, high) if b is not None)
            return Number(negative=low is None or low < 0, int_digits=most, exp_digits=0)
        if kind == "boolean":
            return Literal(("true", "false"))
        if kind == "null":
            return Literal(("null",))
        if kind == "array":
            items = schema.get("items")
            fewest = _int(schema.get("minItems"), 0)
            return Array(sub(items) if isinstance(items, dict) else any_value(ANY_DEPTH - 1),
                         fewest, max(fewest, _int(schema.get("maxItems"), ARRAY_CAP)))
        if kind == "object":
            return _object(schema, sub)
        return any_value()


def _object(schema: dict[str, Any], sub: Any) -> Node:
    props = schema.get("properties")
    props = props if isinstance(props, dict) else {}
    required = [r for r in schema.get("required", ()) if isinstance(r, str)]
    extra = schema.get("additionalProperties", True)
    names = list(props)
    if extra is not False:  # required but not declared: any value, after the rest
        names += [r for r in dict.fromkeys(required) if r not in props]
    if not names:
        if extra is False:
            return Literal(("{}",))
        return FreeObject(sub(extra) if isinstance(extra, dict) else any_value(ANY_DEPTH - 1))
    return Object(tuple(dump(n) for n in names),
                  tuple(sub(props[n]) if n in props else any_value(ANY_DEPTH - 1)
                        for n in names),
                  tuple(n in required for n in names))


def _integer(schema: dict[str, Any]) -> Integer:
    low = _num(schema, "minimum", "exclusiveMinimum")
    high = _num(schema, "maximum", "exclusiveMaximum", upper=True)
    cap = 10 ** INT_DIGITS - 1
    lo = -cap if low is None else max(-cap, low)
    hi = cap if high is None else min(cap, high)
    if lo > hi:  # nothing fits: the validator will say so; write something typed
        lo, hi = -cap, cap
    return Integer(lo, hi, max(len(str(abs(lo))), len(str(abs(hi)))))


def _num(schema: dict[str, Any], inclusive: str, exclusive: str, *, upper: bool = False
         ) -> int | None:
    """The tightest integer bound the schema sets (None: none)."""
    bounds: list[int] = []
    for key, strict in ((inclusive, False), (exclusive, True)):
        v = schema.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            if upper:
                bounds.append(math.ceil(v) - 1 if strict else math.floor(v))
            else:
                bounds.append(math.floor(v) + 1 if strict else math.ceil(v))
    if not bounds:
        return None
    return min(bounds) if upper else max(bounds)


def _int(value: Any, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else default


def _resolve(root: Any, ref: str) -> Any:
    """A local JSON pointer ("#/$defs/X"); None when it is not one or leads nowhere."""
    if not ref.startswith("#"):
        return None
    node = root
    for part in (p for p in ref[1:].split("/") if p):
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node

