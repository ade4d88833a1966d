"""The capability ledger: every peer's signed, self-described entry.

    book.py    the pure book: verify, merge (last writer wins by seq), expire, query
    store.py   its SQLite store, so a restarted peer starts warm
"""
