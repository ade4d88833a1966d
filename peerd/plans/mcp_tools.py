"""An external MCP server's tools as peerd tools, and their results back: pure, no I/O.

`exported(tool, prefix, taken, call)` turns one tool the server listed into a peerd
`Tool` (`schema_tool`): its inputSchema as it is (checked against the metaschema, so
a tool with a broken schema is refused alone, with the reason), its outputSchema when
it has one, else `WRAPPED_OUTPUT` (the content as text). Names: a tool keeps its own
name unless this peer already offers one by that name (a built-in, or another server's
tool that came first); then it is `<prefix>.<name>`, the prefix being the server's own
name (`serverInfo.name`, cut to letters, digits, `_` and `-`). A name that is still
taken, or not an MCP name peerd can carry, is refused.

`result_of(result, structured)` reads a `CallToolResult`: the server's error as a
`ToolError` in its words; else the structured content (a tool with an outputSchema)
or `{"text": ...}` (one without).
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

import mcp_types as types

from peerd.plans.tool import Tool, ToolError, schema_tool
from protocols.tool import MAX_DESCRIPTION_CHARS, NAME

WRAPPED_OUTPUT: dict[str, Any] = {
    "type": "object",
    "description": "the tool's content as text (it declares no outputSchema)",
    "properties": {"text": {"type": "string"}, "structured": {"type": "object"}},
    "required": ["text"],
}

RunFn = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class Refused(ValueError):
    """A listed tool peerd does not re-export; the message says why."""


def prefix_of(server_name: str, fallback: str) -> str:
    """A name prefix from the server's own name: letters, digits, '_' and '-' only."""
    cut = re.sub(r"[^A-Za-z0-9_-]+", "-", server_name).strip("-")[:24]
    return cut if cut[:1].isalpha() else fallback


def export_name(name: str, prefix: str, taken: Callable[[str], bool]) -> str:
    """The name a tool is offered under: its own, else `<prefix>.<name>`; Refused."""
    if not NAME.fullmatch(name):
        raise Refused(f"its name {name!r:.80} is not a letter then letters, digits, '_', "
                      "'.' or '-' (at most 64)")
    if not taken(name):
        return name
    prefixed = f"{prefix}.{name}"
    if not NAME.fullmatch(prefixed):
        raise Refused(f"{name!r} is taken here and {prefixed!r} is over 64 characters")
    if taken(prefixed):
        raise Refused(f"both {name!r} and {prefixed!r} are taken here")
    return prefixed


def exported(tool: types.Tool, name: str, run: RunFn, *, capacity: int) -> Tool:
    """The peerd tool for `tool`, offered as `name`; BadTool (a SchemaInvalid) for a
    schema that is not JSON Schema of an object."""
    output = tool.output_schema if tool.output_schema is not None else WRAPPED_OUTPUT
    description = (tool.description or tool.title or "")[:MAX_DESCRIPTION_CHARS]
    return schema_tool(name, description, tool.input_schema, output, run, capacity=capacity)


def text_of(content: list[types.ContentBlock]) -> str:
    """Text blocks as they are; the others named by kind, not inlined."""
    parts = []
    for block in content:
        if isinstance(block, types.TextContent):
            parts.append(block.text)
        elif isinstance(block, types.ImageContent | types.AudioContent):
            parts.append(f"[{block.type} {block.mime_type}, {len(block.data) * 3 // 4} bytes]")
        elif isinstance(block, types.ResourceLink):
            parts.append(f"[resource link {block.uri}]")
        elif isinstance(block, types.EmbeddedResource):
            resource = block.resource
            text = getattr(resource, "text", None)
            parts.append(text if isinstance(text, str) else f"[resource {resource.uri}]")
        else:
            parts.append(f"[{getattr(block, 'type', 'content')}]")
    return "\n".join(parts)


def result_of(result: types.CallToolResult, structured: bool) -> dict[str, Any]:
    """The tool's result as peerd's JSON object; ToolError for the server's error."""
    if result.is_error:
        raise ToolError(text_of(result.content) or "the MCP server reported an error")
    if structured:
        if not isinstance(result.structured_content, dict):
            raise ToolError("the MCP server returned no structured content for a tool "
                            "with an outputSchema")
        return result.structured_content
    out: dict[str, Any] = {"text": text_of(result.content)}
    if isinstance(result.structured_content, dict):
        out["structured"] = result.structured_content
    return out
