"""The tools on /metrics: calls served by tool and outcome, their latency, and each
tool's use of its capacity (read from the limiter when scraped, so it is exact).

Tool labels are the names this peer offers; a call of a tool it does not offer is
counted under "(unknown)", so a caller cannot grow the label set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from peerd.plans.retry import Slots
    from peerd.plans.toolbox import Toolbox

UNKNOWN = "(unknown)"
LATENCY_BUCKETS = (0.001, 0.005, 0.02, 0.1, 0.5, 1.0, 2.0, 5.0, 15.0, 60.0)


class ToolMetrics:
    def __init__(self, registry: CollectorRegistry, toolbox: Toolbox) -> None:
        self.toolbox = toolbox
        self.calls = Counter("peerd_tool_calls", "Tool calls served, by tool and outcome",
                             ["tool", "outcome"], registry=registry)
        self.latency = Histogram("peerd_tool_latency_seconds", "Time to answer a tool call "
                                 "served, by tool", ["tool"], buckets=LATENCY_BUCKETS,
                                 registry=registry)
        registry.register(_CapacityCollector(toolbox))

    def observe(self, tool: str, outcome: str, elapsed_s: float) -> None:
        label = tool if tool in self.toolbox.tools else UNKNOWN
        self.calls.labels(label, outcome).inc()
        self.latency.labels(label).observe(elapsed_s)


class _CapacityCollector:
    def __init__(self, toolbox: Toolbox) -> None:
        self.toolbox = toolbox

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily("peerd_tool_in_flight", "Calls of a tool running now "
                                      "(its capacity limiter's use)", labels=["tool"])
        capacity = GaugeMetricFamily("peerd_tool_capacity", "Calls of a tool this peer "
                                     "runs at once", labels=["tool"])
        for name, cap in sorted(self.toolbox.capacity.items()):
            in_flight.add_metric([name], cap.in_flight)
            capacity.add_metric([name], cap.limit)
        yield in_flight
        yield capacity


class DispatchMetrics:
    """The caller's side: attempts by tool and outcome, how long each waited for a free
    slot (queue time) and took, and our calls in flight at each peer by tool (the
    dispatcher's limiter, read when scraped). Peers in the gauge are those with calls in
    flight now, so its labels stay as few as the calls."""

    def __init__(self, registry: CollectorRegistry, slots: Slots) -> None:
        self.attempts = Counter("peerd_tool_dispatch_attempts", "Tool call attempts made "
                                "by this peer's dispatcher, by tool and outcome",
                                ["tool", "outcome"], registry=registry)
        self.queued = Histogram("peerd_tool_dispatch_queue_seconds", "Time an attempt "
                                "waited for a free slot at a peer offering its tool",
                                ["tool"], registry=registry,
                                buckets=(0.001, 0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30))
        self.latency = Histogram("peerd_tool_dispatch_attempt_seconds", "Time an attempt "
                                 "took, from its request to its answer or failure",
                                 ["tool"], registry=registry)
        registry.register(_SlotsCollector(slots))


class _SlotsCollector:
    def __init__(self, slots: Slots) -> None:
        self.slots = slots

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("peerd_tool_dispatch_in_flight", "Our tool calls in "
                                  "flight at a peer (never above its declared capacity "
                                  "for dispatched calls)", labels=["tool", "peer"])
        for (peer, tool), held in self.slots:
            gauge.add_metric([tool, peer], held)
        yield gauge


class PlanMetrics:
    """The planner (plans/planning.py): plans by outcome, steps and how their text
    parsed (with or without a constraint), replans, the planner model's tokens, and the
    plans running now."""

    def __init__(self, registry: CollectorRegistry, running: Callable[[], int]) -> None:
        self.plans = Counter("peerd_plans", "Plans ended, by outcome (answered, a budget "
                             "that ran out, error, interrupted)", ["outcome"],
                             registry=registry)
        self.steps = Counter("peerd_plan_steps", "Planner steps, by how their text parsed "
                             "(ok, not_json, bad_step, bad_call) and whether it was "
                             "decoded under a constraint", ["parse", "constrained"],
                             registry=registry)
        self.replans = Counter("peerd_plan_replans", "Observations of what went wrong that "
                               "the planner planned again from", registry=registry)
        self.tokens = Counter("peerd_plan_tokens", "Tokens the planner's model generated",
                              registry=registry)
        registry.register(_RunningCollector(running))


class _RunningCollector:
    def __init__(self, running: Callable[[], int]) -> None:
        self.running = running

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("peerd_plans_running", "Plans running now",
                                value=self.running())
