"""A tool's contract: canonical JSON, the schema hash, and checking values against it.

Pure, no I/O. Two ways to check a value, one interface (`Check`):

- `ModelCheck`: for the tools peerd defines, a pydantic model of the arguments (or the
  result). Its JSON Schema is the model's own (`model_json_schema`), so a tool's schema
  comes from its types and is never written twice.
- `SchemaCheck`: for a schema peerd did not write (an external MCP server's, or a tool a
  peer advertised), JSON Schema validation with `jsonschema`. The schema itself is
  checked against its metaschema first: `SchemaCheck` refuses one that is not valid
  JSON Schema, so a broken tool is refused when it is registered, not at its first call.

Both raise `Invalid` with a short list of problems, each naming where it is
("x: Input should be a valid integer"): a caller, or a planner, can act on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any, Generic, Protocol, TypeVar

import jsonschema
import pydantic
from jsonschema.exceptions import SchemaError
from referencing.exceptions import Unresolvable

from protocols.tool import MAX_SCHEMA_BYTES

MAX_PROBLEMS = 5  # problems listed in one Invalid; the rest are counted

T_co = TypeVar("T_co", covariant=True)
M = TypeVar("M", bound=pydantic.BaseModel)


class Invalid(ValueError):
    """A value breaks a schema. `problems`: what, and where, at most MAX_PROBLEMS."""

    def __init__(self, problems: list[str], more: int = 0) -> None:
        self.problems = problems
        self.more = more
        tail = f" (and {more} more)" if more else ""
        super().__init__("; ".join(problems) + tail)


class BadTool(ValueError):
    """A tool definition refused at registration; the message says what to fix."""


class SchemaInvalid(BadTool):
    """A schema that is not valid JSON Schema (or too large, or not of an object)."""


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no spaces, UTF-8: the same value always gives the same bytes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode()


def schema_hash(name: str, input_schema: dict[str, Any], output_schema: dict[str, Any]
                ) -> str:
    """The sha256 (hex) naming one version of a tool's contract."""
    contract = {"name": name, "inputSchema": input_schema, "outputSchema": output_schema}
    return hashlib.sha256(canonical_json(contract)).hexdigest()


def check_schema(schema: Any, what: str) -> dict[str, Any]:
    """`schema` if it is a JSON Schema object within MAX_SCHEMA_BYTES; else SchemaInvalid.
    MCP asks for an object at the top of both schemas (arguments and structured results
    are JSON objects)."""
    if not isinstance(schema, dict):
        raise SchemaInvalid(f"{what} must be a JSON object, not {type(schema).__name__}")
    try:
        size = len(canonical_json(schema))
    except (TypeError, ValueError) as exc:
        raise SchemaInvalid(f"{what} is not JSON: {exc}") from None
    except RecursionError:
        raise SchemaInvalid(f"{what} nests too deeply to be read") from None
    if size > MAX_SCHEMA_BYTES:
        raise SchemaInvalid(f"{what} is {size} bytes of JSON; at most {MAX_SCHEMA_BYTES}")
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except RecursionError:
        raise SchemaInvalid(f"{what} nests too deeply to be checked") from None
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top"
        raise SchemaInvalid(f"{what} is not valid JSON Schema (at {where}): "
                            f"{exc.message}") from None
    if schema.get("type") != "object":
        raise SchemaInvalid(f'{what} must describe an object ("type": "object")')
    outside = next(_refs_outside(schema), None)
    if outside is not None:
        raise SchemaInvalid(f'{what} refers to {outside!r:.80}: only references within '
                            'the schema ("#/...") can be followed')
    return schema


def _refs_outside(value: Any) -> Iterator[str]:
    """Every "$ref" of `value` that points off the document (a URL, another file)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            ref = v.get("$ref")
            if isinstance(ref, str) and not ref.startswith("#"):
                yield ref
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


class Check(Protocol, Generic[T_co]):
    """Checks a JSON value against one schema; the checked value (typed for a model)."""

    schema: dict[str, Any]

    def __call__(self, value: Any) -> T_co: ...


class ModelCheck(Generic[M]):
    """A pydantic model as a schema: strict JSON validation, so "2" is no integer."""

    def __init__(self, model: type[M]) -> None:
        self.model = model
        self.schema = check_schema(model.model_json_schema(), model.__name__)

    def __call__(self, value: Any) -> M:
        if not isinstance(value, dict):
            raise Invalid([f"expected an object, got {type(value).__name__}"])
        try:
            text = canonical_json(value)
        except (TypeError, ValueError) as exc:
            raise Invalid([f"not a JSON value: {exc}"]) from None
        try:
            # JSON mode: an array is a tuple's value, as the schema says it may be
            return self.model.model_validate_json(text, strict=True)
        except pydantic.ValidationError as exc:
            errors = exc.errors(include_url=False)
            problems = [f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}"
                        for e in errors[:MAX_PROBLEMS]]
            raise Invalid(problems, max(0, len(errors) - MAX_PROBLEMS)) from None


class SchemaCheck:
    """A JSON Schema checked with jsonschema (the schema's own draft, default 2020-12)."""

    def __init__(self, schema: Any, what: str = "schema") -> None:
        self.schema = check_schema(schema, what)
        self._validator = jsonschema.validators.validator_for(self.schema)(self.schema)

    def __call__(self, value: Any) -> dict[str, Any]:
        try:
            errors = sorted(self._validator.iter_errors(value), key=lambda e: list(e.path))
        except RecursionError:  # a peer's schema whose references loop: no value passes
            raise Invalid(["the schema's references loop without reading the value, so "
                           "nothing can be checked against it"]) from None
        except Unresolvable as exc:  # (check_schema refuses references off the document)
            raise Invalid([f"the schema refers to what it does not hold: {exc!s:.200}"]
                          ) from None
        if errors:
            problems = [f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
                        for e in errors[:MAX_PROBLEMS]]
            raise Invalid(problems, max(0, len(errors) - MAX_PROBLEMS))
        assert isinstance(value, dict)  # the schema's top is an object (check_schema)
        return value
