"""Small MCP servers (the official SDK's `MCPServer`) that the tests start over stdio."""
