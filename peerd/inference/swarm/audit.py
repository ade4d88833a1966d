"""Audits: does each hop of a route compute what its layers compute? (the entry's side)

The checks on a RESULT (shape, dtype, finite, one timing a hop) catch what no model
computes. A hop that sends well-formed, finite, wrong hidden states passes them: noise,
zeros, or its input passed on uncomputed (a peer that takes routes for compute it does
not do). Every request through it answers garbage, and nobody is blamed.

So a request is drawn for an audit as it starts, at `--audit-rate` (`keeper`): while
it decodes, the entry keeps what its route returned at each position (`Served`: the
final hidden states, as the pass that computed the position returned them). After it
ends (one audit at a time, in the background), the entry replays its history (prompt
and answer) through the same route, twice, and through the route with one hop's
layers computed by someone else, for each hop that another peer serves in the same
dtype (the entry itself first, where it serves them: it trusts its own compute).
Then (`judge`, `noise_source`, `served_verdict`: pure):

- the route must agree with itself (a hop computes the same for the same input): if
  it does not, the hop whose replacement makes it agree is at fault alone; none, or
  several: inconclusive;
- each hop's version of its layers against the others': a version that disagrees
  with the entry's own is at fault alone; else a strict majority of three or more
  versions blames the rest, alone; two that disagree are both at fault (one of them
  lies, and the entry cannot tell which: as with a hop's word against its neighbour,
  pipeline.py);
- what the route served in the request against what it computes on the replay: a
  replay is a prefill from position 0, which a hop can tell from a request's later
  passes (a decoding step, a draft's tree) and compute honestly while it lies on those.
  Where the two differ, a hop of the route lied while it served: the route's one hop
  that is not the entry is at fault alone; several: all of them (the entry saw only
  the last hop's output).

A version at fault is banned; one proven wrong (by the entry's own compute, a majority,
or as the route's only other hop) is also counted an offence (`wrong_output`) and
banned for the longest a ban lasts (5 minutes) at once; proven wrong again, for a day.
Proofs and their bans outlive a restart of the entry (peerd/proven.py).

Agreement: the final hidden states at every position within `tolerance` of each other
(relative L2 distance), the loosest of the TOLERANCES of the wire's and the hops'
dtypes. Honest hops differ by less (summation orders, a position computed alone or in
a prefill, and in 16 bits kernels that round at other places; bench/README.md,
"Audits"); a lie that moves the output by less passes. An audit replays the whole
request: a prefill of it per version, a few in all, where the request took a pass a
round.
"""

from __future__ import annotations

import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from peerd.inference.swarm.pipeline import WRONG_OUTPUT, PipelineFailure
from peerd.inference.swarm.routing import Route, Server, Span
from peerd.proven import PROVEN_FILE, ProofFile
from protocols.shard import Hop

if TYPE_CHECKING:
    from peerd.inference.generate import Generator

log = logging.getLogger(__name__)

MAX_ALTERNATIVES = 2  # other versions of a hop's layers an audit computes
KEPT_ROWS = 1024  # rows of what a request's route returned kept for its audit, at most
# Honest versions differ by at most (bench/README.md, "Audits"): float32 3.3e-6;
# float16 1.1e-2 and bfloat16 9.1e-2 where one kernel rounds after every operation and
# another at each layer's end only (as GPU kernels accumulating in float32 do)
TOLERANCES = {"float32": 1e-3, "float16": 2.5e-2, "bfloat16": 0.15}
OUTCOMES = ("agreed", "blamed", "disputed", "inconclusive", "failed", "unauditable")


@dataclass(frozen=True, slots=True)
class Verdict:
    at_fault: tuple[str, ...]
    proven: bool  # by the entry's own compute or a majority: each alone; else a dispute
    why: str


@dataclass(frozen=True, slots=True)
class Served:
    """What a request's route returned: the final hidden states [n, H] at `positions`
    (a position again where a later pass computed it again), each as the pass of the
    request that computed it returned it."""

    positions: tuple[int, ...]
    hidden: torch.Tensor


class Keeper:
    """What the route of a request drawn for an audit returns, kept while it decodes
    (decoding.py): the rows the session it ends on returned for committed positions,
    each time it did (a tree's path decides the next token, and is sent again as a
    chain: a lie in either would decide what the request answers). At most `limit`,
    a uniform sample of them past that (reservoir sampling): a lie at every step is
    seen at once, one at a single position of a long request with odds limit / rows."""

    def __init__(self, limit: int = KEPT_ROWS, rng: random.Random | None = None) -> None:
        self.limit = limit
        self.rng = rng or random.Random()
        self.seen = 0
        self.positions: list[int] = []
        self.rows: list[torch.Tensor] = []

    def keep(self, start: int, rows: torch.Tensor) -> None:
        """The route returned rows [n, H] for positions start, start + 1, ..."""
        for i in range(rows.shape[0]):
            if len(self.rows) < self.limit:
                self.positions.append(start + i)
                self.rows.append(rows[i].clone())
            elif (slot := self.rng.randrange(self.seen + 1)) < self.limit:
                self.positions[slot], self.rows[slot] = start + i, rows[i].clone()
            self.seen += 1

    def forget(self) -> None:
        """A new session: what the last one returned is not the new route's."""
        self.seen, self.positions, self.rows = 0, [], []

    def served(self) -> Served | None:
        if not self.rows:
            return None
        return Served(tuple(self.positions), torch.stack(self.rows))


def deviations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The relative L2 distance between a's and b's hidden states at each position
    ([..., H] each, alike)."""
    a, b = a.float(), b.float()
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-6)
    out: torch.Tensor = (a - b).norm(dim=-1) / scale
    return out


def deviation(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest relative L2 distance between a's and b's hidden states at a
    position ([1, T, H] each)."""
    return float(deviations(a, b).max())


def tolerance(dtypes: Sequence[str]) -> float:
    """How far honest versions of a route in `dtypes` (the wire's, the hops') may
    differ: the loosest of theirs; a dtype not in TOLERANCES as bfloat16."""
    return max(TOLERANCES.get(d, TOLERANCES["bfloat16"]) for d in dtypes)


def judge(peers: Sequence[str], agree: Sequence[Sequence[bool]],
          trusted: str | None = None) -> Verdict | None:
    """Versions of one hop's layers, by the peers that computed them (`peers[0]`: the
    route's hop); `agree[i][j]`: versions i and j agree. None when all agree."""
    n = len(peers)
    if all(agree[0][j] for j in range(1, n)):
        return None
    if trusted is not None and trusted in peers:
        t = peers.index(trusted)
        wrong = tuple(peers[i] for i in range(n) if i != t and not agree[i][t])
        return Verdict(wrong, True, f"{', '.join(wrong)} disagreed with the entry's own "
                       "compute of the same layers")
    for i in range(n):
        group = [j for j in range(n) if agree[i][j]]
        if 2 * len(group) > n:
            wrong = tuple(peers[j] for j in range(n) if j not in group)
            return Verdict(wrong, True, f"{', '.join(wrong)} disagreed with "
                           f"{len(group)} of {n} versions of the same layers")
    return Verdict(tuple(peers), False, f"{' and '.join(peers)} computed the same layers "
                   "differently (one of them lies)")


def noise_source(reproducible: dict[str, bool]) -> str | None:
    """The route did not agree with itself; `reproducible[hop]`: it did with that hop's
    layers computed by someone else. The one such hop, or None."""
    fixes = [hop for hop, fixed in reproducible.items() if fixed]
    return fixes[0] if len(fixes) == 1 else None


def served_verdict(peers: Sequence[str], me: str, off: int, of: int) -> Verdict:
    """The route through `peers` returned, at `off` of the `of` positions it served a
    request, what its hops do not compute on a replay: one of its hops that is not the
    entry lied while serving. The only one is proven; of several, the entry saw only
    the last one's output, and all are at fault."""
    others = tuple(dict.fromkeys(p for p in peers if p != me))
    why = (f"the route returned, at {off} of the {of} positions it served a request, "
           "hidden states that its hops do not compute on a replay")
    return Verdict(others, len(others) == 1,
                   f"{others[0]} served what it does not compute ({why})"
                   if len(others) == 1 else f"one of {', '.join(others)} lied: {why}")


def alternatives(servers: Sequence[Server], route: Route, i: int, me: str,
                 banned: frozenset[str]) -> list[str]:
    """Peers other than hop i's that serve all of its layers in its dtype, the entry
    first: at most MAX_ALTERNATIVES. A peer elsewhere on the route can be one only
    beside hop i (its span and hop i's become one: a route crosses a peer once)."""
    span = route.spans[i]
    dtype = next((s.dtype for s in servers if s.peer_id == span.peer_id
                  and s.start <= span.start and span.end <= s.end), "")
    beside = {route.spans[j].peer_id for j in (i - 1, i + 1) if 0 <= j < len(route.spans)}
    elsewhere = {s.peer_id for s in route.spans} - beside
    found = [s.peer_id for s in servers
             if s.start <= span.start and span.end <= s.end and s.dtype == dtype
             and s.peer_id not in elsewhere and (s.peer_id == me or s.peer_id not in banned)]
    found = sorted(set(found), key=lambda p: (p != me, found.index(p)))
    return [p for p in found if p != span.peer_id][:MAX_ALTERNATIVES]


def swapped(route: Route, i: int, peer: str) -> Route:
    """`route` with hop i's layers computed by `peer` (one span with its own beside)."""
    spans = list(route.spans)
    spans[i] = Span(peer, spans[i].start, spans[i].end, spans[i].cost_ms)
    merged: list[Span] = []
    for span in spans:
        if merged and merged[-1].peer_id == span.peer_id:
            last = merged.pop()
            span = Span(span.peer_id, last.start, span.end, last.cost_ms + span.cost_ms)
        merged.append(span)
    return Route(tuple(merged), route.cost_ms)


class Audits:
    """The entry's audits of the routes its requests took (`after` a request)."""

    def __init__(self, generator: Generator, rate: float,
                 draw: Callable[[], float] = random.random) -> None:
        self.generator = generator
        self.rate = rate
        self.draw = draw
        self.busy = False
        self.counts: Counter[str] = Counter()
        # the peers proven wrong, banned again for what is left of their bans
        self.proofs = ProofFile(Path(generator.node.config.data_dir) / PROVEN_FILE,
                                first_s=generator.bans.max_s)
        self.proven = self.proofs.book
        for peer, (seconds, why) in self.proven.banned(time.time()).items():
            generator.bans.ban(peer, time.monotonic(), WRONG_OUTPUT, at_least_s=seconds)
            log.info("%s stays banned %.0f s more: proven wrong (%s)", peer, seconds, why)

    def keeper(self) -> Keeper | None:
        """A request starts: a Keeper of what its route returns when it is drawn for an
        audit (at `rate`), else None. Drawn now, so that no pass of it can be told from
        an audited request's."""
        return Keeper() if self.rate > 0 and self.draw() < self.rate else None

    def after(self, hops: Sequence[Hop], tokens: Sequence[int], kept: Keeper | None) -> None:
        """A request on the route through `hops` ended well: audit it if it was drawn
        (`kept` what its route returned), unless one is running or the route is ours
        alone."""
        me = self.generator.node.peer_id
        route = Route(tuple(Span(h.peer_id, h.start, h.end, 0.0) for h in hops), 0.0)
        if (kept is None or self.busy or len(tokens) < 2
                or all(s.peer_id == me for s in route.spans)):
            return
        self.busy = True
        self.generator.node.nursery.start_soon(self._audit, route, tuple(tokens),
                                               kept.served())

    async def _audit(self, route: Route, tokens: tuple[int, ...], served: Served | None
                     ) -> None:
        try:
            await self.audit(route, tokens, served)
        except Exception:  # our bug: the audit is lost, the node goes on
            log.exception("auditing a route failed")
            self.counts["failed"] += 1
        finally:
            self.busy = False

    async def audit(self, route: Route, tokens: Sequence[int], served: Served | None = None
                    ) -> str:
        """Audit `route` on `tokens` now (and what it `served` a request of them); the
        outcome (one of OUTCOMES), published as an `inference.audit` event, its verdict
        blamed."""
        g = self.generator
        me = g.node.peer_id
        servers = g.servers()
        banned = g.bans.banned(time.monotonic())
        hops = {i: alternatives(servers, route, i, me, banned)
                for i, s in enumerate(route.spans) if s.peer_id != me}
        hops = {i: alts for i, alts in hops.items() if alts}
        peers = [s.peer_id for s in route.spans]
        if not hops and served is None:
            return self._publish("unauditable", peers, "no other peer serves any hop's "
                                 "layers in its dtype")
        dtypes = [g.wire_dtype, *(s.dtype for s in servers if s.peer_id in peers)]
        tol = tolerance(dtypes)
        hidden = await g.in_thread(g.embed, list(tokens))  # [1, T, H]
        try:
            base = await self._run(route, hidden)
            again = await self._run(route, hidden)
            if deviation(base, again) > tol:
                reproducible = {}
                for i, alts in hops.items():
                    r = swapped(route, i, alts[0])
                    a, b = await self._run(r, hidden), await self._run(r, hidden)
                    reproducible[peers[i]] = deviation(a, b) <= tol
                source = noise_source(reproducible)
                if source is None:
                    return self._publish("inconclusive", peers, "the route computed the "
                                         "same tokens differently each time")
                return await self._blame(Verdict((source,), True, f"{source} computed the "
                                                 "same input differently each time"), peers)
            for i, alts in hops.items():
                versions = [(peers[i], base)]
                for alt in alts:
                    versions.append((alt, await self._run(swapped(route, i, alt), hidden)))
                agree = [[deviation(x, y) <= tol for _, y in versions] for _, x in versions]
                verdict = judge([p for p, _ in versions], agree, trusted=me)
                if verdict is not None:
                    return await self._blame(verdict, peers)
        except PipelineFailure as failure:  # a pass failed: blamed as any
            g.blame(failure, 1)
            return self._publish("failed", peers, str(failure))
        said = [f"{len(hops)} hop(s) agreed with another peer's compute of their layers"]
        if served is not None:
            at = [i for i, p in enumerate(served.positions) if p < base.shape[1]]
            rows = base[0, [served.positions[i] for i in at]]  # [n, H]
            off = int((deviations(rows, served.hidden[at]) > tol).sum())
            if off:
                return await self._blame(served_verdict(peers, me, off, len(at)), peers)
            said.append(f"the route served {len(at)} positions as it computes them")
        return self._publish("agreed", peers, "; ".join(said))

    async def _run(self, route: Route, hidden: torch.Tensor) -> torch.Tensor:
        g = self.generator
        session = await g.pipeline.open(route, hidden.shape[1], g.wire_dtype)
        try:
            out: torch.Tensor = (await session.step(hidden, 0)).hidden
            return out
        finally:
            await session.close()

    async def _blame(self, verdict: Verdict, peers: list[str]) -> str:
        g = self.generator
        if verdict.proven:
            for peer in verdict.at_fault:  # proven: the longest ban at once; again: a day
                g.node.offence(peer, WRONG_OUTPUT, verdict.why)
                seconds = self.proven.prove(peer, time.time(), verdict.why)
                g.blame(PipelineFailure(peer, WRONG_OUTPUT, verdict.why), 1,
                        at_least_s=seconds)
            await self.proofs.save()
            return self._publish("blamed", peers, verdict.why, verdict.at_fault)
        first, *others = verdict.at_fault
        g.blame(PipelineFailure(first, WRONG_OUTPUT, verdict.why,
                                others[0] if others else None), 1)
        for peer in others[1:]:  # a route's hops, all of them
            g.blame(PipelineFailure(peer, WRONG_OUTPUT, verdict.why), 1)
        return self._publish("disputed", peers, verdict.why, verdict.at_fault)

    async def forgive(self, peer: str) -> int:
        """Forget `peer`'s proofs (an operator's word, `peerd forgive`): how many."""
        proofs = self.proven.forget(peer)
        if proofs:
            await self.proofs.save()
        return proofs

    def _publish(self, outcome: str, route: list[str], why: str,
                 at_fault: tuple[str, ...] = ()) -> str:
        log.info("audit of %s: %s (%s)", route, outcome, why)
        self.counts[outcome] += 1
        self.generator.node.events.publish("inference.audit", outcome=outcome, route=route,
                                           at_fault=list(at_fault), detail=why[:300])
        return outcome

    def status(self) -> dict[str, Any]:
        return {"rate": self.rate, "running": self.busy,
                **{o: self.counts[o] for o in OUTCOMES}}
