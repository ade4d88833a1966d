"""Turns at the compute, handed out fairly between the peers that want them.

A peer runs its torch work one call at a time (`compute.py`), so whoever waits for the
compute waits for every call queued ahead of it. Served first come first served, one
peer pushing 2048-position FORWARDs back to back sits ahead of everyone else's every
step. `Turns` serves the waiting peers by deficit round robin instead (Shreedhar and
Varghese, "Efficient fair queuing using deficit round robin", 1995): each peer has its
own FIFO queue of jobs, each with a cost (positions x layers, say); peers are visited in
a round, a visit adds the peer's quantum to its deficit, and the peer runs queued jobs
while its deficit covers their cost. Under backlog each peer's share of the cost served
is proportional to its quantum, a peer alone gets every turn at once (work-conserving),
and a small job waits for at most the job running and one visit of each other peer, not
for another peer's whole backlog. Turns are not preempted: a job, once started, runs to
its end.

`DeficitRoundRobin` is the rule, without I/O or clock; `Turns` hands one turn at a time
out in its order to trio tasks and counts who got what: per peer for at most `max_peers`
peers (remote peers name themselves, or are named, by the thousand), the rest added up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import trio

# Peers whose turns are counted one by one; the others' figures are added up together.
MAX_PEERS = 256


@dataclass(eq=False, slots=True)
class Job:
    """One queued call: its peer and its cost. Compared by identity (two equal-looking
    jobs are two jobs)."""

    peer_id: str
    cost: int


class DeficitRoundRobin:
    """Per-peer FIFO queues served in deficit round robin order. Sans-I/O: `push` jobs,
    `pop` the next one to run, `cancel` one still queued.

    `quantum` is what a visit adds to a peer's deficit, so about the most cost a peer
    runs per visit before the next peer's go: near one ordinary job's cost, peers take
    turns job by job; far above it, a peer runs several jobs per visit. Smaller costs
    nothing, as `pop` skips rounds arithmetically. `quanta` (at least 1 each, read at
    every choice, so shares may change live) gives some peers their own: under backlog
    a peer's share of the cost served is its quantum over the sum of the waiting
    peers'. A peer whose queue empties leaves the round and its deficit resets: credit
    is not saved while idle.
    """

    def __init__(self, quantum: int, quanta: dict[str, int] | None = None) -> None:
        if quantum < 1 or any(q < 1 for q in (quanta or {}).values()):
            raise ValueError(f"quanta must be at least 1: {quantum}, {quanta}")
        self.quantum = quantum
        self.quanta = quanta if quanta is not None else {}
        self._queues: dict[str, deque[Job]] = {}
        self._deficit: dict[str, int] = {}
        self._round: deque[str] = deque()  # the peers with queued jobs; [0] is visited next
        self._visiting = False  # whether _round[0] has had its quantum for this visit
        self._queued = 0

    def __len__(self) -> int:
        return self._queued

    def queued(self, peer_id: str) -> int:
        queue = self._queues.get(peer_id)
        return len(queue) if queue else 0

    def deficit(self, peer_id: str) -> int:
        return self._deficit.get(peer_id, 0)

    def push(self, peer_id: str, cost: int) -> Job:
        """Queue a job at the end of its peer's queue; a peer not in the round joins it
        last, with no deficit."""
        if cost < 0:
            raise ValueError(f"a job's cost cannot be negative: {cost}")
        job = Job(peer_id, cost)
        queue = self._queues.get(peer_id)
        if queue is None:
            queue = self._queues[peer_id] = deque()
            self._deficit[peer_id] = 0
            self._round.append(peer_id)
        queue.append(job)
        self._queued += 1
        return job

    def cancel(self, job: Job) -> bool:
        """Take a job out of its queue; False if it is not queued (already popped or
        cancelled)."""
        queue = self._queues.get(job.peer_id)
        if queue is None or job not in queue:
            return False
        queue.remove(job)
        self._queued -= 1
        if not queue:
            self._leave(job.peer_id)
        return True

    def pop(self) -> Job | None:
        """The next job to run, taken out of its queue; None when nothing is queued.

        O(peers) whatever the costs: rather than visiting the round again and again until
        some deficit covers its head job, it works out at which visit each peer's head
        would first fit and jumps there, crediting every peer the quanta those skipped
        rounds would have given it."""
        if not self._round:
            return None
        if self._visiting:
            peer = self._round[0]
            if self._queues[peer][0].cost <= self._deficit[peer]:
                return self._take(peer)
            self._round.rotate(-1)  # its visit is over: its head waits for the next one
            self._visiting = False
        # Peer i (in round order from the next visited, of n) has its k-th visit from now
        # at step (k - 1) * n + i and first runs its head at visit r_i, the fewest quanta
        # that cover the head's cost (at least one: a visit starts by adding the quantum).
        # The first to run is the one with the earliest such step. Peers before it in the
        # round get r quanta in the meantime, peers after it r - 1, and none of theirs
        # fits (else it would have come earlier).
        n = len(self._round)
        first, rounds, when = 0, 0, -1
        for i, peer in enumerate(self._round):
            quantum = self.quanta.get(peer, self.quantum)
            need = self._queues[peer][0].cost - self._deficit[peer]
            r = max(1, -(-need // quantum))
            if when < 0 or (r - 1) * n + i < when:
                first, rounds, when = i, r, (r - 1) * n + i
        for i, peer in enumerate(self._round):
            visits = rounds if i <= first else rounds - 1
            self._deficit[peer] += visits * self.quanta.get(peer, self.quantum)
        self._round.rotate(-first)
        self._visiting = True
        return self._take(self._round[0])

    def _take(self, peer: str) -> Job:
        queue = self._queues[peer]
        job = queue.popleft()
        self._queued -= 1
        self._deficit[peer] -= job.cost
        if not queue:
            self._leave(peer)
        return job

    def _leave(self, peer: str) -> None:
        if self._round[0] == peer:
            self._visiting = False
        self._round.remove(peer)
        del self._queues[peer], self._deficit[peer]


@dataclass(slots=True)
class TurnStats:
    """What a peer (or all of them) got of the compute: `turns` and their `cost`;
    `waited_s`, the time those turns spent queued (so `waited_s / turns` is the mean
    wait); `held_s`, the time they held the compute; `queued`, jobs waiting now. A waiter
    cancelled before it held its turn counts only in `cancelled`."""

    turns: int = 0
    cost: int = 0
    waited_s: float = 0.0
    held_s: float = 0.0
    cancelled: int = 0
    queued: int = 0

    def add(self, other: TurnStats) -> None:
        self.turns += other.turns
        self.cost += other.cost
        self.waited_s += other.waited_s
        self.held_s += other.held_s
        self.cancelled += other.cancelled
        self.queued += other.queued


@dataclass(eq=False, slots=True)
class _Waiter:
    since: float
    granted: trio.Event = field(default_factory=trio.Event)


class Turns:
    """One turn at the compute at a time, handed out in deficit round robin order:

        async with turns.take(peer_id, cost):
            await compute.run(...)

    A waiter cancelled before its turn leaves its queue and never holds; a holder that
    is cancelled or raises gives the turn back, and the next waiter gets it at once.
    `clock` is trio.current_time unless a test passes another.

    Counted per peer, for at most `max_peers` peers: past it, a peer new to the compute
    takes the place of the idle peer that took the least, whose figures go to `other()`.
    So the costliest peers and the newest one keep their own, and the totals count every
    turn. A peer with a turn held or queued keeps its figures until it is done (the map
    passes `max_peers` by at most the peers busy at once). The order of service is the
    `DeficitRoundRobin`'s, which keeps nothing of a peer without queued jobs: counting
    is all that is folded.
    """

    def __init__(self, quantum: int, quanta: dict[str, int] | None = None, *,
                 clock: Callable[[], float] = trio.current_time,
                 max_peers: int = MAX_PEERS) -> None:
        self.order = DeficitRoundRobin(quantum, quanta)
        self.max_peers = max_peers
        self._clock = clock
        self._waiters: dict[Job, _Waiter] = {}
        self._holder: Job | None = None
        self._granted_at = 0.0  # when the holder was given its turn
        self._stats: dict[str, TurnStats] = {}
        self._other = TurnStats()  # the peers folded out of _stats, added up
        self._busy: dict[str, int] = {}  # take() blocks under way (queued or held), by peer

    @property
    def waiting(self) -> int:
        """Jobs queued for a turn, not counting the one holding it."""
        return len(self.order)

    @property
    def busy(self) -> bool:
        """Whether a turn is being held (what CapacityLimiter(1).borrowed_tokens said)."""
        return self._holder is not None

    @asynccontextmanager
    async def take(self, peer_id: str, cost: int) -> AsyncIterator[None]:
        """Wait for `peer_id`'s turn for a job of `cost`, and hold it for the block."""
        job = self.order.push(peer_id, cost)
        self._waiters[job] = waiter = _Waiter(self._clock())
        self._busy[peer_id] = self._busy.get(peer_id, 0) + 1
        stats = self._stats.get(peer_id)
        if stats is None:
            stats = self._stats[peer_id] = TurnStats()
            self._fold()
        try:
            if self._holder is None:  # free, so nobody else waits: the turn is ours
                self._hand_on()
            try:
                await waiter.granted.wait()
            except BaseException:
                stats.cancelled += 1
                if self._holder is job:  # granted, but cancelled before we woke to it
                    self._hand_on()
                else:
                    self.order.cancel(job)
                    del self._waiters[job]
                raise
            granted_at = self._granted_at
            stats.turns += 1
            stats.cost += cost
            stats.waited_s += granted_at - waiter.since
            try:
                yield
            finally:
                assert self._holder is job, "a turn given back by a task that does not hold it"
                stats.held_s += self._clock() - granted_at
                self._hand_on()
        finally:
            self._busy[peer_id] -= 1
            if not self._busy[peer_id]:
                del self._busy[peer_id]
                self._fold()

    def stats(self) -> dict[str, TurnStats]:
        """A snapshot per peer counted one by one (at most `max_peers` of them, and those
        busy now)."""
        return {peer: replace(s, queued=self.order.queued(peer))
                for peer, s in self._stats.items()}

    def other(self) -> TurnStats:
        """What the peers no longer counted one by one got, added up (none queued)."""
        return replace(self._other)

    def totals(self) -> TurnStats:
        total = self.other()
        for s in self.stats().values():
            total.add(s)
        return total

    def _fold(self) -> None:
        """Past `max_peers`, add the idle peers that took the least to `other`."""
        while len(self._stats) > self.max_peers:
            idle = [peer for peer in self._stats if peer not in self._busy]
            if not idle:
                return
            least = min(idle, key=lambda p: (self._stats[p].cost, self._stats[p].turns))
            self._other.add(self._stats.pop(least))

    def _hand_on(self) -> None:
        job = self.order.pop()
        self._holder = job
        if job is not None:
            self._granted_at = self._clock()
            self._waiters.pop(job).granted.set()
