"""Choosing the next token from logits: greedy, temperature, nucleus (top-p).

Deterministic for a given seed: the generator lives with the request, so a replay
after a shard failure continues the same random sequence.
"""

from __future__ import annotations

import torch

from peerd.inference.options import SamplingParams
from peerd.inference.request import TokenLogprob

# Below it logits / T overflows float32, or T itself rounds to 0: NaN probabilities.
# Sampling this cold is greedy in all but name.
MIN_TEMPERATURE = 1e-6


def make_generator(params: SamplingParams) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(params.seed if params.seed is not None else torch.seed())
    return g


def distribution(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] -> the distribution sampling draws from [V] float32 (temperature > 0):
    softmax at the temperature, cut to the nucleus and renormalised."""
    temperature = max(params.temperature, MIN_TEMPERATURE)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [V]
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)  # [V], [V]
        # keep the smallest prefix whose mass reaches top_p (always at least one token:
        # a top_p below float32's least positive number compares as 0)
        keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < params.top_p  # [V] bool
        keep[0] = True
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)  # [V]
        probs = probs / probs.sum()
    return probs


def next_token(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator) -> int:
    """logits: [V] (any float dtype). Returns a token id."""
    if params.temperature == 0.0:
        return int(torch.argmax(logits).item())
    return int(torch.multinomial(distribution(logits, params), 1, generator=gen).item())


def token_logprobs(rows: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """rows [n, V] logits, row i the position that chose tokens[i] -> their entries."""
    lp = torch.log_softmax(rows[:len(tokens)].float(), dim=-1)  # [n, V]
    index = torch.tensor(tokens, dtype=torch.long, device=lp.device)[:, None]  # [n, 1]
    chosen = lp.gather(1, index)[:, 0]  # [n]
    if top == 0:
        return [TokenLogprob(t, float(v)) for t, v in zip(tokens, chosen.tolist(), strict=True)]
    values, ids = lp.topk(top, dim=-1)  # [n, top]
    return [TokenLogprob(t, float(v), tuple(zip(i, w, strict=True)))
            for t, v, i, w in zip(tokens, chosen.tolist(), ids.tolist(), values.tolist(),
                                  strict=True)]
