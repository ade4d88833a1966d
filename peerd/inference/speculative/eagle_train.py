"""Training an EAGLE draft head (eagle.py) for a target model, on a CPU.

1. Data: the target's own greedy answers to a prompt set, under its chat template,
   generated in batches by the reference transformers model. A hook on its last
   decoder layer records that layer's output at every position as generation runs:
   the pre-norm feature the pipeline returns (tests hold it against ShardBlock).
2. Training: the head learns f_{q+1} from (f_q, x_{q+1}) on the answers' positions,
   with a smooth-L1 loss on the normalised feature and cross-entropy of the target's
   lm_head against the target's next token. Drafting several tokens deep feeds the
   head its own features, so training unrolls it too (as HASS / EAGLE-3 do): step d
   takes step d-1's predictions, attending to the true features before the draft
   began and to its own earlier draft slots, exactly as at inference (off by default:
   see TrainConfig.unroll; `init` fine-tunes an existing head that way). Noise on the
   true input features (EAGLE) makes it tolerate its own errors as well. The
   next-token loss is taken over the draft vocabulary the head will draft with.
3. Held-out measure: speculative rounds replayed on held-out greedy answers (greedy
   verification: the longest draft prefix the target agrees with, plus the target's
   own next token), against prompt lookup on the same answers.

Prompts are JSONL, one object per line with "prompt" (or "question", as GSM8K has),
sent under the chat template as /v1/chat/completions does, or "completion": raw text
the target continues as /v1/completions does (a function stub, say: the head then
learns code as HumanEval-style completions see it, not only chat answers).
`scripts/train_eagle_smollm2.sh` is the command that made the shipped head.
"""

from __future__ import annotations

import json
import math
import pickle
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from peerd.inference.model.head import Head
from peerd.inference.model.source import load_config, load_tokenizer, reference_model, resolve
from peerd.inference.sampling import SamplingParams
from peerd.inference.speculative.drafters import Drafter, DraftSession, NgramDrafter
from peerd.inference.speculative.eagle import EagleConfig, EagleDrafter, EagleHead
from peerd.inference.speculative.eagle_file import load_eagle, save_eagle, training_record
from peerd.inference.speculative.vocab import DRAFT_VOCAB_SIZE, count_tokens, coverage, pick

GREEDY = SamplingParams(temperature=0.0)


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


@dataclass(frozen=True, slots=True)
class TrainConfig:
    steps: int = 600  # optimiser steps
    batch_size: int = 8  # examples per step
    lr: float = 1e-3  # peak, after a linear warm-up over 5% of the steps; cosine to 10%
    # Draft depths trained per position (1 = teacher forcing only). Each depth costs a
    # full step; on SmolLM2 with this budget, 3 depths for 150 steps from scratch lifted
    # depth 2-3 to depth 1's accuracy but no higher than 450 teacher-forced steps lift
    # depth 1. So the shipped head is trained teacher-forced first, then fine-tuned
    # (--init) 3 deep: held-out acceptance of draft tokens 2-5 rose from 0.41-0.47 to
    # 0.58-0.60 on GSM8K (scripts/train_eagle_smollm2.sh).
    unroll: int = 1
    ce_weight: float = 0.3  # cross-entropy next to the smooth-L1 feature loss (EAGLE: 0.1)
    noise: float = 0.05  # std of the noise on true input features, relative to their RMS
    seed: int = 0


@dataclass(slots=True)
class Acceptance:
    """Replayed speculative rounds of one drafter at one γ (full rounds only: those
    whose answer had γ+1 tokens left, so the end of an answer does not bias them)."""

    gamma: int
    rounds: int = 0
    committed: int = 0  # tokens committed by those rounds (accepted + the target's own)
    attempts: list[int] = field(default_factory=list)  # [γ]: drafts reaching position i
    accepted: list[int] = field(default_factory=list)  # [γ]: and accepted there

    @property
    def tokens_per_round(self) -> float:
        return self.committed / self.rounds if self.rounds else 0.0

    def rates(self) -> list[float]:
        """P(draft token i accepted | tokens before it accepted), i = 1..γ."""
        return [a / n if n else 0.0 for a, n in zip(self.accepted, self.attempts, strict=True)]

    def as_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma, "rounds": self.rounds,
                "tokens_per_round": round(self.tokens_per_round, 3),
                "acceptance_by_position": [round(r, 3) for r in self.rates()]}


# ---- prompts and data --------------------------------------------------------------------


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


def _prompt_key(example: Example) -> tuple[int, ...]:
    """An answer's prompt tokens: what `answer` files it under."""
    return tuple(example.tokens[:example.prompt_len].tolist())


def load_examples(path: Path) -> list[Example]:
    return read_answers(path)[1]


def answer(model: Callable[[], Any], tokenizer: Any, prompts: Sequence[Prompt],
           max_new_tokens: int, batch_size: int, data: Path | None, model_id: str,
           progress: bool) -> tuple[list[Example], dict[str, int]]:
    """The target's answers to `prompts`, in order, and how many were generated and
    reused. With `data`, the answers already there (to the same prompt tokens) are
    reused and the file grows by the new ones, written every few batches so that an
    interrupted run keeps what it made; `model()` loads the target only when some
    prompt is new."""
    known: dict[tuple[int, ...], Example] = {}
    kept: list[Example] = []
    if data is not None and data.is_file():
        header, kept = read_answers(data)
        for key, want in (("model_id", model_id), ("max_new_tokens", max_new_tokens)):
            if header[key] is not None and header[key] != want:
                raise ValueError(f"{data} holds answers made with {key} {header[key]!r}, "
                                 f"not {want!r}: pass another --data file")
        known = {_prompt_key(e): e for e in kept}
    keys = [tuple(prompt_ids(tokenizer, p)) for p in prompts]
    unknown = {k: p for k, p in zip(keys, prompts, strict=True) if k not in known}
    # batches of similar length
    new = [unknown[k] for k in sorted(unknown, key=len)]
    if new:
        target = model()
        chunk = batch_size * 8
        with progress_bar(progress) as bar:
            task = bar.add_task("generating", total=len(new), info="")
            made = [0]

            def advance(n: int, tokens: int) -> None:
                made[0] += tokens
                bar.update(task, advance=n, info=f"{made[0]} tokens")

            for c in range(0, len(new), chunk):
                done = generate_examples(target, tokenizer, new[c:c + chunk], max_new_tokens,
                                         batch_size, advance)
                kept += done
                known.update((_prompt_key(e), e) for e in done)
                if data is not None:
                    save_examples(kept, data, model_id=model_id,
                                  max_new_tokens=max_new_tokens)
    # an answer is filed under the prompt file that asks for it now
    examples = [replace(known[k], source=p.source) for p, k in zip(prompts, keys, strict=True)]
    return examples, {"generated": len(new), "reused": len(set(keys)) - len(new)}


# ---- training ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    features: torch.Tensor  # [B, S, H] f_q at slot q (zeros past an example's end)
    next_ids: torch.Tensor  # [B, S] x_{q+1}, the token paired with f_q
    target: torch.Tensor  # [B, S, H] f_{q+1}, what slot q predicts
    target_ids: torch.Tensor  # [B, S] x_{q+2}, the target's next token after f_{q+1}
    mask: torch.Tensor  # [B, S] bool: slots that predict an answer token


def make_batch(examples: Sequence[Example], pad_id: int = 0) -> Batch:
    S = max(len(e.tokens) - 1 for e in examples)
    B, H = len(examples), examples[0].features.shape[-1]
    features = torch.zeros(B, S, H)  # [B, S, H]
    target = torch.zeros(B, S, H)  # [B, S, H]
    next_ids = torch.full((B, S), pad_id, dtype=torch.long)  # [B, S]
    target_ids = torch.full((B, S), pad_id, dtype=torch.long)  # [B, S]
    mask = torch.zeros(B, S, dtype=torch.bool)  # [B, S]
    for b, e in enumerate(examples):
        n = len(e.tokens) - 1  # slots: (f_q, x_{q+1}) for q < N-1
        features[b, :n] = e.features
        next_ids[b, :n] = e.tokens[1:]
        target[b, :n - 1] = e.features[1:]
        target_ids[b, :n - 1] = e.tokens[2:]
        # slot q predicts x_{q+2}: an answer token from q = P-2; the last slot has no target
        mask[b, max(e.prompt_len - 2, 0):n - 1] = True
    return Batch(features, next_ids, target, target_ids, mask)


def unroll_mask(S: int, depth: int) -> torch.Tensor:
    """[depth*S, depth*S] bool attention mask over `depth` copies of S slots: copy 0 is
    causal (the committed features); a slot j of copy d >= 1 is a draft d tokens deep,
    which sees copy 0 up to slot j-d (where its draft began) and its own chain: slot
    j-(d-e) of each copy e in 1..d. Keys that are not in the chain stay hidden."""
    j = torch.arange(S)
    rows = []
    for d in range(depth):
        blocks = []
        for e in range(depth):
            if e == 0:
                block = j[None, :] <= j[:, None] - d  # [S, S]
            elif e <= d:
                block = j[None, :] == j[:, None] - (d - e)  # [S, S]
            else:
                block = torch.zeros(S, S, dtype=torch.bool)
            blocks.append(block)
        rows.append(torch.cat(blocks, dim=1))  # [S, depth*S]
    return torch.cat(rows, dim=0)  # [depth*S, depth*S]


def unrolled(eagle: EagleHead, features: torch.Tensor, embeds: torch.Tensor, depth: int,
             bf16: bool = True) -> list[torch.Tensor]:
    """The head's predictions [B, S, H] at draft depths 1..depth for every slot, drafts
    starting from true `features` [B, S, H], with the true tokens' `embeds` [B, S, H].

    Copy d of the S slots runs against a KV cache holding copies 0..d-1 (a slot's keys
    and values depend on its input alone, and gradients flow through the cache), so
    each depth costs one pass; `unroll_mask` says which cached slots a draft slot sees."""
    S = features.shape[1]
    mask = unroll_mask(S, depth)[None, None]  # [1, 1, D*S, D*S]
    positions = torch.arange(S)[None]  # [1, S]: copy d of slot j is at position j
    cache = eagle.new_cache()
    f = features  # [B, S, H]
    preds = []
    for d in range(depth):
        rows = mask[..., d * S:(d + 1) * S, :(d + 1) * S]  # [1, 1, S, (d+1)S]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            pred = eagle(f, embeds, positions, rows, cache).float()  # [B, S, H]
        preds.append(pred)
        # the next copy's slot j+1 continues from this copy's prediction at slot j
        f = torch.cat([torch.zeros_like(pred[:, :1]), pred[:, :-1]], dim=1)  # [B, S, H]
    return preds


def unrolled_loss(eagle: EagleHead, head: Head, batch: Batch, unroll: int, ce_weight: float,
                  noise: float, gen: torch.Generator | None = None,
                  vocab: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, list[dict[str, float]]]:
    """The mean over draft depths of smooth-L1(norm f̂, norm f) + ce_weight * CE, and
    per depth: those two losses and the top-1 agreement with the target's next token.
    With a draft `vocab` (ascending ids [K]) the CE and top-1 are over those ids alone,
    as drafting scores them (a third of the lm_head work on SmolLM2); a next token
    outside it counts as a miss and adds no CE."""
    S = batch.features.shape[1]
    weight = head.lm_head.weight if vocab is None else head.lm_head.weight[vocab]  # [K, H]
    column = None  # [V]: each token id's logit column, -100 (ignored) outside the vocab
    if vocab is not None:
        column = torch.full((head.vocab_size,), -100, dtype=torch.long)
        column[vocab] = torch.arange(len(vocab))
    f = batch.features  # [B, S, H]
    if noise > 0:  # EAGLE's augmentation: the head must tolerate imperfect features
        rms = f.pow(2).mean(-1, keepdim=True).sqrt()  # [B, S, 1]
        f = f + noise * rms * torch.randn(f.shape, generator=gen)  # [B, S, H]
    embeds = head.embed_tokens(batch.next_ids).to(f.dtype)  # [B, S, H]
    with torch.no_grad():
        target = head.norm(batch.target)  # [B, S, H]: what lm_head sees
    total = torch.zeros(())
    stats: list[dict[str, float]] = []
    for d, pred in enumerate(unrolled(eagle, f, embeds, unroll)):
        # slot j predicts f_{j+1}; at depth d+1 it needs a draft start j-d >= 0
        m = batch.mask & (torch.arange(S) >= d)[None]  # [B, S]
        p = head.norm(pred[m])  # [M, H]
        reg = F.smooth_l1_loss(p, target[m])
        ids = batch.target_ids[m]  # [M] token ids
        if column is not None:
            ids = column[ids]  # [M] logit columns
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = F.linear(p, weight).float()  # [M, K]
        ce = F.cross_entropy(logits, ids, ignore_index=-100)
        total = total + (reg + ce_weight * ce) / unroll
        with torch.no_grad():
            top1 = (logits.argmax(-1) == ids).float().mean()
        stats.append({"reg": reg.item(), "ce": ce.item(), "top1": top1.item()})
    return total, stats


def train_head(eagle: EagleHead, head: Head, examples: Sequence[Example], cfg: TrainConfig,
               on_step: Callable[[int, list[dict[str, float]]], None] | None = None,
               vocab: Sequence[int] | None = None) -> list[dict[str, float]]:
    """Train `eagle` in place, its next-token loss over the draft `vocab` it will
    draft with (None: the whole vocabulary); returns the last step's per-depth stats."""
    columns = None if vocab is None else torch.tensor(sorted(vocab), dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    eagle.train().requires_grad_(True)  # a loaded head (fine-tuning) comes frozen
    head.requires_grad_(False)
    opt = torch.optim.AdamW(eagle.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                            weight_decay=0.0)
    warmup = max(1, cfg.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    order: list[int] = []
    stats: list[dict[str, float]] = []
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:  # epochs of shuffled examples
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        picked, order = order[:cfg.batch_size], order[cfg.batch_size:]
        batch = make_batch([examples[i] for i in picked])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss, stats = unrolled_loss(eagle, head, batch, cfg.unroll, cfg.ce_weight, cfg.noise,
                                    gen, columns)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(eagle.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step(step, stats)
    eagle.eval()
    return stats


# ---- measuring -----------------------------------------------------------------------------


def replay(session: DraftSession, example: Example, result: Acceptance) -> None:
    """Speculative rounds along `example` (the target's greedy answer) with greedy
    verification; adds the full rounds to `result`."""
    tokens, P, gamma = example.tokens.tolist(), example.prompt_len, result.gamma
    N = len(tokens)
    rng = torch.Generator().manual_seed(0)  # unused under greedy; the protocol wants one
    # the prefill: the prompt through the pipeline gives the first answer token
    session.extend(tokens[:P + 1], example.features[:P])
    n = P + 1
    while n < N:
        draft = session.propose(gamma, GREEDY, rng).tokens
        truth = tokens[n:n + gamma + 1]  # the target's greedy continuation
        k = 0
        while k < min(len(draft), len(truth) - 1) and draft[k] == truth[k]:
            k += 1
        if len(truth) == gamma + 1:  # a full round
            result.rounds += 1
            result.committed += k + 1
            for i in range(min(k + 1, gamma)):
                result.attempts[i] += 1
                result.accepted[i] += int(i < k)
        c = min(k + 1, N - n)  # accepted drafts and the target's own token
        session.extend(tokens[n:n + c], example.features[n - 1:n - 1 + c])
        n += c


def measure(drafter: Drafter, examples: Sequence[Example], gamma: int) -> Acceptance:
    result = Acceptance(gamma, attempts=[0] * gamma, accepted=[0] * gamma)
    for example in examples:
        replay(drafter.start(), example, result)
    return result


def compare(head: Head, eagle: EagleHead, examples: Sequence[Example],
            gammas: Sequence[int], vocab: Sequence[int] | None = None
            ) -> dict[str, dict[str, Any]]:
    """Held-out acceptance of the head (drafting over `vocab`) and of prompt lookup,
    overall ("eagle@5") and per prompt source ("eagle@5:gsm8k")."""
    sources = sorted({e.source for e in examples})
    report: dict[str, dict[str, Any]] = {}
    for name, drafter in (("eagle", EagleDrafter(head, eagle, vocab=vocab)),
                          ("ngram", NgramDrafter())):
        for gamma in gammas:
            parts = {src: measure(drafter, [e for e in examples if e.source == src], gamma)
                     for src in sources}
            report[f"{name}@{gamma}"] = sum_acceptance(gamma, parts.values()).as_dict()
            if len(parts) > 1:
                report.update({f"{name}@{gamma}:{src}": a.as_dict() for src, a in parts.items()})
    return report


def sum_acceptance(gamma: int, parts: Iterable[Acceptance]) -> Acceptance:
    total = Acceptance(gamma, attempts=[0] * gamma, accepted=[0] * gamma)
    for a in parts:
        total.rounds += a.rounds
        total.committed += a.committed
        total.attempts = [x + y for x, y in zip(total.attempts, a.attempts, strict=True)]
        total.accepted = [x + y for x, y in zip(total.accepted, a.accepted, strict=True)]
    return total


# ---- the whole recipe ----------------------------------------------------------------------


class LoggedProgress(Progress):
    """A rich progress bar that, on a console that is not a terminal (a log file, CI),
    where rich draws nothing until the end, prints a plain line at every tenth of a
    task instead: an hour of training shows how it goes in its log."""

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        before = self._tasks[task_id].completed
        super().update(task_id, **kwargs)
        task = self._tasks[task_id]
        if self.console.is_terminal or self.disable or not task.total:
            return
        if int(10 * task.completed / task.total) > int(10 * before / task.total):
            info = task.fields.get("info", "")
            self.console.print(f"{task.description} {task.completed:g}/{task.total:g} "
                               f"{info} ({task.elapsed or 0.0:.0f} s)", highlight=False)


@contextmanager
def progress_bar(show: bool) -> Iterator[Progress]:
    progress = LoggedProgress(TextColumn("{task.description}"), BarColumn(),
                              MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                              TimeElapsedColumn(), TimeRemainingColumn(),
                              console=Console(stderr=True), disable=not show)
    with progress:
        yield progress


def train_eagle(spec: str, out: Path, prompts: Sequence[Path], cfg: TrainConfig | None = None,
                *, per_file: int | None = None, holdout: int = 24,
                max_new_tokens: int = 160, gen_batch: int = 32, threads: int | None = 2,
                data: Path | None = None, gammas: Sequence[int] = (3, 5, 8),
                vocab_size: int = DRAFT_VOCAB_SIZE, init: Path | None = None,
                progress: bool = True) -> dict[str, Any]:
    """Generate the data (with `data`: reuse the answers it holds, add the new ones), train
    a new head (or fine-tune the head file `init`, which must be for this target),
    pick a draft vocabulary of `vocab_size` ids from the training answers, measure on
    the held-out prompts, save the head to `out`; returns a report."""
    cfg = cfg or TrainConfig()
    began = time.monotonic()
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    source = resolve(spec)
    head = Head(source)
    # before the data: a head for another model is refused in seconds, not after an
    # hour, and nothing about the head it starts from is left to fail after training
    start = lineage = None
    if init is not None:
        start = load_eagle(init, head)
        lineage = {"path": str(init), "training": training_record(init)}
    train_prompts, held_prompts = split_prompts(prompts, per_file, holdout, cfg.seed)

    tokenizer = load_tokenizer(source)
    examples, made = answer(lambda: reference_model(source), tokenizer,
                            train_prompts + held_prompts, max_new_tokens, gen_batch, data,
                            head.model_id, progress)
    train_set, held_set = examples[:len(train_prompts)], examples[len(train_prompts):]
    generated_s = time.monotonic() - began

    answers = count_tokens(e.tokens[e.prompt_len:].tolist() for e in train_set)
    held_answers = count_tokens(e.tokens[e.prompt_len:].tolist() for e in held_set)
    vocab = pick(answers, head.vocab_size, vocab_size,
                 always=tokenizer.all_special_ids)
    vocab_info = {"counted": "the training answers",
                  "held_out_coverage": round(coverage(vocab, held_answers), 4)}

    eagle = (EagleHead(EagleConfig.from_target(load_config(source))) if start is None
             else start.eagle)
    with progress_bar(progress) as bar:
        task = bar.add_task("training", total=cfg.steps, info="")

        def report(step: int, stats: list[dict[str, float]]) -> None:
            top1 = " ".join(f"{s['top1']:.2f}" for s in stats)
            bar.update(task, advance=1, info=f"ce {stats[0]['ce']:.2f} top1 by depth {top1}")

        final = train_head(eagle, head, train_set, cfg, report,
                           vocab if len(vocab) < head.vocab_size else None)
    trained_s = time.monotonic() - began - generated_s
    acceptance = compare(head, eagle, held_set, gammas, vocab)

    summary = {
        "model_id": head.model_id, "out": str(out),
        "prompts": {p.stem: str(p) for p in prompts}, "train_examples": len(train_set),
        "train_tokens": sum(len(e.tokens) - e.prompt_len for e in train_set),
        "held_out_examples": len(held_set), "answers": made,
        "config": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
        "max_new_tokens": max_new_tokens, "final_losses": final,
        "init": lineage,  # what it was fine-tuned from, with that head's own record
        "data_s": round(generated_s, 1), "train_s": round(trained_s, 1),
    }
    save_eagle(eagle, head, out, extra=summary, vocab=vocab, vocab_info=vocab_info)
    summary["draft_vocab"] = {"size": len(vocab), **vocab_info}
    summary["acceptance"] = acceptance
    summary["bytes"] = out.stat().st_size
    summary["total_s"] = round(time.monotonic() - began, 1)
    return summary
