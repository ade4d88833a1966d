"""Exact attention (peerd.inference.model.attention) in bfloat16 on CPU.

It computes what SDPA computes, to bfloat16 rounding. And a position's result does not
depend on the pass it is in, bit for bit: a chain row or a side-branch row of a token
tree equals the same position decoded alone. That property is what makes greedy DSD
in bfloat16 reproduce plain greedy decoding (test_dsd.py checks the whole pipeline)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peerd.inference.model.attention import EXACT, SDPA, attention_for, exact_attention
from peerd.inference.model.shard import ShardBlock, ShardCache
from peerd.inference.model.source import ModelSource, resolve
from peerd.inference.speculative.tree import attention_mask
from tests.models import tiny_llama_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return resolve(str(tiny_llama_dir(tmp_path_factory)))


class GroupedHeads(torch.nn.Module):
    num_key_value_groups = 2


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              mask: torch.Tensor | None) -> torch.Tensor:
    """SDPA in float32: [B, H, T, D] -> [B, T, H, D]."""
    groups = q.shape[1] // k.shape[1]
    k, v = (x.float().repeat_interleave(groups, dim=1) for x in (k, v))
    out = F.scaled_dot_product_attention(q.float(), k, v, attn_mask=mask,
                                         is_causal=mask is None and q.shape[2] > 1)
    return out.transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_computes_attention(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    past, T, H, KV, D = 37, 6, 4, 2, 16
    q = torch.randn(1, H, T, D).to(dtype)
    k, v = (torch.randn(1, KV, past + T, D).to(dtype) for _ in range(2))
    tree = [-1, 0, 1, 0, 3, -1]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for mask in (None, attention_mask(tree, past)):
        qq, kk, vv = (q, k, v) if mask is not None else (q, k[:, :, :T], v[:, :, :T])
        got, weights = exact_attention(GroupedHeads(), qq, kk, vv, mask)
        assert weights is None and got.dtype == dtype and got.shape == (1, T, H, D)
        assert torch.allclose(got.float(), reference(qq, kk, vv, mask), atol=tol)
    # an additive float mask means the same as the boolean one
    boolean = attention_mask(tree, past)
    additive = torch.zeros(boolean.shape).masked_fill(~boolean, torch.finfo(torch.float32).min)
    assert torch.equal(exact_attention(GroupedHeads(), q, k, v, additive)[0],
                       exact_attention(GroupedHeads(), q, k, v, boolean)[0])
    with pytest.raises(ValueError, match="attention mask of shape"):
        exact_attention(GroupedHeads(), q, k, v, boolean.expand(1, H, T, past + T))


def test_bfloat16_on_cpu_uses_it() -> None:
    cpu = torch.device("cpu")
    assert attention_for(cpu, torch.bfloat16) == EXACT
    assert attention_for(cpu, torch.float32) == SDPA
    assert attention_for(torch.device("cuda"), torch.bfloat16) == SDPA


@pytest.mark.parametrize("past", [5, 30, 130])
def test_a_position_computes_the_same_in_any_pass(tiny: ModelSource, past: int) -> None:
    """Chain rows and side-branch rows of one pass equal the positions decoded one by
    one, bit for bit (130: more than one chunk of ROWS queries in the prefill)."""
    block = ShardBlock(tiny, 0, 4, dtype=torch.bfloat16)
    torch.manual_seed(past)
    n = 8
    hidden = torch.randn(1, past + n, block.hidden_size).to(torch.bfloat16)

    def primed() -> ShardCache:
        cache = block.new_cache()
        block(hidden[:, :past], 0, cache)
        return cache

    alone = primed()
    one_by_one = torch.cat([block(hidden[:, past + i:past + i + 1], past + i, alone)
                            for i in range(n)], dim=1)  # [1, n, H]
    chain = block(hidden[:, past:], past, primed())
    assert torch.equal(chain, one_by_one)
    # a tree: the chain 0-1-2-3, then a branch below node 1 repeating positions 2 and 3
    # and one below the root repeating position 0
    nodes = torch.cat([hidden[:, past:past + 4], hidden[:, past + 2:past + 4],
                       hidden[:, past:past + 1]], dim=1)
    out = block(nodes, past, primed(), tree=[-1, 0, 1, 2, 1, 4, -1])
    assert torch.equal(out[:, :4], one_by_one[:, :4])
    assert torch.equal(out[:, 4:6], one_by_one[:, 2:4])  # side branch, gapped keys
    assert torch.equal(out[:, 6], one_by_one[:, 0])


def test_a_float32_block_keeps_sdpa(tiny: ModelSource) -> None:
    assert ShardBlock(tiny, 0, 1).config._attn_implementation == SDPA
    assert ShardBlock(tiny, 0, 1, dtype=torch.bfloat16).config._attn_implementation == EXACT
