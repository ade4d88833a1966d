"""The local HTTP API: the node's own routes and auth (app.py), hypercorn on trio
(server.py), errors in OpenAI's shape (errors.py), and each service's routes: the ledger
(ledger.py), the OpenAI-compatible /v1 (openai.py, its request bodies in
openai_request.py) and Symphony's tasks (tasks.py)."""
