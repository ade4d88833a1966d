"""Gradientsys (issue 27), first slice: typed (MCP) tools across the swarm. A peer's
tools are served over /peerd/tool/1.0.0 and listed in its ledger entry; service.py is
the Service. The planner and scheduler are not built yet (docs/plans.md)."""
