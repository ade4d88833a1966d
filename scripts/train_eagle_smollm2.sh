#!/usr/bin/env bash
# Reproduce peerd/data/eagle-smollm2.safetensors, the EAGLE draft head shipped for
# SmolLM2-135M-Instruct (Q4_1): SmolLM2's greedy answers to peerd's own chat and code
# prompts and to GSM8K *train* questions (MIT licence, (c) 2021 OpenAI; ../shared/data/
# gsm8k/LICENSE), never the GSM8K test set or HumanEval. CPU only, 2 threads: on the
# shared 2-core machine it took 26 min of generation, 18 of training and 5 of measuring
# (about half that when the machine is idle).
# Extra arguments go to `peerd draft train`, e.g. --data /tmp/smollm2-answers.pt to
# keep the generated answers for another run.
# `peerd draft train` picks the head's draft vocabulary (vocab.py) from the target's
# training answers. The shipped head predates that: its 16384 ids were counted with
#   scripts/train_eagle_smollm2.sh --vocab-only
# on GSM8K train, peerd's draft prompts, Python's standard library (*.py) and the
# METADATA (READMEs: prose and markdown) of the packages scripts/setup installs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
if [[ "${1:-}" == "--vocab-only" ]]; then
    stdlib="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
    texts=(../shared/data/gsm8k/train.jsonl peerd/data/draft_prompts.jsonl "$stdlib"/*.py
           .venv/lib/python*/site-packages/*.dist-info/METADATA)
    exec .venv/bin/peerd draft vocab --model smollm2 --size 16384 \
        --head peerd/data/eagle-smollm2.safetensors "${texts[@]/#/--text=}"
fi
exec .venv/bin/peerd draft train --model smollm2 \
    --out peerd/data/eagle-smollm2.safetensors \
    --prompts peerd/data/draft_prompts.jsonl \
    --prompts ../shared/data/gsm8k/train.jsonl \
    --per-file 400 --holdout 24 --max-new-tokens 160 --steps 600 --threads 2 "$@"
