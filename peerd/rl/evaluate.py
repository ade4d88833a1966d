"""Held-out evaluation of a policy (`peerd rl eval`, and scripts/bench_rl.py before and
after training): greedy answers to the task's held-out questions, never trained on,
scored with the task's reward.

A question is put as the samplers put it (`chat_prompt_ids`: the chat template, ready
for the answer) and answered greedily, up to `max_tokens` tokens or an end-of-sequence
token. It is right when its reward is at least CORRECT_REWARD (the last number of the
answer is the expected one), and well formatted when the reward holds FORMAT_REWARD
(the answer's last line is that number alone): number_reward adds the two.

Statistics, all at 95%:
- accuracy: the Wilson score interval (it stays inside [0, 1] and keeps its coverage
  at 0 or n right, where the Wald interval collapses to a point);
- before against after (`compare`): on the same questions, Newcombe's paired
  square-and-add interval (his 1998 method 10, built from the two Wilson intervals and
  the correlation of the paired answers). The same questions answered twice are
  positively correlated (easy ones stay right), and an unpaired interval ignores that
  and is wider than it needs to be; the paired one uses only what the data show. On
  different question lists the unpaired Newcombe hybrid score interval is used
  instead, and the comparison says which.

Batched greedy decoding (`batch_size` > 1) left-pads the prompts; the padded rows run
through matrix products of other shapes, whose float rounding can differ from one
question alone and so, at a near-tie of the two likeliest tokens, pick another token.
Hence batch size 1 by default: every question decoded exactly as it would be alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peerd.rl.sampler import chat_prompt_ids
from peerd.rl.tasks import CORRECT_REWARD, FORMAT_REWARD, Problem, Task

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile
# completion ids for a batch of prompt ids, end-of-sequence token and after cut off
Generate = Callable[[Sequence[Sequence[int]]], list[list[int]]]
Progress = Callable[[int, int], None]  # (questions done, questions in all)


@dataclass(frozen=True, slots=True)
class Answer:
    """One held-out question and the policy's answer to it."""

    prompt: str
    expected: str
    completion: str
    reward: float

    @property
    def correct(self) -> bool:
        return self.reward >= CORRECT_REWARD

    @property
    def formatted(self) -> bool:
        rest = self.reward - (CORRECT_REWARD if self.correct else 0.0)
        return rest >= FORMAT_REWARD / 2  # 0.1 or 0.0, give or take float rounding

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "expected": self.expected,
                "completion": self.completion, "reward": self.reward,
                "correct": self.correct, "formatted": self.formatted}


@dataclass(frozen=True, slots=True)
class EvalResult:
    task: str
    answers: tuple[Answer, ...]

    @property
    def n(self) -> int:
        return len(self.answers)

    @property
    def correct(self) -> int:
        return sum(a.correct for a in self.answers)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% Wilson interval of the accuracy."""
        return wilson(self.correct, self.n)

    @property
    def format_rate(self) -> float:
        return sum(a.formatted for a in self.answers) / self.n if self.n else 0.0

    @property
    def mean_reward(self) -> float:
        return sum(a.reward for a in self.answers) / self.n if self.n else 0.0

    def to_json(self, details: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"task": self.task, "n": self.n, "correct": self.correct,
                               "accuracy": self.accuracy, "interval": list(self.interval),
                               "format_rate": self.format_rate,
                               "mean_reward": self.mean_reward}
        if details:
            out["results"] = [a.to_json() for a in self.answers]
        return out


@dataclass(frozen=True, slots=True)
class Comparison:
    """after - before, in accuracy points (0-100), with its 95% interval."""

    before: float  # accuracy, 0-1
    after: float
    diff_points: float
    interval_points: tuple[float, float]
    paired: bool  # the same questions both times (Newcombe paired), else unpaired
    n: int  # questions (paired), or the after evaluation's
    gained: int  # paired: right after, wrong before (0 unpaired)
    lost: int  # paired: wrong after, right before

    def to_json(self) -> dict[str, Any]:
        return {"before": self.before, "after": self.after, "diff_points": self.diff_points,
                "interval_points": list(self.interval_points),
                "method": "newcombe-paired" if self.paired else "newcombe-unpaired",
                "n": self.n, "gained": self.gained, "lost": self.lost}


# ---- statistics ------------------------------------------------------------------------


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of k successes in n trials; (0, 1) when n is 0."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k} n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at k = 0 or n one bound is exactly 0 or 1; rounding must not push it past
    return (0.0 if k == 0 else max(0.0, centre - half),
            1.0 if k == n else min(1.0, centre + half))


def newcombe_paired(both: int, only_first: int, only_second: int, neither: int,
                    z: float = Z95) -> tuple[float, float]:
    """95% interval of p1 - p2 on paired data (Newcombe 1998, method 10): `only_first`
    pairs succeed in the first measure only, and so on. The correlation estimate phi
    carries his continuity adjustment (0 unless |AD - BC| exceeds n/2)."""
    n = both + only_first + only_second + neither
    if n == 0:
        return -1.0, 1.0
    k1, k2 = both + only_first, both + only_second  # successes in each measure
    p1, p2 = k1 / n, k2 / n
    l1, u1 = wilson(k1, n, z)
    l2, u2 = wilson(k2, n, z)
    margins = k1 * (n - k1) * k2 * (n - k2)
    phi = 0.0
    if margins > 0:
        cross = both * neither - only_first * only_second
        if cross > n / 2:
            phi = (cross - n / 2) / math.sqrt(margins)
        elif cross < 0:
            phi = cross / math.sqrt(margins)
    d = p1 - p2
    low = (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2
    high = (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2
    return max(-1.0, d - math.sqrt(max(low, 0.0))), min(1.0, d + math.sqrt(max(high, 0.0)))


def newcombe_unpaired(k1: int, n1: int, k2: int, n2: int,
                      z: float = Z95) -> tuple[float, float]:
    """95% interval of k1/n1 - k2/n2 for independent samples (Newcombe's hybrid score,
    1998, method 10 of the unpaired paper)."""
    if n1 == 0 or n2 == 0:
        return -1.0, 1.0
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson(k1, n1, z)
    l2, u2 = wilson(k2, n2, z)
    d = p1 - p2
    return (max(-1.0, d - math.hypot(p1 - l1, u2 - p2)),
            min(1.0, d + math.hypot(u1 - p1, p2 - l2)))


def compare(before: EvalResult, after: EvalResult) -> Comparison:
    """after - before in points with a 95% interval: paired when both answered the
    same questions in the same order (the bench's case), unpaired otherwise."""
    paired = [(a.prompt, a.expected) for a in before.answers] == [
        (a.prompt, a.expected) for a in after.answers]
    if paired:
        pairs = list(zip(after.answers, before.answers, strict=True))
        both = sum(x.correct and y.correct for x, y in pairs)
        gained = sum(x.correct and not y.correct for x, y in pairs)
        lost = sum(y.correct and not x.correct for x, y in pairs)
        low, high = newcombe_paired(both, gained, lost, len(pairs) - both - gained - lost)
    else:
        gained = lost = 0
        low, high = newcombe_unpaired(after.correct, after.n, before.correct, before.n)
    return Comparison(before=before.accuracy, after=after.accuracy,
                      diff_points=100 * (after.accuracy - before.accuracy),
                      interval_points=(100 * low, 100 * high), paired=paired, n=after.n,
                      gained=gained, lost=lost)


# ---- evaluating ------------------------------------------------------------------------


def score(task: Task, problems: Sequence[Problem], completions: Sequence[str]) -> EvalResult:
    """The result of these answers to these problems, by the task's reward."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems, {len(completions)} answers")
    return EvalResult(task.name, tuple(
        Answer(p.prompt, p.answer, c, task.reward(c, p.answer))
        for p, c in zip(problems, completions, strict=True)))


def evaluate(policy_model: nn.Module, tokenizer: Any, task: Task, n: int, max_tokens: int,
             *, batch_size: int = 1, progress: Progress | None = None,
             generate: Generate | None = None) -> EvalResult:
    """Greedy answers of `policy_model` (a transformers causal LM, or a peft model around
    one) to the first n held-out questions of `task`, scored. `generate` replaces the
    model's decoding (tests). The model is put in eval mode for the run and given back
    in the mode it came in."""
    if n < 1 or max_tokens < 1 or batch_size < 1:
        raise ValueError(f"n, max_tokens and batch_size must be >= 1, got {n}, "
                         f"{max_tokens}, {batch_size}")
    problems = task.heldout(n)  # ValueError when the task has fewer
    prompts = [chat_prompt_ids(tokenizer, p.prompt) for p in problems]
    if generate is None:
        generate = greedy(policy_model, max_tokens=max_tokens,
                          eos_ids=stop_ids(tokenizer, policy_model),
                          pad_id=pad_id(tokenizer))
    completions: list[str] = []
    training = policy_model.training
    policy_model.train(False)
    try:
        for start in range(0, len(prompts), batch_size):
            for ids in generate(prompts[start:start + batch_size]):
                completions.append(str(tokenizer.decode(ids, skip_special_tokens=True)))
            if progress is not None:
                progress(len(completions), len(prompts))
    finally:
        policy_model.train(training)
    return score(task, problems, completions)


def greedy(model: nn.Module, *, max_tokens: int, eos_ids: set[int], pad_id: int) -> Generate:
    """Batched greedy decoding with transformers' generate, prompts left-padded."""
    from transformers import GenerationConfig

    # a config of our own: the model's may ask for sampling (temperature, top_p)
    config = GenerationConfig(  # type: ignore[no-untyped-call]
        max_new_tokens=max_tokens, do_sample=False, eos_token_id=sorted(eos_ids) or None,
        pad_token_id=pad_id)
    device = next(model.parameters()).device

    @torch.inference_mode()
    def run(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, L]
        for b, p in enumerate(prompts):
            ids[b, width - len(p):] = torch.tensor(list(p), dtype=torch.long)
            mask[b, width - len(p):] = 1
        out = model.generate(  # type: ignore[operator]  # [B, L + new]
            input_ids=ids.to(device), attention_mask=mask.to(device),
            generation_config=config)
        completions = []
        for row in out[:, width:].tolist():
            end = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
            completions.append([int(t) for t in row[:end]])
        return completions

    return run


def stop_ids(tokenizer: Any, model: nn.Module) -> set[int]:
    """The tokens that end an answer: the tokenizer's and the model config's EOS, as the
    samplers stop (peerd.inference.runtime.eos_ids)."""
    from peerd.inference.runtime import eos_ids

    return eos_ids(tokenizer, getattr(model, "config", None))


def pad_id(tokenizer: Any) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if isinstance(value, int):
            return value
    return 0  # left padding is masked out: any id will do


# ---- the policy under test -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    model: nn.Module
    tokenizer: Any
    checkpoint: Path | None  # None: the base model
    step: int | None
    version: int | None
    update: str | None  # "full" or "lora"


def load_policy(spec: str, checkpoint_dir: Path | None = None, *,
                device: str = "cpu") -> LoadedPolicy:
    """The base model SPEC (float32), with a checkpoint's trained tensors applied: every
    parameter of a full update, or a LoRA update's adapters merged into the base
    (weight + scale * B @ A). ValueError when the checkpoint does not fit the model."""
    from peerd.inference.model.source import load_tokenizer, reference_model, resolve

    source = resolve(spec)
    model = reference_model(source, device=device, dtype=torch.float32)
    tokenizer = load_tokenizer(source)
    if checkpoint_dir is None:
        return LoadedPolicy(model, tokenizer, None, None, None, None)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from peerd.rl.checkpoint import STATE, WEIGHTS

    try:
        meta = json.loads((checkpoint_dir / STATE).read_text())
        tensors = load_file(str(checkpoint_dir / WEIGHTS))
        update = str(meta["update"])
        step, version = int(meta["step"]), int(meta["version"])
        scale = meta.get("lora_scale")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:
        raise ValueError(f"cannot read checkpoint {checkpoint_dir}: {exc}") from exc
    if update == "full":
        _apply(model, tensors, add=False, where=checkpoint_dir)
    elif update == "lora" and isinstance(scale, int | float):
        from peerd.rl.manifest import lora_deltas

        try:
            deltas = lora_deltas(tensors, float(scale))
        except ValueError as exc:
            raise ValueError(f"{checkpoint_dir}: {exc}") from exc
        _apply(model, deltas, add=True, where=checkpoint_dir)
    else:
        raise ValueError(f"{checkpoint_dir}: update {update!r} with LoRA scale {scale!r}: "
                         "expected 'full', or 'lora' with a number")
    return LoadedPolicy(model, tokenizer, checkpoint_dir, step, version, update)


def _apply(model: nn.Module, tensors: dict[str, torch.Tensor], *, add: bool,
           where: Path) -> None:
    params = dict(model.named_parameters())
    unknown = sorted(set(tensors) - set(params))
    missing = [] if add else sorted(set(params) - set(tensors))
    if unknown or missing:
        raise ValueError(f"{where} does not fit this model (another model, or another "
                         f"--model than the run's?): unknown {unknown[:3]}, missing "
                         f"{missing[:3]}")
    with torch.no_grad():
        for name, t in tensors.items():
            param = params[name]
            if tuple(t.shape) != tuple(param.shape):
                raise ValueError(f"{where}: {name} is {list(t.shape)}, the model's "
                                 f"{list(param.shape)} (another model than the run's?)")
            if add:
                param.add_(t.to(param.device, param.dtype))
            else:
                param.copy_(t.to(param.device, param.dtype))
