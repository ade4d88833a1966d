"""External MCP servers re-exported to the swarm: `peerd start --mcp "CMD ARGS"`.

`ExternalServer.run()` supervises one server for the life of the Tools service (it
runs in that service's nursery): it starts the command (shlex-split, no shell) with the
official SDK's stdio client, initializes one `ClientSession` within `ready_s`, lists
the server's tools and offers each to the swarm (mcp_tools.py: schemas checked, a
broken one refused alone and counted once, however often the server restarts; names
prefixed on collision). Every call of those tools goes to the server through that one
session, under the tool's capacity (the Toolbox's limiter) and `deadline_s`.

Failure handling:
- the server exits (its stdout closes): its tools are withdrawn from the ledger at
  once, the calls in flight end as `tool_error` observations ("exited during the
  call"), and it is started again after a back-off (0.5 s doubling to 30 s); after
  `max_restarts` crashes in a row (a run of `stable_s` clears the count) it is given up;
- no initialize reply within `ready_s`: given up at once, with one log line saying so
  (a server that hangs at start would hang again);
- the command cannot be started (not found, not executable): given up.
The server's stderr goes to peerd's log, line by line, each line cut to 400
characters and at most 20 lines a 10 s window (the rest counted in one line).
Cancellation (shutdown) closes the session and stops the process (the SDK closes
its stdin, then terminates its process group).
"""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Sequence
from typing import Any, Protocol

import anyio
import mcp_types as types
import trio
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from trio_typing import TaskStatus

from peerd.plans import mcp_tools
from peerd.plans.mcp_settings import DEFAULT_SETTINGS, McpMetrics, McpSettings
from peerd.plans.schema import BadTool
from peerd.plans.tool import Tool, ToolError

log = logging.getLogger(__name__)

STDERR_LINE_CHARS = 400
STDERR_LINES_PER_WINDOW = 20
STDERR_WINDOW_S = 10.0
STDERR_DRAIN_S = 1.0  # after the session ends, for the server's last lines
MAX_LISTED = 256  # tools read from one server's listing (a peer offers at most 64)


class ToolHost(Protocol):
    """Where the tools go: the Tools service."""

    def offered(self, name: str) -> bool: ...

    def offer(self, tools: Sequence[Tool]) -> list[tuple[str, str]]:
        """Offer the tools; (name, reason) for each one refused."""
        ...

    def withdraw(self, names: Sequence[str]) -> None: ...


class Ended(Exception):
    """One run of the server is over; `retry` says whether starting it again may help."""

    def __init__(self, why: str, *, retry: bool) -> None:
        super().__init__(why)
        self.retry = retry


class ExternalServer:
    def __init__(self, label: str, command: str, host: ToolHost, metrics: McpMetrics,
                 settings: McpSettings = DEFAULT_SETTINGS) -> None:
        self.label = label  # "mcp0", "mcp1", ...: logs, metrics, status
        self.command = command
        self.argv = shlex.split(command)
        if not self.argv:
            raise ValueError(f"{label}: an empty command line")
        self.host = host
        self.metrics = metrics
        self.settings = settings
        self.state = "starting"  # starting | up | down | restarting | given up
        self.name = ""  # the server's own name, once it has said it
        self.exported: dict[str, str] = {}  # our name -> the server's name
        self.refused: dict[str, str] = {}  # a tool not offered -> why (kept over restarts)
        self.crashes = 0
        self._session: ClientSession | None = None

    def status(self) -> dict[str, Any]:
        return {"command": self.command, "state": self.state, "name": self.name,
                "tools": sorted(self.exported), "refused": dict(sorted(self.refused.items())),
                "crashes": self.crashes}

    # ---- supervision ----------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:  # the stderr readers
            self._nursery = nursery
            await self._supervise()
            nursery.cancel_scope.cancel()

    async def _supervise(self) -> None:
        s = self.settings
        while True:
            started = trio.current_time()
            try:
                end = await self._serve_once()
            except Exception as exc:  # our bug or the SDK's: log it, treat it as a crash
                log.exception("MCP server %s: the session failed", self.label)
                end = Ended(f"the session failed ({type(exc).__name__})", retry=True)
            self._withdraw()
            if not end.retry:
                return self._give_up(str(end))
            if trio.current_time() - started >= s.stable_s:
                self.crashes = 0
            self.crashes += 1
            if self.crashes > s.max_restarts:
                return self._give_up(f"{end}; {s.max_restarts} restarts did not hold")
            delay = min(s.backoff_cap_s, s.backoff_s * 2 ** (self.crashes - 1))
            log.warning("MCP server %s (%s) ended: %s; restart %d of %d in %.1f s",
                        self.label, self.command, end, self.crashes, s.max_restarts, delay)
            self.state = "restarting"
            self.metrics.restarts.labels(self.label).inc()
            await trio.sleep(delay)

    def _give_up(self, why: str) -> None:
        self.state = "given up"
        self.metrics.given_up.labels(self.label).inc()
        log.error("MCP server %s (%s) given up: %s; its tools are not offered (fix it "
                  "and restart peerd)", self.label, self.command, why)

    async def _serve_once(self) -> Ended:
        """Start, initialize, offer the tools, serve until the server exits. Ends are
        returned, not raised: an exception would leave the SDK's task groups wrapped."""
        read_fd, write_fd = os.pipe()
        errlog = os.fdopen(write_fd, "w")
        reader: trio.CancelScope = await self._nursery.start(self._stderr_to_log, read_fd)
        params = StdioServerParameters(command=self.argv[0], args=self.argv[1:])
        try:
            async with stdio_client(params, errlog=errlog) as (read, write):
                errlog.close()  # the child holds its copy: EOF when it exits
                return await self._session_over(read, write)
        except OSError as exc:  # the spawn, before the SDK's task group
            return Ended(f"cannot start {self.argv[0]!r}: {exc.strerror or exc}", retry=False)
        finally:
            errlog.close()
            reader.deadline = trio.current_time() + STDERR_DRAIN_S  # its last lines

    async def _session_over(self, read: Any, write: Any) -> Ended:
        # Our own hop between the transport and the session: when the server's stdout
        # ends (it exited), `gone` is set, whatever the session is doing.
        gone = trio.Event()
        send, receive = anyio.create_memory_object_stream[SessionMessage | Exception](0)

        async def pump() -> None:
            try:
                async with send:
                    async for item in read:
                        await send.send(item)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            finally:
                gone.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump)
            try:
                async with ClientSession(receive, write) as session:
                    listed = await self._ready(session, gone)
                    if isinstance(listed, Ended):
                        return listed
                    self._session = session
                    self._offer(listed)
                    self.state = "up"
                    log.info("MCP server %s (%s, %s) up: offers %s", self.label,
                             self.name or "unnamed", self.command,
                             ", ".join(sorted(self.exported)) or "no tools")
                    await gone.wait()
                    return Ended("it exited", retry=True)
            finally:  # out of the ledger now, not after the process is reaped
                self._session = None
                self.state = "down"
                self._withdraw()
                nursery.cancel_scope.cancel()

    async def _ready(self, session: ClientSession, gone: trio.Event
                     ) -> list[types.Tool] | Ended:
        """initialize and tools/list within ready_s; Ended if it exits or stays silent."""
        listed: list[types.Tool] = []
        with trio.move_on_after(self.settings.ready_s) as scope:
            try:
                init = await session.initialize()
                self.name = init.server_info.name[:64]
                cursor = None
                while len(listed) < MAX_LISTED:
                    page = await session.list_tools(
                        params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
                    listed.extend(page.tools)
                    cursor = page.next_cursor
                    if not cursor:
                        break
            except MCPError as exc:
                if gone.is_set():
                    return Ended("it exited before it was ready", retry=True)
                return Ended(f"its handshake failed: {exc}", retry=True)
        if scope.cancelled_caught:
            if gone.is_set():
                return Ended("it exited before it was ready", retry=True)
            return Ended(f"no initialize reply and tool list within "
                         f"{self.settings.ready_s:g} s (is it an MCP server on stdio?)",
                         retry=False)
        return listed

    # ---- the tools ------------------------------------------------------------------

    def _offer(self, listed: list[types.Tool]) -> None:
        prefix = mcp_tools.prefix_of(self.name, self.label)
        tools: list[Tool] = []
        names: set[str] = set()
        for tool in listed:
            try:
                name = mcp_tools.export_name(
                    tool.name, prefix, lambda n: n in names or self.host.offered(n))
                structured = tool.output_schema is not None
                tools.append(mcp_tools.exported(tool, name, self._runner(tool.name, structured),
                                                capacity=self.settings.capacity))
                names.add(name)
                self.exported[name] = tool.name
            except (mcp_tools.Refused, BadTool) as exc:
                self._refused(tool.name, str(exc))
        for name, why in self.host.offer(tools):
            self.exported.pop(name, None)
            self._refused(name, why)

    def _refused(self, name: str, why: str) -> None:
        """Counted and logged once per tool and reason: a restart lists the same broken
        tool again, and the counter counts broken tools, not restarts."""
        if self.refused.get(name) == why:
            return
        if len(self.refused) < MAX_LISTED:
            self.refused[name] = why
        self.metrics.refused.labels(self.label).inc()
        log.warning("MCP server %s: tool %r not offered: %s", self.label, name[:80], why)

    def _withdraw(self) -> None:
        if self.exported:
            self.host.withdraw(list(self.exported))
            log.info("MCP server %s: withdrew %s", self.label, ", ".join(sorted(self.exported)))
        self.exported = {}

    def _runner(self, tool: str, structured: bool) -> mcp_tools.RunFn:
        async def run(arguments: dict[str, Any]) -> dict[str, Any]:
            return mcp_tools.result_of(await self.call(tool, arguments), structured)

        return run

    async def call(self, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
        """One call through the session; ToolError for anything but the server's answer."""
        session = self._session
        if session is None:
            raise ToolError(f"the MCP server behind {tool} is not up ({self.state}); try "
                            "again shortly")
        try:
            with trio.fail_after(self.settings.deadline_s):
                return await session.call_tool(tool, arguments)
        except trio.TooSlowError:
            raise ToolError(f"the MCP server did not answer within "
                            f"{self.settings.deadline_s:g} s") from None
        except MCPError as exc:
            if self._session is None or exc.error.code == types.CONNECTION_CLOSED:
                raise ToolError("the MCP server exited during the call") from None
            raise ToolError(f"the MCP server refused the call: {exc.error.message}") from None
        except RuntimeError as exc:  # the SDK's check of the result against outputSchema
            raise ToolError(f"the MCP server's answer was refused: {exc}") from None

    # ---- stderr ---------------------------------------------------------------------

    async def _stderr_to_log(self, fd: int, *,
                             task_status: TaskStatus[trio.CancelScope]) -> None:
        lines = StderrLines(self.label)
        with trio.CancelScope() as scope:
            task_status.started(scope)
            try:
                async with trio.lowlevel.FdStream(fd) as stream:
                    while chunk := await stream.receive_some(65536):
                        lines.feed(chunk, trio.current_time())
            except (trio.ClosedResourceError, OSError):
                pass
        lines.close()


class StderrLines:
    """A server's stderr into our log, bounded: lines cut to STDERR_LINE_CHARS, at most
    STDERR_LINES_PER_WINDOW a window, the rest counted."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.buffer = b""
        self.window_start = float("-inf")
        self.lines = 0
        self.dropped = 0

    def feed(self, chunk: bytes, now: float) -> None:
        *whole, rest = (self.buffer + chunk).split(b"\n")
        self.buffer = rest[-4 * STDERR_LINE_CHARS:]  # a line with no end stays bounded
        for raw in whole:
            if now - self.window_start >= STDERR_WINDOW_S:
                self._tell_dropped()
                self.window_start, self.lines = now, 0
            if self.lines >= STDERR_LINES_PER_WINDOW:
                self.dropped += 1
                continue
            self.lines += 1
            text = raw.decode("utf-8", "replace").rstrip()[:STDERR_LINE_CHARS]
            log.info("MCP server %s stderr: %s", self.label, text)

    def close(self) -> None:
        if self.buffer:
            self.feed(b"\n", self.window_start)
        self._tell_dropped()

    def _tell_dropped(self) -> None:
        if self.dropped:
            log.info("MCP server %s: %d stderr lines not logged", self.label, self.dropped)
            self.dropped = 0
