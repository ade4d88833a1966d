"""LocalPolicy: the peer's whole model as a versioned RL policy.

Generation against transformers' reference model (behaviour log-probs recomputed from
its logits; float32, tolerance LOGPROB_ATOL), seeded determinism, and versions:
applied atomically (a bad tensor changes nothing), never mid-generation, only forward,
LoRA-style deltas on the version-0 base (v2 after v1 does not stack)."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import trio

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peerd.inference.model.head import Head
from peerd.inference.model.shard import ShardBlock
from peerd.inference.model.source import ModelSource, reference_model, resolve
from peerd.rl.policy import Completion, LocalPolicy, nucleus
from peerd.rl.versions import PolicyError
from tests.models import tiny_llama_dir

# Behaviour log-probs against the reference's: float32 both, the same modules, but the
# policy decodes through the KV cache in batches while the reference scores the whole
# sequence in one forward, so kernels sum in other orders: float rounding (measured
# ~1e-6 on the tiny model), far inside this.
LOGPROB_ATOL = 1e-4
PROMPT = [1, 17, 42, 99, 7, 250, 3]
EOS = {2}
Q = "model.layers.1.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return resolve(str(tiny_llama_dir(tmp_path_factory)))


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory: pytest.TempPathFactory) -> ModelSource:
    return resolve(str(tiny_llama_dir(tmp_path_factory, tied=True)))


@pytest.fixture(scope="module")
def ref(tiny: ModelSource) -> Any:
    return reference_model(tiny)


def load(source: ModelSource) -> LocalPolicy:
    """A fresh policy (tests change its weights)."""
    return LocalPolicy(ShardBlock(source, 0, 4), Head(source))


async def sample(policy: LocalPolicy, **kw: Any) -> list[Completion]:
    settings: dict[str, Any] = {"n": 4, "temperature": 1.0, "top_p": 1.0, "max_tokens": 12,
                                "seed": 7, "eos_ids": EOS} | kw
    return await policy.generate(PROMPT, **settings)


def reference_logprobs(ref: Any, completion: Completion, temperature: float,
                       top_p: float = 1.0) -> torch.Tensor:
    ids = torch.tensor([PROMPT + list(completion.ids)])
    with torch.inference_mode():
        logits = ref(ids).logits[0, len(PROMPT) - 1:-1].float()  # [C, V]
    lp = torch.log_softmax(logits / (temperature or 1.0), dim=-1)
    if top_p < 1.0:
        lp = nucleus(lp, top_p)
    return lp.gather(1, torch.tensor(completion.ids)[:, None])[:, 0]


# ---- generation -------------------------------------------------------------------------


def test_needs_all_layers(tiny: ModelSource) -> None:
    with pytest.raises(PolicyError, match=r"all 4 layers.*\[0, 2\)"):
        LocalPolicy(ShardBlock(tiny, 0, 2), Head(tiny))


@pytest.mark.parametrize(("temperature", "top_p"), [(1.0, 1.0), (0.7, 1.0), (1.3, 0.8)])
async def test_logprobs_match_the_reference(tiny: ModelSource, ref: Any, temperature: float,
                                            top_p: float) -> None:
    policy = load(tiny)
    completions = await sample(policy, temperature=temperature, top_p=top_p)
    assert len(completions) == 4
    assert len({c.ids for c in completions}) > 1  # a group, not one sample repeated
    worst = 0.0
    for c in completions:
        assert 1 <= len(c.ids) == len(c.logprobs) <= 12
        assert len(c.ids) == 12 or c.ids[-1] in EOS
        assert not EOS & set(c.ids[:-1])  # stops at the first EOS
        assert all(lp <= 0.0 for lp in c.logprobs)
        expected = reference_logprobs(ref, c, temperature, top_p)
        worst = max(worst, float((torch.tensor(c.logprobs) - expected).abs().max()))
    print(f"max |logprob - reference| = {worst:.2e}")
    assert worst < LOGPROB_ATOL


async def test_greedy_is_the_reference_greedy_with_logprobs_at_temperature_1(
        tiny: ModelSource, ref: Any) -> None:
    policy = load(tiny)
    completions = await sample(policy, temperature=0.0, n=2, max_tokens=10)
    ids = torch.tensor([PROMPT])
    with torch.inference_mode():
        out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=10, eos_token_id=sorted(EOS))
    expected = tuple(out[0, len(PROMPT):].tolist())
    assert completions[0].ids == completions[1].ids == expected
    lp = reference_logprobs(ref, completions[0], 1.0)
    assert torch.allclose(torch.tensor(completions[0].logprobs), lp, atol=LOGPROB_ATOL)


async def test_same_seed_same_tokens_and_a_completion_does_not_depend_on_its_batch(
        tiny: ModelSource) -> None:
    policy = load(tiny)
    first = await sample(policy, seed=11)
    again = await sample(policy, seed=11)
    assert first == again
    assert await sample(policy, seed=12) != first
    # completion g has its own random stream: the first two of four are the two of two
    pair = await sample(policy, seed=11, n=2)
    assert [c.ids for c in pair] == [c.ids for c in first[:2]]
    for a, b in zip(pair, first[:2], strict=True):
        assert torch.allclose(torch.tensor(a.logprobs), torch.tensor(b.logprobs),
                              atol=LOGPROB_ATOL)


async def test_generate_many_prompts_at_one_version(tiny: ModelSource) -> None:
    policy = load(tiny)
    other = [5, 6, 7]
    out = await policy.generate_many([PROMPT, other], n=3, temperature=1.0, top_p=1.0,
                                     max_tokens=6, seed=3, eos_ids=EOS)
    assert out.version == 0 and [len(g) for g in out.groups] == [3, 3]
    # prompt 0 of a many-prompt call is the single-prompt call with the same seed
    assert out.groups[0] == await sample(policy, seed=3, n=3, max_tokens=6)


async def test_bad_generation_arguments_are_refused(tiny: ModelSource) -> None:
    policy = load(tiny)
    with pytest.raises(PolicyError, match="outside the vocabulary"):
        await policy.generate([1, 10_000], n=1, temperature=1.0, top_p=1.0, max_tokens=2,
                              seed=0, eos_ids=EOS)
    with pytest.raises(PolicyError, match="empty"):
        await policy.generate([], n=1, temperature=1.0, top_p=1.0, max_tokens=2, seed=0,
                              eos_ids=EOS)
    with pytest.raises(PolicyError, match="out of range"):
        await sample(policy, n=0)


# ---- versions ---------------------------------------------------------------------------


def weight(policy: LocalPolicy, name: str) -> torch.Tensor:
    return policy._params[name].detach().clone()


async def test_full_update_replaces_and_changes_what_is_sampled(tiny: ModelSource) -> None:
    policy = load(tiny)
    before = await sample(policy, temperature=0.0, n=1)
    lm = weight(policy, "lm_head.weight")
    shuffled = lm[torch.randperm(lm.shape[0], generator=torch.Generator().manual_seed(0))]
    await policy.apply(1, full={"lm_head.weight": shuffled})
    assert policy.version == 1
    assert torch.equal(weight(policy, "lm_head.weight"), shuffled)
    assert await sample(policy, temperature=0.0, n=1) != before


@pytest.mark.parametrize("bad", [
    {"model.layers.9.mlp.up_proj.weight": torch.zeros(128, 64)},  # no such layer
    {Q: torch.zeros(64, 65)},  # shape
    {Q: torch.zeros(64, 64, dtype=torch.float64)},  # dtype
    {Q: torch.full((64, 64), float("nan"))},  # not finite
])
async def test_a_bad_tensor_changes_nothing(tiny: ModelSource, bad: dict[str, torch.Tensor]
                                            ) -> None:
    policy = load(tiny)
    norm, q = weight(policy, "model.norm.weight"), weight(policy, Q)
    good = {"model.norm.weight": torch.full_like(norm, 3.0)}
    with pytest.raises(PolicyError):
        await policy.apply(1, full=good | bad)
    with pytest.raises(PolicyError):
        await policy.apply(1, full=good, deltas=bad)
    assert policy.version == 0
    assert torch.equal(weight(policy, "model.norm.weight"), norm)
    assert torch.equal(weight(policy, Q), q)
    await policy.apply(1, full=good)  # and the policy still takes a good version
    assert torch.equal(weight(policy, "model.norm.weight"), good["model.norm.weight"])


async def test_versions_only_move_forward(tiny: ModelSource) -> None:
    policy = load(tiny)
    await policy.apply(2, full={})
    for old in (0, 1, 2):
        with pytest.raises(PolicyError, match="not ahead"):
            await policy.apply(old, full={"model.norm.weight": torch.zeros(64)})
    assert policy.version == 2
    assert not torch.equal(weight(policy, "model.norm.weight"), torch.zeros(64))


async def test_lora_deltas_apply_to_the_base_and_do_not_stack(tiny: ModelSource) -> None:
    policy = load(tiny)
    base = weight(policy, Q)
    g = torch.Generator().manual_seed(1)
    d1, d2 = torch.randn(64, 64, generator=g) * 0.1, torch.randn(64, 64, generator=g) * 0.1
    await policy.apply(1, deltas={Q: d1})
    assert torch.allclose(weight(policy, Q), base + d1)
    await policy.apply(2, deltas={Q: d2})
    assert torch.allclose(weight(policy, Q), base + d2)  # not base + d1 + d2
    # a full replacement, then a delta: on the checkpoint's base, not on the replacement
    norm = "model.norm.weight"
    norm_base = weight(policy, norm)
    await policy.apply(3, full={norm: torch.full((64,), 5.0)})
    await policy.apply(4, deltas={norm: torch.full((64,), 0.5)})
    assert torch.allclose(weight(policy, norm), norm_base + 0.5)


async def test_reset_goes_back_to_the_model_as_loaded(tiny: ModelSource) -> None:
    policy = load(tiny)
    expected = await sample(policy, seed=3)
    names = [Q, "model.norm.weight", "lm_head.weight"]
    before = {n: weight(policy, n) for n in names}
    await policy.apply(1, full={"model.norm.weight": torch.full((64,), 5.0)})
    await policy.apply(2, deltas={Q: torch.ones(64, 64)})
    await policy.apply(3, full={"lm_head.weight": weight(policy, "lm_head.weight") * 2})
    assert await sample(policy, seed=3) != expected
    await policy.reset()
    assert policy.version == 0
    assert all(torch.equal(weight(policy, n), before[n]) for n in names)
    assert await sample(policy, seed=3) == expected
    await policy.apply(1, deltas={Q: torch.ones(64, 64)})  # a new run starts at 1 again
    assert torch.allclose(weight(policy, Q), before[Q] + 1)


async def test_apply_waits_for_a_running_generation(tiny: ModelSource) -> None:
    policy = load(tiny)
    expected = await sample(policy, max_tokens=40, seed=5, eos_ids=set())
    order: list[str] = []
    got: list[list[Completion]] = []
    lm = weight(policy, "lm_head.weight")

    async def generation() -> None:
        got.append(await sample(policy, max_tokens=40, seed=5, eos_ids=set()))
        order.append("generated")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(generation)
        while not policy._lock.locked():  # until the generation holds it
            await trio.lowlevel.checkpoint()
        await policy.apply(1, full={"lm_head.weight": -lm})
        order.append("applied")
    assert order == ["generated", "applied"]
    assert got[0] == expected  # every token came from version 0
    assert policy.version == 1


async def test_tied_embeddings_take_either_name_once(tiny_tied: ModelSource) -> None:
    policy = load(tiny_tied)
    emb = weight(policy, "model.embed_tokens.weight")
    with pytest.raises(PolicyError, match="tied"):
        await policy.apply(1, full={"lm_head.weight": emb * 2,
                                    "model.embed_tokens.weight": emb * 3})
    assert torch.equal(weight(policy, "lm_head.weight"), emb)
    await policy.apply(1, full={"lm_head.weight": emb * 2})
    assert torch.equal(weight(policy, "model.embed_tokens.weight"), emb * 2)
    # a delta on the tied matrix after a full update starts from the checkpoint's base
    await policy.apply(2, deltas={"lm_head.weight": torch.ones_like(emb)})
    assert torch.allclose(weight(policy, "model.embed_tokens.weight"), emb + 1)


def test_parameters_are_named_as_hugging_face_names(tiny: ModelSource, ref: Any) -> None:
    policy = load(tiny)
    hf = {n: (tuple(t.shape), t.dtype) for n, t in ref.state_dict().items()
          if not n.endswith("rotary_emb.inv_freq")}
    assert policy.parameters() == hf


def test_seed_mixing_is_stable() -> None:
    # the seeds of a request's completions are part of its reproducibility
    from peerd.rl.policy import completion_seed
    assert completion_seed(0, 0, 0) == completion_seed(0, 0, 0)
    assert len({completion_seed(1, p, g) for p in range(8) for g in range(8)}) == 64

