"""Held-out evaluation (peerd/rl/evaluate.py, `peerd rl eval`): the intervals against
published and hand-computed values, scoring of known answers, greedy decoding batched
as alone, and a trained checkpoint (full or LoRA) changing what is evaluated."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from daemons import run_cli

from peerd.rl import checkpoint
from peerd.rl.evaluate import (
    Answer,
    EvalResult,
    compare,
    evaluate,
    load_policy,
    newcombe_paired,
    newcombe_unpaired,
    wilson,
)
from peerd.rl.learner import Learner, TokenBatch
from peerd.rl.sampler import chat_prompt_ids
from peerd.rl.tasks import jsonl_task
from tests.models import tiny_llama_dir

ROWS = [{"prompt": f"Say a number ({i})", "answer": "7"} for i in range(200)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory, layers=2)


@pytest.fixture(scope="module")
def seven(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("task") / "seven.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def close(got: tuple[float, float], want: tuple[float, float], tol: float = 5e-5) -> bool:
    return abs(got[0] - want[0]) < tol and abs(got[1] - want[1]) < tol


# ---- statistics ------------------------------------------------------------------------


def test_wilson_against_hand_computed_values() -> None:
    # 8/10: centre (0.8 + z^2/20) / (1 + z^2/10) = 0.716737, half-width
    # z * sqrt(0.016 + z^2/400) / (1 + z^2/10) = 0.226581
    assert close(wilson(8, 10), (0.490156, 0.943318))
    # 0/10: upper (z^2/20 + z * z/20) / (1 + z^2/10) = 2 * 0.192073 / 1.384146
    assert wilson(0, 10)[0] == 0.0 and close(wilson(0, 10), (0.0, 0.277533))
    assert wilson(10, 10)[1] == 1.0 and close(wilson(10, 10), (0.722467, 1.0))
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson(3, 2)


def test_newcombe_intervals_against_published_values() -> None:
    # Fagerland, Lydersen & Laake, "Statistical Analysis of Contingency Tables", ch. 8:
    # Cavo et al. 2012, paired 2x2 [[59, 6], [16, 80]]: -0.0621 (-0.1186 to -0.0046)
    low, high = newcombe_paired(59, 6, 16, 80)
    assert close((low, high), (-0.1186, -0.0046), 5e-5)
    # ch. 4: Perondi et al. 2004, 7/34 against 1/34: 0.1765 (0.0189 to 0.3404)
    assert close(newcombe_unpaired(7, 34, 1, 34), (0.0189, 0.3404), 5e-5)
    # no discordant pairs: the difference is 0 and its interval straddles it
    low, high = newcombe_paired(5, 0, 0, 5)
    assert low < 0 < high


def answers(prompts: Sequence[str], right: Sequence[bool]) -> EvalResult:
    return EvalResult("t", tuple(Answer(p, "7", "7" if r else "8", 1.1 if r else 0.1)
                                 for p, r in zip(prompts, right, strict=True)))


def test_compare_pairs_the_same_questions_and_not_others() -> None:
    qs = [f"q{i}" for i in range(10)]
    before = answers(qs, [True] * 3 + [False] * 7)
    after = answers(qs, [True] * 2 + [False] + [True] * 5 + [False] * 2)
    c = compare(before, after)
    assert c.paired and (c.gained, c.lost, c.n) == (5, 1, 10)
    assert c.diff_points == pytest.approx(40.0)
    low, high = newcombe_paired(2, 5, 1, 2)
    assert c.interval_points == pytest.approx((100 * low, 100 * high))
    assert c.to_json()["method"] == "newcombe-paired"
    other = compare(before, answers([f"r{i}" for i in range(10)], [True] * 7 + [False] * 3))
    assert not other.paired and other.to_json()["method"] == "newcombe-unpaired"
    low, high = newcombe_unpaired(7, 10, 3, 10)
    assert other.interval_points == pytest.approx((100 * low, 100 * high))


# ---- scoring ---------------------------------------------------------------------------


def test_scoring_of_known_answers_through_an_injected_generate(tiny: Path,
                                                               tmp_path: Path) -> None:
    """Held-out questions with known answers, answered by a fake decoder: accuracy,
    format rate and interval are what the answers make them, and the decoder was asked
    exactly the held-out questions, in the samplers' chat prompt."""
    path = tmp_path / "sums.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"What is {i} + 3?", "answer": i + 3}) + "\n"
                            for i in range(300)))
    task = jsonl_task(path, seed=0)
    problems = task.heldout(5)
    policy = load_policy(str(tiny))
    tok = policy.tokenizer
    a = [int(p.answer) for p in problems]
    texts = [f"{a[0]}", f"The answer is {a[1]}.", f"{a[2] + 1}", "no idea",
             f"{a[4]} or {a[4] + 1}"]
    asked: list[list[int]] = []
    done: list[tuple[int, int]] = []

    def fake(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        start = len(asked)
        asked.extend(list(p) for p in prompts)
        return [tok(t, add_special_tokens=False).input_ids
                for t in texts[start:start + len(prompts)]]

    result = evaluate(policy.model, tok, task, 5, 8, batch_size=2, generate=fake,
                      progress=lambda k, n: done.append((k, n)))
    assert asked == [chat_prompt_ids(tok, p.prompt) for p in problems]
    assert done == [(2, 5), (4, 5), (5, 5)]
    assert [x.completion for x in result.answers] == texts
    assert [x.reward for x in result.answers] == [1.1, 1.0, 0.1, 0.0, 0.0]
    assert [x.correct for x in result.answers] == [True, True, False, False, False]
    assert (result.n, result.correct, result.accuracy) == (5, 2, 0.4)
    assert result.format_rate == pytest.approx(0.4)
    assert result.interval == wilson(2, 5)
    out = result.to_json(details=True)
    assert out["interval"] == list(wilson(2, 5)) and len(out["results"]) == 5
    assert "results" not in result.to_json()


# ---- real models -----------------------------------------------------------------------


def test_batched_greedy_answers_as_one_at_a_time(tiny: Path, seven: Path) -> None:
    policy = load_policy(str(tiny))
    task = jsonl_task(seven, seed=0)
    lengths = {len(chat_prompt_ids(policy.tokenizer, p.prompt)) for p in task.heldout(6)}
    assert len(lengths) > 1  # so a batch of 4 is padded
    alone = evaluate(policy.model, policy.tokenizer, task, 6, 5)
    batched = evaluate(policy.model, policy.tokenizer, task, 6, 5, batch_size=4)
    assert [a.completion for a in alone.answers] == [a.completion for a in batched.answers]
    assert any(a.completion for a in alone.answers)  # it did generate something


def say_seven(learner: Learner, tokenizer: Any, task: Any, steps: int) -> None:
    """Teach the policy to answer '7' (then stop) on training questions."""
    seven_ids = [*tokenizer("7", add_special_tokens=False).input_ids,
                 tokenizer.convert_tokens_to_ids("<|im_end|>")]
    prompts = [chat_prompt_ids(tokenizer, task.problem(i).prompt) for i in range(8)]
    batch = TokenBatch.from_sequences(prompts, [seven_ids] * 8,
                                      [[0.0] * len(seven_ids)] * 8, [1.0] * 8)

    def loss(new_logp: torch.Tensor, part: TokenBatch) -> tuple[torch.Tensor, dict[str, Any]]:
        return -(new_logp * part.completion_mask).sum() / part.completion_mask.sum(), {}

    for _ in range(steps):
        learner.step(batch, loss)


@pytest.mark.parametrize("update", ["full", "lora"])
def test_a_checkpoint_changes_the_policy_evaluated(tiny: Path, seven: Path, tmp_path: Path,
                                                   update: str) -> None:
    task = jsonl_task(seven, seed=0)
    base = load_policy(str(tiny))
    before = evaluate(base.model, base.tokenizer, task, 8, 3)
    learner = Learner.load(str(tiny), update=update, lr=0.05)  # type: ignore[arg-type]
    say_seven(learner, base.tokenizer, task, 15)
    checkpoint.save(tmp_path, step=3, version=3, learner=learner, state={})
    trained = load_policy(str(tiny), checkpoint.latest_checkpoint(tmp_path))
    assert (trained.step, trained.version, trained.update) == (3, 3, update)
    # the policy evaluated is the learner's: its weights, LoRA merged into the base
    merged, _ = learner.export("full")
    for name, p in trained.model.named_parameters():
        torch.testing.assert_close(p.detach(), merged[name], rtol=0, atol=1e-6)
    after = evaluate(trained.model, trained.tokenizer, task, 8, 3)
    print("before", before.to_json(True), "after", after.to_json(True))
    assert after.accuracy >= 0.75 > before.accuracy
    # the benchmark's way: the learner's own model (peft's, for LoRA), left training
    direct = evaluate(learner.model, base.tokenizer, task, 8, 3)
    assert [a.completion for a in direct.answers] == [a.completion for a in after.answers]
    assert learner.model.training
    c = compare(before, after)
    assert c.paired and c.diff_points > 0 and c.interval_points[0] > 0


def test_a_checkpoint_of_another_model_is_refused(tiny: Path, tmp_path: Path,
                                                  tmp_path_factory: pytest.TempPathFactory
                                                  ) -> None:
    other = tiny_llama_dir(tmp_path_factory, layers=3)
    checkpoint.save(tmp_path, step=1, version=1, learner=Learner.load(str(other)), state={})
    with pytest.raises(ValueError, match="does not fit this model"):
        load_policy(str(tiny), checkpoint.latest_checkpoint(tmp_path))
    with pytest.raises(ValueError, match="no checkpoint"):
        checkpoint.latest_checkpoint(tmp_path / "nothing")


# ---- the command -----------------------------------------------------------------------


def test_the_eval_command_on_a_trained_run(tiny: Path, seven: Path, tmp_path: Path) -> None:
    learner = Learner.load(str(tiny), update="lora", lr=0.05)
    task = jsonl_task(seven, seed=0)
    from peerd.inference.model.source import load_tokenizer, resolve

    say_seven(learner, load_tokenizer(resolve(str(tiny))), task, 15)
    checkpoint.save(tmp_path / "run", step=2, version=2, learner=learner, state={})
    args = ["rl", "eval", "--model", str(tiny), "--task", str(seven), "-n", "6",
            "--max-tokens", "3", "--torch-threads", "1"]
    got = run_cli(*args, "--run", str(tmp_path / "run"), "--json", "--details",
                  timeout_s=120)
    assert got.returncode == 0, got.stderr
    out = json.loads(got.stdout)
    assert out["n"] == 6 and out["task"] == "seven" and out["step"] == 2
    assert out["checkpoint"].endswith("step-00000002") and out["update"] == "lora"
    assert 0.0 <= out["interval"][0] <= out["accuracy"] <= out["interval"][1] <= 1.0
    assert out["accuracy"] >= 0.5 and 0.0 <= out["format_rate"] <= 1.0
    assert len(out["results"]) == 6 and set(out["results"][0]) >= {
        "prompt", "expected", "completion", "reward", "correct"}
    table = run_cli(*args, "--details", env={"COLUMNS": "200"}, timeout_s=120)
    assert table.returncode == 0, table.stderr
    assert "accuracy" in table.stdout and "base model" in table.stdout
    assert "Say a number" in table.stdout and "expected" in table.stdout
    bad = run_cli(*args, "--run", str(tmp_path / "nowhere"), timeout_s=60)
    assert bad.returncode == 1 and "no checkpoint" in bad.stderr
