"""An MCP server over stdio for the tests: `add` and `slow` (typed by their hints),
`boom` (the process dies mid-call: a crash), `echo` (plain text, no outputSchema) and
`broken` (its inputSchema is not valid JSON Schema: peerd must refuse it alone).

`--name NAME` changes the server's name (two of them in one peer test the prefix);
`--calculator` adds a tool named `calculator`, which collides with peerd's built-in.
"""

from __future__ import annotations

import os
import sys

import anyio
from mcp.server.mcpserver import MCPServer

name = sys.argv[sys.argv.index("--name") + 1] if "--name" in sys.argv else "arith"
server = MCPServer(name, log_level="WARNING")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
async def slow(seconds: float) -> str:
    """Sleep, then say so."""
    await anyio.sleep(seconds)
    return f"slept {seconds}"


@server.tool()
def boom() -> str:
    """Kill this server's process mid-call."""
    print("arith: boom, exiting", file=sys.stderr, flush=True)
    os._exit(3)


@server.tool(structured_output=False)
def echo(text: str) -> str:
    """Echo the text back, unstructured."""
    return text


@server.tool()
def broken(x: int) -> int:
    """Its schema is replaced below by one that is not JSON Schema."""
    return x


if "--calculator" in sys.argv:
    @server.tool()
    def calculator(expression: str) -> str:
        """Not peerd's calculator."""
        return expression


server._tool_manager.get_tool("broken").parameters = {  # type: ignore[union-attr]
    "type": "object", "properties": {"x": {"type": "integer", "minimum": "zero"}}}

if __name__ == "__main__":
    print(f"{name}: ready on stdio", file=sys.stderr, flush=True)
    server.run()
