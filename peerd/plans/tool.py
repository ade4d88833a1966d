"""The tool type, as the Model Context Protocol defines it: name, description,
inputSchema, outputSchema; plus what peerd adds, the peer's capacity (calls it runs at
once) and the schema hash that names the contract's version.

Two ways to make one:

- `typed_tool(name, description, fn)` for the tools peerd defines: `fn` is an async
  function of one pydantic model (the arguments) returning another (the result); both
  schemas come from those type hints, never written twice.
- `schema_tool(name, description, input_schema, output_schema, fn)` for a contract
  peerd did not write (an external MCP server's tools, later): `fn` takes and returns
  JSON objects, checked with jsonschema. A schema that is not valid JSON Schema is
  refused here, at registration (`BadTool`).

`ToolError` is how a tool refuses a call in words ("no such file"): the caller gets the
message. Anything else a tool raises is a bug of the tool, reported without its insides.
"""

from __future__ import annotations

import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pydantic

from peerd.plans.schema import BadTool, Check, ModelCheck, SchemaCheck, schema_hash
from protocols.tool import MAX_CAPACITY, MAX_DESCRIPTION_CHARS, NAME, ToolBrief, ToolSpec

A = TypeVar("A", bound=pydantic.BaseModel)
R = TypeVar("R", bound=pydantic.BaseModel)


class ToolError(Exception):
    """A tool's refusal of one call, in words the caller (or a planner) can act on."""


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    arguments: Check[Any]  # the inputSchema, and the check of a call's arguments
    result: Check[Any]  # the outputSchema, and the check of the tool's result
    run: Callable[[Any], Awaitable[Any]]  # checked arguments -> result (model or dict)
    capacity: int = 4
    schema: str = field(init=False)  # the schema hash

    def __post_init__(self) -> None:
        if not NAME.fullmatch(self.name):
            raise BadTool(f"tool name {self.name!r:.80} must be a letter then letters, digits,"
                          " '_', '.' or '-' (at most 64)")
        if len(self.description) > MAX_DESCRIPTION_CHARS:
            raise BadTool(f"{self.name}: description over {MAX_DESCRIPTION_CHARS} characters")
        if not 1 <= self.capacity <= MAX_CAPACITY:
            raise BadTool(f"{self.name}: capacity {self.capacity} outside 1..{MAX_CAPACITY}")
        object.__setattr__(self, "schema", schema_hash(self.name, self.input_schema,
                                                       self.output_schema))

    @property
    def input_schema(self) -> dict[str, Any]:
        return self.arguments.schema

    @property
    def output_schema(self) -> dict[str, Any]:
        return self.result.schema

    def with_capacity(self, capacity: int) -> Tool:
        return Tool(self.name, self.description, self.arguments, self.result, self.run,
                    capacity)

    def brief(self) -> ToolBrief:
        return ToolBrief(name=self.name, schema=self.schema, capacity=self.capacity)

    def spec(self) -> ToolSpec:
        return ToolSpec(name=self.name, description=self.description,
                        input_schema=self.input_schema, output_schema=self.output_schema,
                        schema=self.schema, capacity=self.capacity)

    def to_json(self) -> dict[str, Any]:
        """MCP's field names."""
        return {"name": self.name, "description": self.description,
                "inputSchema": self.input_schema, "outputSchema": self.output_schema,
                "schema": self.schema, "capacity": self.capacity}


def typed_tool(name: str, description: str, fn: Callable[[A], Awaitable[R]], *,
               capacity: int = 4) -> Tool:
    """A tool whose schemas are those of `fn`'s argument and result models."""
    try:
        hints = typing.get_type_hints(fn)
    except NameError as exc:  # string annotations name what only a function body sees
        raise BadTool(f"{name}: {exc}: define the models at a module's top level") from None
    result = hints.pop("return", None)
    if len(hints) != 1:
        raise BadTool(f"{name}: the function takes one argument, a pydantic model")
    (arguments,) = hints.values()
    for what, model in (("argument", arguments), ("result", result)):
        if not (isinstance(model, type) and issubclass(model, pydantic.BaseModel)):
            raise BadTool(f"{name}: the {what} type must be a pydantic model, not {model!r}")
    return Tool(name, description, ModelCheck(arguments), ModelCheck(result),
                fn, capacity)


def schema_tool(name: str, description: str, input_schema: Any, output_schema: Any,
                fn: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]], *,
                capacity: int = 4) -> Tool:
    """A tool with JSON Schemas written elsewhere; BadTool if either is not valid."""
    return Tool(name, description, SchemaCheck(input_schema, f"{name}: inputSchema"),
                SchemaCheck(output_schema, f"{name}: outputSchema"), fn, capacity)


def dump(value: Any) -> Any:
    """A tool's result as JSON data (a model is dumped; a dict goes as it is)."""
    if isinstance(value, pydantic.BaseModel):
        return value.model_dump(mode="json", warnings=False)  # the outputSchema judges it
    return value
