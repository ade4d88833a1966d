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
        # What this peer lends to others (shares.py), by resource and holder
        self.lent = Gauge("peerd_lent", "Held of a lent resource, by peer",
                          ["resource", "peer"], registry=r)
        self.lent_capacity = Gauge("peerd_lent_capacity", "Capacity of a lent resource",
                                   ["resource"], registry=r)
        self.evictions = Counter("peerd_evictions", "Lent things taken back for a peer "
                                 "within its share, by resource", ["resource"], registry=r)
        self.share_refusals = Counter("peerd_share_refusals", "Requests refused because "
                                      "the peer was over its fair share", ["resource"],
                                      registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
