"""Where a cold pipeline session's time goes: a timeline of its opening and first
FORWARD, over real in-process libp2p hosts whose every link crosses the testnet's
latency proxy (testnet/proxy.py: T ms each way).

Three nodes serve a tiny random Llama in three spans, as the testnet's 3-peer
SmolLM2 runs one stage a peer; node 0 is the entry (it serves the first span itself,
so a pass crosses 3 links: entry -> n1 -> n2 -> entry). Every connection is made
through the proxies before the first request (as the daemon keeps its ledger peers
connected), so what is timed is the session: the streams each hop opens (dial +
multistream-select), OPEN and its answers, the return stream, the first FORWARD. The
model is tiny, so compute is ~0 and what is left is the network's part.

Each event is timestamped at the node where it happened (one process: one clock).
Prints the timeline of one cold request, and the cold and warm totals over --reps;
`--json` writes them. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

# Three nodes in one process: one torch thread each, or their OpenMP teams throttle
# one another (bench/README.md, "one compute thread per peer") and compute swamps all.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import multiaddr  # noqa: E402
from libp2p.peer.peerinfo import info_from_p2p_addr  # noqa: E402

from peerd.inference.runtime import ModelRuntime  # noqa: E402
from peerd.inference.slot import ModelOptions  # noqa: E402
from peerd.inference.swarm import pipeline as pipeline_module  # noqa: E402
from peerd.inference.swarm.routing import Route  # noqa: E402
from peerd.node import Node  # noqa: E402
from protocols.codec import unpackb  # noqa: E402
from testnet import proxy  # noqa: E402
from tests.harness import book, serve_model, swarm, wait_for  # noqa: E402
from tests.models import tiny_llama_dir  # noqa: E402

SPLITS = [(0, 1), (1, 3), (3, 4)]
PROMPT = [5, 17, 33, 101, 7, 250, 12, 64, 3, 99]


class Timeline:
    def __init__(self) -> None:
        self.t0 = 0.0
        self.events: list[tuple[float, str, str]] = []
        self.on = False

    def mark(self, where: str, what: str) -> None:
        if self.on:
            self.events.append(((time.perf_counter() - self.t0) * 1e3, where, what))

    def start(self) -> None:
        self.events.clear()
        self.t0 = time.perf_counter()
        self.on = True


TL = Timeline()


def instrument(nodes: list[Node]) -> None:
    """Wrap each node's stream opening, and count the frames the shard code reads and
    writes, so the timeline shows where the time went."""
    names = {n.peer_id: f"n{i}" for i, n in enumerate(nodes)}
    for node in nodes:
        for attr in ("new_stream", "new_stream_eager"):
            original = getattr(node, attr, None)
            if original is None:
                continue

            def wrapped(peer_id: str, protocol: str, *, _o: Callable[..., Awaitable[Any]]
                        = original, _n: Node = node, _a: str = attr) -> Awaitable[Any]:
                async def run() -> Any:
                    me, them = names[_n.peer_id], names.get(peer_id, peer_id[:8])
                    TL.mark(me, f"{_a} -> {them} {protocol.split('/')[2]}: start")
                    stream = await _o(peer_id, protocol)
                    TL.mark(me, f"{_a} -> {them} {protocol.split('/')[2]}: ready")
                    return stream
                return run()

            setattr(node, attr, wrapped)

    import peerd.streams as streams_module
    from peerd.inference.swarm import server as server_module

    for module in (server_module, pipeline_module, streams_module):
        read, write = module.read_frame, module.write_frame  # type: ignore[attr-defined]

        async def traced_read(stream: Any, max_size: int, _r: Any = read) -> bytes:
            raw = await _r(stream, max_size)
            TL.mark(_where(stream, names), f"read {_kind(raw)}")
            return raw  # type: ignore[no-any-return]

        async def traced_write(stream: Any, payload: bytes, max_size: int, _w: Any = write
                               ) -> None:
            TL.mark(_where(stream, names), f"write {_kind(payload)}")
            await _w(stream, payload, max_size)

        module.read_frame = traced_read  # type: ignore[attr-defined]
        module.write_frame = traced_write  # type: ignore[attr-defined]


def _kind(raw: bytes) -> str:
    """The message's KIND (the "t" of its msgpack map)."""
    try:
        obj = unpackb(raw)
        return str(obj.get("t", "?")) if isinstance(obj, dict) else "?"
    except Exception:
        return f"{len(raw)} bytes"


def _where(stream: Any, names: dict[str, str]) -> str:
    """The far end of `stream` (one process holds every node: the near end is unknown)."""
    far = getattr(getattr(stream, "muxed_conn", None), "peer_id", None)
    return f"<> {names.get(str(far), 'self')}"


@contextlib.asynccontextmanager
async def proxied_swarm(tmp: Path, latency_ms: float) -> AsyncIterator[list[ModelRuntime]]:
    spec = tiny_llama_dir(tmp)
    async with swarm(3, tmp, connect="none", heartbeat_s=2.0) as nodes, \
            trio.open_nursery() as nursery:
        ports = [int(n.addrs()[0].split("/tcp/")[1].split("/")[0]) for n in nodes]
        links = [proxy.Link(0, p) for p in ports]
        bound = await nursery.start(proxy.serve, links, latency_ms / 1000)
        for i, a in enumerate(nodes):  # a full mesh, every link through a proxy
            for j in range(i + 1, len(nodes)):
                b = nodes[j]
                addr = f"/ip4/127.0.0.1/tcp/{bound[j]}/p2p/{b.peer_id}"
                await a.host.connect(info_from_p2p_addr(multiaddr.Multiaddr(addr)))
        runtimes = [await serve_model(n, ModelOptions(str(spec), layers=s))
                    for n, s in zip(nodes, SPLITS, strict=True)]
        await wait_for(lambda: all(len([e for e in book(n).entries() if e.models]) == 3
                                   for n in nodes), 30, "every ledger lists every shard")
        yield runtimes
        nursery.cancel_scope.cancel()


async def one_request(entry: ModelRuntime, fresh: bool) -> dict[str, float]:
    """A 1-token request's pass: open (unless warm) and one FORWARD of the prompt."""
    gen = entry.generator
    route = gen.route()
    assert isinstance(route, Route)
    with torch.inference_mode():
        hidden = entry.head.embed(torch.tensor([PROMPT]))
    t0 = time.perf_counter()
    if fresh:
        session = await open_session(gen, route)
    else:
        session = gen.pipeline.take(route, 64)  # type: ignore[arg-type]
        assert session is not None, "no pooled session"
    t1 = time.perf_counter()
    result = await session.step(hidden, 0, keep=0 if session.held else -1)
    session.held = len(PROMPT)
    t2 = time.perf_counter()
    await gen.pipeline.release(session)
    return {"open_ms": (t1 - t0) * 1e3, "forward_ms": (t2 - t1) * 1e3,
            "total_ms": (t2 - t0) * 1e3, "compute_ms": result.compute_ms}


async def open_session(gen: Any, route: Any) -> Any:
    start = getattr(gen.pipeline, "start", None)
    if start is not None:  # the pipelined opening: OPEN goes with the first FORWARD
        return await start(route, 64)
    return await gen.pipeline.open(route, 64)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"latency_ms": args.latency, "links": 3}
    with tempfile.TemporaryDirectory() as tmp:
        async with proxied_swarm(Path(tmp), args.latency) as runtimes:
            nodes = [r.node for r in runtimes]
            instrument(nodes)
            entry = runtimes[0]
            await trio.sleep(1.0)
            TL.start()
            first = await one_request(entry, fresh=True)
            TL.on = False
            out["timeline"] = [{"ms": round(t, 1), "where": w, "what": e}
                               for t, w, e in TL.events]
            cold, warm = [first], []
            for _ in range(args.reps):
                warm.append(await one_request(entry, fresh=False))
                # a fresh session each time: drop the pooled one
                for s in [s for idle in entry.generator.pipeline.pool.values() for s in idle]:
                    await s.close()
                entry.generator.pipeline.pool.clear()
                await trio.sleep(0.2)
                cold.append(await one_request(entry, fresh=True))
            for name, runs in (("cold", cold), ("warm", warm)):
                out[name] = {k: round(statistics.median(r[k] for r in runs), 1)
                             for k in runs[0]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency", type=float, default=50.0, help="ms each way per link")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = trio.run(main_async, args)
    for e in out["timeline"]:
        print(f"{e['ms']:8.1f} ms  {e['where']:<10} {e['what']}")
    for name in ("cold", "warm"):
        print(f"{name}: {out[name]}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
