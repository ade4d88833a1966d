"""Checkpoints of the learner: a round trip resumes the same training (weights, optimiser,
RNG, the trainer's state); only the last K stay; a disk that fills up or a run dir that
cannot be written gives a clear error and leaves the previous checkpoint loadable."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from peerd.rl import checkpoint
from peerd.rl.checkpoint import CheckpointError, checkpoints, load_latest, save
from peerd.rl.learner import Learner, TokenBatch
from tests.models import tiny_llama_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama_dir(tmp_path_factory, layers=2)


def batch() -> TokenBatch:
    return TokenBatch.from_sequences([[5, 17, 42], [7, 8]], [[20, 21, 22], [30]],
                                     [[-1.0] * 3, [-1.0]], [1.0, -1.0])


def loss(new_logp: torch.Tensor, part: TokenBatch) -> tuple[torch.Tensor, dict[str, Any]]:
    mask = part.completion_mask
    return -(new_logp * part.advantages[:, None] * mask).sum() / mask.sum(), {}


def weights(learner: Learner) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in learner.model.named_parameters()}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("update", ["full", "lora"])
def test_round_trip_resumes_the_same_training(tiny: Path, tmp_path: Path, update: str) -> None:
    learner = Learner.load(str(tiny), update=update, lr=1e-2)  # type: ignore[arg-type]
    for _ in range(2):
        learner.step(batch(), loss)
    state = {"buffer": {"admitted": 7, "rejected": {"stale": 2}}, "metrics": "m.jsonl"}
    path = save(tmp_path, step=2, version=2, learner=learner, state=state)
    assert path == tmp_path / "checkpoints" / "step-00000002"
    assert sorted(p.name for p in path.iterdir()) == ["state.json", "trainer.pt",
                                                     "weights.safetensors"]
    from safetensors import safe_open

    with safe_open(str(path / "weights.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert names == set(learner.export()[0])  # LoRA: the adapters only
    assert all(".lora_" in n for n in names) is (update == "lora")
    noise = torch.rand(3)  # the RNG as the checkpoint saw it, drawn once after

    resumed = Learner.load(str(tiny), update=update, lr=1e-2, seed=5)  # type: ignore[arg-type]
    assert load_latest(tmp_path, resumed) == (2, 2, state)
    assert_same(weights(resumed), weights(learner))
    assert torch.equal(torch.rand(3), noise)
    learner.step(batch(), loss)  # the optimiser's moments came along: the same next step
    resumed.step(batch(), loss)
    assert_same(weights(resumed), weights(learner))


def test_no_checkpoint_yet(tiny: Path, tmp_path: Path) -> None:
    assert load_latest(tmp_path / "absent", Learner.load(str(tiny))) is None
    assert checkpoints(tmp_path) == []


def test_keeps_the_last_k_and_loads_the_newest(tiny: Path, tmp_path: Path) -> None:
    learner = Learner.load(str(tiny), update="lora", lr=1e-2)
    for step in range(1, 6):
        learner.step(batch(), loss)
        save(tmp_path, step, step + 10, learner, {"step": step}, keep=2)
    assert [p.name for p in checkpoints(tmp_path)] == ["step-00000004", "step-00000005"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    other = Learner.load(str(tiny), update="lora", lr=1e-2)
    assert load_latest(tmp_path, other) == (5, 15, {"step": 5})
    # the same step saved again replaces it
    save(tmp_path, 5, 99, learner, {"again": True}, keep=2)
    assert load_latest(tmp_path, other) == (5, 99, {"again": True})


def test_disk_full_on_the_last_file_leaves_the_previous_checkpoint(
        tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    learner = Learner.load(str(tiny), lr=1e-2)
    learner.step(batch(), loss)
    save(tmp_path, 1, 1, learner, {"n": 1})
    at_one = weights(learner)
    learner.step(batch(), loss)

    def full_disk(path: Path, body: str) -> None:
        path.write_text(body[:10])  # half a file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(checkpoint, "_write_state", full_disk)
    with pytest.raises(CheckpointError) as info:
        save(tmp_path, 2, 2, learner, {"n": 2})
    message = str(info.value)
    assert "step-00000002" in message and "No space left" in message
    assert "free space" in message and "intact" in message
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000001"]  # no temp left
    monkeypatch.undo()
    fresh = Learner.load(str(tiny), lr=1e-2)
    assert load_latest(tmp_path, fresh) == (1, 1, {"n": 1})
    assert_same(weights(fresh), at_one)


def test_unwritable_run_dir_is_a_clear_error(tiny: Path, tmp_path: Path) -> None:
    # root ignores permission bits, so "unwritable" here is a run dir under a file
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointError, match=r"a-file.*writable directory"):
        save(blocker / "run", 1, 1, Learner.load(str(tiny)), {})


def test_state_must_be_json_and_nothing_is_written_otherwise(tiny: Path,
                                                             tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        save(tmp_path, 1, 1, Learner.load(str(tiny)), {"rng": torch.get_rng_state()})
    assert not (tmp_path / "checkpoints").exists()


def test_a_checkpoint_of_the_other_kind_is_refused(tiny: Path, tmp_path: Path) -> None:
    save(tmp_path, 1, 1, Learner.load(str(tiny), update="lora"), {})
    with pytest.raises(CheckpointError, match="--update lora"):
        load_latest(tmp_path, Learner.load(str(tiny)))
    state = tmp_path / "checkpoints" / "step-00000001" / "state.json"
    meta = json.loads(state.read_text())
    state.write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        load_latest(tmp_path, Learner.load(str(tiny), update="lora"))
    (tmp_path / "checkpoints" / "step-00000001" / "weights.safetensors").write_bytes(b"junk")
    state.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="move it aside"):
        load_latest(tmp_path, Learner.load(str(tiny), update="lora"))
