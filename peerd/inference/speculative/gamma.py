"""How much to draft next round, from what this session measured: γ (the length of a
chain, the depth of an `ngram` tree) and, for a token tree, how many candidates it
keeps and how deep a draft head grows it (TreeBudget).

γ, after Leviathan et al. 2023: each draft token is accepted independently with
probability α, so a round that drafts γ tokens commits on average

    E[γ] = (1 − α^(γ+1)) / (1 − α)        tokens (accepted prefix + 1 target token)

and costs T(γ) = a + b·γ: `a` is the round's fixed cost (the trip through every shard
and back, one position of compute) and `b` the cost of one more position (drafting
it plus verifying it in every shard). γ maximises E[γ] / T(γ) over 1..max_gamma.

Tree size, after EAGLE-2 (Li et al. 2024): the draft head's cumulative probability p_i
of a candidate estimates the chance that the target accepts it, and the accepted path
is the set of accepted nodes, so a tree of the n likeliest candidates commits on
average E[n] = 1 + c·(p_1 + … + p_n) tokens, where c calibrates the head (observed
accepted / predicted, decayed). A round of n nodes costs T(n) = a + b·n; n maximises
E[n] / T(n). A slow link (large a) buys a big tree, a compute-bound pipeline (large b,
as on CPUs) a small one, and when no candidate pays for its position the round drafts
nothing.

α, c, a and b are exponentially weighted estimates, so both follow the session: long
accepted runs and slow links push them up, a drafter that keeps missing or a compute-
bound pipeline pulls them down. Pure: the caller passes measured times in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from peerd.inference.options import MAX_GAMMA

MAX_TREE_NODES = 64  # head candidates a tree may keep (lookup branches come on top)
TREE_NODES = 16  # ... before anything is measured
TREE_DEPTH = 8  # an auto tree's depth: its lookup branches' length, the head's deepest
DECAY = 0.3  # weight of the newest round in every estimate
PROBE_EVERY = 8  # when drafting does not pay, still draft every this many rounds
MAX_PROBE_EVERY = 32  # ... doubling after each probe that did not pay, up to this
JUDGE_AFTER = 3  # drafted rounds in a row before their rate is held against plain's
# Drafting stops only where the rounds that drafted commit clearly less a ms than plain
# rounds (r·t under this): a few rounds' tokens are noisy, and stopping wrongly costs
# more (plain rounds until the next probe) than drafting on where it barely pays.
STOP_BELOW = 0.9


def expected_tokens(alpha: float, gamma: int) -> float:
    """Mean tokens one round commits when each draft is accepted with prob. alpha."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def best_gamma(alpha: float, fixed_ms: float, per_token_ms: float,
               max_gamma: int = MAX_GAMMA, min_gamma: int = 1) -> int:
    """argmax over γ in min_gamma..max_gamma of E[γ] / (fixed_ms + per_token_ms·γ); ties
    → smaller. γ = 0 is a plain round (1 token for fixed_ms)."""
    best, best_rate = min_gamma, -1.0
    for g in range(min_gamma, max_gamma + 1):
        rate = expected_tokens(alpha, g) / max(fixed_ms + per_token_ms * g, 1e-6)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = g, rate
    return best


def best_tree_size(probs: Sequence[float], fixed_ms: float, per_node_ms: float,
                   calibration: float = 1.0, min_nodes: int = 0,
                   plain_ms: float | None = None) -> int:
    """argmax over n in min_nodes..len(probs) of (1 + calibration·Σ_{i<n} probs[i]) /
    (fixed_ms + per_node_ms·n), with `probs` the candidates' estimated chances of being
    accepted, likeliest first; n = 0 (a plain round) costs `plain_ms` where given;
    ties → smaller."""
    best, best_rate, value = min_nodes, -1.0, 1.0
    for n in range(len(probs) + 1):
        if n > 0:
            value += calibration * probs[n - 1]
        if n < min_nodes:
            continue
        cost = plain_ms if n == 0 and plain_ms is not None else fixed_ms + per_node_ms * n
        rate = value / max(cost, 1e-6)
        if rate > best_rate * (1 + 1e-9):
            best, best_rate = n, rate
    return best


@dataclass
class CostFit:
    """T(x) = a + b·x, a decayed least-squares fit of round time T on draft size x (x
    varies from round to round: auto moves it, prompt lookup finds runs of any length).
    Until the rounds span two different sizes, b is a tenth of the round; while the size
    holds still the last fitted b stays."""

    _slope: float | None = None  # the last fitted b
    _n: float = 0.0  # decayed sums: weight, Σx, ΣT, Σx², ΣxT
    _sx: float = 0.0
    _st: float = 0.0
    _sxx: float = 0.0
    _sxt: float = 0.0

    @property
    def empty(self) -> bool:
        return self._n == 0

    def cost(self) -> tuple[float, float]:
        """(a, b) in ms, from the rounds seen so far (observe at least one first)."""
        mean_x, mean_t = self._sx / self._n, self._st / self._n
        var = self._sxx / self._n - mean_x ** 2
        if var > 0.25:
            b = self._slope = max((self._sxt / self._n - mean_x * mean_t) / var, 0.0)
        elif self._slope is not None:
            b = self._slope
        else:
            b = 0.1 * mean_t / (1 + mean_x)
        return max(mean_t - b * mean_x, 1e-3), b

    def observe(self, size: float, round_ms: float) -> None:
        keep = 1 - DECAY
        self._n = keep * self._n + 1
        self._sx = keep * self._sx + size
        self._st = keep * self._st + round_ms
        self._sxx = keep * self._sxx + size * size
        self._sxt = keep * self._sxt + size * round_ms


@dataclass
class GammaController:
    """Per-session γ. `fixed` set: always that; else auto from observed rounds."""

    fixed: int | None = None
    max_gamma: int = MAX_GAMMA
    alpha: float = 0.6  # prior: a fair drafter
    fit: CostFit = field(default_factory=CostFit)
    _plain_rounds: int = 0  # rounds in a row auto chose not to draft

    def next(self) -> int:
        """γ for the next round; 0 (a plain round) when drafting does not pay here, with
        a probe every PROBE_EVERY rounds so that a drafter that starts hitting is seen."""
        if self.fixed is not None:
            return self.fixed
        if self.fit.empty:
            return 4  # nothing measured yet
        fixed_ms, per_token_ms = self.fit.cost()
        g = best_gamma(self.alpha, fixed_ms, per_token_ms, self.max_gamma, min_gamma=0)
        if g == 0:
            self._plain_rounds += 1
            if self._plain_rounds >= PROBE_EVERY:
                self._plain_rounds = 0
                return best_gamma(self.alpha, fixed_ms, per_token_ms, self.max_gamma)
        return g

    def cost(self) -> tuple[float, float]:
        """(a, b) of T(γ) = a + b·γ in ms, from the rounds seen so far."""
        return self.fit.cost()

    def observe(self, drafted: int, accepted: int, round_ms: float) -> None:
        """A round drafted `drafted` tokens, kept `accepted` and took `round_ms` in all
        (drafting, the pipeline, verification)."""
        if drafted > 0:
            # trials: every accepted token, plus the one that was rejected (if any)
            trials = accepted + (1 if accepted < drafted else 0)
            self.alpha = (1 - DECAY) * self.alpha + DECAY * min(accepted / trials, 0.99)
        self.fit.observe(drafted, round_ms)


@dataclass
class TreeBudget:
    """Per-session tree shape. Size: how many of the head's candidates a tree keeps;
    `fixed` set: always that many; else best_tree_size from observed rounds: T(n) =
    a + b·n fitted on the rounds that sent a tree, without their drafting (the tree is
    grown before its size is chosen), and a plain round's time t measured apart (a
    pass of one position costs less than a's extrapolation says: on a CPU a tree's
    products, mask and logits cost a jump of their own; 72 ms against an intercept of
    120 on the bench's pipeline). Until this session has decoded a plain round, its
    generator's last figure for the route is the estimate (`plain_ms`), or none: then
    the first decoding round is plain.

    Whether to grow trees at all is measured: the rounds that drafted commit r tokens
    per ms of their whole time, drafting included (decayed), plain rounds 1 per t ms.
    When, after JUDGE_AFTER drafted rounds in a row (one round's tokens are too noisy
    to judge by), r · t < STOP_BELOW (a tree that sent nothing cost its drafting for
    one token), the following rounds do not draft at all (`drafting()`), until a
    probe after PROBE_EVERY rounds: JUDGE_AFTER rounds of trees (the first of at least
    `probe` nodes) whose own rate starts the average again; a probe that does not pay
    doubles the wait, up to MAX_PROBE_EVERY (on a fast link a tree costs a jump and its
    drafting, more than a plain round). Measured, not predicted: the head's estimates
    do not cover the tree's prompt-lookup branches, which carry much of what word
    problems and code commit. Where the link is fast and the head unsure (chat on a
    LAN: a round of 12 nodes and 18 ms of drafting must commit 2 tokens to beat a
    72 ms plain round) the session decodes plain; where a round's fixed cost is high
    it keeps drafting.

    Depth (`deeper`): a level of the head costs drafting time, not pipeline positions
    (the candidates it adds are paid for only if `choose` keeps them), so the head
    grows another level while the last one added candidates worth what it cost:

        calibration · Σ (estimates of the level's best candidates)  ≥  r · level_ms

    with r this session's tokens per ms (committed tokens / round time, decayed). A
    level's candidates are its best continuations, whose cumulative chances only fall
    with depth; once a level does not pay, deeper ones would not either."""

    fixed: int | None = None
    max_nodes: int = MAX_TREE_NODES
    probe: int = 4
    fit: CostFit = field(default_factory=CostFit)  # rounds that sent a tree, less drafting
    # decayed Σ accepted and Σ predicted, for the calibration, from a prior of one
    # token as predicted (so that one round that missed does not make it 0.1)
    _accepted: float = 1.0
    _expected: float = 1.0
    _committed: float = 0.0  # decayed Σ committed tokens and Σ whole round ms: rate r
    _round_ms: float = 0.0
    _draft_ms: float | None = None  # decayed mean ms of drafting a round
    plain_ms: float | None = None  # t: a plain round's time (decayed), or an estimate
    _idle: int = 0  # plain rounds since drafting stopped paying (0: drafting)
    _wait: int = PROBE_EVERY  # idle rounds before the next probe
    _probing: bool = False  # the next tree is a probe
    _probe: bool = False  # the tree in hand is one
    _streak: int = 0  # rounds drafted in a row (since the session began or a probe)
    _from_probe: bool = False  # ... and the streak began with a probe, not yet judged

    @property
    def rate(self) -> float:
        """Committed tokens per ms over the rounds that drafted (0 until one is seen)."""
        return self._committed / self._round_ms if self._round_ms > 0 else 0.0

    def deeper(self, best: Sequence[float], level_ms: float) -> bool:
        """Whether the head grows another level, after one that added candidates with
        estimates `best` (its best few) and took `level_ms`; yes until a round is
        measured."""
        return self.calibration * sum(best) >= self.rate * level_ms

    @property
    def calibration(self) -> float:
        """Observed accepted / predicted (1 before anything is), within [0.1, 3]."""
        if self._expected <= 0:
            return 1.0
        return min(max(self._accepted / self._expected, 0.1), 3.0)

    def drafting(self) -> bool:
        """Whether to grow a tree this round (else a plain round)."""
        if self.fixed is None and self.plain_ms is None:
            return False  # a plain round first: what a tree must beat
        if self._idle == 0:
            return True
        self._idle += 1
        if self._idle > self._wait:
            self._idle, self._probing = 0, True
            return True
        return False

    def choose(self, probs: Sequence[float]) -> int:
        """How many of `probs` (the candidates' estimated chances, likeliest first) to
        keep."""
        probs = probs[:self.max_nodes]
        if self.fixed is not None:
            return min(self.fixed, len(probs))
        if self.fit.empty:
            return min(TREE_NODES, len(probs))
        fixed_ms, per_node_ms = self.fit.cost()
        plain_ms = fixed_ms if self.plain_ms is None else self.plain_ms
        n = best_tree_size(probs, fixed_ms, per_node_ms, self.calibration,
                           plain_ms=plain_ms)
        self._probe, self._probing = self._probing, False
        if self._probe:
            n = max(n, min(self.probe, len(probs)))
        return n

    def observe(self, sent: int, predicted: float, accepted: int, round_ms: float,
                committed: int | None = None, draft_ms: float = 0.0) -> None:
        """A round that drafted sent `sent` draft positions in all, of which head
        candidates predicted to commit `predicted` tokens, accepted `accepted`; it
        committed `committed` tokens in all (default accepted + 1), spent `draft_ms`
        growing the tree and `round_ms` on the rest (the pass, verification)."""
        keep = 1 - DECAY
        if predicted > 0:
            self._accepted = keep * self._accepted + accepted
            self._expected = keep * self._expected + predicted
        if self._probe:  # after the plain rounds before it, the probe is the news
            self._committed = self._round_ms = 0.0
            self._streak, self._from_probe = 0, True
        self._probe = False
        self._streak += 1
        self._committed = keep * self._committed + (
            accepted + 1 if committed is None else committed)
        self._round_ms = keep * self._round_ms + round_ms + draft_ms
        self._draft_ms = draft_ms if self._draft_ms is None else (
            keep * self._draft_ms + DECAY * draft_ms)
        if sent > 0:
            self.fit.observe(sent, round_ms)
        else:  # a tree that sent nothing: a plain round, but for its drafting
            self.observe_plain(round_ms)
        plain_ms = self.plain_ms if self.plain_ms is not None or self.fit.empty \
            else self.fit.cost()[0]
        if self.fixed is not None or plain_ms is None or self._streak < JUDGE_AFTER:
            return
        pays = self.rate * plain_ms >= STOP_BELOW  # else plain rounds commit more a ms
        if self._from_probe:
            self._wait = PROBE_EVERY if pays else min(2 * self._wait, MAX_PROBE_EVERY)
            self._from_probe = False
        if not pays:
            self._idle = max(self._idle, 1)

    def observe_plain(self, round_ms: float) -> None:
        """A round that sent no draft took `round_ms` (drafting aside)."""
        self.plain_ms = round_ms if self.plain_ms is None else (
            (1 - DECAY) * self.plain_ms + DECAY * round_ms)
