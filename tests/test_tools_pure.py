"""Typed tools without a network: schemas from types and their hashes, argument checks
(pydantic and jsonschema), a tool refused at registration, read_file's refusals, the
capacity limiter under concurrent calls (counted), every outcome of a call, the choice
of a peer, and the `tools` settings."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
from pydantic import BaseModel

from peerd.config import BUILTIN_TOOLS, ConfigError, load_config
from peerd.plans import builtins
from peerd.plans.choice import Offer, rank
from peerd.plans.reading import MAX_FILE_BYTES, ReadRefused, read_inside
from peerd.plans.schema import (
    BadTool,
    Invalid,
    ModelCheck,
    SchemaCheck,
    SchemaInvalid,
    canonical_json,
    schema_hash,
)
from peerd.plans.tool import Tool, ToolError, schema_tool, typed_tool
from peerd.plans.toolbox import Toolbox
from protocols import tool as wire
from protocols.codec import decode, encode
from protocols.errors import WireError
from protocols.ledger import LedgerEntry
from protocols.tool import ToolBrief, ToolCall, ToolRequest

ME, THEM = "QmMe", "QmThem"


class Args(BaseModel):
    n: int
    tags: tuple[str, ...] = ()


class Out(BaseModel):
    double: int


async def double(args: Args) -> Out:
    return Out(double=2 * args.n)


ECHO_IN = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 10}},
           "required": ["text"], "additionalProperties": False}
ECHO_OUT = {"type": "object", "properties": {"text": {"type": "string"}},
            "required": ["text"]}


async def echo(args: dict[str, Any]) -> dict[str, Any]:
    return {"text": args["text"]}


def call(tool: Tool, arguments: dict[str, Any], *, schema: str | None = None,
         deadline_s: float = 5.0, call_id: str = "c1") -> ToolCall:
    return ToolCall(call_id=call_id, tool=tool.name, schema=schema or tool.schema,
                    arguments=arguments, deadline_s=deadline_s)


# ---- schemas and hashes -------------------------------------------------------------


def test_a_typed_tools_schemas_come_from_its_type_hints() -> None:
    tool = typed_tool("double", "Twice n.", double)
    assert tool.input_schema == Args.model_json_schema()
    assert tool.output_schema == Out.model_json_schema()
    assert tool.input_schema["properties"]["n"]["type"] == "integer"
    assert tool.to_json()["inputSchema"] is tool.input_schema  # MCP's names


def test_the_schema_hash_is_sha256_of_canonical_json_and_names_a_version() -> None:
    tool = typed_tool("double", "Twice n.", double)
    assert len(tool.schema) == 64 and tool.schema == schema_hash(
        "double", tool.input_schema, tool.output_schema)
    # key order and whitespace do not matter; the name and every schema byte do
    shuffled = dict(reversed(list(tool.input_schema.items())))
    assert schema_hash("double", shuffled, tool.output_schema) == tool.schema
    assert schema_hash("triple", tool.input_schema, tool.output_schema) != tool.schema
    assert typed_tool("double", "Other words.", double).schema == tool.schema
    assert canonical_json({"b": 1, "a": [1.5, "é"]}) == '{"a":[1.5,"é"],"b":1}'.encode()


def test_a_typed_tool_needs_models_on_both_sides() -> None:
    async def untyped(args: dict[str, Any]) -> dict[str, Any]:
        return args

    with pytest.raises(BadTool, match="pydantic model"):
        typed_tool("bad", "", untyped)
    with pytest.raises(BadTool, match="tool name"):
        typed_tool("no spaces", "", double)
    with pytest.raises(BadTool, match="capacity"):
        typed_tool("double", "", double, capacity=0)


# ---- argument checks ----------------------------------------------------------------


def test_pydantic_checks_are_strict_and_say_where() -> None:
    check = ModelCheck(Args)
    assert check({"n": 3, "tags": ["a"]}) == Args(n=3, tags=("a",))
    for bad, where in [({"n": "3"}, "n"), ({"n": True}, "n"), ({}, "n"),
                       ({"n": 1, "tags": "ab"}, "tags")]:
        with pytest.raises(Invalid) as err:
            check(bad)
        assert err.value.problems[0].startswith(where + ":"), err.value
    with pytest.raises(Invalid, match="expected an object"):
        check([1])


def test_jsonschema_checks_external_schemas_and_say_where() -> None:
    check = SchemaCheck(ECHO_IN)
    assert check({"text": "hi"}) == {"text": "hi"}
    with pytest.raises(Invalid, match="text: 5 is not of type 'string'"):
        check({"text": 5})
    with pytest.raises(Invalid, match="too long"):
        check({"text": "x" * 11})
    with pytest.raises(Invalid, match="Additional properties"):
        check({"text": "a", "more": 1})
    with pytest.raises(Invalid, match="required"):
        check({})


@pytest.mark.parametrize(("schema", "words"), [
    ({"type": "object", "properties": {"x": {"type": "strnig"}}}, "not valid JSON Schema"),
    ({"type": "object", "required": "x"}, "not valid JSON Schema"),
    ({"type": "array"}, "must describe an object"),
    ([], "must be a JSON object"),
    ({"type": "object", "description": "x" * 20_000}, "bytes of JSON"),
], ids=["bad-type", "bad-required", "not-object", "not-a-dict", "huge"])
def test_a_tool_whose_schema_is_not_json_schema_is_refused_at_registration(
        schema: Any, words: str) -> None:
    with pytest.raises(SchemaInvalid, match=words):
        schema_tool("ext", "An external tool.", schema, ECHO_OUT, echo)
    with pytest.raises(SchemaInvalid, match="outputSchema"):
        schema_tool("ext", "An external tool.", ECHO_IN, schema, echo)


# ---- one call, every outcome --------------------------------------------------------


async def test_a_call_runs_checked_and_answers_signed_fields() -> None:
    box = Toolbox(ME, [typed_tool("double", "", double), schema_tool("echo", "", ECHO_IN,
                                                                      ECHO_OUT, echo)])
    got = await box.execute(call(box.tools["double"], {"n": 21}), THEM)
    assert (got.outcome, got.result, got.peer, got.caller, got.call_id) == (
        wire.OK, {"double": 42}, ME, THEM, "c1")
    got = await box.execute(call(box.tools["echo"], {"text": "hi"}), THEM)
    assert (got.outcome, got.result) == (wire.OK, {"text": "hi"})


async def test_bad_calls_get_outcomes_that_say_what_to_do() -> None:
    tool = typed_tool("double", "", double)
    box = Toolbox(ME, [tool])
    unknown = await box.execute(ToolCall("c", "nope", tool.schema, {}, 1.0), THEM)
    assert unknown.outcome == wire.UNKNOWN_TOOL and "offers: double" in unknown.message
    stale = await box.execute(call(tool, {"n": 1}, schema="0" * 64), THEM)
    assert stale.outcome == wire.SCHEMA_MISMATCH and stale.schema == tool.schema
    assert "list this peer's tools again" in stale.message
    typed = await box.execute(call(tool, {"n": "one"}), THEM)
    assert typed.outcome == wire.INVALID_ARGUMENTS and "n: Input should be" in typed.message
    assert box.capacity["double"].peak == 0  # none of them ran


class Free(BaseModel):
    pass


async def test_a_raising_hanging_or_lying_tool_is_an_outcome_not_a_crash() -> None:
    async def raises(args: Free) -> Out:
        raise RuntimeError("secret internals")

    async def refuses(args: Free) -> Out:
        raise ToolError("no such thing")

    async def hangs(args: Free) -> Out:
        await trio.sleep_forever()
        raise AssertionError

    async def lies(args: Free) -> Out:
        return Out.model_construct(double="not a number")  # type: ignore[arg-type]

    async def floods(args: dict[str, Any]) -> dict[str, Any]:
        return {"text": "x" * (wire.MAX_RESULT_BYTES + 1)}

    box = Toolbox(ME, [typed_tool("raises", "", raises), typed_tool("refuses", "", refuses),
                       typed_tool("hangs", "", hangs), typed_tool("lies", "", lies),
                       schema_tool("floods", "", ECHO_IN, ECHO_OUT, floods)])
    expect = {"raises": (wire.TOOL_ERROR, "raises failed (RuntimeError)"),
              "refuses": (wire.TOOL_ERROR, "no such thing"),
              "hangs": (wire.DEADLINE, "deadline of 0.2 s"),
              "lies": (wire.INVALID_RESULT, "outputSchema"),
              "floods": (wire.OVERSIZED_RESULT, "ask for less")}
    for name, (outcome, words) in expect.items():
        arguments = {"text": "a"} if name == "floods" else {}
        got = await box.execute(call(box.tools[name], arguments, deadline_s=0.2), THEM)
        assert got.outcome == outcome and words in got.message, (name, got)
        assert "secret" not in got.message
        assert box.capacity[name].in_flight == 0  # the slot is given back


async def test_the_limiter_never_exceeds_capacity_under_concurrent_calls() -> None:
    running = 0
    most = 0
    gate = trio.Event()

    async def slow(args: Args) -> Out:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await gate.wait()
        running -= 1
        return Out(double=args.n)

    tool = typed_tool("slow", "", slow, capacity=3)
    box = Toolbox(ME, [tool])
    outcomes: list[str] = []

    async def one(i: int) -> None:
        outcomes.append((await box.execute(call(tool, {"n": i}, call_id=f"c{i}"), THEM)).outcome)

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(one, i)
        await trio.testing.wait_all_tasks_blocked()
        assert box.capacity["slow"].in_flight == 3
        gate.set()
    assert most == 3 and box.capacity["slow"].peak == 3
    assert outcomes.count(wire.OK) == 3 and outcomes.count(wire.BUSY) == 17
    assert box.capacity["slow"].in_flight == 0
    # once free, it serves again
    assert (await box.execute(call(tool, {"n": 1}), THEM)).outcome == wire.OK


# ---- the built-ins ------------------------------------------------------------------


async def test_the_calculator_is_symphonys_and_refuses_in_words() -> None:
    tool = builtins.calculator()
    box = Toolbox(ME, [tool])
    got = await box.execute(call(tool, {"expression": "(48 / 2) * 3 + 1/4"}), THEM)
    assert got.result == {"value": "72.25"}
    bad = await box.execute(call(tool, {"expression": "__import__('os')"}), THEM)
    assert bad.outcome == wire.TOOL_ERROR and "not plain arithmetic" in bad.message


def test_read_file_reads_inside_its_directory_only(tmp_path: Path) -> None:
    root = tmp_path / "tools"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.txt").write_text("hello")
    (tmp_path / "secret.txt").write_text("do not")
    (root / "out").symlink_to(tmp_path / "secret.txt")
    (root / "outdir").symlink_to(tmp_path)
    (root / "in").symlink_to(root / "sub" / "a.txt")
    (root / "big").write_bytes(b"x" * (MAX_FILE_BYTES + 1))
    (root / "long.txt").write_text("y" * 100)
    os.mkfifo(root / "fifo")
    assert read_inside(root, "sub/a.txt", 100).text == "hello"
    assert read_inside(root, "in", 100).text == "hello"  # a symlink that stays inside
    cut = read_inside(root, "long.txt", 10)
    assert (cut.text, cut.size, cut.truncated) == ("y" * 10, 100, True)
    for path, words in [("../secret.txt", "climbs out"), ("sub/../../secret.txt", "climbs"),
                        (str(tmp_path / "secret.txt"), "absolute"), ("~/x", "absolute"),
                        ("out", "outside the tools directory"),
                        ("outdir/secret.txt", "outside"), ("missing", "no file"),
                        ("big", "at most"), ("sub", "not a regular file"),
                        ("fifo", "not a regular file"), ("a\x00b", "NUL")]:
        with pytest.raises(ReadRefused, match=words):
            read_inside(root, path, 100)


async def test_read_file_as_a_tool_answers_refusals_as_tool_errors(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello")
    tool = builtins.read_file(tmp_path)
    box = Toolbox(ME, [tool])
    got = await box.execute(call(tool, {"path": "a.txt"}), THEM)
    assert got.result == {"path": "a.txt", "size": 5, "text": "hello", "truncated": False}
    bad = await box.execute(call(tool, {"path": "../etc/passwd"}), THEM)
    assert bad.outcome == wire.TOOL_ERROR and "climbs out" in bad.message
    big = await box.execute(call(tool, {"path": "a.txt", "max_bytes": 10**9}), THEM)
    assert big.outcome == wire.INVALID_ARGUMENTS and "max_bytes" in big.message


async def test_memory_search_reaches_the_memory_through_recall() -> None:
    from peerd.api.recall import Note

    class FakeMemory:
        async def notes(self, text: str, k: int | None, domain: str | None) -> list[Note]:
            return [Note("i1", f"about {text}", domain or "general", 0.9, 1.0, 0.9)][:k]

    memory: FakeMemory | None = None
    tool = builtins.memory_search(lambda: memory)
    box = Toolbox(ME, [tool])
    none = await box.execute(call(tool, {"query": "sums"}), THEM)
    assert none.outcome == wire.TOOL_ERROR and "keeps no memory" in none.message
    memory = FakeMemory()
    got = await box.execute(call(tool, {"query": "sums", "domain": "arithmetic"}), THEM)
    assert got.result == {"notes": [{"id": "i1", "text": "about sums",
                                     "domain": "arithmetic", "score": 0.9}]}
    bad = await box.execute(call(tool, {"query": "x", "domain": "Not A Domain"}), THEM)
    assert bad.outcome == wire.INVALID_ARGUMENTS


def test_the_config_names_the_builtins_and_their_capacities(tmp_path: Path) -> None:
    assert set(BUILTIN_TOOLS) == set(builtins.DEFAULT_CAPACITY)
    default = load_config({"data_dir": str(tmp_path)}, environ={})
    assert [t.name for t in builtins.offered(default.tool_choices, default.tools_dir,
                                             lambda: None)] == ["calculator", "memory_search"]
    cfg = load_config({"data_dir": str(tmp_path), "tools": "calculator:2,read_file",
                       "tools_dir": str(tmp_path)}, environ={})
    tools = builtins.offered(cfg.tool_choices, cfg.tools_dir, lambda: None)
    assert [(t.name, t.capacity) for t in tools] == [("calculator", 2), ("read_file", 4)]
    for flags, words in [({"tools": "shell"}, "not a built-in"),
                         ({"tools": "calculator:0"}, "capacity"),
                         ({"tools": "read_file"}, "--tools-dir"),
                         ({"tools_dir": str(tmp_path / "nope")}, "not a directory")]:
        with pytest.raises(ConfigError, match=words):
            load_config({"data_dir": str(tmp_path), **flags}, environ={})


# ---- the wire and the choice --------------------------------------------------------


def test_requests_decode_strictly_and_entries_tolerantly() -> None:
    req = ToolRequest(method=wire.CALL, call=ToolCall("c", "t", "a" * 64, {"x": [1]}, 2.0))
    assert decode(encode(req), ToolRequest) == ToolRequest(
        method=wire.CALL, call=ToolCall("c", "t", "a" * 64, {"x": [1]}, 2.0))
    for bad in [ToolRequest(method="tools/run"), ToolRequest(method=wire.LIST, call=req.call),
                ToolRequest(method=wire.CALL, call=ToolCall("c", "t", "nothex", {}, 2.0)),
                ToolRequest(method=wire.CALL, call=ToolCall("c", "t", "a" * 64, {}, 999.0))]:
        with pytest.raises(WireError):
            bad.check()
    entry = LedgerEntry(peer_id="p", seq=1, timestamp=1.0, ttl_s=30.0,
                        tools=(ToolBrief(name="calculator", schema="a" * 64, capacity=16),))
    wire_form = entry.to_wire()
    assert decode(encode(entry), LedgerEntry) == entry
    wire_form["tools"][0]["future"] = 1  # a newer peer's extra field is ignored
    del wire_form["tools"]  # and an older peer's entry has none
    from protocols.codec import packb
    assert decode(packb(wire_form), LedgerEntry).tools == ()


def test_the_choice_prefers_free_capacity_then_the_nearest() -> None:
    offers = [Offer("far", "h", 4, 0, 80.0), Offer("near", "h", 4, 0, 5.0),
              Offer("full", "h", 2, 2, 1.0), Offer("unmeasured", "h", 8, 0, None),
              Offer("self", "h", 1, 0, 0.0), Offer("near2", "h", 8, 1, 5.0)]
    assert [o.peer for o in rank(offers)] == ["self", "near2", "near", "far", "unmeasured",
                                              "full"]
    assert rank([]) == []


def test_a_peers_schema_that_cannot_be_checked_is_refused_or_checks_nothing() -> None:
    """Schemas a peer may offer that jsonschema cannot follow: references that loop
    without reading the value (a RecursionError from every call's check: a 500),
    references off the document (another file, a URL) and nesting past the recursion
    limit (a RecursionError while the offer was remembered)."""
    looping = {"type": "object", "properties": {"x": {"$ref": "#/$defs/A"}},
               "$defs": {"A": {"anyOf": [{"$ref": "#/$defs/A"}] * 3}}}
    with pytest.raises(Invalid, match="references loop"):
        SchemaCheck(looping)({"x": 1})
    with pytest.raises(SchemaInvalid, match="only references within"):
        SchemaCheck({"type": "object", "properties": {"x": {"$ref": "https://e.com/s"}}})
    deep: dict[str, Any] = {}
    cur = deep
    for _ in range(900):
        cur["items"] = {}
        cur = cur["items"]
    with pytest.raises(SchemaInvalid, match="nests too deeply"):
        SchemaCheck({"type": "object", "properties": {"x": deep}})
