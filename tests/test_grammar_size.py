"""A tool's inputSchema compiles to a grammar of bounded size (peerd/plans/nodes.py):
each subschema once per depth, shared by whatever refers to it, and nested anyOfs
merged, so an anyOf of k references to itself (k**6 nodes when every reference was a
copy) is a small grammar; one that still passes MAX_NODES is the permissive value
where it is compiled anyway, and refused where a tool is taken in (a peer's spec,
counted against the peer; our own tool, at registration). Honest schemas compile to
the grammar they always had: its shape is pinned here. A plan cancelled while its
constraint is built (peerd/plans/thinker.py) does not wait for it."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from pydantic import BaseModel, Field

from peerd.config import Config
from peerd.node import Node
from peerd.plans import nodes
from peerd.plans.nodes import (
    AnyOf,
    Array,
    FreeObject,
    Integer,
    Literal,
    Number,
    Object,
    String,
    compile_schema,
)
from peerd.plans.planner import Transcript
from peerd.plans.schema import BadTool, check_schema, schema_hash
from peerd.plans.service import Tools
from peerd.plans.thinker import ModelThinker
from peerd.plans.tool import schema_tool
from peerd.plans.toolbox import Toolbox
from protocols.tool import ToolSpec
from tests.test_grammar import PERSON, TOOLS


def self_referring(k: int) -> dict[str, Any]:
    """Valid JSON Schema (check_schema takes it): A is any of k references to A."""
    return {"type": "object", "$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}] * k}},
            "$ref": "#/$defs/A"}


def each_referring(k: int) -> dict[str, Any]:
    """k definitions, each any of all k: no two branches alike, k**6 paths."""
    defs = {f"D{i}": {"anyOf": [{"$ref": f"#/$defs/D{j}"} for j in range(k)]}
            for i in range(k)}
    return {"type": "object", "$defs": defs, "$ref": "#/$defs/D0"}


def wide(k: int) -> dict[str, Any]:
    """As `each_referring`, each definition a value of its own too: compiled once per
    depth, still ~40 * k**3 branches gathered, past MAX_NODES at k = 25 (16 KiB)."""
    defs = {f"D{i}": {"anyOf": [{"const": i}, *({"$ref": f"#/$defs/D{j}"}
                                               for j in range(k))]} for i in range(k)}
    return {"type": "object", "$defs": defs, "$ref": "#/$defs/D0"}


# ---- honest schemas: the same grammar as before $refs were shared -------------------

class Address(BaseModel):
    street: str = Field(max_length=40)
    zip: int = Field(ge=0, le=99999)


class Order(BaseModel):
    ship_to: Address  # the same $def twice, at one depth
    bill_to: Address | None = None
    lines: list[Address] = Field(max_length=3)


TREE = {"type": "object", "$defs": {"node": {
    "type": "object", "required": ["label"], "additionalProperties": False,
    "properties": {"label": {"type": "string", "maxLength": 8},
                   "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}},
    "properties": {"root": {"$ref": "#/$defs/node"}}, "required": ["root"]}

EXPR = {"type": "object", "$defs": {"expr": {"anyOf": [
    {"type": "integer", "minimum": -9, "maximum": 9},
    {"type": "object", "additionalProperties": False, "required": ["op", "left", "right"],
     "properties": {"op": {"enum": ["+", "*"]}, "left": {"$ref": "#/$defs/expr"},
                    "right": {"$ref": "#/$defs/expr"}}}]}},
    "properties": {"e": {"$ref": "#/$defs/expr"}, "f": {"$ref": "#/$defs/expr"}}}

MIXED = {"type": "object", "properties": {
    "kind": {"type": ["string", "null", "integer"], "maxLength": 4},
    "one": {"allOf": [{"type": "boolean"}]},
    "free": {"type": "object", "additionalProperties": {"type": "number", "maximum": 5}},
    "odd": {"not": {"type": "string"}}, "list": {"items": {"const": [1, "a"]}},
    "x": {"type": "number", "exclusiveMinimum": -2.5, "maximum": 1000},
    "dangling": {"$ref": "#/$defs/nowhere"},
    "either": {"anyOf": [{"type": ["integer", "null"]}, {"anyOf": [{"type": "boolean"}, {}]},
                         {"$ref": "#/properties/kind"}, {"type": "null"}]}},
    "required": ["kind", "undeclared"]}

HONEST: dict[str, dict[str, Any]] = {
    "person": PERSON, **{t.name: t.input_schema for t in TOOLS},
    "order": Order.model_json_schema(), "tree": TREE, "expr": EXPR, "mixed": MIXED,
}


def shape(node: nodes.Node) -> Any:
    """The grammar as the automaton sees it: every field that steers it, shared nodes
    written out at each use, and an anyOf as the set of what it may start as (its
    branches' own anyOfs merged into it, repeats once: automaton.start's frames)."""
    if isinstance(node, Literal):
        return ["lit", list(node.texts)]
    if isinstance(node, String):
        return ["str", node.min_length, node.max_length]
    if isinstance(node, Integer):
        return ["int", node.low, node.high, node.max_digits]
    if isinstance(node, Number):
        return ["num", node.negative, node.int_digits, node.frac_digits, node.exp_digits]
    if isinstance(node, AnyOf):
        starts: set[str] = set()
        for branch in node.branches:
            inner = shape(branch)
            starts |= set(inner[1]) if inner[0] == "any" else {json.dumps(inner)}
        return ["any", sorted(starts)]
    if isinstance(node, Array):
        return ["arr", node.min_items, node.max_items, shape(node.item)]
    if isinstance(node, FreeObject):
        return ["free", node.max_members, shape(node.key), shape(node.value)]
    if isinstance(node, Object):
        return ["obj", list(node.keys), list(node.required), [shape(v) for v in node.values]]
    raise TypeError(node)


def digest(node: nodes.Node) -> str:
    text = json.dumps([shape(node), node.shortest], separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# computed with the compiler that copied every $ref target wherever it was used, and
# nested anyOfs
PINNED = {
    "person": "3495c4ebb72d9dc0",
    "calculator": "5c129aa208993f13",
    "convert": "72b7208772346568",
    "search": "9d8fc3e70f3d8b3e",
    "order": "6786f6058c3991b4",
    "tree": "5323b407f12864f2",
    "expr": "24aabbf751edac8b",
    "mixed": "3a14f8cece4ada90",
}


@pytest.mark.parametrize("name", sorted(HONEST))
def test_honest_schemas_compile_to_the_grammar_they_always_had(name: str) -> None:
    assert digest(compile_schema(HONEST[name])) == PINNED[name]


def test_honest_schemas_are_far_below_the_cap() -> None:
    for schema in HONEST.values():
        assert nodes.grammar_size(schema) < nodes.MAX_NODES // 1000
    untyped = {"type": "object", "properties": {f"{i:03x}": {} for i in range(1800)}}
    check_schema(untyped, "inputSchema")  # 16 KiB of properties of any value
    assert nodes.grammar_size(untyped) < nodes.MAX_NODES // 10


def test_a_definition_used_twice_at_one_depth_is_compiled_once() -> None:
    grammar = compile_schema(Order.model_json_schema())
    assert isinstance(grammar, Object)
    ship_to, bill_to, lines = grammar.values
    assert isinstance(bill_to, AnyOf) and isinstance(lines, Array)
    assert bill_to.branches[0] is lines.item  # Address at depth 3, once
    assert ship_to is not lines.item  # at another depth: compiled again


# ---- schemas whose grammar explodes -----------------------------------------------------

def run_apart(code: str, timeout_s: float = 30.0) -> str:
    """`code` in a fresh interpreter (a runaway compile holds the GIL: a thread could
    not be stopped); its stdout. The test fails if it runs past `timeout_s`."""
    try:
        done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                              capture_output=True, text=True, timeout=timeout_s,
                              cwd=Path(__file__).resolve().parent.parent)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still compiling after {timeout_s:g} s")
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.parametrize(("family", "k"), [("self_referring", 50), ("each_referring", 20),
                                         ("wide", 25)])
def test_a_schema_referring_to_itself_k_times_compiles_in_bounded_time(family: str, k: int
                                                                      ) -> None:
    out = run_apart(f"""
        import json
        from peerd.plans.grammar import JsonGrammar, StepGrammar
        from peerd.plans.schema import check_schema
        from tests.test_grammar import Spec
        from tests.test_grammar_size import {family}

        schema = check_schema({family}({k}), "inputSchema")
        grammar = JsonGrammar.for_schema(schema)
        step = StepGrammar.for_tools([Spec("loop", schema)])
        calling = '{{"thought":"","calls":[{{"tool":"loop","arguments":'
        print(json.dumps([grammar.start().dead, step.start().advance(calling).dead]))
    """)
    assert json.loads(out) == [False, False]


def test_a_schema_referring_to_itself_is_a_small_grammar() -> None:
    assert nodes.grammar_size(self_referring(50)) < 2_000
    assert nodes.grammar_size(each_referring(20)) < nodes.MAX_NODES


def test_past_the_cap_the_grammar_is_any_value_and_the_size_refuses() -> None:
    schema = check_schema(wide(25), "inputSchema")
    assert compile_schema(schema) is nodes.any_value()
    with pytest.raises(nodes.GrammarTooLarge, match="nodes"):
        nodes.grammar_size(schema)


def test_a_peers_tool_whose_grammar_explodes_is_refused_and_counted(tmp_path: Path) -> None:
    host = SimpleNamespace(get_id=lambda: "me")
    node = Node(Config(data_dir=tmp_path), create_new_key_pair(), host,  # type: ignore[arg-type]
                pubsub=None)
    tools = Tools(node, SimpleNamespace(book=None))  # type: ignore[arg-type]
    out = {"type": "object"}
    bad = wide(25)
    spec = ToolSpec("loop", "", bad, out, schema_hash("loop", bad, out))
    tools._remember(spec, "liar")
    assert tools.spec_of(spec.schema) is None  # left out of every plan and call
    assert node.offences["liar"]["tool_schema"] == 1
    # not fetched (specs() skips it) nor counted again while the refusal stands: every
    # plan start asked the peer again and counted the same offence again
    assert tools.refused(spec.schema)
    tools._remember(spec, "liar")
    assert node.offences["liar"]["tool_schema"] == 1
    fine = ToolSpec("echo", "", TREE, out, schema_hash("echo", TREE, out))
    tools._remember(fine, "honest")
    assert tools.spec_of(fine.schema) == fine and "honest" not in node.offences


def test_our_own_tool_whose_grammar_explodes_is_refused_at_registration() -> None:
    async def run(args: dict[str, Any]) -> dict[str, Any]:
        return {}

    tool = schema_tool("loop", "", wide(25), {"type": "object"}, run)
    with pytest.raises(BadTool, match="grammar"):
        Toolbox("me", [tool])
    assert "tree" in Toolbox("me", [schema_tool("tree", "", TREE, {"type": "object"},
                                                run)]).tools


async def test_a_plan_cancelled_while_its_constraint_is_built_leaves_at_once() -> None:
    release, finished = threading.Event(), threading.Event()

    def slow_constraint(model: Any, tools: Any) -> Any:
        release.wait(20)  # a long compile, or a first vocabulary
        finished.set()

    class Face:
        async def prepare_chat(self, messages: Any, params: Any) -> None:
            return None

    face: Any = Face()
    thinker = ModelThinker(lambda: face, make_constraint=slow_constraint)
    with trio.move_on_after(0.2) as scope:
        await thinker.think(Transcript("goal", (), (), (), 10, 1))
    assert scope.cancelled_caught
    assert not finished.is_set()  # we left while the thread still ran
    release.set()
