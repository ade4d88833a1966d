"""The local HTTP API: the node's routes (app.py) and each service's: the ledger
(ledger.py), the OpenAI-compatible /v1 (openai.py) and Symphony's tasks (tasks.py)."""
