"""Placement: pure."""

from __future__ import annotations

from peerd.inference.swarm.placement import choose_layers, coverage, window_size
from peerd.inference.swarm.routing import Server


def test_first_peer_starts_at_zero() -> None:
    assert choose_layers([], 30, 10) == (0, 10)


def test_next_peers_fill_the_gaps() -> None:
    servers = [Server("a", 0, 10)]
    assert choose_layers(servers, 30, 10) == (10, 20)
    servers.append(Server("b", 10, 20))
    assert choose_layers(servers, 30, 10) == (20, 30)


def test_full_coverage_adds_a_replica_where_least_served() -> None:
    servers = [Server("a", 0, 30), Server("b", 0, 10), Server("c", 20, 30)]
    assert choose_layers(servers, 30, 10) == (10, 20)


def test_window_covers_a_gap_in_the_middle() -> None:
    servers = [Server("a", 0, 12), Server("b", 18, 30)]
    start, end = choose_layers(servers, 30, 8)
    assert start <= 12 and end >= 18


def test_big_memory_takes_everything() -> None:
    assert choose_layers([Server("a", 0, 5)], 30, 100) == (0, 30)


def test_window_size_from_memory() -> None:
    assert window_size(30, 10, 95) == 9
    assert window_size(30, 10, 5) == 1
    assert window_size(30, 10, 10**9) == 30
    assert coverage([Server("a", 0, 2), Server("b", 1, 3)], 4) == [1, 2, 1, 0]
