#!/usr/bin/env bash
# Reproduce peerd/data/eagle-smollm2.safetensors, the EAGLE draft head shipped for
# SmolLM2-135M-Instruct (Q4_1): SmolLM2's greedy answers to peerd's own chat and code
# prompts, to GSM8K *train* questions (MIT licence, (c) 2021 OpenAI; bench/data/
# gsm8k/LICENSE) and its raw completions of function stubs from the local Python
# standard library and installed packages (scripts/code_prompts.py); never the GSM8K
# test set or HumanEval. CPU only, 2 threads, in three phases:
#   1. a new head, teacher-forced, 1000 steps over 1144 answers;
#   2. that head fine-tuned for 600 steps over 3168 answers (those and more), unrolled 3
#      draft tokens deep so that it learns from its own features, as drafting feeds them;
#   3. fine-tuned 800 steps more, the same way, over 5320 answers: 1000 more GSM8K train
#      questions and 1200 more stubs (the rest of the standard library's, 1000 more of
#      the packages'), none of them in the earlier files.
# The phases share one file of answers (--data): each generates only its new prompts'.
# Then its draft vocabulary (vocab.py): the 16384 ids most
# frequent in GSM8K train, peerd's draft prompts, Python's standard library (*.py) and
# the METADATA (READMEs: prose and markdown) of the packages scripts/setup installs,
# a wider count than the training answers `peerd draft train` picks from.
# Extra arguments go to both `peerd draft train` runs (--threads 4, say).
# A broader corpus of many kinds of prompt, with a held-out file per kind, comes from
# scripts/draft_corpus.py, and `peerd draft measure` reports held-out k per kind
# (docs/dsd.md, "Training corpus"); the next retraining of the shipped head uses them.
#   scripts/train_eagle_smollm2.sh --vocab-only   only sets the shipped head's vocabulary
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
head=peerd/data/eagle-smollm2.safetensors
vocab() {
    stdlib="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
    texts=(bench/data/gsm8k/train.jsonl peerd/data/draft_prompts.jsonl "$stdlib"/*.py
           .venv/lib/python*/site-packages/*.dist-info/METADATA)
    .venv/bin/peerd draft vocab --model smollm2 --size 16384 --head "$head" \
        "${texts[@]/#/--text=}"
}
if [[ "${1:-}" == "--vocab-only" ]]; then
    vocab
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
.venv/bin/peerd draft train "${common[@]}" --out "$head" "${chat[@]}" "${code[@]}" \
    --prompts "$work/3/code_more.jsonl" --prompts "$work/3/pkg_more.jsonl" \
    --init "$work/phase2.safetensors" --unroll 3 --lr 3e-4 --per-file 2400 --steps 800 "$@"
vocab
