"""The data an EAGLE head is trained on: the target's own greedy answers to a prompt
set, with the target's features along them.

Prompts are JSONL, one object per line with "prompt" (or "question", as GSM8K has),
sent under the chat template as /v1/chat/completions does, or "completion": raw text
the target continues as /v1/completions does (a function stub, say: the head then
learns code as HumanEval-style completions see it, not only chat answers).

The answers are generated in batches by the reference transformers model. A hook on
its last decoder layer records that layer's output at every position as generation
runs: the pre-norm feature the pipeline returns (tests hold it against ShardBlock).
"""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True, slots=True)
class Prompt:
    source: str  # the prompt file's stem: acceptance is reported per source
    text: str
    raw: bool = False  # a completion (no chat template), kept exactly as written


@dataclass(frozen=True, slots=True)
class Example:
    """One greedy answer of the target and the target's features along it."""

    source: str
    tokens: torch.Tensor  # [N] long: the templated prompt, then the answer
    features: torch.Tensor  # [N-1, H] float32: f_q for every position but the last
    prompt_len: int  # P: tokens[P:] are the answer



def load_prompts(path: Path) -> list[Prompt]:
    # "gsm8k-train" rather than "train" for generic file names
    source = f"{path.parent.name}-{path.stem}" if path.stem in ("train", "test") else path.stem
    prompts = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: not JSON ({exc.msg}); each line must be one "
                             "object") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: a {type(row).__name__}, not an object with a "
                             "\"prompt\", \"question\" or \"completion\"")
        raw = "completion" in row
        text = row["completion"] if raw else row.get("prompt") or row.get("question")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{path}:{i}: no \"prompt\", \"question\" or \"completion\" "
                             "string")
        prompts.append(Prompt(source, text if raw else text.strip(), raw))
    return prompts


def split_prompts(files: Sequence[Path], per_file: int | None, holdout: int,
                  seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held out): each file shuffled (seeded), its first `holdout` prompts held
    out and at most `per_file` of the rest trained on."""
    train: list[Prompt] = []
    held: list[Prompt] = []
    for path in files:
        prompts = load_prompts(path)
        random.Random(f"{seed}:{path.stem}").shuffle(prompts)
        held += prompts[:holdout]
        train += prompts[holdout:][:per_file]
    return train, held


def chat_ids(tokenizer: Any, text: str) -> list[int]:
    """The prompt as the API sends it: chat template, no extra special tokens."""
    templated = tokenizer.apply_chat_template([{"role": "user", "content": text}],
                                              tokenize=False, add_generation_prompt=True)
    return list(tokenizer(templated, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer: Any, prompt: Prompt) -> list[int]:
    """The prompt's tokens as the API would send them: a completion as /v1/completions
    tokenises it, anything else under the chat template."""
    if prompt.raw:
        return list(tokenizer(prompt.text, add_special_tokens=True)["input_ids"])
    return chat_ids(tokenizer, prompt.text)


@torch.inference_mode()
def generate_examples(model: Any, tokenizer: Any, prompts: Sequence[Prompt],
                      max_new_tokens: int = 160, batch_size: int = 32,
                      on_batch: Callable[[int, int], None] | None = None) -> list[Example]:
    """The target's greedy answers to `prompts`, with its features; batches of prompts
    of similar length, left-padded. `on_batch(prompts, tokens)` after each batch."""
    ids = [prompt_ids(tokenizer, p) for p in prompts]
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    captured: list[torch.Tensor] = []

    def keep_feature(_module: Any, _args: Any, output: Any) -> None:
        # the last decoder layer's output: [B, T, H], before the final norm
        captured.append((output[0] if isinstance(output, tuple) else output).float())

    hook = model.model.layers[-1].register_forward_hook(keep_feature)
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    done: dict[int, Example] = {}
    try:
        for b in range(0, len(order), batch_size):
            batch = order[b:b + batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i]
                                      for i in batch])  # [B, Pmax], left-padded
            attention = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i])
                                      for i in batch])  # [B, Pmax]
            captured.clear()
            out = model.generate(input_ids=input_ids, attention_mask=attention,
                                 max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad)  # [B, Pmax + M]
            feats = torch.cat(captured, dim=1)  # [B, Pmax + M - 1, H]
            tokens = 0
            for row, i in enumerate(batch):
                left = width - len(ids[i])
                answer = out[row, width:].tolist()
                end = next((k + 1 for k, t in enumerate(answer) if t in eos_ids), len(answer))
                seq = out[row, left:width + end].clone()  # [N]
                done[i] = Example(prompts[i].source, seq,
                                  feats[row, left:left + len(seq) - 1].clone(), len(ids[i]))
                tokens += end
            if on_batch is not None:
                on_batch(len(batch), tokens)
    finally:
        hook.remove()
    return [done[i] for i in range(len(prompts))]


ANSWERS_VERSION = 2  # 1: a bare list of rows, no header (read as it is)


def save_examples(examples: Sequence[Example], path: Path, *, model_id: str | None = None,
                  max_new_tokens: int | None = None) -> None:
    """Write answers (features in float16) with what made them, all at once: an
    interrupted write leaves the previous file whole."""
    rows = [(e.source, e.tokens, e.features.half(), e.prompt_len) for e in examples]
    part = path.with_name(path.name + ".part")
    torch.save({"version": ANSWERS_VERSION, "model_id": model_id,
                "max_new_tokens": max_new_tokens, "examples": rows}, part)
    part.replace(path)


def read_answers(path: Path) -> tuple[dict[str, Any], list[Example]]:
    """(header: model_id and max_new_tokens where recorded, the answers) of a file
    save_examples wrote."""
    try:
        data = torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ValueError(f"{path} is not a file of answers (peerd draft train --data): "
                         f"{exc}") from None
    if isinstance(data, list):  # version 1
        data = {"version": 1, "examples": data}
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise ValueError(f"{path} is not a file of answers (peerd draft train --data)")
    header = {k: data.get(k) for k in ("model_id", "max_new_tokens")}
    try:
        return header, [Example(s, t, f.float(), int(p)) for s, t, f, p in data["examples"]]
    except (TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"{path} holds a malformed answer: {exc}") from None


def prompt_key(example: Example) -> tuple[int, ...]:
    """An answer's prompt tokens: what `answer` files it under."""
    return tuple(example.tokens[:example.prompt_len].tolist())


def load_examples(path: Path) -> list[Example]:
    return read_answers(path)[1]
