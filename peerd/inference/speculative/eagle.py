"""EAGLE: a small draft head that extrapolates the target's own features.

The pipeline hands the entry peer the target's final-layer feature f_q (the last
shard's output, before the final norm) for every position q it runs. EAGLE (Li et al.,
2024) drafts from those: slot q of the head takes concat(f_q, e(x_{q+1})), the feature
at q and the embedding of the token that followed it, and predicts f_{q+1}; the
target's own norm and lm_head turn that into logits for x_{q+2}. To draft further the
head feeds itself: its predicted feature and the token drawn from it. One small
decoder layer per draft token, against the whole model per pipeline round.

    slot (rotary position)   q                  q+1 (drafting)
    input                    f_q, e(x_{q+1})    f̂_{q+1}, e(x̂_{q+2})
    output                   f̂_{q+1}           f̂_{q+2}

The head owns fc (2H -> H), one Llama decoder layer (EAGLE's; `num_layers` stacks more)
with its rotary embedding, and an
RMSNorm on its feature input; it borrows the embeddings, the final norm and lm_head
from the target's `Head`. Why the extra norm: SmolLM2's pre-norm features have norms
~600 with single dimensions past 4000, its embeddings norms ~3; and the target's
logits see only a feature's direction (the final RMSNorm divides the scale out), so
normalising the input loses nothing the draft needs.

Head files: eagle_file.py.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig
from transformers.masking_utils import create_causal_mask
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
)

from peerd.inference.model.head import Head
from peerd.inference.options import SamplingParams
from peerd.inference.speculative.draft_logits import DraftLogits, Rows
from peerd.inference.speculative.drafters import Draft, DraftBuilder, DraftError
from peerd.inference.speculative.gamma import TREE_NODES
from peerd.inference.speculative.ngram import LOOKUP_BRANCHES, LOOKUP_SCORE, lookups
from peerd.inference.speculative.tree import DepthBudget, NodeBudget, TokenTree, TreeBuilder

TREE_WIDTH = 4  # nodes expanded per depth, and children taken from each


@dataclass(frozen=True, slots=True)
class EagleConfig:
    """Shape of the head; `from_target` copies the target's layer geometry. The
    defaults are SmolLM2-135M's."""

    hidden_size: int = 576  # the target's H: features, embeddings and output are H wide
    intermediate_size: int = 1536  # MLP width of its decoder layers
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100000.0  # plain RoPE whatever the target's scaling: the head is
    max_position_embeddings: int = 8192  # trained with it, and only sees its own slots
    num_layers: int = 1  # decoder layers after fc; EAGLE's is 1 (`grow` adds more)

    @classmethod
    def from_target(cls, config: Any) -> EagleConfig:
        rope = getattr(config, "rope_parameters", None) or {}
        hidden, heads = int(config.hidden_size), int(config.num_attention_heads)
        return cls(
            hidden_size=hidden, intermediate_size=int(config.intermediate_size),
            num_attention_heads=heads,
            num_key_value_heads=int(getattr(config, "num_key_value_heads", None) or heads),
            head_dim=int(getattr(config, "head_dim", None) or hidden // heads),
            rms_norm_eps=float(config.rms_norm_eps),
            rope_theta=float(rope.get("rope_theta", getattr(config, "rope_theta", 1e4))),
            max_position_embeddings=int(config.max_position_embeddings))

    def layer_config(self) -> LlamaConfig:
        """The transformers config of the decoder layers (and of their DynamicCache)."""
        config = LlamaConfig(
            vocab_size=1, bos_token_id=None, eos_token_id=None, pad_token_id=None,  # none
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps, max_position_embeddings=self.max_position_embeddings,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta})
        config._attn_implementation = "sdpa"
        return config


class EagleHead(nn.Module):
    """fc(concat(norm(f), e)) -> decoder layer(s) -> predicted next feature."""

    def __init__(self, config: EagleConfig) -> None:
        super().__init__()
        H = config.hidden_size
        self.config = config
        self.layer_config = config.layer_config()
        self.feature_norm = LlamaRMSNorm(H, eps=config.rms_norm_eps)
        self.fc = nn.Linear(2 * H, H, bias=True)
        self.layer = LlamaDecoderLayer(self.layer_config, layer_idx=0)
        # layers 1.. of a deeper head (`layer` keeps its name: one-layer files load as is)
        self.upper = nn.ModuleList(LlamaDecoderLayer(self.layer_config, layer_idx=i)
                                   for i in range(1, config.num_layers))
        self.rotary_emb = LlamaRotaryEmbedding(config=self.layer_config)

    def forward(self, features: torch.Tensor, embeds: torch.Tensor,
                position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: DynamicCache | None = None) -> torch.Tensor:
        """features [B, T, H] (f_q), embeds [B, T, H] (e(x_{q+1})), position_ids [B|1, T]
        -> predicted features [B, T, H] (f̂_{q+1}). With no mask the T slots attend
        causally among themselves (no cache) or to all of the cache (T = 1)."""
        f = self.feature_norm(features.to(embeds.dtype))  # [B, T, H]
        x = self.fc(torch.cat([f, embeds], dim=-1))  # [B, T, 2H] -> [B, T, H]
        cos_sin = self.rotary_emb(x, position_ids=position_ids)  # 2 x [B|1, T, head_dim]
        out: torch.Tensor = x
        for layer in (self.layer, *self.upper):
            out = layer(out, attention_mask=attention_mask, position_ids=position_ids,
                        cache=cache, use_cache=cache is not None,
                        position_embeddings=cos_sin)  # [B, T, H]
        return out

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.layer_config)

    def extend(self, features: torch.Tensor, embeds: torch.Tensor,
               cache: DynamicCache) -> torch.Tensor:
        """Append T slots [1, T, H] after the cache's; returns their outputs [1, T, H]."""
        start = cache.get_seq_length()
        T = features.shape[1]
        position_ids = torch.arange(start, start + T, device=embeds.device).unsqueeze(0)  # [1, T]
        # None for a lone slot or an empty cache, else the [1, 1, T, start+T] causal
        # mask: SDPA's is_causal alone would misalign T queries against a longer cache.
        mask = create_causal_mask(config=self.layer_config, inputs_embeds=embeds,
                                  attention_mask=None, cache=cache,
                                  position_ids=position_ids, layer_idx=0)
        out: torch.Tensor = self(features, embeds, position_ids, mask, cache)  # [1, T, H]
        return out


def grow(eagle: EagleHead, num_layers: int) -> EagleHead:
    """`eagle` with decoder layers added on top, up to `num_layers`, each starting as
    the identity (its attention and MLP output projections zero, so its residual adds
    nothing): the grown head drafts exactly as `eagle` did until fine-tuning moves it."""
    if num_layers < eagle.config.num_layers:
        raise ValueError(f"cannot grow a head of {eagle.config.num_layers} layers to "
                         f"{num_layers}")
    grown = EagleHead(replace(eagle.config, num_layers=num_layers))
    grown.load_state_dict(eagle.state_dict(), strict=False)  # the new layers' keys missing
    with torch.no_grad():
        for layer in list(grown.upper)[eagle.config.num_layers - 1:]:
            assert isinstance(layer, LlamaDecoderLayer)
            for output in (layer.self_attn.o_proj, layer.mlp.down_proj):
                assert isinstance(output, nn.Linear)
                output.weight.zero_()
    return grown.to(next(eagle.parameters()))


# ---- drafting ---------------------------------------------------------------------------


class EagleDrafter:
    """Drafts with `eagle` over the target's `head` (whose embeddings and lm_head it
    borrows), scoring drafts over `vocab` (ascending token ids; None: the whole
    vocabulary). Inference only: the head is put in eval mode without gradients."""

    def __init__(self, head: Head, eagle: EagleHead, name: str = "eagle",
                 vocab: Sequence[int] | None = None) -> None:
        if eagle.config.hidden_size != head.hidden_size:
            raise DraftError(f"EAGLE head of width {eagle.config.hidden_size} cannot draft "
                             f"for {head.model_id} (hidden size {head.hidden_size})")
        self.head = head
        self.eagle = eagle.eval().requires_grad_(False)
        self.name = name
        self.logits = DraftLogits(head, vocab)

    def start(self) -> EagleSession:
        return EagleSession(self.head, self.eagle, self.logits)


class EagleSession:
    """One request's draft state: the head's KV cache over the committed slots and the
    head's prediction for the last committed position."""

    levels = True  # its trees grow a level per head step: `deeper` can stop them

    def __init__(self, head: Head, eagle: EagleHead, logits: DraftLogits) -> None:
        self.head, self.eagle = head, eagle
        self.logits = logits  # the drafter's, shared by its sessions
        self.param = next(eagle.parameters())  # where and in what dtype the head computes
        self.cache = eagle.new_cache()
        self.tokens: list[int] = []
        self.slots = 0  # committed slots in the cache = features received
        self.pending: torch.Tensor | None = None  # [1, 1, H]: f̂ of the last committed position
        # the context's tokens outside the draft vocabulary, and their lm_head rows [m, H]:
        # an answer often repeats a rare token of its prompt (a code identifier, a name)
        self.extra: list[int] = []
        self.extra_rows: Rows | None = None
        self.columns = logits.columns(())  # [K (+ m)] token id per logit column, or None

    @torch.inference_mode()
    def extend(self, tokens: Sequence[int], features: torch.Tensor | None) -> None:
        if features is None:
            raise DraftError("the eagle drafter needs the target's features with every "
                             "committed token (the pipeline's last hidden states)")
        f = features.unsqueeze(0) if features.dim() == 2 else features  # [1, n, H]
        if f.dim() != 3 or f.shape[0] != 1 or f.shape[-1] != self.head.hidden_size:
            raise DraftError(f"features of shape {list(features.shape)}; expected "
                             f"[n, {self.head.hidden_size}] or [1, n, {self.head.hidden_size}]")
        n = f.shape[1]
        if self.slots + n != len(self.tokens) + len(tokens) - 1:
            raise DraftError(f"{self.slots + n} features for {len(self.tokens) + len(tokens)} "
                             "committed tokens: the eagle drafter needs one for each but "
                             "the last")
        self.tokens.extend(tokens)
        new = [t for t in dict.fromkeys(self.logits.outside(tokens)) if t not in self.extra]
        if new:
            self.extra += new
            self.extra_rows = self.logits.rows(self.extra)  # m rows, rarely grown
            self.columns = self.logits.columns(self.extra)
        if n == 0:
            return
        # slot q pairs f_q with x_{q+1}: the tokens after each new feature's position
        ids = torch.tensor([self.tokens[self.slots + 1:self.slots + n + 1]])  # [1, n]
        embeds = self.head.embed(ids).to(self.param)  # [1, n, H]
        out = self.eagle.extend(f.to(self.param), embeds, self.cache)  # [1, n, H]
        self.slots += n
        self.pending = out[:, -1:]  # [1, 1, H]

    @torch.inference_mode()
    def propose(self, gamma: int, params: SamplingParams, rng: torch.Generator) -> Draft:
        if gamma < 1 or self.pending is None:
            return Draft([])
        feature = self.pending  # [1, 1, H]
        draft = DraftBuilder(params, rng)
        try:
            for i in range(gamma):
                token = draft.add(self._full_logits(feature))  # [V] float32
                if i + 1 < gamma:  # a draft slot: the head's own feature and token
                    ids = torch.tensor([[token]])  # [1, 1]
                    embeds = self.head.embed(ids).to(self.param)  # [1, 1, H]
                    feature = self.eagle.extend(feature, embeds, self.cache)  # [1, 1, H]
        finally:  # forget the draft slots: committed state only
            drafted = self.cache.get_seq_length() - self.slots
            if drafted > 0:
                self.cache.crop(-drafted)  # transformers 5: negative = remove that many
        return draft.build()

    @torch.inference_mode()
    def propose_tree(self, depth: int, nodes: NodeBudget = TREE_NODES,
                     deeper: DepthBudget | None = None, width: int = TREE_WIDTH
                     ) -> TokenTree:
        """A token tree up to `depth` deep for greedy or adaptive verification
        (EAGLE-2's expansion): at each depth the `width` best nodes so far, by the
        head's cumulative log-probability, are run through the head together (each
        attending to the committed slots and its own ancestors) and their `width` best
        children become candidates; the tree is the `nodes` best candidates, plus up to
        LOOKUP_BRANCHES prompt-lookup continuations (ngram.lookups) as more branches,
        since the head is weakest exactly where an answer copies its prompt.

        `deeper`, when given, is asked after each level past the first whether to grow
        another: with the estimates of the `width` best candidates that level added and
        its cost in ms. Cumulative chances only fall with depth, so a level that did not
        pay says the next would not either: the tree stops there, short of `depth`."""
        builder = TreeBuilder()
        if depth < 1 or self.pending is None:
            return builder.build()
        feature: dict[int, torch.Tensor] = {}  # node -> f̂ after it [H], once expanded
        slot: dict[int, int] = {}  # node -> its slot in the head's cache, once expanded
        frontier = self._children(builder, [-1], self.pending, width)
        try:
            for _ in range(depth - 1):
                t0 = time.perf_counter()
                expand = sorted(frontier, key=lambda n: -builder.scores[n])[:width]
                base = self.cache.get_seq_length()
                parents = [builder.parents[n] for n in expand]
                inputs = torch.stack([self.pending[0, -1] if p < 0 else feature[p]
                                      for p in parents])[None]  # [1, w, H]
                embeds = self.head.embed(torch.tensor([[builder.tokens[n] for n in expand]])
                                         ).to(self.param)  # [1, w, H]
                positions = torch.tensor([[self.slots + self._depth(builder, n)
                                           for n in expand]], device=embeds.device)  # [1, w]
                # the committed slots, the expanded ancestors' slots, itself
                mask = torch.zeros(1, 1, len(expand), base + len(expand), dtype=torch.bool,
                                   device=embeds.device)  # [1, 1, w, base+w]
                mask[..., :self.slots] = True
                for i, n in enumerate(expand):
                    mask[0, 0, i, base + i] = True
                    a = builder.parents[n]
                    while a >= 0:
                        mask[0, 0, i, slot[a]] = True
                        a = builder.parents[a]
                out = self.eagle(inputs, embeds, positions, mask, self.cache)  # [1, w, H]
                for i, n in enumerate(expand):
                    slot[n], feature[n] = base + i, out[0, i]
                frontier = self._children(builder, expand, out, width)
                if deeper is not None:
                    best = sorted((builder.estimate(n) for n in frontier), reverse=True)
                    if not deeper(best[:width], (time.perf_counter() - t0) * 1e3):
                        break
        finally:  # forget the draft slots: committed state only
            drafted = self.cache.get_seq_length() - self.slots
            if drafted > 0:
                self.cache.crop(-drafted)
        keep = builder.best(nodes)
        for i, follow in enumerate(lookups(self.tokens, depth, branches=LOOKUP_BRANCHES)):
            keep += builder.add_chain(follow, LOOKUP_SCORE - i)
        return builder.build(keep)

    def _logits(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """features [1, n, H] -> (logits [1, n, K'], token ids [K'] or None: see DraftLogits)."""
        return self.logits(features, self.extra_rows), self.columns

    def _full_logits(self, feature: torch.Tensor) -> torch.Tensor:
        """feature [1, 1, H] -> logits [V] float32 (-inf off the draft vocabulary)."""
        logits, ids = self._logits(feature)  # [1, 1, K']
        if ids is None:
            return logits[0, -1]
        full = torch.full((self.head.vocab_size,), float("-inf"), device=logits.device)
        return full.index_copy_(0, ids, logits[0, -1])  # [V]

    def _children(self, builder: TreeBuilder, parents: list[int], features: torch.Tensor,
                  width: int) -> list[int]:
        """Add the head's `width` likeliest tokens after each of `features` [1, n, H]
        under the matching node of `parents` (-1: the root); one lm_head call for all."""
        logits, ids = self._logits(features)  # [1, n, K']
        logp = torch.log_softmax(logits[0], dim=-1)  # [n, K']
        top_p, top = torch.topk(logp, width, dim=-1)  # [n, width] each
        if ids is not None:
            top = ids[top]  # columns -> token ids
        added = []
        for parent, ps, ts in zip(parents, top_p.tolist(), top.tolist(), strict=True):
            score = builder.scores[parent] if parent >= 0 else 0.0
            added += [builder.add(parent, t, score + p) for p, t in zip(ps, ts, strict=True)]
        return added

    @staticmethod
    def _depth(builder: TreeBuilder, node: int) -> int:
        d = 0
        while builder.parents[node] >= 0:
            node, d = builder.parents[node], d + 1
        return d
