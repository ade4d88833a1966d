"""The daemon's trainer with a learner group under torchrun (ranks.py): 2 gloo ranks
make the update of one process, checkpoint as one, fail with a clear error, and leave
no process behind.

The tolerances are test_rl_ddp.py's: scoring is the same forward in another process
(equal to rounding); the AdamW steps, the same float32 sums in another order, agree to
ADAM_ATOL where a gradient is near Adam's eps and far closer elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import trio

from peerd.rl.checkpoint import checkpoints
from peerd.rl.grpo import GrpoLoss
from peerd.rl.learner import Learner
from peerd.rl.learner_policy import Policy
from peerd.rl.ranks import LOGS_ENV, GroupError, RankedPolicy
from peerd.rl.run import RunSpec, SpecError
from peerd.rl.training import Run, Training
from peerd.rl.types import Rollout
from tests.harness import wait_for
from tests.models import tiny_llama_dir
from tests.rl_swarm import rl_swarm, seven_task
from tests.test_rl_learner import ADVANTAGES, COMPLETIONS, PROMPTS  # rows of unequal lengths

LR = 1e-2
ADAM_ATOL = 1e-2 * LR
SCORE_ATOL = 1e-6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory, layers=2)


def rollouts(behaviour: list[list[float]] | None = None) -> list[Rollout]:
    """Rows of unequal lengths: the ranks hold 6 and 7 tokens (test_rl_ddp.py says why)."""
    lps = behaviour or [[-1.0] * len(c) for c in COMPLETIONS]
    return [Rollout("r", 0, "0.1", tuple(p), tuple(c), tuple(lp), 0, "peer", "")
            for p, c, lp in zip(PROMPTS, COMPLETIONS, lps, strict=True)]


def close_all(a: list[list[float]], b: list[list[float]], atol: float) -> None:
    assert [len(x) for x in a] == [len(x) for x in b]
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(torch.tensor(x), torch.tensor(y), atol=atol, rtol=0)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def leftovers(under: Path) -> list[int]:
    """Live processes of any learner group whose logs are under `under` (torchrun and
    its ranks carry the path in their environment)."""
    mark = f"{LOGS_ENV}={under}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and mark in (proc / "environ").read_bytes() and \
                    not gone(int(proc.name)):
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.parametrize(("ranks", "group"), [(0, 4), (9, 16), (4, 2)])
def test_ranks_out_of_bounds_are_refused(ranks: int, group: int) -> None:
    with pytest.raises(SpecError, match="ranks"):
        RunSpec.parse({"model": "m", "ranks": ranks, "group": group})
    assert RunSpec.parse({"model": "m", "ranks": 8, "group": 8}).ranks == 8
    assert RunSpec.parse({"model": "m"}).ranks == 1


def test_kl_reaches_the_loss_the_trainer_steps_with(tiny: Path) -> None:
    """--kl: the learner keeps the version-0 policy and the run's loss (GrpoLoss) adds the
    KL to it: nothing at the first step, more than nothing once a step moved away."""
    spec = RunSpec(model=str(tiny), group=4, lr=LR, max_tokens=6, kl=0.05)
    policy = Policy(Learner.load(spec.model, lr=LR, seed=spec.seed, reference=True),
                    spec.aggregation)
    rows = rollouts()
    rows = rollouts(policy.score(rows, 1.0))
    first = policy.train(rows, ADVANTAGES, GrpoLoss.of(spec), 1.0)
    second = policy.train(rows, ADVANTAGES, GrpoLoss.of(spec), 1.0)
    assert first["kl_mean"] == pytest.approx(0.0, abs=1e-7)
    assert second["kl_mean"] > 1e-6


@pytest.mark.slow
def test_two_gloo_ranks_train_score_and_checkpoint_as_one_process(tmp_path: Path,
                                                            tiny: Path) -> None:
    spec = RunSpec(model=str(tiny), group=4, lr=LR, ranks=2, max_tokens=6)
    run_dir = tmp_path / "run"
    group = RankedPolicy.launch(spec, run_dir, threads=1, start_timeout_s=120,
                                call_timeout_s=60)
    try:
        group.wait_ready()
        assert len(group.pids) == 2 and group.proc.pid not in group.pids
        plain = Policy(Learner.load(spec.model, lr=LR, seed=spec.seed), spec.aggregation)
        rows = rollouts()
        # on-policy behaviour log-probs, so the ratio starts at 1 as in a sync run
        rows = rollouts(plain.score(rows, 1.0))
        close_all(group.score(rows, 1.0), plain.score(rows, 1.0), SCORE_ATOL)
        group.remember(0, {})
        plain.remember(0, plain.export()[0])
        loss = GrpoLoss.of(spec)
        for _ in range(2):
            got, want = group.train(rows, ADVANTAGES, loss, 1.0), \
                plain.train(rows, ADVANTAGES, loss, 1.0)
            assert got.keys() == want.keys()
            # the loss each step reports is the whole batch's, whichever rank
            assert got["loss"] == pytest.approx(want["loss"], abs=1e-6)
        theirs, scale = group.export()
        mine = plain.export()[0]
        assert scale is None and theirs.keys() == mine.keys()
        for name in mine:
            torch.testing.assert_close(theirs[name], mine[name], atol=ADAM_ATOL, rtol=0)
        base = Learner.load(spec.model).export()[0]
        assert max(float((mine[n] - base[n]).abs().max()) for n in mine) > 1e-3
        # an older version scored under its own weights, on rank 0
        then = group.score_at(0, rows, 1.0)
        assert then is not None
        close_all(then, plain.score_at(0, rows, 1.0) or [], SCORE_ATOL)
        assert group.score_at(7, rows, 1.0) is None
        close_all(group.score(rows, 1.0), plain.score(rows, 1.0), 1e-3)
        # rank 0 writes the checkpoint; a plain learner resumes from it exactly
        assert group.save(run_dir, 2, 2, {"note": "ranked"}) == checkpoints(run_dir)[-1]
        fresh = Policy(Learner.load(spec.model, lr=LR), spec.aggregation)
        assert fresh.resume(run_dir) == (2, 2, {"note": "ranked"})
        for name, tensor in fresh.export()[0].items():
            assert torch.equal(tensor, theirs[name])
        # the group is handed our loss's settings; a function cannot cross
        with pytest.raises(TypeError, match="GrpoLoss"):
            group.train(rows, ADVANTAGES, lambda *a: None, 1.0)
        # a rank that dies takes the group down, and the call says which and how
        os.kill(group.pids[1], signal.SIGKILL)
        with pytest.raises(GroupError, match=r"rank 1 of 2 exited with code -9 \(SIGKILL\)"):
            group.train(rows, ADVANTAGES, loss, 1.0)
        with pytest.raises(GroupError, match="rank 1 of 2"):  # and stays failed
            group.score(rows, 1.0)
    finally:
        group.close()
    assert all(gone(pid) for pid in [group.proc.pid, *group.pids])
    assert leftovers(tmp_path) == []


def group_of(run: Run) -> RankedPolicy:
    """The ranks' group of a run that is training (an ended run lets go of it)."""
    assert run.trainer is not None
    policy = run.trainer.learner
    assert isinstance(policy, RankedPolicy)
    return policy


async def ended(training: Training, spec: RunSpec, state: str = "done"
                ) -> tuple[Run, RankedPolicy | None]:
    """The run once it has ended in `state`, and its ranks' group as it trained (None
    when it never trained)."""
    run = await training.start_run(spec)
    group = None
    with trio.fail_after(120):
        while not run.ended.is_set():
            if group is None and run.trainer is not None and run.trainer.learner is not None:
                group = group_of(run)
            await trio.sleep(0.01)
    assert run.state == state, run.to_json()
    return run, group


@pytest.mark.slow
async def test_a_run_with_two_ranks_fails_clearly_checkpoints_resumes_and_leaves_nothing_behind(
        tmp_path: Path, tiny: Path) -> None:
    settings: dict[str, Any] = {"model": str(tiny), "task": str(seven_task(tmp_path)),
                                   "group": 4, "batch": 2, "max_tokens": 3, "lr": 0.02,
                                   "seed": 1, "ranks": 2, "run_id": "ranked"}
    broken = tmp_path / "broken"  # a model whose weights do not load
    shutil.copytree(tiny, broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not safetensors")
    async with rl_swarm(tmp_path, tiny, samplers=1) as (training, (sampler,)):
        # the group cannot start: the run fails saying why; the peer goes on
        failed, _ = await ended(training, RunSpec(**{
            **settings, "model": str(broken), "run_id": "broken", "steps": 1}), "failed")
        # rank 0's answer, or (when torchrun ends the group first) a rank's last words
        assert failed.error.startswith("GroupError: ") and "rank" in failed.error
        assert "SafetensorError" in failed.error, failed.error
        first, group = await ended(training, RunSpec(**settings, steps=2))
        assert group is not None
        assert first.to_json()["version"] == 2 and len(checkpoints(first.dir)) == 1
        assert all(gone(pid) for pid in [group.proc.pid, *group.pids])
        assert (first.dir / "ranks" / "rank1.log").is_file()
        # resumed with ranks=2 at its step; then stopped mid-run: the group ends too
        again = await training.start_run(RunSpec(
            **settings, steps=50, resume=True, out=str(first.dir)))
        await wait_for(lambda: again.to_json()["step"] >= 3, timeout_s=90)
        group = group_of(again)
        again.stop()
        with trio.fail_after(60):
            await again.ended.wait()
        out = again.to_json()
        assert again.state == "stopped" and 3 <= out["step"] < 50, out
        steps = [json.loads(x)["step"] for x in
                 (first.dir / "metrics.jsonl").read_text().splitlines()]
        assert steps == list(range(1, out["step"] + 1))  # on from step 2, none lost
        assert checkpoints(first.dir)[-1].name == f"step-{out['step']:08d}"
        assert again.trainer is not None and again.trainer.learner is None  # let go of
        assert all(gone(pid) for pid in [group.proc.pid, *group.pids])
        # the samplers follow the group's versions: the last one reaches them (a pull
        # that failed, as one did under load, is tried again: follow.py)
        await wait_for(lambda: sampler.sampler.policy.version == out["version"], 40.0,
                       "the sampler at the run's last version")
    assert leftovers(tmp_path) == []  # the broken group's included
