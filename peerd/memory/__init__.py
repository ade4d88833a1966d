"""SEDM: a self-evolving memory shared across the swarm (docs/sedm.md)."""
