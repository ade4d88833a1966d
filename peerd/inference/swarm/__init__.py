"""The model across peers: who serves what, and the pipeline between them.

    routing.py    pure: the cheapest chain of shard peers covering every layer
    placement.py  pure: which layers a new peer should serve
    pipeline.py   the entry peer's side of a pipeline session
    server.py     the shard server: this peer's layers for other peers' sessions
"""
