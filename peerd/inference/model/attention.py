"""Attention whose answer for a query does not depend on what else is in the pass.

Greedy speculative decoding promises the tokens plain decoding would have produced.
It keeps that promise only if a position verified among γ others gets the logits it
would have got alone. In bfloat16 on CPU the matrix products already behave so:
oneDNN computes each element of a product the same way, whatever the number of rows
or columns and whatever zero padding follows the reduction. torch's fused attention
kernel does not. A query's result changes with the number of keys in the call (even
masked ones), with the other queries in its block, and with masked gaps between its
keys. One different bit in one layer is enough to flip a near-tie thirty layers on.
In bfloat16 such flips are common enough, with fused attention, to part greedy answers
from plain greedy (bench/README.md, DSD).

`exact_attention` is written from the invariant pieces:

    scores = q · kᵀ (bf16 product) · scale   -> float32, masked with -inf
    p      = softmax(scores) in float32      -> bf16
    out    = p · v (bf16 product)

and lays every query's keys out as a plain decode step would see them: the cached
positions in order, then its own path. A causal or chain query attends to a prefix
of the keys, so the masked keys after it only add -inf scores and zero weights, and
they change nothing. A query on a side branch of a token tree attends to the cache
and to ancestors that are not next to each other. For such a query the keys and
values are gathered into that prefix layout, so it is computed exactly as plain
decoding would compute it.

The cost, for a pass that needs it: scores for the whole pass (T x S per head, kept
in float32, in chunks of ROWS queries) and one gather per side-branch query.

Still open: in real SmolLM2 runs a few rows still differ from the position decoded
alone, more with 2 torch threads per host than with 1, and random trees do not
reproduce it (bench/README.md, DSD).

float32 keeps plain SDPA. There, MKL's float32 products themselves change with the
number of rows, so this would cost time and buy nothing. Verification in float32 is
exact to float rounding, and the tests excuse a flip only at a near-tie.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

SDPA = "sdpa"
EXACT = "peerd_exact"
ROWS = 128  # queries per chunk: bounds the float32 scores of a long prefill


def exact_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                    value: torch.Tensor, attention_mask: torch.Tensor | None,
                    dropout: float = 0.0, scaling: float | None = None,
                    is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention interface (inference only). Takes query [B, H, T, D]
    and key/value [B, KV, S, D] (the cache, then the T new positions). The mask is
    boolean [B|1, 1, T, S] (True: attend), or None for causal order. Returns the
    output [B, T, H, D]."""
    B, H, T, D = query.shape
    KV, S, Dv = key.shape[1], key.shape[2], value.shape[3]
    G = H // KV  # query heads per key/value head
    scale = scaling if scaling is not None else D ** -0.5
    allowed = _allowed(attention_mask, B, T, S, query.device)  # [B, T, S]

    qg = query.reshape(B, KV, G, T, D)  # head kv*G + g reads key/value head kv
    kt = key.transpose(-1, -2)  # [B, KV, D, S]
    out = value.new_empty(B, KV, G, T, Dv)
    for r0 in range(0, T, ROWS):
        r1 = min(T, r0 + ROWS)
        t = r1 - r0
        scores = torch.matmul(qg[:, :, :, r0:r1].reshape(B, KV, G * t, D), kt)  # [B, KV, G*t, S]
        weights = _softmax(scores.view(B, KV, G, t, S), scale,
                           allowed[:, None, None, r0:r1], value.dtype)  # [B, KV, G, t, S]
        out[:, :, :, r0:r1] = torch.matmul(weights.view(B, KV, G * t, S),
                                           value).view(B, KV, G, t, Dv)

    # queries whose keys are not a prefix: gather them into one, then as above
    counts = allowed.sum(-1)  # [B, T]
    prefix = torch.arange(S, device=query.device) < counts[..., None]  # [B, T, S]
    bs, ts = (allowed != prefix).any(-1).nonzero(as_tuple=True)  # R side-branch queries
    if len(bs):
        attended = counts[bs, ts]  # [R]
        n = int(attended.max())
        # the attended columns in order, first (a stable sort puts True before False)
        cols = torch.sort((~allowed[bs, ts]).to(torch.uint8), dim=-1,
                          stable=True).indices[:, :n]  # [R, n]
        valid = torch.arange(n, device=query.device) < attended[:, None]  # [R, n]
        k = key[bs[:, None], :, cols].transpose(1, 2)  # [R, KV, n, D]
        v = value[bs[:, None], :, cols].transpose(1, 2)  # [R, KV, n, Dv]
        scores = torch.matmul(qg[bs, :, :, ts], k.transpose(-1, -2))  # [R, KV, G, n]
        weights = _softmax(scores, scale, valid[:, None, None], value.dtype)
        out[bs, :, :, ts] = torch.matmul(weights, v)  # [R, KV, G, Dv]
    return out.view(B, H, T, Dv).transpose(1, 2).contiguous(), None  # [B, T, H, Dv]


def _allowed(mask: torch.Tensor | None, B: int, T: int, S: int,
             device: torch.device) -> torch.Tensor:
    """The attention pattern as booleans [B, T, S]."""
    if mask is None:  # causal: query i sits at position S - T + i
        keys = torch.arange(S, device=device)  # [S]
        rows = torch.arange(S - T, S, device=device)  # [T]
        return (keys[None, :] <= rows[:, None]).expand(B, T, S)
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"an attention mask of shape {list(mask.shape)}; expected "
                         f"[B, 1, {T}, {S}]")
    if mask.dtype != torch.bool:  # additive: 0 attends, the dtype's minimum does not
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask[:, 0].expand(B, T, S)


def _softmax(scores: torch.Tensor, scale: float, allowed: torch.Tensor,
             dtype: torch.dtype) -> torch.Tensor:
    """Softmax of scale * scores over the last dim in float32, where `allowed`; in `dtype`."""
    masked = (scores.float() * scale).masked_fill(~allowed, float("-inf"))
    return torch.softmax(masked, dim=-1).to(dtype)


AttentionInterface.register(EXACT, exact_attention)
# masks are built as for SDPA (boolean, or None where causal order is enough)
AttentionMaskInterface.register(EXACT, ALL_MASK_ATTENTION_FUNCTIONS[SDPA])


def attention_for(device: torch.device, dtype: torch.dtype) -> str:
    """The attention a shard on `device` computing in `dtype` uses."""
    return EXACT if device.type == "cpu" and dtype == torch.bfloat16 else SDPA
