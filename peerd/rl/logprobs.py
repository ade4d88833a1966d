"""Per-token log-probs of a batch's completions under a model, with gradient where the
caller wants one: the forward pass of the trainer's step, its fused check and its
re-scoring of rollouts (learner.py). Where rows share a prompt, the prompt is computed
once and each completion continues from its KV cache (`shared_prompts`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from peerd.rl.learner import TokenBatch


def token_logprobs(module: nn.Module, batch: TokenBatch,
                   temperature: float) -> torch.Tensor:
    """[B, T] log-probs of each completion token under `module` (0 past the end). Where
    rows share a prompt (a GRPO group's completions do), each prompt is computed once
    (shared_prompts); otherwise in one pass over the whole batch."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, not {temperature}")
    groups = shared_prompts(batch)
    if groups is None:
        # logits only where a completion token is read (the model's own lm_head and any
        # final scaling, on [B, T] positions, not [B, L]: a prompt's logits are never used)
        logits = module(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                        logits_to_keep=batch.positions).logits  # [B, T, V]
        return _picked(logits, batch.completion_ids, batch.completion_mask, temperature)
    parts = [_group_logprobs(module, batch, g, temperature) for g in groups]
    order = torch.cat([g.rows for g in groups])  # row of the batch, in the parts' order
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel(), device=order.device)
    return torch.cat(parts)[where]


@dataclass(frozen=True)
class PromptGroup:
    """Rows of a batch whose prompts have one length: its distinct prompts and which of
    them each row continues."""

    rows: torch.Tensor  # [r] long: rows of the batch
    prompts: torch.Tensor  # [u, P] long: the distinct prompts, u <= r
    which: torch.Tensor  # [r] long: each row's prompt, an index into `prompts`


def shared_prompts(batch: TokenBatch) -> list[PromptGroup] | None:
    """The batch's rows grouped by prompt length, each group's prompts deduplicated;
    None when no two rows share a prompt (one pass over the batch is then as cheap).

    Computing a shared prompt once and its completions from its KV cache gives what the
    whole-sequence pass gives (causal attention: a prompt position never sees what
    follows it), up to float rounding, and the gradient through the shared KV is the
    sum over the rows that read it. A GRPO batch of G completions a prompt of P tokens
    and T new ones then costs about (P + G * T) positions a prompt, not G * (P + T)."""
    lengths = batch.positions[:, 0] + 1  # completion token 0 is read at len(prompt) - 1
    groups: list[PromptGroup] = []
    shared = False
    for length in lengths.unique().tolist():  # type: ignore[no-untyped-call]
        rows = (lengths == length).nonzero().squeeze(1)
        prompts, which = torch.unique(  # type: ignore[no-untyped-call]
            batch.input_ids[rows, :length], dim=0, return_inverse=True)
        shared = shared or prompts.shape[0] < rows.numel()
        groups.append(PromptGroup(rows, prompts, which))
    return groups if shared else None


def _group_logprobs(module: nn.Module, batch: TokenBatch, group: PromptGroup,
                   temperature: float) -> torch.Tensor:
    """[r, T] log-probs of the group's rows: one pass over its distinct prompts (keeping
    the last position's logits, which read completion token 0, and the KV cache), then
    one over its rows' completions from the cache, copied to each row by its prompt.
    Completions are right-padded, so under causal attention no real token sees a pad."""
    width = int(batch.completion_mask.shape[1])
    length = int(group.prompts.shape[1])
    t = int(batch.completion_mask[group.rows].sum(1).max())  # the group's longest
    first = module(input_ids=group.prompts, use_cache=t > 1, logits_to_keep=1)
    logits = first.logits[group.which]  # [r, 1, V]
    if t > 1:
        cache = first.cache
        cache.batch_select_indices(group.which)  # each row's prompt KV (autograd: a gather)
        positions = torch.arange(length, length + t - 1, device=group.prompts.device)
        rest = module(input_ids=batch.completion_ids[group.rows, :t - 1], cache=cache,
                      position_ids=positions.expand(group.rows.numel(), -1),
                      use_cache=False).logits  # [r, t - 1, V]
        logits = torch.cat([logits, rest], dim=1)
    picked = _picked(logits, batch.completion_ids[group.rows, :t],
                     batch.completion_mask[group.rows, :t], temperature)
    return nn.functional.pad(picked, (0, width - t))


def _picked(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
            temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) at `tokens`, 0 where `mask` is: its logit minus
    the logsumexp (no second [B, T, V] tensor)."""
    scaled = logits.float() / temperature  # [B, T, V]
    chosen = scaled.gather(-1, tokens[..., None]).squeeze(-1)  # [B, T]
    out: torch.Tensor = (chosen - torch.logsumexp(scaled, dim=-1)) * mask
    return out
