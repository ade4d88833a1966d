"""The EAGLE draft head: training, files, and the DraftSession contract, on tiny models;
and the head shipped for smollm2."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from peerd.inference.model.head import Head
from peerd.inference.model.shard import ShardBlock
from peerd.inference.model.source import load_config, load_tokenizer, reference_model, resolve
from peerd.inference.options import SamplingParams
from peerd.inference.speculative.drafters import DraftError
from peerd.inference.speculative.eagle import (
    EagleConfig,
    EagleDrafter,
    EagleHead,
    EagleSession,
    grow,
)
from peerd.inference.speculative.eagle_data import (
    Example,
    Prompt,
    chat_ids,
    generate_examples,
    load_prompts,
)
from peerd.inference.speculative.eagle_file import (
    default_eagle_path,
    load_eagle,
    save_eagle,
    set_vocab,
)
from peerd.inference.speculative.eagle_measure import measure
from peerd.inference.speculative.eagle_train import (
    TrainConfig,
    make_batch,
    train_head,
    unrolled,
    unrolled_loss,
)
from peerd.inference.speculative.tree import DepthBudget, TokenTree
from peerd.machine import cpu_bf16_fast
from tests.models import tiny_llama_dir

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [Prompt("t", p) for p in (
    "What is the capital of France?", "def add(a, b):", "The quick brown fox",
    "Each shard runs a range of layers.", "0 1 2 3 4 5", "A peer-to-peer daemon")]
CFG = TrainConfig(steps=12, batch_size=3, lr=3e-3, unroll=2, noise=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory)


@pytest.fixture(scope="module")
def head(tiny: Path) -> Head:
    return Head(resolve(str(tiny)))


@pytest.fixture(scope="module")
def examples(tiny: Path) -> list[Example]:
    source = resolve(str(tiny))
    return generate_examples(reference_model(source), load_tokenizer(source), PROMPTS,
                             max_new_tokens=20, batch_size=4)


def fresh_eagle(tiny: Path, seed: int = 0) -> EagleHead:
    torch.manual_seed(seed)
    return EagleHead(EagleConfig.from_target(load_config(resolve(str(tiny)))))


@pytest.fixture(scope="module")
def trained(tiny: Path, head: Head, examples: list[Example]) -> EagleHead:
    eagle = fresh_eagle(tiny)
    train_head(eagle, head, examples, CFG)
    with torch.no_grad():  # fp16 weights, as a file holds them: a reload is the same head
        for p in eagle.parameters():
            p.copy_(p.half().float())
    return eagle.eval()


def session(head: Head, eagle: EagleHead, e: Example, upto: int) -> EagleSession:
    """A session that has committed e.tokens[:upto] (the prompt and then some)."""
    s = EagleDrafter(head, eagle).start()
    s.extend(e.tokens[:upto].tolist(), e.features[:upto - 1])
    return s


def test_generated_features_are_what_the_pipeline_returns(
        tiny: Path, head: Head, examples: list[Example]) -> None:
    # batched, left-padded generation records the same features as an unpadded
    # ShardBlock over all layers (what the last peer sends back to the entry peer)
    source = resolve(str(tiny))
    block = ShardBlock(source, 0, load_config(source).num_hidden_layers)
    for e in examples:
        assert len(e.tokens) > e.prompt_len and e.features.shape == (len(e.tokens) - 1, 64)
        f = block(head.embed(e.tokens[None]), 0, block.new_cache())[0, :-1]  # [N-1, H]
        torch.testing.assert_close(e.features, f, atol=1e-4, rtol=1e-4)


def test_completion_prompts_are_continued_raw_chat_prompts_under_the_template(
        tmp_path: Path, tiny: Path) -> None:
    stub = 'def add(a, b):\n    """The sum."""\n'
    path = tmp_path / "mixed.jsonl"
    path.write_text(f'{{"prompt": " hi "}}\n\n{{"question": "2+2?"}}\n'
                    f'{json.dumps({"completion": stub})}\n')
    prompts = load_prompts(path)
    assert [(p.text, p.raw) for p in prompts] == [("hi", False), ("2+2?", False), (stub, True)]
    source = resolve(str(tiny))
    tok = load_tokenizer(source)
    chat, raw = generate_examples(reference_model(source), tok, [prompts[0], prompts[2]],
                                  max_new_tokens=4, batch_size=2)
    assert chat.tokens[:chat.prompt_len].tolist() == chat_ids(tok, "hi")
    assert raw.tokens[:raw.prompt_len].tolist() == tok(stub)["input_ids"]  # as /v1/completions
    for bad, why in [('{"completion": "  "}', "no \"prompt\""), ('["hi"]', "a list, not an object"),
                     ('{"prompt": "hi"', "not JSON")]:
        path.write_text(f'{{"prompt": "fine"}}\n{bad}\n')
        with pytest.raises(ValueError, match=rf"mixed\.jsonl:2: {why}"):
            load_prompts(path)


def test_training_lowers_the_loss(tiny: Path, head: Head, examples: list[Example]) -> None:
    eagle = fresh_eagle(tiny)
    batch = make_batch(examples)
    with torch.no_grad():
        before, _ = unrolled_loss(eagle, head, batch, 2, CFG.ce_weight, 0.0)
    train_head(eagle, head, examples, CFG)
    with torch.no_grad():
        after, _ = unrolled_loss(eagle, head, batch, 2, CFG.ce_weight, 0.0)
    assert float(after) < 0.7 * float(before)


def test_the_training_unroll_sees_what_drafting_sees(head: Head, trained: EagleHead,
                                                    examples: list[Example]) -> None:
    # depth d at slot j of the parallel unroll = a session committed up to slot j-d,
    # then fed its own features d-1 times (with the true tokens)
    e = examples[2]
    batch = make_batch([e])
    embeds = head.embed_tokens(batch.next_ids)  # [1, S, H]
    with torch.no_grad():
        preds = unrolled(trained, batch.features, embeds, 3, bf16=False)  # 3 x [1, S, H]
    for c in (e.prompt_len - 2, e.prompt_len + 3):  # the last committed slot
        s = session(head, trained, e, c + 2)  # features f_0..f_c
        assert s.pending is not None
        feature = s.pending  # [1, 1, H]
        torch.testing.assert_close(feature[0, 0], preds[0][0, c], atol=1e-4, rtol=1e-4)
        with torch.inference_mode():
            for d in (1, 2):
                x = embeds[:, c + d:c + d + 1]  # [1, 1, H]: e(x_{c+d+1})
                feature = trained.extend(feature, x, s.cache)  # [1, 1, H]
                torch.testing.assert_close(feature[0, 0], preds[d][0, c + d], atol=1e-4,
                                           rtol=1e-4)


def test_save_and_load_give_the_same_drafts(tmp_path: Path, head: Head, trained: EagleHead,
                                            examples: list[Example]) -> None:
    path = tmp_path / "eagle.safetensors"
    save_eagle(trained, head, path)
    loaded = load_eagle(path, head)
    for e in examples:
        a = session(head, trained, e, e.prompt_len + 1)
        b = loaded.start()
        b.extend(e.tokens[:e.prompt_len + 1].tolist(), e.features[:e.prompt_len])
        assert a.pending is not None and b.pending is not None
        torch.testing.assert_close(a.pending, b.pending, atol=0.0, rtol=0.0)
        rng = torch.Generator()
        assert a.propose(6, GREEDY, rng) == b.propose(6, GREEDY, rng)


def test_a_head_for_another_model_is_refused(tmp_path_factory: pytest.TempPathFactory,
                                             tmp_path: Path, head: Head,
                                             trained: EagleHead) -> None:
    other_dir = tiny_llama_dir(tmp_path_factory, seed=1)  # same shapes, other weights
    other = Head(resolve(str(other_dir)))
    path = tmp_path / "eagle.safetensors"
    save_eagle(trained, head, path)
    with pytest.raises(DraftError, match="embed_fingerprint") as info:
        load_eagle(path, other)
    assert head.model_id in str(info.value) and other.model_id in str(info.value)


def test_a_corrupt_file_is_refused(tmp_path: Path, head: Head, trained: EagleHead) -> None:
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_eagle(trained, head, good)
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    foreign = tmp_path / "foreign.safetensors"  # a safetensors file, not a head
    save_file({"x": torch.zeros(3)}, str(foreign))
    for path in (truncated, garbage, foreign, tmp_path / "missing.safetensors"):
        with pytest.raises(DraftError, match="is not a peerd EAGLE head"):
            load_eagle(path, head)


def test_proposing_changes_nothing_committed(head: Head, trained: EagleHead,
                                            examples: list[Example]) -> None:
    e = examples[0]
    s = session(head, trained, e, e.prompt_len + 1)
    slots = s.cache.get_seq_length()
    first = s.propose(5, GREEDY, torch.Generator())
    assert len(first.tokens) == 5 and first.probs is None
    assert s.propose(5, GREEDY, torch.Generator()) == first
    assert s.cache.get_seq_length() == slots == e.prompt_len
    # sampling: the distributions come along, and a seeded generator repeats itself
    hot = SamplingParams(temperature=0.8, top_p=0.9)
    a = s.propose(4, hot, torch.Generator().manual_seed(1))
    b = s.propose(4, hot, torch.Generator().manual_seed(1))
    assert a.tokens == b.tokens and a.probs is not None and b.probs is not None
    assert a.probs.shape == (4, head.vocab_size)
    torch.testing.assert_close(a.probs.sum(-1), torch.ones(4))
    assert all(float(a.probs[i, t]) > 0 for i, t in enumerate(a.tokens))
    assert s.propose(5, GREEDY, torch.Generator()) == first


def test_a_grown_head_drafts_as_its_origin_until_trained_then_as_its_unroll(
        tmp_path: Path, tiny: Path, head: Head, trained: EagleHead,
        examples: list[Example]) -> None:
    deep = grow(trained, 3)
    assert deep.config.num_layers == 3 and len(deep.upper) == 2
    assert trained.config.num_layers == 1 and len(trained.upper) == 0  # not changed
    e = examples[0]
    a = session(head, trained, e, e.prompt_len + 1)
    b = session(head, deep, e, e.prompt_len + 1)
    assert a.pending is not None and b.pending is not None
    torch.testing.assert_close(a.pending, b.pending, atol=1e-6, rtol=1e-6)
    assert a.propose(6, GREEDY, torch.Generator()) == b.propose(6, GREEDY, torch.Generator())
    assert a.propose_tree(4) == b.propose_tree(4)
    # training moves every layer, the added ones' inner weights included (their zero
    # output projections let gradient through from the second step on)
    before = {k: v.clone() for k, v in deep.state_dict().items()}
    train_head(deep, head, examples, replace(CFG, steps=3))
    after = deep.state_dict()
    for name in ("upper.0.self_attn.q_proj.weight", "upper.1.mlp.up_proj.weight",
                 "upper.1.mlp.down_proj.weight", "layer.mlp.down_proj.weight"):
        assert not torch.equal(before[name], after[name]), name
    # its parallel unroll (training) is what drafting does, through every layer
    batch = make_batch([e])
    embeds = head.embed_tokens(batch.next_ids)  # [1, S, H]
    with torch.no_grad():
        preds = unrolled(deep.eval(), batch.features, embeds, 2, bf16=False)  # 2 x [1, S, H]
    c = e.prompt_len + 2
    s = session(head, deep, e, c + 2)
    assert s.pending is not None
    torch.testing.assert_close(s.pending[0, 0], preds[0][0, c], atol=1e-4, rtol=1e-4)
    with torch.inference_mode():
        nxt = deep.extend(s.pending, embeds[:, c + 1:c + 2], s.cache)  # [1, 1, H]
    torch.testing.assert_close(nxt[0, 0], preds[1][0, c + 1], atol=1e-4, rtol=1e-4)
    # a file keeps the layers: loaded, it drafts the same
    path = tmp_path / "deep.safetensors"
    save_eagle(deep, head, path)
    loaded = load_eagle(path, head)
    assert loaded.eagle.config.num_layers == 3
    x, y = session(head, deep, e, c + 2), loaded.start()
    y.extend(e.tokens[:c + 2].tolist(), e.features[:c + 1])
    assert x.propose(5, GREEDY, torch.Generator()) == y.propose(5, GREEDY, torch.Generator())
    # for a bfloat16 target every layer's weights are bfloat16 (the rotary table stays)
    half = load_eagle(path, Head(resolve(str(tiny)), dtype=torch.bfloat16)).eagle
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="cannot grow a head of 3 layers to 2"):
        grow(deep, 2)


def test_a_tree_holds_the_heads_best_chain_and_changes_nothing_committed(
        head: Head, trained: EagleHead, examples: list[Example]) -> None:
    from peerd.inference.speculative.eagle import TREE_WIDTH
    from peerd.inference.speculative.gamma import TREE_NODES

    e = examples[0]
    s = session(head, trained, e, e.prompt_len + 1)
    slots = s.cache.get_seq_length()
    chain = s.propose(5, GREEDY, torch.Generator()).tokens
    tree = s.propose_tree(5)
    assert s.cache.get_seq_length() == slots  # the draft slots are gone again
    assert 1 <= tree.depth() <= 5 and len(tree) <= TREE_NODES + 3 * 5
    assert len(tree.children(-1)) >= min(TREE_WIDTH, 2)
    # the first slots hold the head's greedy chain (as far as the expansion kept it)
    n = tree.first_chain()
    assert n >= 1 and tree.tokens[:n] == chain[:n]
    assert s.propose_tree(5) == tree  # deterministic, nothing committed moved
    assert s.propose(5, GREEDY, torch.Generator()).tokens == chain
    assert s.propose_tree(0).tokens == []


def head_depth(tree: TokenTree) -> int:
    """Tokens on the longest path of the head's own nodes (lookup-only nodes have no
    estimate)."""
    depths: list[int] = []
    for p in tree.parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return max((d for d, x in zip(depths, tree.estimates, strict=True) if x > 0), default=0)


def test_a_tree_stops_growing_where_deeper_says(
        head: Head, trained: EagleHead, examples: list[Example]) -> None:
    from peerd.inference.speculative.eagle import TREE_WIDTH

    e = examples[0]
    s = session(head, trained, e, e.prompt_len + 1)
    slots = s.cache.get_seq_length()
    asked: list[tuple[list[float], float]] = []

    def levels(n: int) -> DepthBudget:
        def deeper(best: Sequence[float], level_ms: float) -> bool:
            asked.append((list(best), level_ms))
            return len(asked) < n
        return deeper

    full = s.propose_tree(6, 1000)  # every candidate kept
    assert s.propose_tree(6, 1000, lambda best, ms: True) == full  # never stopped
    asked.clear()
    short = s.propose_tree(6, 1000, levels(2))
    assert s.cache.get_seq_length() == slots
    # the root's children, then two expanded levels: asked after each, stopped at the 2nd
    assert len(asked) == 2
    assert head_depth(short) == 3 and head_depth(full) == 6
    for best, ms in asked:
        assert 1 <= len(best) <= TREE_WIDTH and ms > 0
        assert all(0 < p <= 1 for p in best) and best == sorted(best, reverse=True)
    assert asked[1][0][0] <= asked[0][0][0]  # cumulative chances fall with depth
    # what it kept of the head's tree is what the full tree kept at those depths
    assert short.tokens[:short.first_chain()] == full.tokens[:short.first_chain()]


def test_extending_in_one_call_or_one_token_at_a_time_agree(
        head: Head, trained: EagleHead, examples: list[Example]) -> None:
    e = examples[1]
    n = len(e.tokens)
    whole = session(head, trained, e, n)
    steps = EagleDrafter(head, trained).start()
    steps.extend(e.tokens[:1].tolist(), e.features[:0])
    for q in range(1, n):
        steps.extend([int(e.tokens[q])], e.features[q - 1:q][None])  # [1, 1, H] works too
    assert whole.pending is not None and steps.pending is not None
    torch.testing.assert_close(whole.pending, steps.pending, atol=1e-5, rtol=1e-5)
    assert whole.propose(6, GREEDY, torch.Generator()) == steps.propose(
        6, GREEDY, torch.Generator())


def test_extend_wants_a_feature_for_every_committed_token_but_the_last(
        head: Head, trained: EagleHead, examples: list[Example]) -> None:
    e = examples[0]
    s = EagleDrafter(head, trained).start()
    with pytest.raises(DraftError, match="needs the target's features"):
        s.extend(e.tokens[:3].tolist(), None)
    with pytest.raises(DraftError, match="one for each but the last"):
        s.extend(e.tokens[:3].tolist(), e.features[:3])
    assert s.propose(3, GREEDY, torch.Generator()).tokens == []  # nothing committed yet


def test_replay_counts_rounds(head: Head, trained: EagleHead,
                              examples: list[Example]) -> None:
    result = measure(EagleDrafter(head, trained), examples, 3)
    assert result.rounds > 0 and 1.0 <= result.tokens_per_round <= 4.0
    assert result.attempts[0] == result.rounds
    assert all(0.0 <= r <= 1.0 for r in result.rates())


def test_the_shipped_smollm2_head_loads_and_drafts() -> None:
    """A few seconds: reads SmolLM2's head and all its layers."""
    source = resolve("smollm2")
    head = Head(source)
    path = default_eagle_path(head.model_id)
    assert path is not None and path.stat().st_size < 20e6
    drafter = load_eagle(path, head)
    assert default_eagle_path("some-other-model") is None
    tokenizer = load_tokenizer(source)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Count from 1 to 20."}],
                                         tokenize=False, add_generation_prompt=True)
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    block = ShardBlock(source, 0, head.num_layers)
    features = block(head.embed(torch.tensor([ids])), 0, block.new_cache())  # [1, P, H]
    first = int(torch.argmax(head.logits(features)[0, -1]))
    s = drafter.start()
    s.extend([*ids, first], features)
    draft = s.propose(5, GREEDY, torch.Generator())
    assert len(draft.tokens) == 5 and all(0 <= t < head.vocab_size for t in draft.tokens)


def test_a_draft_vocabulary_scores_its_ids_and_the_contexts(
        head: Head, trained: EagleHead, examples: list[Example]) -> None:
    V = head.vocab_size
    e = examples[0]
    context = set(e.tokens[:e.prompt_len + 1].tolist())
    vocab = list(range(0, V, 3))  # a third of the ids
    allowed = set(vocab) | context
    whole, part = EagleDrafter(head, trained), EagleDrafter(head, trained, vocab=vocab)
    assert whole.logits.size == V and part.logits.size == len(vocab)
    s = part.start()
    s.extend(e.tokens[:e.prompt_len + 1].tolist(), e.features[:e.prompt_len])
    assert set(s.extra) == context - set(vocab) and s.extra_rows is not None
    # the columns are the whole vocabulary's logits for those ids
    assert s.pending is not None
    sub, ids = s._logits(s.pending)  # [1, 1, K + m]
    full = whole.logits(s.pending)  # [1, 1, V]
    assert whole.start().columns is None and ids is not None
    assert sorted(ids.tolist()) == sorted(allowed)
    torch.testing.assert_close(sub[0, 0], full[0, 0, ids], atol=1e-3, rtol=1e-3)
    # drafts only ever hold those ids; a chain's distributions are 0 off them
    hot = SamplingParams(temperature=1.0)
    for params in (GREEDY, hot):
        d = s.propose(6, params, torch.Generator().manual_seed(3))
        assert len(d.tokens) == 6 and set(d.tokens) <= allowed
    d = s.propose(4, hot, torch.Generator().manual_seed(3))
    assert d.probs is not None
    off = torch.ones(V, dtype=torch.bool)
    off[sorted(allowed)] = False
    assert float(d.probs[:, off].sum()) == 0.0
    torch.testing.assert_close(d.probs.sum(-1), torch.ones(4))
    tree = s.propose_tree(4)
    assert len(tree) > 1 and set(tree.tokens) <= allowed
    # tokens committed later that the vocabulary leaves out become draftable too
    rare = next(t for t in range(V) if t not in allowed)
    s.extend([rare], e.features[e.prompt_len:e.prompt_len + 1])
    assert rare in s.extra and s.extra_rows is not None and len(s.extra_rows) == len(s.extra)
    # a vocabulary of every id is no vocabulary
    assert EagleDrafter(head, trained, vocab=list(range(V))).logits.ids is None
    with pytest.raises(DraftError, match="outside"):
        EagleDrafter(head, trained, vocab=[0, V])


def test_a_draft_vocabulary_is_saved_set_and_removed(tmp_path: Path, head: Head,
                                                     trained: EagleHead) -> None:
    from safetensors import safe_open

    path = tmp_path / "eagle.safetensors"
    save_eagle(trained, head, path, vocab=[4, 2, 9], vocab_info={"counted": "test"})
    loaded = load_eagle(path, head)
    assert loaded.logits.ids is not None and loaded.logits.ids.tolist() == [2, 4, 9]

    def weights(p: Path) -> dict[str, torch.Tensor]:
        with safe_open(str(p), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys() if k != "draft_vocab"}  # noqa: SIM118

    before = weights(path)
    set_vocab(path, head, list(range(0, head.vocab_size, 2)), {"counted": "again"})
    assert load_eagle(path, head).logits.size == len(range(0, head.vocab_size, 2))
    set_vocab(path, head, None)
    assert load_eagle(path, head).logits.ids is None
    after = weights(path)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit for bit
    with pytest.raises(DraftError, match="outside"):
        set_vocab(path, head, [head.vocab_size + 5])
    assert load_eagle(path, head).logits.ids is None  # the failed write left it alone


def test_a_broken_draft_vocabulary_or_format_version_is_refused(
        tmp_path: Path, head: Head, trained: EagleHead) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    good = tmp_path / "good.safetensors"
    save_eagle(trained, head, good)
    with safe_open(str(good), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    def variant(name: str, extra: dict[str, torch.Tensor], **header: str) -> Path:
        path = tmp_path / name
        save_file({**tensors, **extra}, str(path), metadata={**meta, **header})
        return path

    old = variant("v1.safetensors", {}, version="1")  # heads written before vocabularies
    assert load_eagle(old, head).logits.ids is None
    for path, match in [
            (variant("float.safetensors", {"draft_vocab": torch.zeros(3)}), "not a list"),
            (variant("2d.safetensors", {"draft_vocab": torch.zeros(2, 2, dtype=torch.int32)}),
             "not a list"),
            (variant("range.safetensors",
                     {"draft_vocab": torch.tensor([1, head.vocab_size + 1], dtype=torch.int32)}),
             "outside"),
            (variant("dup.safetensors", {"draft_vocab": torch.tensor([1, 1], dtype=torch.int32)}),
             "repeats"),
            (variant("v9.safetensors", {}, version="9"), "reads versions 1, 2")]:
        with pytest.raises(DraftError, match=match):
            load_eagle(path, head)


def test_a_wider_head_cannot_draft_for_a_narrower_model(tiny: Path, head: Head) -> None:
    config = replace(EagleConfig.from_target(load_config(resolve(str(tiny)))), hidden_size=32,
                     num_attention_heads=2, num_key_value_heads=2, head_dim=16)
    with pytest.raises(DraftError, match="width 32"):
        EagleDrafter(head, EagleHead(config))


def test_peerd_draft_vocab_sets_and_removes_a_heads_vocabulary(
        tmp_path: Path, tiny: Path, head: Head, trained: EagleHead,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    import json

    from click.testing import CliRunner

    from peerd.cli import main

    path = tmp_path / "eagle.safetensors"
    save_eagle(trained, head, path)
    text = tmp_path / "text.jsonl"
    text.write_text('{"prompt": "The quick brown fox", "answer": "def add(a, b):"}\n')
    run = CliRunner().invoke
    args = ["draft", "vocab", "--model", str(tiny), "--head", str(path)]
    r = run(main, [*args, "--text", str(text), "--size", "40", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["size"] == 40 and report["coverage"] == 1.0 and report["tokens"] > 0
    assert load_eagle(path, head).logits.size == 40
    r = run(main, [*args, "--none", "--json"])
    assert r.exit_code == 0 and load_eagle(path, head).logits.ids is None, r.output
    # bad input: nothing to count; a head for another model; a broken text file
    r = run(main, args)
    assert r.exit_code == 1 and "--text FILE" in r.output
    other = tiny_llama_dir(tmp_path_factory, seed=1)
    r = run(main, ["draft", "vocab", "--model", str(other), "--head", str(path),
                   "--text", str(text)])
    assert r.exit_code == 1 and "embed_fingerprint" in r.output
    broken = tmp_path / "broken.jsonl"
    broken.write_text("{not json\n")
    r = run(main, [*args, "--text", str(broken)])
    assert r.exit_code == 1 and "broken.jsonl:1: not JSON" in r.output
    assert load_eagle(path, head).logits.ids is None  # untouched by the failures


def test_a_draft_vocabulary_loss_is_the_loss_over_those_columns(
        tiny: Path, head: Head, examples: list[Example]) -> None:
    import torch.nn.functional as F

    eagle = fresh_eagle(tiny, seed=3)
    batch = make_batch(examples)
    everything = torch.arange(head.vocab_size)
    with torch.no_grad():
        whole, whole_stats = unrolled_loss(eagle, head, batch, 1, 1.0, 0.0)
        same, same_stats = unrolled_loss(eagle, head, batch, 1, 1.0, 0.0, vocab=everything)
        torch.testing.assert_close(same, whole)
        assert same_stats == whole_stats
        # a subset: the CE over its columns, next tokens outside it ignored (and missed)
        m = batch.mask
        targets = batch.target_ids[m]  # [M]
        vocab = torch.tensor(sorted(set(targets.tolist()[::2]) | {0, 1}))  # [K]
        _, stats = unrolled_loss(eagle, head, batch, 1, 1.0, 0.0, vocab=vocab)
        pred = unrolled(eagle, batch.features, head.embed_tokens(batch.next_ids), 1)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16_fast()):
            logits = F.linear(head.norm(pred[m]), head.lm_head.weight[vocab]).float()
        inside = torch.isin(targets, vocab)  # [M]
        column = torch.searchsorted(vocab, targets[inside])
        ce = F.cross_entropy(logits[inside], column)
        hits = (vocab[logits.argmax(-1)] == targets).float().mean()
    assert 0 < int(inside.sum()) < len(targets)
    assert stats[0]["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert stats[0]["top1"] == pytest.approx(float(hits), rel=1e-6)


def test_peerd_draft_train_trains_then_fine_tunes_a_head(
        tmp_path: Path, tiny: Path, head: Head,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    from click.testing import CliRunner
    from safetensors import safe_open

    from peerd.cli import main

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in PROMPTS))
    data, first, tuned = (tmp_path / n for n in ("answers.pt", "a.safetensors",
                                                 "b.safetensors"))
    common = ["draft", "train", "--model", str(tiny), "--prompts", str(prompts),
              "--holdout", "2", "--max-new-tokens", "12", "--data", str(data),
              "--threads", "1", "--vocab-size", "64", "--json"]
    run = CliRunner().invoke
    r = run(main, [*common, "--out", str(first), "--steps", "4"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["train_examples"] == 4 and report["init"] is None
    assert report["config"]["unroll"] == 1 and report["draft_vocab"]["size"] == 64
    assert report["answers"] == {"generated": 6, "reused": 0}
    assert data.is_file()  # the answers are kept, and the second run reuses them
    r = run(main, [*common, "--out", str(tuned), "--steps", "3", "--init", str(first),
                   "--unroll", "3", "--lr", "0.002", "--batch-size", "2"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["answers"] == {"generated": 0, "reused": 6}
    assert report["init"]["path"] == str(first)
    assert report["init"]["training"]["config"]["steps"] == 4  # the lineage is recorded
    assert report["config"] == {**report["config"], "unroll": 3, "lr": 0.002,
                                "batch_size": 2, "steps": 3}
    assert len(report["final_losses"]) == 3  # one entry per trained depth
    with safe_open(str(first), "pt") as a, safe_open(str(tuned), "pt") as b:
        moved = [k for k in a.keys() if not torch.equal(a.get_tensor(k), b.get_tensor(k))]  # noqa: SIM118
        assert "training" in b.metadata()
    assert "fc.weight" in moved  # fine-tuned from the first head, not left as it was
    load_eagle(tuned, head)
    # --layers grows the head it starts from; a fine-tune cannot take layers away
    deep = tmp_path / "deep.safetensors"
    r = run(main, [*common, "--out", str(deep), "--steps", "2", "--init", str(tuned),
                   "--layers", "2"])
    assert r.exit_code == 0, r.output
    assert load_eagle(deep, head).eagle.config.num_layers == 2
    r = run(main, [*common, "--out", str(tmp_path / "x.safetensors"), "--steps", "1",
                   "--init", str(deep), "--layers", "1"])
    assert r.exit_code == 1 and "a fine-tune can add layers, not remove them" in r.output
    assert not (tmp_path / "x.safetensors").exists()
    # bad input: a head for another model is refused before any work, nothing written
    other = tiny_llama_dir(tmp_path_factory, seed=1)
    broken = tmp_path / "c.safetensors"
    r = run(main, ["draft", "train", "--model", str(other), "--out", str(broken),
                   "--prompts", str(prompts), "--init", str(first), "--steps", "1"])
    assert r.exit_code == 1 and "embed_fingerprint" in r.output and not broken.exists()


def test_draft_train_data_grows_with_new_prompts_and_refuses_a_mismatch(
        tmp_path: Path, tiny: Path) -> None:
    from click.testing import CliRunner

    from peerd.cli import main
    from peerd.inference.speculative.eagle_data import read_answers

    first, more = tmp_path / "first.jsonl", tmp_path / "more.jsonl"
    first.write_text("".join(json.dumps({"prompt": p.text}) + "\n" for p in PROMPTS[:4]))
    more.write_text("".join(json.dumps({"completion": p.text}) + "\n" for p in PROMPTS[3:]))
    data = tmp_path / "answers.pt"
    common = ["draft", "train", "--model", str(tiny), "--holdout", "1", "--data", str(data),
              "--max-new-tokens", "10", "--threads", "1", "--steps", "1", "--json"]
    run = CliRunner().invoke
    r = run(main, [*common, "--prompts", str(first), "--out", str(tmp_path / "a.safetensors")])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["answers"] == {"generated": 4, "reused": 0}
    header, kept = read_answers(data)
    assert header == {"model_id": tiny.name, "max_new_tokens": 10} and len(kept) == 4
    # a second file: its 3 completions are new (raw text, no chat template: other tokens
    # than the chat prompt of the same text), the first file's 4 answers are reused
    r = run(main, [*common, "--prompts", str(first), "--prompts", str(more),
                   "--out", str(tmp_path / "b.safetensors")])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["answers"] == {"generated": 3, "reused": 4}
    assert report["train_examples"] + report["held_out_examples"] == 7
    again = read_answers(data)[1]
    assert len(again) == 7 and all(torch.equal(a.tokens, b.tokens)
                                   for a, b in zip(kept, again[:4], strict=True))
    # bad input: answers of another length, or not answers at all: refused, kept as they are
    before = data.read_bytes()
    r = run(main, [*common[:8], "--max-new-tokens", "12", "--threads", "1", "--steps", "1",
                   "--prompts", str(first), "--out", str(tmp_path / "c.safetensors")])
    assert r.exit_code == 1 and "max_new_tokens 10, not 12" in r.output
    assert data.read_bytes() == before and not (tmp_path / "c.safetensors").exists()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    r = run(main, [*common[:7], str(junk), *common[8:], "--prompts", str(first),
                   "--out", str(tmp_path / "d.safetensors")])
    assert r.exit_code == 1 and "is not a file of answers" in r.output


def test_long_work_reports_progress_in_a_log(capsys: pytest.CaptureFixture[str]) -> None:
    from peerd.inference.speculative.eagle_train import progress_bar

    with progress_bar(True) as bar:  # stderr is captured: not a terminal
        task = bar.add_task("training", total=20, info="")
        for i in range(20):
            bar.update(task, advance=1, info=f"top1 {i}")
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("training ")]
    assert [x.split()[1] for x in lines[:10]] == [f"{2 * i}/20" for i in range(1, 11)]
    assert "top1 19" in lines[9]
    with progress_bar(False) as bar:  # --json: nothing at all
        bar.update(bar.add_task("training", total=5, info=""), advance=5)
    assert capsys.readouterr().err == ""


def test_draft_train_leaves_out_prompts_too_long(tmp_path: Path, tiny: Path) -> None:
    """A pasted file of thousands of tokens would pad its whole generation batch to its
    length: such prompts are left out, and counted."""
    from click.testing import CliRunner

    from peerd.cli import main

    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": p.text} for p in PROMPTS[:4]] + [{"prompt": "word " * 600}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = CliRunner().invoke(main, [
        "draft", "train", "--model", str(tiny), "--prompts", str(prompts), "--holdout", "1",
        "--max-new-tokens", "8", "--threads", "1", "--steps", "1", "--json",
        "--max-prompt-tokens", "200", "--out", str(tmp_path / "a.safetensors")])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["prompts_too_long"] == 1 and report["max_prompt_tokens"] == 200
    assert report["train_examples"] + report["held_out_examples"] == 4
    assert report["answers"] == {"generated": 4, "reused": 0}


def test_draft_rows_take_the_fastest_form_and_keep_the_drafts(
        head: Head, trained: EagleHead, examples: list[Example],
        monkeypatch: pytest.MonkeyPatch) -> None:
    from peerd.inference.speculative import draft_logits

    # where the CPU multiplies bfloat16 natively, bfloat16; elsewhere int8 (fbgemm)
    monkeypatch.setattr(draft_logits, "cpu_bf16_fast", lambda: True)
    assert draft_logits.draft_form(head) == "bfloat16"
    monkeypatch.setattr(draft_logits, "cpu_bf16_fast", lambda: False)
    if not draft_logits.int8_kernels():
        pytest.skip("this torch has no int8 CPU kernels")
    assert draft_logits.draft_form(head) == "int8"
    e = examples[0]
    vocab = list(range(0, head.vocab_size, 2))
    forms = {form: EagleDrafter(head, trained, vocab=vocab) for form in ("int8", "float32")}
    for form, d in forms.items():
        d.logits = draft_logits.DraftLogits(head, vocab, form=form)
        assert d.logits.form == form and d.logits.size == len(vocab)
    sessions = {form: d.start() for form, d in forms.items()}
    for s in sessions.values():
        s.extend(e.tokens[:e.prompt_len + 1].tolist(), e.features[:e.prompt_len])
        assert s.pending is not None
    # int8 rows: the same columns (context rows appended), logits within quantisation
    got = {form: s._logits(s.pending) for form, s in sessions.items()
           if s.pending is not None}
    (q, q_ids), (f, f_ids) = got["int8"], got["float32"]
    assert q_ids is not None and f_ids is not None and torch.equal(q_ids, f_ids)
    err = (q - f).abs().max() / f.abs().max()
    assert err < 0.05, err
    assert int(q.argmax()) == int(f.argmax())
    # and the drafts are nearly always the same tokens
    trees = {form: s.propose_tree(4, 12) for form, s in sessions.items()}
    assert trees["int8"].tokens[:4] == trees["float32"].tokens[:4]
