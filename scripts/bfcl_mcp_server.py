#!/usr/bin/env python3
"""One BFCL multi-turn class as an MCP server over stdio (the SDK's `MCPServer`), for
`peerd start --mcp "python scripts/bfcl_mcp_server.py CLASS"` (bench_plans_multiturn.py).

The server holds ONE instance of CLASS (bfcl_eval's func_source_code: GorillaFileSystem,
MathAPI, MessageAPI, TwitterAPI, TicketAPI, TradingBot, TravelAPI, VehicleControlAPI) and
offers:

- each of its methods that BFCL documents (data/multi_turn_func_doc), under the method's
  own name, with BFCL's description (less the preamble BFCL repeats in every tool of a
  class, "This tool belongs to the ... Tool description: ": `short_description`) and its
  parameter doc converted to JSON Schema by bench_plans_bfcl.bfcl_schema (peerd checks
  every call against it before it comes here).
  The result is BFCL's own rendering of the method's return value, as its executor
  (multi_turn_utils.execute_multi_turn_func_call) writes it: a string as is, a dict as
  JSON, anything else str(); a method that raises answers "Error during execution: ...",
  as there. So a peer's observation is the text BFCL's checker gets when it runs the
  same call.
- `CLASS.reset` `{"config": {...}}`: a fresh instance loaded with a test case's
  initial_config for this class (`_load_scenario`, as BFCL does; a stateless class just
  starts afresh). Named after the class, so the reset of each class is a distinct tool
  in the swarm, never routed to another class's server.
"""

from __future__ import annotations

import functools
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import MCPServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_plans_bfcl import bfcl_schema
from bench_plans_multiturn import class_docs, new_instance


def short_description(description: str) -> str:
    """BFCL's description after its per-class preamble. Why: the planner's prompt lists
    every tool of a case's classes, and on the 2-core machine SmolLM2's prefill of the
    full docs (up to ~3,900 tokens) ran past the pipeline's 60 s step deadline; the
    preamble is a third of it and says nothing about the tool."""
    return description.split("Tool description: ", 1)[-1].strip() or description


def rendered(value: Any) -> str:
    """A method's return value as BFCL's executor renders it."""
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def build(class_name: str) -> MCPServer:
    server = MCPServer(class_name, log_level="WARNING")
    holder: dict[str, Any] = {"instance": new_instance(class_name, None)}

    def method_tool(name: str) -> Any:
        signature = inspect.signature(getattr(holder["instance"], name))

        @functools.wraps(getattr(type(holder["instance"]), name))
        def call(**arguments: Any) -> str:
            try:
                return rendered(getattr(holder["instance"], name)(**arguments))
            except Exception as exc:  # BFCL's executor's words for a method that raises
                return f"Error during execution: {exc}"

        # the SDK binds arguments by the method's own parameters (self left out)
        call.__signature__ = signature.replace(return_annotation=str)  # type: ignore[attr-defined]
        del call.__wrapped__  # type: ignore[attr-defined]  # else its hints win over the signature
        call.__annotations__ = {p.name: p.annotation for p in signature.parameters.values()
                                if p.annotation is not inspect.Parameter.empty} | {"return": str}
        return call

    for doc in class_docs(class_name):
        tool = server._tool_manager.add_tool(
            method_tool(doc["name"]), name=doc["name"],
            description=short_description(doc["description"]), structured_output=False)
        tool.parameters = bfcl_schema(doc["parameters"])  # BFCL's contract, not the hints

    def reset(config: dict[str, Any]) -> dict[str, Any]:
        """Start this class afresh from a test case's initial_config for it."""
        holder["instance"] = new_instance(class_name, config)
        return {"class": class_name, "reset": True}

    server.add_tool(reset, name=f"{class_name}.reset",
                    description=f"Load a BFCL test case's initial_config into {class_name}, "
                    "dropping its state (the benchmark's, not the planner's).")
    return server


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: bfcl_mcp_server.py CLASS")
    print(f"bfcl {sys.argv[1]}: ready on stdio", file=sys.stderr, flush=True)
    build(sys.argv[1]).run()
