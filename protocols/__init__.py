"""The wire contract between peerd peers: protocol ids, message types, limits, codecs.

Nothing here imports torch or the daemon; `peerd` depends on this package, never
the other way round.
"""
