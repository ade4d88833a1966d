"""A local multi-peer testnet: N real `peerd` processes on 127.0.0.1.

Why: the network paths of peerd (gossip, routing, speculative decoding over a
pipeline, fault recovery) are only believable when exercised against real
processes over real sockets, with link latency and crashes injected from outside.

    python -m testnet up --peers 4 --latency-ms 20
    python -m testnet up --peers 4 --model smollm2 --stages 3   # peer3 replicates peer0
    python -m testnet status [--json]
    python -m testnet kill peer2
    python -m testnet down

From Python (tests, `scripts/bench_*.py`): `up`, `status`, `kill`, `down`,
`api_get`/`api_request` and `map_peers` in `testnet.launcher`, re-exported here;
the stage split of a served model is `testnet.plan.stage_layers`.
"""

from testnet.launcher import PeerInfo, api_get, api_request, down, kill, map_peers, status, up
from testnet.state import TestnetError

__all__ = [
    "PeerInfo",
    "TestnetError",
    "api_get",
    "api_request",
    "down",
    "kill",
    "map_peers",
    "status",
    "up",
]
