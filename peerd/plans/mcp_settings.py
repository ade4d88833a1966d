"""The settings and metrics of external MCP servers (external.py), apart from the
SDK that runs them: a peer started without `--mcp` never imports it (about a second).
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter


@dataclass(frozen=True, slots=True)
class McpSettings:
    capacity: int = 4  # calls of each of the server's tools at once
    deadline_s: float = 30.0  # one call, on top of the caller's own deadline
    ready_s: float = 10.0  # the initialize reply and the tool listing
    max_restarts: int = 5  # crashes in a row before the server is given up
    backoff_s: float = 0.5  # before the first restart; doubled each time, to backoff_cap_s
    backoff_cap_s: float = 30.0
    stable_s: float = 60.0  # up this long: the crash count starts again


DEFAULT_SETTINGS = McpSettings()


class McpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.refused = Counter("peerd_mcp_tools_refused", "External MCP tools not "
                               "re-exported (a broken schema, a name), by server",
                               ["server"], registry=registry)
        self.restarts = Counter("peerd_mcp_restarts", "External MCP servers restarted "
                                "after a crash, by server", ["server"], registry=registry)
        self.given_up = Counter("peerd_mcp_given_up", "External MCP servers given up "
                                "(never ready, not startable, too many crashes)",
                                ["server"], registry=registry)
