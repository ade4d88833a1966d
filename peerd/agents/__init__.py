"""Agents: Symphony's beacon election of task workers, chain-of-thought voting and
reputation.

Pure parts (no I/O, tested with a fake clock): `answers` (extraction and
normalisation), `election` (ranking, seats, fallbacks), `voting` (weighted argmax),
`reputation` (EWMA records and how reports combine), `skills` (match scores).
The I/O lives in `requester` (this peer's tasks: beacons, bids, seats, votes; their
records in `record`), `worker` (bidding on and answering other peers' tasks) and
`solver` (chain-of-thought generation with the peer's model). `symphony` is the
service that runs both sides on a node.
"""
