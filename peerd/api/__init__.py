"""The local HTTP API: admin and observability now; OpenAI-compatible /v1 later."""
