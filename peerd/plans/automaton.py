"""A pushdown automaton over compact JSON text for a compiled JSON Schema (nodes.py).

A configuration is a stack of frames, the innermost last; each frame is where one
value stands in its own text. A parent that hands over to a child value (an object
after ':', an array after '[' or ',') is already in the phase it returns to, so a
finished child is simply popped. A frame that is complete but could go on (a
number, an enum value that prefixes another) pops when the next character is not
its own: the automaton is nondeterministic, and a `State` is the set of stacks that
fit the text so far (anyOf branches run side by side until the text tells them
apart). Pure: no torch, no I/O; everything is immutable and hashable, so states can
key a cache.

One module past 450 lines on purpose: the frame types and the step function over them
are one transition table; split, each half would be read with the other open.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from peerd.plans.nodes import (
    AnyOf,
    Array,
    FreeObject,
    Integer,
    Literal,
    Node,
    Number,
    Object,
    String,
    feasible_integer,
    integer_completion,
)

ESCAPES = frozenset('"\\/bfnrt')  # \uXXXX is refused: fewer ways to go wrong
QUOTE = frozenset('"')
CLOSE_OBJECT = frozenset("}")
NUMBER_CHARS = frozenset("-+.eE0123456789")
PUNCTUATION = {"open": frozenset("{"), "colon": frozenset(":"), "after": frozenset(",}"),
               "free-first": frozenset('}"'), "array-open": frozenset("["),
               "array-empty": frozenset("]"), "array-after": frozenset(",]")}


@dataclass(frozen=True, slots=True)
class Frame:
    """One value being written. `step` consumes a character: the frames this one may
    become, each with a child to push (a node from its start, or a frame already
    begun) or None."""

    def step(self, c: str) -> list[tuple[Frame, Node | Frame | None]]:
        raise NotImplementedError

    @property
    def complete(self) -> bool:  # the value may end here
        return False

    @property
    def closed(self) -> bool:  # complete, and no character can extend it
        return False

    def shortest(self) -> int:  # characters to complete it from here
        raise NotImplementedError

    def first_chars(self) -> frozenset[str] | None:
        """The characters `step` may accept (a superset); None: almost any."""
        return None


@dataclass(frozen=True, slots=True)
class Done(Frame):
    """A value whose last character was written ('}', ']', a closing quote)."""

    def step(self, c: str) -> list[tuple[Frame, Node | Frame | None]]:
        return []

    @property
    def complete(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return True

    def shortest(self) -> int:
        return 0

    def first_chars(self) -> frozenset[str] | None:
        return frozenset()


DONE = Done()


@dataclass(frozen=True, slots=True)
class LitFrame(Frame):
    """One of fixed texts (enum, const, true/false/null, a key): those still matching."""

    options: tuple[str, ...]
    pos: int = 0

    def step(self, c: str) -> list[tuple[Frame, Node | Frame | None]]:
        left = tuple(o for o in self.options if len(o) > self.pos and o[self.pos] == c)
        if not left:
            return []
        if all(len(o) == self.pos + 1 for o in left):
            return [(DONE, None)]
        return [(LitFrame(left, self.pos + 1), None)]

    @property
    def complete(self) -> bool:
        return any(len(o) == self.pos for o in self.options)

    def shortest(self) -> int:
        return min(len(o) for o in self.options) - self.pos

    def first_chars(self) -> frozenset[str] | None:
        return frozenset(o[self.pos] for o in self.options if len(o) > self.pos)


@dataclass(frozen=True, slots=True)
class StrFrame(Frame):
    """A free string: before its opening quote (`opened` False), inside it, or just
    after a backslash (`escape`). `used`: characters of the value written so far."""

    node: String
    opened: bool = False
    used: int = 0
    escape: bool = False

    def step(self, c: str) -> list[tuple[Frame, Node | Frame | None]]:
        if not self.opened:
            return [(StrFrame(self.node, True), None)] if c == '"' else []
        if self.escape:
            if c in ESCAPES and self.used < self.node.max_length:
                return [(StrFrame(self.node, True, self.used + 1), None)]
            return []
        if c == '"':
            return [(DONE, None)] if self.used >= self.node.min_length else []
        if c == "\\":
            ok = self.used < self.node.max_length
            return [(StrFrame(self.node, True, self.used, True), None)] if ok else []
        if c < " " or self.used >= self.node.max_length:
            return []
        return [(StrFrame(self.node, True, self.used + 1), None)]

    def shortest(self) -> int:
        need = max(0, self.node.min_length - self.used)
        if not self.opened:
            return 2 + need
        return 1 + need + (1 if self.escape and need == 0 else 0)

    def first_chars(self) -> frozenset[str] | None:
        return QUOTE if not self.opened else ESCAPES if self.escape else None


@dataclass(frozen=True, slots=True)
class NumFrame(Frame):
    """A JSON number: -?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?, digits capped."""

    node: Number
    phase: str = "start"  # start sign zero int dot frac e esign exp
    digits: int = 0  # in the current part

    def step(self, c: str) -> list[tuple[Frame, Node | Frame | None]]:
        p, n, d = self.phase, self.node, c.isdigit() and c.isascii()
        nxt: tuple[str, int] | None = None
        if p in ("start", "sign"):
            if c == "-" and p == "start" and n.negative:
                nxt = ("sign", 0)
            elif d:
                nxt = ("zero", 1) if c == "0" else ("int", 1)
        elif p in ("zero", "int"):
            if d and p == "int" and self.digits < n.int_digits:
                nxt = ("int", self.digits + 1)
            elif c == "." and n.frac_digits:
                nxt = ("dot", 0)
            elif c in "eE" and n.exp_digits:
                nxt = ("e", 0)
        elif p in ("dot", "frac"):
            if d and self.digits < n.frac_digits:
                nxt = ("frac", self.digits + 1)
            elif c in "eE" and p == "frac" and n.exp_digits:
                nxt = ("e", 0)
        elif p in ("e", "esign", "exp"):
            if c in "+-" and p == "e":
                nxt = ("esign", 0)
            elif d and self.digits < n.exp_digits:
                nxt = ("exp", self.digits + 1)
        return [] if nxt is None else [(NumFrame(n, *nxt), None)]

    @property
    def complete(self) -> bool:
        return self.phase in ("zero", "int", "frac", "exp")

    def shortest(self) -> int:
        return 0 if self.complete else 1

    def first_chars(self) -> frozenset[str] | None:
        return NUMBER_CHARS


@dataclass(frozen=True, slots=True)
class IntFrame(Frame):
    """An integer within the node's bounds: every prefix can still end in range."""

    node: Integer
    negative: bool = False
    value: int = 0  # magnitude so far
    digits: int = 0

    def step(self, c: str) -> list[tuple[Frame, Node | Frame | None]]:
        n = self.node
        if c == "-" and self.digits == 0 and not self.negative:  # no -0 where no negatives
            return [(IntFrame(n, True), None)] if n.low < 0 else []
        if not (c.isdigit() and c.isascii()) or self.digits >= n.max_digits:
            return []
        if self.digits > 0 and self.value == 0:  # no digit after a leading zero
            return []
        value = self.value * 10 + int(c)
        if not feasible_integer(n, self.negative, value, self.digits + 1):
            return []
        return [(IntFrame(n, self.negative, value, self.digits + 1), None)]

    @property
    def complete(self) -> bool:
        return self.digits > 0 and self.node.low <= self.signed <= self.node.high

    @property
    def closed(self) -> bool:
        return self.complete and (self.value == 0 or self.digits >= self.node.max_digits)

    @property
    def signed(self) -> int:
        return -self.value if self.negative else self.value

    def shortest(self) -> int:
        return integer_completion(self.node, self.negative, self.value, self.digits)

    def first_chars(self) -> frozenset[str] | None:
        return NUMBER_CHARS


@dataclass(frozen=True, slots=True)
class ObjFrame(Frame):
    """An object with declared properties, written in their order: `phase` open
    (before '{'), first (after '{'), key (`prefix` of a key's quoted text, the
    candidates from property `at` on), colon (after key `at`), after (property `at`
    is next; ',' or '}' expected)."""

    node: Object
    phase: str = "open"
    at: int = 0
    prefix: str = ""

    def step(self, c: str) -> list[tuple[Frame, Node | Frame | None]]:
        n, p = self.node, self.phase
        if p == "open":
            return [(ObjFrame(n, "first"), None)] if c == "{" else []
        if p == "first" and c == "}":
            return [(DONE, None)] if n.may_close(0) else []
        if p in ("first", "key"):
            prefix = self.prefix + c
            for j in n.window(self.at):
                key = n.keys[j]
                if key == prefix:
                    return [(ObjFrame(n, "colon", j), None)]
                if key.startswith(prefix):
                    return [(ObjFrame(n, "key", self.at, prefix), None)]
            return []
        if p == "colon":
            return [(ObjFrame(n, "after", self.at + 1), n.values[self.at])] if c == ":" \
                else []
        if p == "after":
            if c == "}":
                return [(DONE, None)] if n.may_close(self.at) else []
            if c == "," and n.window(self.at):
                return [(ObjFrame(n, "key", self.at), None)]
        return []

    def shortest(self) -> int:
        n, p = self.node, self.phase
        if p == "open":
            return n.shortest
        if p == "after":
            return n.rest(self.at)
        if p == "colon":
            return 1 + n.values[self.at].shortest + n.rest(self.at + 1)
        # first or key: the cheapest key that fits the prefix, then the rest
        best = min((len(n.keys[j]) - len(self.prefix) + 1 + n.values[j].shortest
                    + n.rest(j + 1)) for j in n.window(self.at)
                   if n.keys[j].startswith(self.prefix)) if n.window(self.at) else -1
        if p == "first" and n.may_close(0):
            return 1 if best < 0 else min(1, best)
        return best

    def first_chars(self) -> frozenset[str] | None:
        p, n = self.phase, self.node
        if p in ("first", "key"):
            at = len(self.prefix)
            keys = frozenset(n.keys[j][at] for j in n.window(self.at)
                             if n.keys[j].startswith(self.prefix))
            return keys | CLOSE_OBJECT if p == "first" else keys
        return PUNCTUATION[p]


@dataclass(frozen=True, slots=True)
class FreeObjFrame(Frame):
    """An object with free keys (strings) and values of one node: open, first, colon
    (after a key), after (`count` members written)."""

    node: FreeObject
    phase: str = "open"
    count: int = 0

    def step(self, c: str) -> list[tuple[Frame, Node | Frame | None]]:
        n, p = self.node, self.phase
        if p == "open":
            return [(FreeObjFrame(n, "first"), None)] if c == "{" else []
        if p == "colon":
            return [(FreeObjFrame(n, "after", self.count + 1), n.value)] if c == ":" else []
        if c == "}" and p in ("first", "after"):
            return [(DONE, None)]
        more = self.count < n.max_members
        if p == "first" and c == '"' and more:  # the key's opening quote is ours
            return [(FreeObjFrame(n, "colon", self.count), StrFrame(n.key, True))]
        if p == "after" and c == "," and more:
            return [(FreeObjFrame(n, "colon", self.count), StrFrame(n.key))]
        return []

    def shortest(self) -> int:
        if self.phase == "open":
            return 2
        if self.phase == "colon":
            return 1 + self.node.value.shortest + 1
        return 1

    def first_chars(self) -> frozenset[str] | None:
        return PUNCTUATION["free-first" if self.phase == "first" else self.phase]


@dataclass(frozen=True, slots=True)
class ArrFrame(Frame):
    """An array: open (before '['), empty (after '[', ']' expected), after (`count`
    items written: ',' or ']')."""

    node: Array
    phase: str = "open"
    count: int = 0

    def step(self, c: str) -> list[tuple[Frame, Node | Frame | None]]:
        n, p = self.node, self.phase
        out: list[tuple[Frame, Node | Frame | None]] = []
        if p == "open" and c == "[":
            if n.max_items >= 1:
                out.append((ArrFrame(n, "after", 1), n.item))
            if n.min_items == 0:
                out.append((ArrFrame(n, "empty"), None))
        elif p == "empty" and c == "]":
            out.append((DONE, None))
        elif p == "after":
            if c == "," and self.count < n.max_items:
                out.append((ArrFrame(n, "after", self.count + 1), n.item))
            elif c == "]" and self.count >= n.min_items:
                out.append((DONE, None))
        return out

    def shortest(self) -> int:
        n = self.node
        if self.phase == "open":
            return n.shortest
        if self.phase == "empty":
            return 1
        return max(0, n.min_items - self.count) * (1 + n.item.shortest) + 1

    def first_chars(self) -> frozenset[str] | None:
        return PUNCTUATION["array-" + self.phase]


Stack = tuple[Frame, ...]


def start(node: Node) -> list[Frame]:
    """The frames a value of `node` begins as (one per branch of an anyOf)."""
    if isinstance(node, AnyOf):
        return [f for b in node.branches for f in start(b)]
    if isinstance(node, Literal):
        return [LitFrame(node.texts)]
    if isinstance(node, String):
        return [StrFrame(node)]
    if isinstance(node, Integer):
        return [IntFrame(node)]
    if isinstance(node, Number):
        return [NumFrame(node)]
    if isinstance(node, Object):
        return [ObjFrame(node)]
    if isinstance(node, FreeObject):
        return [FreeObjFrame(node)]
    if isinstance(node, Array):
        return [ArrFrame(node)]
    raise TypeError(f"no frame for {node!r}")


def step_stack(stack: Stack, c: str) -> Iterable[Stack]:
    if not stack:
        return
    top, below = stack[-1], stack[:-1]
    for frame, child in top.step(c):
        base = (*below, frame) if not frame.closed or not below else below
        if child is None:
            yield base
        elif isinstance(child, Frame):
            yield (*base, child)
        else:
            for f in start(child):
                yield (*base, f)
    if top.complete and below:  # the value ends here: `c` is the parent's
        yield from step_stack(below, c)


@dataclass(frozen=True, slots=True)
class State:
    """The stacks that fit the text so far (empty: the text is not in the language)."""

    stacks: frozenset[Stack]

    @classmethod
    def begin(cls, node: Node) -> State:
        return cls(frozenset((f,) for f in start(node)))

    def step(self, c: str) -> State:
        return State(frozenset(s for stack in self.stacks for s in step_stack(stack, c)))

    def advance(self, text: str) -> State:
        state = self
        for c in text:
            state = state.step(c)
            if not state.stacks:
                break
        return state

    @property
    def dead(self) -> bool:
        return not self.stacks

    @property
    def complete(self) -> bool:
        """The text so far is a whole value."""
        return any(all(f.complete for f in stack) for stack in self.stacks)

    @property
    def finished(self) -> bool:
        """A whole value that no character can extend."""
        return bool(self.stacks) and all(all(f.closed for f in stack) for stack in self.stacks)

    def next_chars(self) -> frozenset[str] | None:
        """The characters that may come next (a superset); None: almost any."""
        out: set[str] = set()
        for stack in self.stacks:
            for frame in reversed(stack):
                chars = frame.first_chars()
                if chars is None:
                    return None
                out |= chars
                if not frame.complete:
                    break
        return frozenset(out)

    def shortest(self) -> int:
        """Fewest characters that complete the value (0 when complete; -1 when dead)."""
        return min((sum(f.shortest() for f in stack) for stack in self.stacks), default=-1)

    def forced(self, limit: int) -> str:
        """The characters that must come next, at most `limit`: as long as the value
        may not end and only one character may follow (a key's name, the punctuation
        between keys, a lone tool's name)."""
        out: list[str] = []
        state = self
        while len(out) < limit and not state.complete:
            chars = state.next_chars()  # a superset: each is tried
            if chars is None:
                break
            alive = [(c, after) for c in chars if not (after := state.step(c)).dead]
            if len(alive) != 1:
                break
            c, state = alive[0]
            out.append(c)
        return "".join(out)
