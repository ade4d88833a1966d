"""How far a reused prompt prefix's KV is from a fresh prefill's, by dtype.

The prompt cache's safety rule (peerd/inference/swarm/warm.py) rests on this. For each
trial, in this process, the whole model as one ShardBlock (1 torch thread): a random
prompt is prefilled and 12 tokens decoded greedily one at a time (as a first chat turn
leaves a pooled session's caches); then 8 new tokens (the next turn) run on those
caches, against the whole history prefilled fresh in one pass. Reports the largest
|logit difference| at the last position, how often the argmax differs, and the
smallest top-two gap of the fresh logits (how close a near-tie came).

    scripts/measure_prompt_reuse.py --model smollm2 --trials 12

Prints a table and writes bench/results/prompt_reuse.json. Not a test: no thresholds.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from peerd.inference.model.head import Head  # noqa: E402
from peerd.inference.model.shard import ShardBlock, set_torch_threads  # noqa: E402
from peerd.inference.model.source import load_config, resolve  # noqa: E402
from peerd.inference.model.tensors import TORCH_DTYPES  # noqa: E402

DECODED = 12  # tokens of the first turn, decoded one at a time
NEXT_TURN = 8  # new tokens run on the reused caches


def measure(spec: str, dtype: str, trials: int) -> dict[str, Any]:
    source = resolve(spec)
    config = load_config(source)
    block = ShardBlock(source, 0, int(config.num_hidden_layers), dtype=TORCH_DTYPES[dtype],
                       config=config)
    head = Head(source, dtype=TORCH_DTYPES[dtype], config=config)
    vocab = min(head.vocab_size, 5000)  # ordinary tokens, not the tail of the vocabulary
    gen = torch.Generator().manual_seed(0)
    worst, flips, gaps = 0.0, 0, []
    with torch.inference_mode():
        for trial in range(trials):
            prompt = torch.randint(0, vocab, (40 + trial,), generator=gen).tolist()
            cache = block.new_cache()
            hidden = block.forward(head.embed(torch.tensor([prompt])), 0, cache)  # [1, T, H]
            history = list(prompt)
            for _ in range(DECODED):
                history.append(int(head.logits(hidden[:, -1:])[0, -1].argmax()))
                hidden = block.forward(head.embed(torch.tensor([history[-1:]])),
                                       len(history) - 1, cache)  # [1, 1, H]
            turn = history + torch.randint(0, vocab, (NEXT_TURN,), generator=gen).tolist()
            held = block.cache_len(cache)
            reused = block.forward(head.embed(torch.tensor([turn[held:]])), held, cache)
            fresh = block.forward(head.embed(torch.tensor([turn])), 0, block.new_cache())
            a = head.logits(reused[:, -1:])[0, -1].float()  # [V]
            b = head.logits(fresh[:, -1:])[0, -1].float()  # [V]
            worst = max(worst, float((a - b).abs().max()))
            flips += int(a.argmax() != b.argmax())
            top = torch.topk(b, 2).values
            gaps.append(float(top[0] - top[1]))
    return {"model": spec, "dtype": dtype, "trials": trials, "max_abs_logit_diff": worst,
            "argmax_differs": flips, "min_top2_gap": min(gaps)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "prompt_reuse.json")
    args = ap.parse_args()
    set_torch_threads(1)
    rows = [measure(args.model, dtype, args.trials) for dtype in args.dtypes]
    print(f"{'dtype':>9} {'max |dlogit|':>13} {'argmax differs':>15} {'min top-2 gap':>14}")
    for r in rows:
        print(f"{r['dtype']:>9} {r['max_abs_logit_diff']:>13.2e} "
              f"{r['argmax_differs']:>8}/{r['trials']:<6} {r['min_top2_gap']:>14.2e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "prompt_reuse", "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
