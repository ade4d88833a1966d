"""Training an EAGLE draft head (eagle.py) for a target model, on a CPU.

1. Data (eagle_data.py): the target's own greedy answers to a prompt set, under its
   chat template, with the target's features along them; `answer` reuses those a
   file already holds.
2. Training: the head learns f_{q+1} from (f_q, x_{q+1}) on the answers' positions,
   with a smooth-L1 loss on the normalised feature and cross-entropy of the target's
   lm_head against the target's next token. Drafting several tokens deep feeds the
   head its own features, so training unrolls it too (as HASS / EAGLE-3 do): step d
   takes step d-1's predictions, attending to the true features before the draft
   began and to its own earlier draft slots, exactly as at inference (off by default:
   see TrainConfig.unroll; `init` fine-tunes an existing head that way). Noise on the
   true input features (EAGLE) makes it tolerate its own errors as well. The
   next-token loss is taken over the draft vocabulary the head will draft with.
3. Held-out measure (eagle_measure.py): speculative rounds replayed on held-out
   greedy answers, against prompt lookup on the same answers.

`scripts/train_eagle_smollm2.sh` is the command that made the shipped head.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
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
from peerd.inference.speculative.eagle import EagleConfig, EagleHead, grow
from peerd.inference.speculative.eagle_data import (
    Example,
    Prompt,
    generate_examples,
    prompt_ids,
    prompt_key,
    read_answers,
    save_examples,
    split_prompts,
)
from peerd.inference.speculative.eagle_file import load_eagle, save_eagle, training_record
from peerd.inference.speculative.eagle_measure import compare
from peerd.inference.speculative.vocab import DRAFT_VOCAB_SIZE, count_tokens, coverage, pick
from peerd.machine import cpu_bf16_fast, describe

# Prompts longer than this are left out of training: every answer of a generation
# batch is padded to its longest prompt, so one pasted file of thousands of tokens
# costs its whole batch minutes (and a training batch as much memory), for one answer.
MAX_PROMPT_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class TrainConfig:
    steps: int = 600  # optimiser steps
    batch_size: int = 8  # examples per step
    lr: float = 1e-3  # peak, after a linear warm-up over 5% of the steps; cosine to 10%
    # Draft depths trained per position (1 = teacher forcing only). Each depth costs a
    # full step, and from scratch the same budget spent on teacher forcing lifts the
    # first draft token more; so the shipped head is trained teacher-forced first,
    # then fine-tuned (--init) 3 deep, which lifts the later draft tokens
    # (scripts/train_eagle_smollm2.sh; the runs and their figures: bench/README.md).
    unroll: int = 1
    ce_weight: float = 0.3  # cross-entropy next to the smooth-L1 feature loss (EAGLE: 0.1)
    noise: float = 0.05  # std of the noise on true input features, relative to their RMS
    seed: int = 0


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
             bf16: bool | None = None) -> list[torch.Tensor]:
    """The head's predictions [B, S, H] at draft depths 1..depth for every slot, drafts
    starting from true `features` [B, S, H], with the true tokens' `embeds` [B, S, H].

    Copy d of the S slots runs against a KV cache holding copies 0..d-1 (a slot's keys
    and values depend on its input alone, and gradients flow through the cache), so
    each depth costs one pass; `unroll_mask` says which cached slots a draft slot sees.
    The head runs under bfloat16 autocast where the CPU multiplies it natively (`bf16`
    None: `cpu_bf16_fast()`), in float32 otherwise."""
    bf16 = cpu_bf16_fast() if bf16 is None else bf16
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16_fast()):
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


# ---- the data, reused where a file holds it ----------------------------------------------


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
        known = {prompt_key(e): e for e in kept}
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
                known.update((prompt_key(e), e) for e in done)
                if data is not None:
                    save_examples(kept, data, model_id=model_id,
                                  max_new_tokens=max_new_tokens)
    # an answer is filed under the prompt file that asks for it now
    examples = [replace(known[k], source=p.source) for p, k in zip(prompts, keys, strict=True)]
    return examples, {"generated": len(new), "reused": len(set(keys)) - len(new)}


# ---- the whole recipe --------------------------------------------------------------------


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
                max_prompt_tokens: int | None = MAX_PROMPT_TOKENS,
                layers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Generate the data (with `data`: reuse the answers it holds, add the new ones), train
    a new head (or fine-tune the head file `init`, which must be for this target),
    pick a draft vocabulary of `vocab_size` ids from the training answers, measure on
    the held-out prompts, save the head to `out`; returns a report. `layers`: the new
    head's decoder layers, or those `init`'s head is grown to (`eagle.grow`) [1 / as
    `init`'s]."""
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
        if layers is not None and layers < start.eagle.config.num_layers:
            raise ValueError(f"{init} has {start.eagle.config.num_layers} decoder layers: "
                             f"a fine-tune can add layers, not remove them (--layers "
                             f"{start.eagle.config.num_layers} or more)")
    train_prompts, held_prompts = split_prompts(prompts, per_file, holdout, cfg.seed)

    tokenizer = load_tokenizer(source)
    long = 0
    if max_prompt_tokens is not None:  # a batch is padded to its longest prompt
        limit = max_prompt_tokens
        kept = [[p for p in ps if len(prompt_ids(tokenizer, p)) <= limit]
                for ps in (train_prompts, held_prompts)]
        long = len(train_prompts) + len(held_prompts) - len(kept[0]) - len(kept[1])
        train_prompts, held_prompts = kept
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

    if start is None:
        config = EagleConfig.from_target(load_config(source))
        eagle = EagleHead(replace(config, num_layers=layers or 1))
    else:
        eagle = grow(start.eagle, layers or start.eagle.config.num_layers)
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
        "prompts_too_long": long,  # over max_prompt_tokens: left out
        "max_prompt_tokens": max_prompt_tokens,
        "config": {f: getattr(cfg, f) for f in cfg.__dataclass_fields__},
        "max_new_tokens": max_new_tokens, "final_losses": final,
        "init": lineage,  # what it was fine-tuned from, with that head's own record
        "data_s": round(generated_s, 1), "train_s": round(trained_s, 1),
        "machine": describe(),  # what the seconds above ran on
    }
    save_eagle(eagle, head, out, extra=summary, vocab=vocab, vocab_info=vocab_info)
    summary["draft_vocab"] = {"size": len(vocab), **vocab_info}
    summary["acceptance"] = acceptance
    summary["bytes"] = out.stat().st_size
    summary["total_s"] = round(time.monotonic() - began, 1)
    return summary
