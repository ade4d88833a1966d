"""ShardBlock: decoder layers [start, end) of a model, and their per-session KV cache.

The layers are transformers' own modules (LlamaDecoderLayer, LlamaRotaryEmbedding,
the same causal-mask builder), so a chain of blocks computes what the whole model
computes, to float rounding. Only this block's tensors are read from the checkpoint
(see weights.py); the modules are built on the meta device and the loaded tensors
assigned in, so no random initialisation is ever allocated.

A session's cache (`new_cache()`) holds keys and values for this block's layers,
indexed locally (layer `start` is cache layer 0). `forward(hidden, start_pos, cache,
keep)` first truncates the cache to `keep` positions (how speculative decoding rolls
back rejected tokens, riding on the next request), then requires `start_pos` to be
the cache length: positions are contiguous or the request is refused.

A peer serving [start, end) may be routed a sub-span [a, b) of it (`span=`); a cache
is bound to the span of its first forward and refuses another.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask

from peerd.inference.model.attention import attention_for
from peerd.inference.model.source import ModelSource, architecture, load_config
from peerd.inference.model.weights import read_tensors
from peerd.inference.speculative.tree import attention_mask
from protocols.errors import WireError
from protocols.shard import tree_depths


def set_torch_threads(n: int | None) -> int:
    """Intra-op threads for this process's forwards (None: leave torch's default, one
    per core). A peer that also serves the network should leave a core free."""
    if n is not None:
        torch.set_num_threads(max(1, n))
    return torch.get_num_threads()


@dataclass(eq=False, slots=True)
class ShardCache:
    """One session's keys and values for one ShardBlock."""

    kv: DynamicCache  # local layer indices: cache layer i is model layer start + i
    span: tuple[int, int] | None = None  # model layers it serves; set by the first forward


@dataclass(eq=False, slots=True)
class Step:
    """One forward between `ShardBlock.begin` and its last `run`: the hidden states so
    far, and what every layer of it attends with (computed once, before any layer)."""

    x: torch.Tensor  # [B, T, H]
    cache: ShardCache
    mask: torch.Tensor | None
    position_ids: torch.Tensor  # [1, T]
    cos_sin: Any  # the rotary embedding's (cos, sin), each [1, T, head_dim]
    layers: range  # the model layers it runs


class ShardBlock(nn.Module):
    """Decoder layers [start, end) of `source`, materialising only their weights."""

    def __init__(self, source: ModelSource, start: int, end: int, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 config: Any = None) -> None:
        super().__init__()
        model_config = config if config is not None else load_config(source)
        total = int(model_config.num_hidden_layers)
        if not 0 <= start < end <= total:
            raise ValueError(f"layers [{start}, {end}) are not a non-empty range of the "
                             f"model's {total} layers")
        arch = architecture(model_config)
        self.device = torch.device(device)
        # The block's own config: its layers are numbered 0..n-1 (cache indices), and
        # `num_hidden_layers` sizes the DynamicCache of a session.
        config = copy.deepcopy(model_config)
        config.num_hidden_layers = end - start
        # transformers' SDPA, as the reference model uses; in bfloat16 on CPU, exact
        # attention, so a verified position rounds as it would alone (attention.py)
        config._attn_implementation = attention_for(self.device, dtype)

        self.source = source
        self.model_id = source.model_id
        self.start, self.end = start, end
        self.num_layers = total  # of the whole model
        self.hidden_size = int(config.hidden_size)
        self.dtype = dtype
        self.config = config
        self._kv_width = int(config.num_key_value_heads) * int(config.head_dim)

        with torch.device("meta"):  # shapes only: the checkpoint supplies every value
            self.layers = nn.ModuleList(
                [arch.decoder_layer(config, layer_idx=i) for i in range(end - start)])
        local = {f"layers.{i}.{key}": f"model.layers.{start + i}.{key}"
                 for i, layer in enumerate(self.layers) for key in layer.state_dict()}
        tensors = read_tensors(source, model_config, list(local.values()), dtype=dtype,
                               device=self.device)
        self.load_state_dict({mine: tensors[theirs] for mine, theirs in local.items()},
                             strict=True, assign=True)
        self.rotary_emb = arch.rotary_embedding(config=config).to(self.device)
        self.eval().requires_grad_(False)

    # ---- sessions ----------------------------------------------------------------------

    def new_cache(self) -> ShardCache:
        return ShardCache(DynamicCache(config=self.config))

    def cache_len(self, cache: ShardCache) -> int:
        """Positions the cache holds (0 before the first forward)."""
        if cache.span is None:
            return 0
        return int(cache.kv.get_seq_length(cache.span[0] - self.start))

    def cache_bytes(self, cache: ShardCache) -> int:
        """Bytes of keys and values held now (for a per-peer KV memory cap)."""
        total = 0
        for layer in cache.kv.layers:
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.nelement() * t.element_size()
        return total

    def kv_bytes_per_position(self, span: tuple[int, int] | None = None) -> int:
        """Bytes of KV one position costs over `span` (default: all of this block)."""
        a, b = self._check_span(span)
        element = torch.empty((), dtype=self.dtype).element_size()
        return (b - a) * 2 * self._kv_width * element  # 2: keys and values

    def truncate(self, cache: ShardCache, keep: int) -> None:
        """Drop every position from `keep` on (speculative rollback)."""
        have = self.cache_len(cache)
        if not 0 <= keep <= have:
            raise ValueError(f"keep={keep} but the cache holds {have} positions")
        if keep < have:
            cache.kv.crop(keep - have)  # negative: remove that many from the end

    def fork(self, cache: ShardCache, source: Sequence[int]) -> None:
        """Cache row r becomes a copy of row source[r] (rows that share a prompt)."""
        index = torch.tensor(list(source), dtype=torch.long, device=self.device)
        cache.kv.batch_select_indices(index)

    # ---- compute -----------------------------------------------------------------------

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, start_pos: int, cache: ShardCache,
                keep: int | None = None, span: tuple[int, int] | None = None,
                tree: Sequence[int] = ()) -> torch.Tensor:
        """hidden [B, T, H] at positions start_pos..start_pos+T-1 -> hidden [B, T, H]
        after layers `span` (default: all of this block), attending causally over the
        cache (first truncated to `keep` positions) and the T new positions. With a
        `tree` (the parent of each new position, -1 for the cache's last; see
        protocols.shard) position j sits at start_pos + depth(j) and attends to the
        cache, its ancestors and itself."""
        step = self.begin(hidden, start_pos, cache, keep, span, tree)
        self.run(step, step.layers)
        return step.x

    @torch.inference_mode()
    def begin(self, hidden: torch.Tensor, start_pos: int, cache: ShardCache,
              keep: int | None = None, span: tuple[int, int] | None = None,
              tree: Sequence[int] = ()) -> Step:
        """`forward` up to its first layer: checks, rollback, positions, mask. Then
        `run` the step's layers, all at once or a few at a time (the server lets other
        peers' work in between): the same operations either way, so the same result."""
        # Every check before any change: a refused request leaves the session as it was.
        a, b = self._check_span(span)
        if cache.span is not None and cache.span != (a, b):
            raise ValueError(f"this cache serves layers {list(cache.span)}, not [{a}, {b})")
        have = self.cache_len(cache)
        if keep is not None and not 0 <= keep <= have:
            raise ValueError(f"keep={keep} but the cache holds {have} positions")
        after_keep = have if keep is None else keep
        if start_pos != after_keep:
            raise ValueError(f"start_pos {start_pos} but the cache holds {after_keep} positions"
                             " (after keep): positions must continue where the cache ends")
        if hidden.dim() != 3 or hidden.shape[1] < 1 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden states of shape {list(hidden.shape)}; expected "
                             f"[B, T>=1, {self.hidden_size}]")
        try:
            depths = tree_depths(tuple(tree), hidden.shape[1])
        except WireError as exc:
            raise ValueError(str(exc)) from None
        if keep is not None:
            self.truncate(cache, keep)
        cache.span = (a, b)

        x = hidden.to(device=self.device, dtype=self.dtype)  # [B, T, H]
        T = x.shape[1]
        if tree:
            position_ids = torch.tensor([[start_pos + d for d in depths]],
                                        device=self.device)  # [1, T]
            mask: torch.Tensor | None = attention_mask(tree, start_pos, self.device)
        else:
            positions = torch.arange(start_pos, start_pos + T, device=self.device)  # [T]
            position_ids = positions.unsqueeze(0)  # [1, T], broadcast over the batch
            # None for plain prefill and single-token decode (SDPA's is_causal / no
            # mask), else a boolean [B, 1, T, have+T] mask, exactly as LlamaModel builds it.
            mask = create_causal_mask(config=self.config, inputs_embeds=x,
                                      attention_mask=None, cache=cache.kv,
                                      position_ids=position_ids, layer_idx=a - self.start)
        cos_sin = self.rotary_emb(x, position_ids=position_ids)  # 2 x [1, T, head_dim]
        return Step(x, cache, mask, position_ids, cos_sin, range(a, b))

    @torch.inference_mode()
    def run(self, step: Step, layers: range) -> None:
        """Run model layers `layers` (a part of the step's, in order) on the step."""
        for i in layers:
            step.x = self.layers[i - self.start](
                step.x, attention_mask=step.mask, position_ids=step.position_ids,
                cache=step.cache.kv, use_cache=True, position_embeddings=step.cos_sin)  # [B, T, H]

    def _check_span(self, span: tuple[int, int] | None) -> tuple[int, int]:
        if span is None:
            return self.start, self.end
        a, b = span
        if not self.start <= a < b <= self.end:
            raise ValueError(f"layers [{a}, {b}) are not within this block's "
                             f"[{self.start}, {self.end})")
        return a, b

    def extra_repr(self) -> str:
        return f"{self.model_id} layers [{self.start}, {self.end}) of {self.num_layers}"
