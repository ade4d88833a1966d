"""Token trees for speculative decoding, as pure functions: layout, masks, the wire's
parent lists, and greedy / adaptive verification along a tree."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import pytest
import torch

from peerd.inference.speculative.acceptance import TokenClasses, verify_greedy, verify_tree
from peerd.inference.speculative.tree import TokenTree, TreeBuilder, attention_mask, chain_prefix
from protocols.errors import WireError
from protocols.shard import MAX_TREE_POSITIONS, Forward, WireTensor, check_forward, tree_depths

V = 10


def logits_for(choice: dict[int, int], second: dict[int, int] | None = None
               ) -> dict[int, torch.Tensor]:
    """node -> logits [V] whose argmax is choice[node] (and runner-up second[node])."""
    rows = {}
    for node, best in choice.items():
        row = torch.zeros(V)
        row[best] = 5.0
        if second and node in second:
            row[second[node]] = 4.9
        rows[node] = row
    return rows


def test_builder_merges_equal_children_and_lays_out_best_first() -> None:
    b = TreeBuilder()
    a = b.add(-1, 7, -0.5)
    c = b.add(-1, 3, -0.1)  # the better root child
    assert b.add(-1, 7, -0.2) == a  # same token under the same parent: one node, best score
    b.add(a, 1, -0.9)
    b.add(c, 2, -0.3)
    b.add(c, 4, -0.2)  # c's best child
    b.add_chain([3, 4, 5], -1e4)  # merges into c -> 4, adds 5 under it
    tree = b.build()
    # depth first, best child first: 3, 4, 5, 2, 7, 1
    assert tree.tokens == [3, 4, 5, 2, 7, 1]
    assert tree.parents == [-1, 0, 1, 0, -1, 4]
    assert tree.depth() == 3 and tree.children(-1) == [0, 4] and tree.children(0) == [1, 3]
    assert tree.first_chain() == 3 and not tree.is_chain()


def test_builder_keeps_ancestors_of_kept_nodes() -> None:
    b = TreeBuilder()
    r = b.add(-1, 1, -1.0)
    m = b.add(r, 2, -2.0)
    leaf = b.add(m, 3, -3.0)
    b.add(-1, 9, -0.1)
    tree = b.build([leaf])  # its parent and grandparent come along; the other root not
    assert tree.tokens == [1, 2, 3] and tree.is_chain() and tree.first_chain() == 3
    assert b.build([]).tokens == []


def test_builder_keeps_the_best_by_count_or_by_budget_and_records_estimates() -> None:
    b = TreeBuilder()
    x = b.add(-1, 10, math.log(0.8))
    b.add(x, 11, math.log(0.8 * 0.5))
    b.add(-1, 20, math.log(0.1))
    b.add_chain([30, 31], -1e4)  # unscored (a lookup branch)
    assert b.best(2) == [0, 1]
    seen: list[list[float]] = []

    def budget(probs: Sequence[float]) -> int:
        seen.append(list(probs))
        return 1

    assert b.best(budget) == [0]
    assert [round(p, 6) for p in seen[0]] == [0.8, 0.4, 0.1, 0.0, 0.0]
    tree = b.build()
    assert tree.tokens == [10, 11, 20, 30, 31]
    assert [round(e, 6) for e in tree.estimates] == [0.8, 0.4, 0.1, 0.0, 0.0]
    # predicted 1.3 tokens; the accepted path 10 11 had two scored nodes, 30 31 none
    assert tree.estimated([0, 1])[1] == 2 and abs(tree.estimated([0, 1])[0] - 1.3) < 1e-9
    assert tree.estimated([3, 4])[1] == 0
    assert TokenTree.chain([1, 2]).estimated([0]) == (0.0, 0)
    head = tree.head(3)
    assert (head.tokens, head.parents, len(head.estimates)) == ([10, 11, 20], [-1, 0, -1], 3)
    assert tree.head(99) is tree and len(tree.head(-1)) == 0


def test_tree_rejects_bad_parents() -> None:
    with pytest.raises(ValueError):
        TokenTree([1, 2], [-1, 1])  # a parent must come first
    with pytest.raises(ValueError):
        TokenTree([1], [-1, 0])


def test_attention_mask_sees_the_cache_ancestors_and_itself() -> None:
    mask = attention_mask([-1, 0, -1, 2, 1], past=3)
    assert mask.shape == (1, 1, 5, 8) and mask.dtype == torch.bool
    m = mask[0, 0]
    assert bool(m[:, :3].all())  # every position sees every cached one
    own = m[:, 3:].int().tolist()
    assert own == [[1, 0, 0, 0, 0],
                   [1, 1, 0, 0, 0],
                   [0, 0, 1, 0, 0],
                   [0, 0, 1, 1, 0],
                   [1, 1, 0, 0, 1]]


def test_wire_tree_depths_and_refusals() -> None:
    assert tree_depths((), 3) == [0, 1, 2]
    assert tree_depths((-1, 0, 0, 1, -1), 5) == [0, 1, 1, 2, 0]
    for bad in [(-1, 0), (0,), (-1, 1, 0), (-2, 0)]:
        with pytest.raises(WireError):
            tree_depths(bad, 2 if len(bad) != 2 else 3)
    with pytest.raises(WireError):
        tree_depths((-1, 2, 0), 3)  # forward reference
    big = tuple(range(-1, MAX_TREE_POSITIONS))  # a chain one longer than allowed
    with pytest.raises(WireError, match="exceeds"):
        tree_depths(big, len(big))


def test_chain_prefix() -> None:
    assert chain_prefix([0, 1, 2]) == 3
    assert chain_prefix([0, 3]) == 1
    assert chain_prefix([4, 5]) == 0
    assert chain_prefix([]) == 0


def test_greedy_tree_walks_the_targets_choices() -> None:
    #       root
    #      /    \
    #   0:3      3:8
    #   / \        \
    # 1:4  2:6     4:2
    tree = TokenTree([3, 4, 6, 8, 2], [-1, 0, 0, -1, 3])
    rows = logits_for({-1: 8, 3: 2, 4: 5})  # target: 8, then 2, then 5 (not drafted)
    asked: list[int] = []

    def at(node: int) -> torch.Tensor:
        asked.append(node)
        return rows[node]

    verdict = verify_tree(tree, at)
    assert verdict.path == [3, 4] and verdict.token == 5
    assert verdict.committed(tree) == [8, 2, 5]
    assert asked == [-1, 3, 4]  # logits only along the walk

    miss = verify_tree(tree, lambda n: logits_for({-1: 9})[n])
    assert miss.path == [] and miss.token == 9


def test_greedy_tree_on_a_chain_equals_chain_verification() -> None:
    gen = torch.Generator().manual_seed(3)
    for _ in range(50):
        logits = torch.randn(5, V, generator=gen)  # [γ+1, V]
        best = torch.argmax(logits, dim=-1).tolist()
        draft = [best[0], best[1], int(torch.randint(V, (), generator=gen)), best[3]]
        chain = verify_greedy(logits, draft)
        tree = verify_tree(TokenTree.chain(draft), lambda n, rows=logits: rows[n + 1])
        assert tree.path == list(range(chain.accepted)) and tree.token == chain.token


def test_adaptive_tree_takes_the_exact_child_first_then_a_relaxed_one() -> None:
    texts = [" the", " a", "7", "8", ",", ".", " cat", " dog", " and", " or"]
    classes = TokenClasses(texts)
    # target prefers " the" (0) narrowly over " a" (1): function words, a near-tie
    tree = TokenTree([1, 0], [-1, -1])
    rows = logits_for({-1: 0, 0: 6, 1: 6}, second={-1: 1})
    exact = verify_tree(tree, lambda n: rows[n], classes)
    assert exact.path == [1]  # " the" was drafted too: the exact child wins the tie
    relaxed = verify_tree(TokenTree([1], [-1]), lambda n: rows.get(n, rows[1]), classes)
    assert relaxed.path == [0]  # only " a": accepted by the relaxed rule
    digits = logits_for({-1: 2}, second={-1: 3})
    strict = verify_tree(TokenTree([3], [-1]), lambda n: digits[n], classes)
    assert strict.path == [] and strict.token == 2  # a digit is never swapped


def test_adaptive_tree_takes_the_longest_accepted_path() -> None:
    texts = [" the", " a", "7", "8", ",", ".", " cat", " dog", " and", " or"]
    classes = TokenClasses(texts)
    #        root                 target at the root: " the" (0), " a" (1) a near-tie
    #       /    \
    #   0:" the"  1:" a"          after " the": "7" (not drafted); after " a": " cat"
    #               \
    #              2:" cat"       after " cat": ","
    tree = TokenTree([0, 1, 6], [-1, -1, 1])
    rows = logits_for({-1: 0, 0: 2, 1: 6, 2: 4}, second={-1: 1})
    asked: list[int] = []

    def at(node: int) -> torch.Tensor:
        asked.append(node)
        return rows[node]

    longest = verify_tree(tree, at, classes)
    assert longest.path == [1, 2] and longest.token == 4  # " a cat," beats " the 7"
    assert sorted(asked) == [-1, 0, 1, 2]  # the root and the accepted nodes, once each
    greedy = verify_tree(tree, lambda n: rows[n])
    assert greedy.path == [0] and greedy.token == 2  # greedy keeps the target's own path


# ---- what a FORWARD may be on a session's stream (protocols/shard.check_forward) ------


def _forward(**change: object) -> Forward:
    positions = 2
    hidden = WireTensor("float32", (1, positions, 4), b"\0" * (positions * 4 * 4))
    base = Forward(session="s1", step=3, start_pos=5, keep=-1, hidden=hidden)
    return dataclasses.replace(base, **change)  # type: ignore[arg-type]


def _check(msg: Forward, **kw: object) -> None:
    args: dict[str, object] = {"session": "s1", "last_step": 2, "dtype": "float32",
                               "hidden_size": 4, "cached": 5, "max_length": 16}
    args.update(kw)
    check_forward(msg, **args)  # type: ignore[arg-type]


def test_a_forward_that_follows_its_session_passes() -> None:
    _check(_forward())
    _check(_forward(keep=3, start_pos=3))  # rolls the cache back to 3 positions first
    _check(_forward(tree=(-1, 0)))


@pytest.mark.parametrize(("change", "kw", "words"), [
    ({"session": "s2"}, {}, "unknown session"),
    ({"step": 2}, {}, "after step 2"),
    ({"hidden": WireTensor("float32", (1, 2, 4), b"\0")}, {}, "needs 32 bytes"),
    ({}, {"dtype": "bfloat16"}, "the session agreed on bfloat16"),
    ({}, {"hidden_size": 8}, "expected [1, T>=1, 8]"),
    ({"keep": 6}, {}, "keep=6 but the session holds 5"),
    ({"start_pos": 4}, {}, "must be contiguous"),
    ({"tree": (-1, 1)}, {}, "parent must be an earlier position"),
    ({}, {"max_length": 6}, "exceed the session's max_length 6"),
])
def test_a_forward_out_of_its_session_is_a_wire_error(change: dict[str, object],
                                                      kw: dict[str, object], words: str) -> None:
    with pytest.raises(WireError) as exc:
        _check(_forward(**change), **kw)
    assert words in str(exc.value)
