"""An "MCP server" that exits at once, before any initialize reply."""

import sys

print("exits: nothing to serve", file=sys.stderr, flush=True)
sys.exit(1)
