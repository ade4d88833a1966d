"""The learner under torchrun: 2 gloo processes, each on its rows of a batch of 6, make the
same update as 1 process on the whole batch (full and LoRA).

The 6 completions have 4, 1, 2, 3, 2 and 6 tokens, so the ranks hold 8 and 10 tokens: a
rank that normalised by its own tokens and let DDP average would move the weights by
another amount, which the comparison sees. Rows 0 and 2 share a prompt, as rows 1 and 3
do (a GRPO group's completions): each rank's first micro-batch of 2 computes its prompt
once (logprobs.py's shared prompts), through DDP, and so does the one process. The
optimiser is SGD at lr 1 (the step is minus the gradient, so equal weights are equal
gradients: Adam's first step, lr * sign(g), would hide a scale error), then one AdamW
step as the trainer runs it.

This file is also the worker: torchrun runs it as a script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from peerd.rl.learner import Learner, TokenBatch, broadcast_batch, init_distributed, with_check
from tests.models import tiny_llama_dir

# The SGD step: the same float32 sums in another order (gloo's all-reduce, micro-batches).
ATOL, RTOL = 1e-6, 1e-5
# The AdamW step moves a weight by about lr * g / (|g| + eps): where |g| is a few eps, a
# sum that nearly cancels, its rounding in another order (ranks, micro-batches, a prompt
# computed once for its group) moves that weight by a good share of lr (2.4e-2 * lr seen
# once in 8192); elsewhere it stays ~1e-8. The SGD step above holds the gradients
# themselves to 1e-6.
LR = 1e-2
ADAM_ATOL = 1e-1 * LR
UPDATES = ("full", "lora")


COMPLETIONS = [[20, 21, 22, 23], [30], [24, 25], [31, 32, 33], [40, 41],
               [50, 51, 52, 53, 54, 55]]


def batch() -> TokenBatch:
    return TokenBatch.from_sequences(
        [[5, 17, 42], [7, 8], [5, 17, 42], [7, 8], [9, 10, 11, 12, 13], [3]], COMPLETIONS,
        [[-1.0] * len(c) for c in COMPLETIONS], [1.0, -0.5, -0.75, 0.5, 0.25, -1.0])


def loss(new_logp: torch.Tensor, part: TokenBatch) -> tuple[torch.Tensor, dict[str, Any]]:
    mask = part.completion_mask
    return -(new_logp * part.advantages[:, None] * mask).sum() / mask.sum(), {}


def train(model: str, update: str, *, micro_batch: int | None,
          out: Path | None = None) -> tuple[Learner, Learner | None, list[float]]:
    """An SGD step then an AdamW step, each saved under `out` (rank 0). In one process
    (out None): the learner after each step and the two losses."""
    from peerd.rl.checkpoint import save

    learner = Learner.load(model, update=update, lr=LR, seed=0)  # type: ignore[arg-type]
    # rank 0 holds the rollouts; the others receive the batch from it
    whole = broadcast_batch(batch() if learner.rank == 0 else None)
    adamw = learner.optimizer
    learner.optimizer = torch.optim.SGD(learner.trained, lr=1.0)
    first = learner.step(whole, loss, micro_batch=micro_batch, max_grad_norm=1e9)
    after_sgd = None
    if out is not None:
        path = save(out / f"{update}-sgd", 1, 1, learner, {"loss": first.loss})
        rank = learner.rank
        (out / f"{update}-rank{rank}.json").write_text(json.dumps({"saved": str(path)}))
    else:
        after_sgd = Learner.load(model, update=update)  # type: ignore[arg-type]
        after_sgd.load_tensors(learner.export()[0])
    learner.optimizer = adamw
    second = learner.step(whole, loss, micro_batch=micro_batch, max_grad_norm=1e9)
    if out is not None:
        save(out / f"{update}-adamw", 2, 2, learner, {"loss": second.loss})
    return learner, after_sgd, [first.loss, second.loss]


# the fused check's tolerances: the behaviour log-probs are -1.0, not the policy's, so
# every row deviates; row 2 alone is held to a tolerance it misses
LOOSE_BUT_ROW_2 = [100.0, 100.0, 1e-3, None, 100.0, 100.0]


def fused(model: str, tolerances: list[float | None]) -> tuple[bool, list[float]]:
    """(stepped, deviations) of a step whose batch carries the fused check."""
    learner = Learner.load(model, seed=0)
    whole = broadcast_batch(batch() if learner.rank == 0 else None)
    stats = learner.step(with_check(whole, tolerances), loss, micro_batch=2)
    assert stats.deviations is not None
    return stats.stepped, stats.deviations


def worker(model: str, out: Path) -> None:
    rank, world = init_distributed("cpu")
    assert world == 2
    for update in UPDATES:
        learner, _, _ = train(model, update, micro_batch=2, out=out)  # 2 micro-batches a rank
        assert learner.rank == rank and learner.world == world
    checks = [fused(model, LOOSE_BUT_ROW_2), fused(model, [100.0] * 6)]
    (out / f"fused-rank{rank}.json").write_text(json.dumps(checks))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_make_the_update_of_one_process(tmp_path: Path) -> None:
    from peerd.rl.checkpoint import load_latest

    model = str(tiny_llama_dir(tmp_path, layers=2))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
         "2", __file__, model, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=150)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for update in UPDATES:
        saved = [json.loads((tmp_path / f"{update}-rank{r}.json").read_text())["saved"]
                 for r in (0, 1)]
        assert saved[0].endswith("step-00000001") and saved[1] == "None"  # rank 0 writes
        last, after_sgd, losses = train(model, update, micro_batch=None)
        assert after_sgd is not None
        base = Learner.load(model, update=update).export()[0]  # type: ignore[arg-type]
        for name, single, atol, rtol in [("sgd", after_sgd, ATOL, RTOL),
                                         ("adamw", last, ADAM_ATOL, 0.0)]:
            resumed = Learner.load(model, update=update)  # type: ignore[arg-type]
            got = load_latest(tmp_path / f"{update}-{name}", resumed)
            assert got is not None
            step, _, state = got
            # the loss each rank reports is the whole batch's
            assert state["loss"] == pytest.approx(losses[step - 1], abs=1e-6)
            mine, theirs = single.export()[0], resumed.export()[0]
            assert mine.keys() == theirs.keys()
            for tensor in mine:
                torch.testing.assert_close(theirs[tensor], mine[tensor], atol=atol, rtol=rtol)
            assert max(float((mine[n] - base[n]).abs().max()) for n in mine) > 1e-3
    # the fused check: each rank measured its rows, and both decided alike, as one
    # process decides: no step for a row over its tolerance, a step when none is
    alone = [list(fused(model, LOOSE_BUT_ROW_2)), list(fused(model, [100.0] * 6))]
    ranks = [json.loads((tmp_path / f"fused-rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    assert [stepped for stepped, _ in ranks[0]] == [False, True]
    assert ranks[0][0][1][3] != ranks[0][0][1][3]  # NaN: row 3 was not checked
    for (_, theirs), (_, mine) in zip(ranks[0], alone, strict=True):
        assert theirs[:3] + theirs[4:] == pytest.approx(mine[:3] + mine[4:], abs=1e-6)
    assert ranks[0][1][1] == pytest.approx(alone[1][1], abs=1e-6)


if __name__ == "__main__":
    worker(sys.argv[1], Path(sys.argv[2]))
