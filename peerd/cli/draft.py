"""`peerd draft`: drafters for speculative decoding (train an EAGLE head, measure it per
kind of prompt, set its draft vocabulary). torch and the inference wing are imported
inside the commands."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.markup import escape
from rich.table import Table

from peerd.cli.client import console, emit, fail
from peerd.inference.speculative.vocab import DRAFT_VOCAB_SIZE  # pure: no torch

# peerd's own prompts, the ones the shipped head was trained on
DRAFT_PROMPTS = Path(__file__).parents[1] / "data" / "draft_prompts.jsonl"


@click.group()
def draft() -> None:
    """Drafters for speculative decoding: train an EAGLE draft head, measure it per kind
    of prompt, set its draft vocabulary."""


@draft.command("train")
@click.option("--model", "spec", required=True, metavar="SPEC",
              help="The target: smollm2, a .gguf file, a model directory or a cached repo id.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the head (fp16 .safetensors).")
@click.option("--prompts", "prompt_files", multiple=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSONL prompts, \"prompt\" or \"question\" per line (repeatable) "
                   "[peerd's own draft_prompts.jsonl].")
@click.option("--steps", default=600, show_default=True, type=click.IntRange(1),
              help="Optimiser steps.")
@click.option("--per-file", type=click.IntRange(1), metavar="N",
              help="Train on at most N prompts of each file [all].")
@click.option("--holdout", default=24, show_default=True, type=click.IntRange(1),
              help="Prompts of each file held out to measure acceptance.")
@click.option("--max-new-tokens", default=160, show_default=True, type=click.IntRange(8, 2048),
              help="Length of the target's answers trained on.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Keep the generated answers here, and reuse them when it exists.")
@click.option("--max-prompt-tokens", type=click.IntRange(1), metavar="N",
              help="Leave out prompts longer than N tokens (a batch pads to its "
                   "longest) [1024].")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1),
              help="torch threads.")
@click.option("--vocab-size", default=DRAFT_VOCAB_SIZE, show_default=True,
              type=click.IntRange(1), metavar="N",
              help="Draft over the N tokens most frequent in the training answers (the "
                   "model's vocabulary size or more: all of them).")
@click.option("--init", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              metavar="FILE", help="Fine-tune this head (one for the same model) instead "
                                   "of training a new one.")
@click.option("--unroll", default=1, show_default=True, type=click.IntRange(1, 8),
              metavar="D", help="Draft depths trained per position: depth 2 and deeper "
                                "feed the head its own features, as drafting does (each "
                                "depth costs a step).")
@click.option("--lr", default=1e-3, show_default=True,
              type=click.FloatRange(0, 1, min_open=True), help="Peak learning rate.")
@click.option("--layers", type=click.IntRange(1, 8), metavar="N",
              help="Decoder layers of the head; with --init, the fine-tuned head grows to "
                   "N, each added layer starting as the identity [1; --init: its own].")
@click.option("--batch-size", default=8, show_default=True,
              type=click.IntRange(1), help="Answers per step.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def draft_train(spec: str, out: Path, prompt_files: tuple[Path, ...], steps: int,
                per_file: int | None, holdout: int, max_new_tokens: int, data: Path | None,
                max_prompt_tokens: int | None, threads: int, vocab_size: int, init: Path | None,
                unroll: int, lr: float, layers: int | None, batch_size: int,
                as_json: bool) -> None:
    """Train an EAGLE draft head on the target's own greedy answers (CPU, minutes), and
    measure its acceptance on held-out prompts against prompt lookup."""
    from peerd.inference.model.source import ModelError
    from peerd.inference.speculative.drafters import DraftError
    from peerd.inference.speculative.eagle_train import (
        MAX_PROMPT_TOKENS,
        TrainConfig,
        train_eagle,
    )

    files = list(prompt_files) or [DRAFT_PROMPTS]
    cfg = TrainConfig(steps=steps, unroll=unroll, lr=lr, batch_size=batch_size)
    try:
        report = train_eagle(spec, out, files, cfg, per_file=per_file, holdout=holdout,
                             max_new_tokens=max_new_tokens, data=data, threads=threads,
                             vocab_size=vocab_size, init=init,
                             max_prompt_tokens=max_prompt_tokens or MAX_PROMPT_TOKENS,
                             layers=layers)
    except (ModelError, DraftError, ValueError, OSError) as exc:
        fail(str(exc))

    def render(r: dict[str, Any]) -> None:
        t = Table(title="held-out acceptance (greedy): tokens per round, and per draft "
                        "position given the earlier ones accepted")
        for col in ("drafter", "γ", "rounds", "tokens/round", "by position"):
            t.add_column(col)
        for key, a in r["acceptance"].items():
            name = key.split("@")[0]
            label = f"{name} ({key.split(':')[1]})" if ":" in key else name
            t.add_row(escape(label), str(a["gamma"]), str(a["rounds"]),
                      f"{a['tokens_per_round']:.2f}",
                      " ".join(f"{x:.2f}" for x in a["acceptance_by_position"]))
        console.print(t)
        losses = "; ".join(f"depth {d + 1}: smooth-L1 {s['reg']:.3f} CE {s['ce']:.2f} "
                           f"top-1 {s['top1']:.2f}" for d, s in enumerate(r["final_losses"]))
        console.print(f"{r['train_examples']} answers ({r['train_tokens']} tokens) of "
                      f"{r['model_id']}, {r['held_out_examples']} held out; "
                      f"{r['config']['steps']} steps"
                      + (f", {r['config']['unroll']} depths unrolled"
                         if r["config"]["unroll"] > 1 else "")
                      + (f", fine-tuned from {r['init']['path']}" if r["init"] else "")
                      + f"; final {losses}", highlight=False)
        console.print(f"data {r['data_s']:.0f} s, training {r['train_s']:.0f} s, total "
                      f"{r['total_s']:.0f} s; wrote {r['out']} ({r['bytes'] / 1e6:.1f} MB)",
                      highlight=False)

    emit(report, as_json, render)


@draft.command("vocab")
@click.option("--model", "spec", required=True, metavar="SPEC",
              help="The target the head drafts for (its tokenizer counts the text).")
@click.option("--head", "head_file", required=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The EAGLE head file to rewrite.")
@click.option("--text", "text_files", multiple=True, metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text to count tokens in (repeatable): .jsonl (every string value) or "
                   "any text file.")
@click.option("--size", default=DRAFT_VOCAB_SIZE, show_default=True, type=click.IntRange(1),
              help="Ids to keep (the model's vocabulary size or more: all of them).")
@click.option("--none", "clear", is_flag=True, help="Remove the draft vocabulary instead.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def draft_vocab(spec: str, head_file: Path, text_files: tuple[Path, ...], size: int,
                clear: bool, as_json: bool) -> None:
    """Give an EAGLE head a draft vocabulary: its drafts are scored over the SIZE tokens
    most frequent in the text (plus the request's own context tokens), not the whole
    vocabulary; one lm_head call is most of a draft step. Verification is unchanged."""
    from peerd.inference.model.head import Head
    from peerd.inference.model.source import ModelError, load_tokenizer, resolve
    from peerd.inference.speculative.drafters import DraftError
    from peerd.inference.speculative.eagle_file import set_vocab
    from peerd.inference.speculative.eagle_train import progress_bar
    from peerd.inference.speculative.vocab import VocabError, count_files, coverage, pick

    if not clear and not text_files:
        fail("give --text FILE (repeatable) to count tokens in, or --none to remove the "
             "draft vocabulary")
    try:
        source = resolve(spec)
        head = Head(source)
        if clear:
            set_vocab(head_file, head, None)
            emit({"head": str(head_file), "size": head.vocab_size, "removed": True},
                 as_json, lambda r: console.print(f"{r['head']}: drafts over the whole "
                                                  f"vocabulary ({r['size']})"))
            return
        tokenizer = load_tokenizer(source)
        with progress_bar(not as_json) as bar:
            task = bar.add_task("counting", total=len(text_files), info="")
            counts = count_files(
                text_files, lambda t: tokenizer(t, add_special_tokens=False)["input_ids"],
                lambda _: bar.update(task, advance=1))
        ids = pick(counts, head.vocab_size, size, always=tokenizer.all_special_ids)
        info = {"counted": f"{len(text_files)} text files", "tokens": sum(counts.values()),
                "coverage": round(coverage(ids, counts), 4)}
        set_vocab(head_file, head, ids, info)
    except (ModelError, DraftError, VocabError, OSError, UnicodeDecodeError) as exc:
        fail(str(exc))
    report = {"head": str(head_file), "size": len(ids), "vocab_size": head.vocab_size, **info}
    emit(report, as_json, lambda r: console.print(
        f"{r['head']}: drafts over {r['size']} of {r['vocab_size']} tokens, covering "
        f"{100 * r['coverage']:.2f}% of the {r['tokens']} counted", highlight=False))


def kind_file(value: str) -> tuple[str, Path]:
    """KIND=FILE, or FILE (its stem is the kind: held-out/chat.jsonl is "chat")."""
    kind, eq, name = value.partition("=")
    path = Path(name if eq else value)
    kind = kind if eq else path.stem
    if not kind:
        raise click.BadParameter(f"{value!r}: want KIND=FILE or FILE")
    if not path.is_file():
        raise click.BadParameter(f"{path}: no such file")
    return kind, path


@draft.command("measure")
@click.option("--model", "spec", required=True, metavar="SPEC",
              help="The target: smollm2, a .gguf file, a model directory or a cached repo id.")
@click.option("--head", "head_file", metavar="FILE",
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The EAGLE head to measure [the one shipped for the model].")
@click.argument("files", nargs=-1, metavar="[[KIND=]FILE]...")
@click.option("--prompts", "prompt_files", multiple=True,
              metavar="[KIND=]FILE", help="Held-out prompts of one kind, JSONL as `peerd "
              "draft train` reads them (repeatable, or as arguments); without KIND= the "
              "file's stem is the kind.")
@click.option("--gamma", "gammas", multiple=True, type=click.IntRange(1, 16),
              metavar="N", help="Draft tokens per round, a tree's depth (repeatable) [2 4 6].")
@click.option("--tree", is_flag=True, help="Also replay token trees (EAGLE-2, with the "
              "prompt-lookup branches), γ deep.")
@click.option("--tree-nodes", default=16, show_default=True, type=click.IntRange(1, 64),
              help="Scored candidates a tree keeps.")
@click.option("--max-new-tokens", default=160, show_default=True, type=click.IntRange(8, 2048),
              help="Length of the target's answers.")
@click.option("--data", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Keep the generated answers here, and reuse them when it exists (a "
                   "`peerd draft train --data` file serves too).")
@click.option("--limit", type=click.IntRange(1), metavar="N",
              help="At most the first N prompts of each file [all].")
@click.option("--threads", default=2, show_default=True, type=click.IntRange(1),
              help="torch threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def draft_measure(spec: str, head_file: Path | None, files: tuple[str, ...],
                  prompt_files: tuple[str, ...],
                  gammas: tuple[int, ...], tree: bool, tree_nodes: int, max_new_tokens: int,
                  data: Path | None, limit: int | None, threads: int, as_json: bool) -> None:
    """Measure a draft head per kind of prompt: the target's greedy answers to held-out
    prompts (generated once, kept with --data), and the tokens a speculative round
    would commit on them (k), for the head as a chain (and a tree) and prompt lookup."""
    from peerd.inference.model.source import ModelError
    from peerd.inference.speculative.drafters import DraftError
    from peerd.inference.speculative.eagle_heldout import measure_kinds

    if not files and not prompt_files:
        fail("give the held-out prompt files: [KIND=]FILE... or --prompts [KIND=]FILE")
    try:
        kinds = dict(kind_file(v) for v in (*prompt_files, *files))
    except click.BadParameter as exc:
        fail(f"prompts: {exc.message}")
    try:
        report = measure_kinds(spec, kinds, head_file, gammas=gammas or (2, 4, 6), tree=tree,
                               tree_nodes=tree_nodes, max_new_tokens=max_new_tokens,
                               data=data, limit=limit, threads=threads, progress=not as_json)
    except (ModelError, DraftError, ValueError, OSError) as exc:
        fail(str(exc))

    def render(r: dict[str, Any]) -> None:
        t = Table(title="held-out k (tokens per round, greedy) by kind of prompt")
        t.add_column("kind")
        t.add_column("prompts", justify="right")
        for config in r["k"]:
            name, gamma = config.split("@")
            label = {"eagle-chain": "chain", "eagle-tree": "tree"}.get(name, name)
            t.add_column(f"{label} {'d' if label == 'tree' else 'γ'}{gamma}", justify="right")
        for kind in [*r["kinds"], "all"]:
            n = (r["kinds"][kind]["prompts"] if kind != "all"
                 else sum(v["prompts"] for v in r["kinds"].values()))
            t.add_row(escape(kind), str(n), *(f"{r['k'][c][kind]['tokens_per_round']:.2f}"
                                              for c in r["k"]), end_section=kind != "all"
                      and kind == list(r["kinds"])[-1])
        console.print(t)
        made = r["answers"]
        console.print(f"{r['head']} drafting for {r['model_id']}; answers of up to "
                      f"{r['max_new_tokens']} tokens: {made['generated']} generated, "
                      f"{made['reused']} reused ({r['data_s']:.0f} s); total "
                      f"{r['total_s']:.0f} s", highlight=False)

    emit(report, as_json, render)
