#!/usr/bin/env bash
# Reproduce peerd/data/eagle-smollm2.safetensors, the EAGLE draft head shipped for
# SmolLM2-135M-Instruct (Q4_1): SmolLM2's greedy answers to peerd's own chat and code
# prompts, to GSM8K *train* questions (MIT licence, (c) 2021 OpenAI; bench/data/
# gsm8k/LICENSE) and its raw completions of function stubs from the local Python
# standard library and installed packages (scripts/code_prompts.py), then to a broad
# corpus of prompts of many kinds; never the GSM8K test set, HumanEval or the mixed
# reporting set. CPU only, 2 threads, in four phases:
#   1. a new head, teacher-forced, 1000 steps over 1144 answers;
#   2. that head fine-tuned for 600 steps over 3168 answers (those and more), unrolled 3
#      draft tokens deep so that it learns from its own features, as drafting feeds them;
#   3. fine-tuned 800 steps more, the same way, over 5320 answers: 1000 more GSM8K train
#      questions and 1200 more stubs (the rest of the standard library's, 1000 more of
#      the packages'), none of them in the earlier files.
#   4. fine-tuned 600 steps more, the same way, over SmolLM2's answers (128 tokens) to
#      300 prompts of each of seven kinds from scripts/draft_corpus.py's broad corpus
#      (chat, instructions, text tasks, word problems, code completed raw, stubs as chat,
#      code asked for in words; docs/dsd.md, "Training corpus"). Its held-out files,
#      never trained on, give k per kind before and after (`peerd draft measure`).
# Phases 1-3 share one file of answers (--data): each generates only its new prompts'.
# Then its draft vocabulary (vocab.py): the 16384 ids most
# frequent in GSM8K train, peerd's draft prompts, Python's standard library (*.py),
# the METADATA (READMEs: prose and markdown) of the packages scripts/setup installs and
# the corpus's training prompts, a wider count than the training answers
# `peerd draft train` picks from.
# Extra arguments go to every `peerd draft train` run (--threads 4, say).
#   scripts/train_eagle_smollm2.sh --vocab-only [CORPUS/train/*.jsonl]   only sets the
#   shipped head's vocabulary (give the corpus's training files to count them too)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
head=peerd/data/eagle-smollm2.safetensors
vocab() {
    stdlib="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
    texts=(bench/data/gsm8k/train.jsonl peerd/data/draft_prompts.jsonl "$stdlib"/*.py
           .venv/lib/python*/site-packages/*.dist-info/METADATA "$@")
    .venv/bin/peerd draft vocab --model smollm2 --size 16384 --head "$head" \
        "${texts[@]/#/--text=}"
}
if [[ "${1:-}" == "--vocab-only" ]]; then
    vocab "${@:2}"
    exit
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir "$work/1" "$work/2" "$work/3"  # a stubs file's name is its source's: the same twice
.venv/bin/python scripts/code_prompts.py --out "$work/1/code_prompts.jsonl" --n 400
.venv/bin/python scripts/code_prompts.py --out "$work/2/code_prompts.jsonl" --n 624
.venv/bin/python scripts/code_prompts.py --out "$work/2/pkg_prompts.jsonl" --n 824 \
    --site-packages
.venv/bin/python scripts/code_prompts.py --out "$work/3/code_more.jsonl" --n 200 \
    --exclude "$work/2/code_prompts.jsonl"
.venv/bin/python scripts/code_prompts.py --out "$work/3/pkg_more.jsonl" --n 1000 \
    --site-packages --exclude "$work/2/pkg_prompts.jsonl"
chat=(--prompts peerd/data/draft_prompts.jsonl --prompts bench/data/gsm8k/train.jsonl)
code=(--prompts "$work/2/code_prompts.jsonl" --prompts "$work/2/pkg_prompts.jsonl")
common=(--model smollm2 --data "$work/answers.pt" --holdout 24 --max-new-tokens 160
        --threads 2)
.venv/bin/peerd draft train "${common[@]}" --out "$work/phase1.safetensors" "${chat[@]}" \
    --prompts "$work/1/code_prompts.jsonl" --per-file 400 --steps 1000 "$@"
.venv/bin/peerd draft train "${common[@]}" --out "$work/phase2.safetensors" "${chat[@]}" \
    "${code[@]}" --init "$work/phase1.safetensors" --unroll 3 --lr 3e-4 \
    --per-file 1400 --steps 600 "$@"
.venv/bin/peerd draft train "${common[@]}" --out "$work/phase3.safetensors" "${chat[@]}" \
    "${code[@]}" --prompts "$work/3/code_more.jsonl" --prompts "$work/3/pkg_more.jsonl" \
    --init "$work/phase2.safetensors" --unroll 3 --lr 3e-4 --per-file 2400 --steps 800 "$@"
.venv/bin/python scripts/draft_corpus.py --out "$work/corpus"
broad=("$work"/corpus/train/*.jsonl)
.venv/bin/peerd draft train --model smollm2 --data "$work/broad.pt" --holdout 8 \
    --max-new-tokens 128 --threads 2 --out "$head" "${broad[@]/#/--prompts=}" \
    --init "$work/phase3.safetensors" --unroll 3 --lr 3e-4 --per-file 300 --steps 600 "$@"
vocab "${broad[@]}"
