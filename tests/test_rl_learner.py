"""The learner on tiny random Llamas: per-token log-probs against a one-sequence-at-a-time
reference, gradient accumulation equal to one pass, the exports (full and LoRA) against
what a fresh model and peft's own merge give."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from peerd.inference.model.source import reference_model, resolve
from peerd.rl.learner import Learner, TokenBatch, with_check, with_reference
from peerd.rl.logprobs import shared_prompts
from peerd.rl.progress import mean_abs
from tests.models import tiny_llama_dir

# float32 on CPU: the padded batched forward and the one-sequence forward differ by
# rounding only.
ATOL = 1e-5

PROMPTS = [[5, 17, 42], [7, 8], [9, 10, 11, 12, 13], [3]]
COMPLETIONS = [[20, 21, 22, 23], [30], [40, 41], [50, 51, 52, 53, 54, 55]]
ADVANTAGES = [1.0, -0.5, 0.25, -1.0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory, layers=2)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory, layers=2, tied=True)


def batch(behaviour: float = -1.0) -> TokenBatch:
    return TokenBatch.from_sequences(PROMPTS, COMPLETIONS,
                                     [[behaviour] * len(c) for c in COMPLETIONS], ADVANTAGES)


def token_loss(new_logp: torch.Tensor, part: TokenBatch) -> tuple[torch.Tensor, dict[str, Any]]:
    """A token-level policy-gradient loss: -sum(A * logp) / tokens of the part."""
    mask = part.completion_mask
    loss = -(new_logp * part.advantages[:, None] * mask).sum() / mask.sum()
    return loss, {"logp": (new_logp * mask).sum().detach() / mask.sum()}


def sequence_loss(new_logp: torch.Tensor,
                  part: TokenBatch) -> tuple[torch.Tensor, dict[str, Any]]:
    """A mean over sequences of per-sequence token means."""
    mask = part.completion_mask
    per_seq = (new_logp * mask).sum(-1) / mask.sum(-1)  # [B]
    return -(per_seq * part.advantages).mean(), {}


def one_by_one(model: Any, temperature: float) -> list[torch.Tensor]:
    """Each completion's log-probs from a forward pass over that sequence alone."""
    out = []
    with torch.no_grad():
        for p, c in zip(PROMPTS, COMPLETIONS, strict=True):
            ids = torch.tensor([[*p, *c]])
            logits = model(input_ids=ids).logits[0] / temperature  # [L, V]
            logp = torch.log_softmax(logits.float(), dim=-1)
            out.append(torch.stack([logp[len(p) - 1 + t, tok] for t, tok in enumerate(c)]))
    return out


def params(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters()}


# ---- the batch -------------------------------------------------------------------------


def test_token_batch_layout() -> None:
    b = batch()
    assert b.input_ids.shape == (4, 7) and b.completion_ids.shape == (4, 6)
    assert b.completion_mask.sum(-1).tolist() == [4, 1, 2, 6] and b.tokens == 13
    assert b.input_ids[0, :7].tolist() == [5, 17, 42, 20, 21, 22, 23]
    assert b.attention_mask[1].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert b.positions[2, :2].tolist() == [4, 5]  # prompt of 5: token 0 read at 4
    two = b.rows(slice(1, 3))
    assert two.size == 2 and two.completion_ids.shape == (2, 6)  # width kept


@pytest.mark.parametrize("bad", [
    dict(prompt_ids=[[1]], completion_ids=[[2, 3]], behaviour_logprobs=[[-1.0]],
         advantages=[0.0]),  # a log-prob short
    dict(prompt_ids=[[]], completion_ids=[[2]], behaviour_logprobs=[[-1.0]],
         advantages=[0.0]),  # no prompt
    dict(prompt_ids=[[1]], completion_ids=[[2]], behaviour_logprobs=[[-1.0]],
         advantages=[]),  # no advantage
    dict(prompt_ids=[], completion_ids=[], behaviour_logprobs=[], advantages=[]),
])
def test_token_batch_refuses_inconsistent_sequences(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TokenBatch.from_sequences(**bad)


# ---- log-probs -------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_match_each_sequence_alone(tiny: Path, temperature: float) -> None:
    learner = Learner.load(str(tiny))
    ref = one_by_one(reference_model(resolve(str(tiny))), temperature)
    got = learner.logprobs(batch(), temperature=temperature)
    assert got.requires_grad and got.shape == (4, 6)
    scored = learner.score(batch(), temperature=temperature)
    assert not scored.requires_grad
    for b, expected in enumerate(ref):
        n = len(expected)
        torch.testing.assert_close(got[b, :n].detach(), expected, atol=ATOL, rtol=0)
        torch.testing.assert_close(scored[b, :n], expected, atol=ATOL, rtol=0)
        assert (got[b, n:] == 0).all()  # padding columns are zero
    # a different temperature gives different log-probs: the test can see it
    other = learner.score(batch(), temperature=temperature * 2)
    assert not torch.allclose(other[0, :4], scored[0, :4], atol=1e-3)


# GRPO's shape: groups of completions of one prompt. Prompts 0 and 2 have one length (two
# groups of it), prompt 1 another; completions of 1 to 5 tokens, so a group's longest is
# shorter than the batch's and one row has a single token (no pass from the cache).
GROUPED_PROMPTS = [[5, 17, 42], [5, 17, 42], [7, 8], [9, 10, 11], [9, 10, 11], [7, 8],
                   [5, 17, 42]]
GROUPED_COMPLETIONS = [[20, 21, 22, 23], [20, 24], [30], [40, 41, 42, 43, 44], [45],
                       [31, 32], [25, 26, 27]]
GROUPED_ADVANTAGES = [1.0, -0.5, 0.25, -1.0, 0.75, -0.25, 0.5]


def grouped() -> TokenBatch:
    return TokenBatch.from_sequences(GROUPED_PROMPTS, GROUPED_COMPLETIONS,
                                     [[-1.0] * len(c) for c in GROUPED_COMPLETIONS],
                                     GROUPED_ADVANTAGES)


def test_shared_prompts_group_rows_by_prompt() -> None:
    groups = shared_prompts(grouped())
    assert groups is not None
    found = {tuple(int(r) for r in g.rows): (g.prompts.tolist(), g.which.tolist())
             for g in groups}
    assert found[(2, 5)] == ([[7, 8]], [0, 0])
    (prompts, which), = [v for k, v in found.items() if k == (0, 1, 3, 4, 6)]
    rows = [GROUPED_PROMPTS[r] for r in (0, 1, 3, 4, 6)]
    assert [prompts[w] for w in which] == rows and len(prompts) == 2
    assert shared_prompts(batch()) is None  # no two rows share a prompt: one pass


@pytest.mark.parametrize("update", ["full", "lora"])
def test_shared_prompts_give_each_sequence_alone(tiny: Path, update: str) -> None:
    learner = Learner.load(str(tiny), update=update)  # type: ignore[arg-type]
    model = learner.model
    got = learner.logprobs(grouped(), temperature=0.7)
    scored = learner.score(grouped(), temperature=0.7)
    with torch.no_grad():
        for b, (p, c) in enumerate(zip(GROUPED_PROMPTS, GROUPED_COMPLETIONS, strict=True)):
            logits = model(input_ids=torch.tensor([[*p, *c]])).logits[0] / 0.7
            logp = torch.log_softmax(logits.float(), dim=-1)
            expected = torch.stack([logp[len(p) - 1 + t, tok] for t, tok in enumerate(c)])
            torch.testing.assert_close(got[b, :len(c)].detach(), expected, atol=ATOL, rtol=0)
            torch.testing.assert_close(scored[b, :len(c)], expected, atol=ATOL, rtol=0)
            assert (got[b, len(c):] == 0).all()


@pytest.mark.parametrize("update", ["full", "lora"])
def test_shared_prompts_give_the_gradient_of_each_sequence_alone(tiny: Path,
                                                                 update: str) -> None:
    """A step on the grouped batch in one pass (prompts computed once, their KV read by
    every row of the group) equals the step accumulated one row at a time (no prompt
    shared): the gradient through a shared prompt is the sum over its rows."""
    whole = sgd(Learner.load(str(tiny), update=update))  # type: ignore[arg-type]
    rows = sgd(Learner.load(str(tiny), update=update))  # type: ignore[arg-type]
    before = params(whole)
    s1 = whole.step(grouped(), token_loss, micro_batch=None, max_grad_norm=1e9)
    s2 = rows.step(grouped(), token_loss, micro_batch=1, max_grad_norm=1e9)
    assert s1.loss == pytest.approx(s2.loss, abs=1e-6)
    after_whole, after_rows = params(whole), params(rows)
    assert max(float((after_whole[n] - before[n]).abs().max()) for n in before) > 1e-3
    for name in before:
        torch.testing.assert_close(after_rows[name], after_whole[name], atol=1e-6, rtol=1e-5)


def test_logprobs_refuse_zero_temperature(tiny: Path) -> None:
    with pytest.raises(ValueError, match="temperature"):
        Learner.load(str(tiny)).score(batch(), temperature=0.0)


# ---- the step --------------------------------------------------------------------------


def sgd(learner: Learner) -> Learner:
    """Plain SGD at lr 1: the step moves each weight by minus its gradient, so comparing
    weights compares gradients (Adam's first step is lr * sign(g) and would hide a
    wrongly weighted micro-batch)."""
    learner.optimizer = torch.optim.SGD(learner.trained, lr=1.0)
    return learner


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
def test_micro_batches_give_the_step_of_one_pass(tiny: Path, aggregation: str) -> None:
    loss_fn = token_loss if aggregation == "token" else sequence_loss
    whole = sgd(Learner.load(str(tiny)))
    micro = sgd(Learner.load(str(tiny)))
    before = params(whole)
    s1 = whole.step(batch(), loss_fn, micro_batch=None, max_grad_norm=1e9,
                    aggregation=aggregation)  # type: ignore[arg-type]
    s2 = micro.step(batch(), loss_fn, micro_batch=1, max_grad_norm=1e9,
                    aggregation=aggregation)  # type: ignore[arg-type]
    assert s1.sequences == 4 and s1.tokens == 13 and s1.seconds > 0
    assert s1.loss == pytest.approx(s2.loss, abs=1e-6)
    assert s1.grad_norm == pytest.approx(s2.grad_norm, rel=1e-5)
    after_whole, after_micro = params(whole), params(micro)
    moved = max(float((after_whole[n] - before[n]).abs().max()) for n in before)
    assert moved > 1e-3  # the step did something
    for name in before:  # the same float32 sums in another order
        torch.testing.assert_close(after_micro[name], after_whole[name], atol=1e-6, rtol=1e-5)


def test_step_loss_is_the_whole_batch_loss(tiny: Path) -> None:
    learner = Learner.load(str(tiny))
    with torch.no_grad():
        expected, extra = token_loss(learner.score(batch()), batch())
    stats = learner.step(batch(), token_loss, micro_batch=3)
    assert stats.loss == pytest.approx(float(expected), abs=1e-5)
    assert stats.stats["logp"] == pytest.approx(float(extra["logp"]), abs=1e-5)
    # equal weights per micro-batch would give another number: the test can tell
    first, _ = token_loss(learner.score(batch()).detach()[:3], batch().rows(slice(0, 3)))
    assert abs(float(first) - float(expected)) > 1e-3


def honest(learner: Learner, lie: dict[int, float] | None = None) -> TokenBatch:
    """The batch with the policy's own log-probs as its behaviour log-probs (what an
    honest sampler of this version sends); `lie`: rows shifted by that much a token."""
    ours = learner.score(batch())
    rows = [[float(x) + (lie or {}).get(b, 0.0) for x in ours[b, :len(c)]]
            for b, c in enumerate(COMPLETIONS)]
    return TokenBatch.from_sequences(PROMPTS, COMPLETIONS, rows, ADVANTAGES)


@pytest.mark.parametrize("micro_batch", [None, 1, 3])
def test_the_fused_check_measures_what_the_separate_check_would(tiny: Path,
                                                                micro_batch: int | None
                                                                ) -> None:
    learner = Learner.load(str(tiny))
    lying = honest(learner, {1: 0.01})  # row 1 off by 0.01 a token
    ours = learner.score(batch())
    expected = [mean_abs(ours[b, :len(c)], lying.behaviour_logprobs[b, :len(c)].tolist())
                for b, c in enumerate(COMPLETIONS)]
    before = params(learner)
    stats = learner.step(with_check(lying, [1e-3, 1e-3, None, 1e-3]), token_loss,
                         micro_batch=micro_batch)
    assert stats.deviations is not None
    assert stats.deviations[2] != stats.deviations[2]  # NaN: row 2 was not checked
    for b in (0, 1, 3):
        assert stats.deviations[b] == pytest.approx(expected[b], abs=1e-6)
    assert stats.deviations[1] == pytest.approx(0.01, abs=1e-5)
    # row 1 is over its tolerance: no step, the weights as they were
    assert not stats.stepped
    after = params(learner)
    assert all(torch.equal(after[n], before[n]) for n in before)


def test_honest_rows_pass_the_fused_check_and_train_as_without_it(tiny: Path) -> None:
    checked, plain = sgd(Learner.load(str(tiny))), sgd(Learner.load(str(tiny)))
    sent = honest(checked, {2: 0.5})  # row 2 lies, but is not checked (an older version)
    s1 = checked.step(with_check(sent, [1e-3, 1e-3, None, 1e-3]), token_loss, micro_batch=2)
    s2 = plain.step(sent, token_loss, micro_batch=2)
    assert s1.stepped and s2.deviations is None
    assert s1.deviations is not None and max(s1.deviations[b] for b in (0, 1, 3)) < 1e-5
    assert s1.loss == pytest.approx(s2.loss, abs=1e-7)
    a, b = params(checked), params(plain)
    assert all(torch.equal(a[n], b[n]) for n in a)  # the check moves nothing
    with pytest.raises(ValueError, match="3 tolerances for 4 rows"):
        with_check(sent, [1e-3] * 3)


def test_steps_raise_the_log_prob_of_a_rewarded_completion(tiny: Path) -> None:
    learner = Learner.load(str(tiny), lr=1e-3)
    before = learner.score(batch())
    for _ in range(3):
        learner.step(batch(), token_loss, max_grad_norm=10.0)
    after = learner.score(batch())
    assert float(after[0, :4].sum()) > float(before[0, :4].sum())  # advantage +1
    assert float(after[3, :6].sum()) < float(before[3, :6].sum())  # advantage -1


def test_grad_norm_is_clipped(tiny: Path) -> None:
    learner = Learner.load(str(tiny))
    stats = learner.step(batch(), token_loss, max_grad_norm=1e-3)
    assert stats.grad_norm > 1e-3  # reported before clipping


def test_reference_stays_at_version_zero(tiny: Path) -> None:
    learner = Learner.load(str(tiny), lr=1e-3, reference=True)
    base = learner.score(batch())
    learner.step(batch(), token_loss)
    torch.testing.assert_close(learner.reference_logprobs(batch()), base)
    assert not torch.allclose(learner.score(batch()), base, atol=1e-4)
    kl = with_reference(batch(), learner.reference_logprobs(batch()))
    assert kl.reference_logprobs is not None and kl.rows(slice(0, 2)).reference_logprobs \
        is not None
    with pytest.raises(RuntimeError, match="reference"):
        Learner.load(str(tiny)).reference_logprobs(batch())


# ---- exports ---------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_full_export_applied_to_a_fresh_model_gives_identical_logits(
        tiny: Path, tiny_tied: Path, tied: bool) -> None:
    directory = tiny_tied if tied else tiny
    learner = Learner.load(str(directory), lr=1e-3)
    learner.step(batch(), token_loss)
    tensors, scale = learner.export("full")
    assert scale is None
    assert ("lm_head.weight" in tensors) is not tied  # tied: exported once, as embeddings
    assert "model.embed_tokens.weight" in tensors
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad
               for t in tensors.values())
    fresh = reference_model(resolve(str(directory)))
    missing, unexpected = fresh.load_state_dict(tensors, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if tied else [])
    ids = batch().input_ids
    with torch.no_grad():
        want = learner.model(input_ids=ids).logits
        got = fresh(input_ids=ids).logits
    assert torch.equal(got, want)
    # and the export is a copy: stepping again leaves it as it was
    snapshot = {n: t.clone() for n, t in tensors.items()}
    learner.step(batch(), token_loss)
    assert all(torch.equal(tensors[n], snapshot[n]) for n in tensors)


def test_lora_export_equals_peft_merge(tiny: Path) -> None:
    learner = Learner.load(str(tiny), update="lora", lora_rank=4, lora_alpha=8, lr=1e-2)
    base = learner.score(batch())
    adapters0, _ = learner.export()
    assert all(float(t.abs().max()) == 0 for n, t in adapters0.items() if n.endswith("B"))
    learner.step(batch(), token_loss)
    adapters, scale = learner.export("lora")
    assert scale == 2.0
    modules = {n.rsplit(".", 1)[0] for n in adapters}
    assert len(modules) == 2 * 4 and len(adapters) == 2 * len(modules)  # 2 layers, q k v o
    assert "model.layers.1.self_attn.o_proj" in modules
    assert not any(n.startswith("base_model") for n in adapters)
    assert adapters["model.layers.0.self_attn.q_proj.lora_A"].shape == (4, 64)
    assert adapters["model.layers.0.self_attn.k_proj.lora_B"].shape == (32, 4)  # 2 kv heads
    assert any(float(t.abs().max()) > 0 for n, t in adapters.items() if n.endswith("B"))

    merged = copy.deepcopy(learner.model).merge_and_unload()  # type: ignore[operator]
    merged_state = merged.state_dict()
    original = reference_model(resolve(str(tiny))).state_dict()
    for module in modules:
        a, b = adapters[f"{module}.lora_A"], adapters[f"{module}.lora_B"]
        mine = original[f"{module}.weight"] + scale * b @ a
        torch.testing.assert_close(mine, merged_state[f"{module}.weight"], atol=1e-6, rtol=0)
    # "full" from a LoRA learner is the merged model, under HF names
    full, none = learner.export("full")
    assert none is None and set(full) == set(original)
    for name, tensor in full.items():
        torch.testing.assert_close(tensor, merged_state[name], atol=1e-6, rtol=0)
    # the reference of a LoRA learner is the base, adapters off (no second copy)
    learner2 = Learner.load(str(tiny), update="lora", lr=1e-2, reference=True)
    learner2.step(batch(), token_loss)
    torch.testing.assert_close(learner2.reference_logprobs(batch()), base)
    assert not torch.allclose(learner2.score(batch()), base, atol=1e-5)


def test_load_tensors_round_trips_and_refuses_a_foreign_layout(tiny: Path) -> None:
    trained = Learner.load(str(tiny), update="lora", lr=1e-2, seed=1)
    trained.step(batch(), token_loss)
    adapters, _ = trained.export()
    other = Learner.load(str(tiny), update="lora", lr=1e-2, seed=2)
    assert not torch.allclose(other.score(batch()), trained.score(batch()))
    other.load_tensors(adapters)
    torch.testing.assert_close(other.score(batch()), trained.score(batch()), atol=0, rtol=0)
    with pytest.raises(ValueError, match="do not fit"):
        Learner.load(str(tiny)).load_tensors(adapters)


def test_full_learner_has_no_adapters(tiny: Path) -> None:
    with pytest.raises(ValueError, match="adapters"):
        Learner.load(str(tiny)).export("lora")
    with pytest.raises(ValueError, match="update"):
        Learner.load(str(tiny), update="partial")  # type: ignore[arg-type]


def test_smollm2_alias_loads_with_lora() -> None:
    """The GGUF alias (a few seconds: dequantises 135M parameters)."""
    learner = Learner.load("smollm2", update="lora", lora_rank=2)
    logp = learner.score(TokenBatch.from_sequences([[1, 2, 3]], [[4, 5]], [[-1.0, -1.0]],
                                                   [0.0]))
    assert logp.shape == (1, 2) and bool((logp < 0).all())
    adapters, scale = learner.export()
    assert scale == 8.0 and len(adapters) == 30 * 4 * 2  # 30 layers, q k v o, A and B
