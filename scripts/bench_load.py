"""How long a process takes to load SmolLM2 from its GGUF: the first process on a machine
(which converts the metadata: peerd/inference/model/gguf_cache.py), every later one, and
transformers' own GGUF loader (what each process paid before the cache).

Each figure is one fresh Python process (imports and in-process caches cold; the file's
pages in the OS cache, as on any machine that has loaded it once), timed from after its
imports to the loaded objects:

    peer        what a peer serving the whole model loads: config, tokenizer, the head
                (embeddings, norm, lm_head) and one shard of every layer
    reference   `reference_model` + `load_tokenizer`: what the RL trainer, evaluation and
                the draft catalog load
    transformers  AutoModelForCausalLM + AutoTokenizer .from_pretrained(gguf_file=...):
                the whole metadata parsed twice, as `reference` did before the cache

"cold" runs in an empty cache directory (a machine's first load: conversion included),
"warm" in the one it left. Repeated `--repeats` times, interleaved; the table gives the
median and the range. 1 torch thread a process. Prints a table, writes
bench/results/load.json (`--out`). Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peerd.machine import describe as machine  # noqa: E402

KINDS = ("peer", "reference", "transformers")


def load_once(kind: str) -> float:
    """Seconds to load `kind` in this process, after its imports."""
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peerd.inference.model.head import Head
    from peerd.inference.model.shard import ShardBlock
    from peerd.inference.model.source import (
        load_config,
        load_tokenizer,
        num_layers,
        reference_model,
        resolve,
    )

    source = resolve("smollm2")
    began = time.perf_counter()
    if kind == "peer":
        load_config(source)
        load_tokenizer(source)
        Head(source)
        ShardBlock(source, 0, num_layers(source))
    elif kind == "reference":
        reference_model(source)
        load_tokenizer(source)
    else:
        AutoModelForCausalLM.from_pretrained(str(source.path), gguf_file=source.gguf_file,
                                             dtype=torch.float32)
        AutoTokenizer.from_pretrained(str(source.path), gguf_file=source.gguf_file)
    return time.perf_counter() - began


def run(kind: str, cache: Path) -> float:
    env = {**os.environ, "PEERD_CACHE_DIR": str(cache), "TQDM_DISABLE": "1",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, __file__, "--one", kind], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "load.json")
    parser.add_argument("--one", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(f"{load_once(args.one):.3f}")
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    seconds: dict[str, list[float]] = {f"{k} {t}": [] for k in KINDS[:2]
                                       for t in ("cold", "warm")}
    seconds["transformers"] = []
    load_before = os.getloadavg()
    with console.status("loading") as status:
        for repeat in range(args.repeats):
            for kind in KINDS[:2]:
                with tempfile.TemporaryDirectory(prefix="peerd-load-") as cache:
                    for temperature in ("cold", "warm"):
                        status.update(f"repeat {repeat + 1}/{args.repeats}: {kind} "
                                      f"{temperature}")
                        seconds[f"{kind} {temperature}"].append(run(kind, Path(cache)))
            status.update(f"repeat {repeat + 1}/{args.repeats}: transformers")
            with tempfile.TemporaryDirectory(prefix="peerd-load-") as cache:
                seconds["transformers"].append(run("transformers", Path(cache)))

    table = Table(title="SmolLM2-135M-Instruct Q4_1 GGUF, float32, one process a load, "
                        "1 torch thread")
    for column in ("load", "median s", "range s"):
        table.add_column(column, justify="left" if column == "load" else "right")
    rows: dict[str, Any] = {}
    for name, values in seconds.items():
        rows[name] = {"median_s": round(statistics.median(values), 2),
                      "seconds": [round(v, 2) for v in values]}
        table.add_row(name, f"{statistics.median(values):.2f}",
                      f"{min(values):.2f}-{max(values):.2f}")
    console.print(table)
    result = {"model": "smollm2", "repeats": args.repeats, "loads": rows,
              "machine": machine(),
              "load_average_before": [round(x, 2) for x in load_before],
              "load_average_after": [round(x, 2) for x in os.getloadavg()]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
