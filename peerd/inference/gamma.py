"""γ = auto: how many tokens to draft next round, from what this session measured.

Model (as in Leviathan et al. 2023): each draft token is accepted independently with
probability α, so a round that drafts γ tokens commits on average

    E[γ] = (1 − α^(γ+1)) / (1 − α)        tokens (accepted prefix + 1 target token)

and costs T(γ) = a + b·γ: `a` is the round's fixed cost (the trip through every shard
and back, one position of compute) and `b` the cost of one more position (drafting
it plus verifying it in every shard). γ maximises E[γ] / T(γ) over 1..max_gamma.

α, a and b are exponentially weighted estimates, so γ follows the session: long
accepted runs and slow links push it up, a drafter that keeps missing or a compute-
bound pipeline pulls it down. Pure: the caller passes measured times in.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_GAMMA = 16
DECAY = 0.3  # weight of the newest round in every estimate
PROBE_EVERY = 8  # when drafting does not pay, still draft every this many rounds


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


@dataclass
class GammaController:
    """Per-session γ. `fixed` set: always that; else auto from observed rounds.

    a and b come from a decayed least-squares fit of round time on tokens drafted
    (γ varies from round to round: auto moves it, prompt lookup finds runs of any
    length); until the rounds span two different γ, b is a tenth of the round, and
    while γ holds still the last fitted b stays."""

    fixed: int | None = None
    max_gamma: int = MAX_GAMMA
    alpha: float = 0.6  # prior: a fair drafter
    _plain_rounds: int = 0  # rounds in a row auto chose not to draft
    _slope: float | None = None  # the last fitted b
    _n: float = 0.0  # decayed sums for the fit: weight, Σγ, ΣT, Σγ², ΣγT
    _sg: float = 0.0
    _st: float = 0.0
    _sgg: float = 0.0
    _sgt: float = 0.0

    def next(self) -> int:
        """γ for the next round; 0 (a plain round) when drafting does not pay here, with
        a probe every PROBE_EVERY rounds so that a drafter that starts hitting is seen."""
        if self.fixed is not None:
            return self.fixed
        if self._n == 0:
            return 4  # nothing measured yet
        fixed_ms, per_token_ms = self.cost()
        g = best_gamma(self.alpha, fixed_ms, per_token_ms, self.max_gamma, min_gamma=0)
        if g == 0:
            self._plain_rounds += 1
            if self._plain_rounds >= PROBE_EVERY:
                self._plain_rounds = 0
                return best_gamma(self.alpha, fixed_ms, per_token_ms, self.max_gamma)
        return g

    def cost(self) -> tuple[float, float]:
        """(a, b) of T(γ) = a + b·γ in ms, from the rounds seen so far."""
        mean_g, mean_t = self._sg / self._n, self._st / self._n
        var = self._sgg / self._n - mean_g ** 2
        if var > 0.25:
            b = self._slope = max((self._sgt / self._n - mean_g * mean_t) / var, 0.0)
        elif self._slope is not None:  # γ has held still: keep the last fitted slope
            b = self._slope
        else:
            b = 0.1 * mean_t / (1 + mean_g)
        return max(mean_t - b * mean_g, 1e-3), b

    def observe(self, drafted: int, accepted: int, round_ms: float) -> None:
        """A round drafted `drafted` tokens, kept `accepted` and took `round_ms` in all
        (drafting, the pipeline, verification)."""
        if drafted > 0:
            # trials: every accepted token, plus the one that was rejected (if any)
            trials = accepted + (1 if accepted < drafted else 0)
            self.alpha = (1 - DECAY) * self.alpha + DECAY * min(accepted / trials, 0.99)
        keep = 1 - DECAY
        self._n = keep * self._n + 1
        self._sg = keep * self._sg + drafted
        self._st = keep * self._st + round_ms
        self._sgg = keep * self._sgg + drafted * drafted
        self._sgt = keep * self._sgt + drafted * round_ms
