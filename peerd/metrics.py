"""Prometheus metrics for one node, in a registry of its own (several nodes can
live in one process in tests)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.peers = Gauge("peerd_peers", "Connected peers", registry=r)
        self.ledger_entries = Gauge("peerd_ledger_entries", "Live ledger entries", registry=r)
        self.messages = Counter(
            "peerd_messages", "Protocol and gossip messages", ["direction", "kind"], registry=r
        )
        self.rejections = Counter(
            "peerd_rejections", "Refused input by reason", ["reason"], registry=r
        )
        self.connections = Counter(
            "peerd_connection_events", "Connection events", ["event"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
