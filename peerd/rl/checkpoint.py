"""Checkpoints of a training run: whole or absent, never half written.

    RUN_DIR/checkpoints/step-00000012/
        weights.safetensors   the trained tensors in `Learner.export`'s layout: every
                              parameter for a full update, only the adapters for LoRA
                              (the base is the model SPEC, read again on resume)
        trainer.pt            the optimiser's state and torch's RNG states
        state.json            step, version, update kind, LoRA scale, and the trainer's
                              own `state` (buffer counters, its RNG states, metrics path)

A checkpoint is written into a hidden temporary directory beside the others, every file
fsynced, then renamed into place in one `os.replace` and the parent directory fsynced:
a crash or a full disk at any point leaves the previous checkpoints as they were, and a
directory named step-N is always complete. Only the newest `keep` are kept.

Under DDP only rank 0 writes (`save` returns None elsewhere); every rank loads.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from peerd.durable import fsync, fsync_dir
from peerd.rl.learner import Learner

FORMAT = 1
WEIGHTS, TRAINER, STATE = "weights.safetensors", "trainer.pt", "state.json"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


class CheckpointError(Exception):
    """A checkpoint cannot be written or read; the message names the path and what to do."""


def save(run_dir: Path | str, step: int, version: int, learner: Learner,
         state: dict[str, Any], *, keep: int = 3) -> Path | None:
    """Write the checkpoint of `step` (the policy at `version`); its directory, or None
    on a rank other than 0. CheckpointError if it cannot be written: then nothing of it
    is left behind and the earlier checkpoints are intact."""
    if learner.rank != 0:
        return None
    if step < 0 or version < 0 or keep < 1:
        raise ValueError(f"step {step}, version {version}, keep {keep}: need >= 0, >= 0, >= 1")
    tensors, scale = learner.export()
    body = json.dumps({"format": FORMAT, "step": step, "version": version,
                       "update": learner.update, "lora_scale": scale, "state": state},
                      indent=1, sort_keys=True)  # TypeError here: the caller's bug, no I/O yet
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        tmp.mkdir()
        _write_weights(tmp / WEIGHTS, tensors, learner.update)
        _write_trainer(tmp / TRAINER, learner)
        _write_state(tmp / STATE, body)
        fsync_dir(tmp)
        if final.exists():  # the same step saved again: the new one wins
            old = root / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except OSError as exc:
        _remove(tmp)
        raise CheckpointError(_why(final, exc)) from exc
    for stale in _complete(root)[:-keep]:
        _remove(stale)
    return final


def load_latest(run_dir: Path | str, learner: Learner) -> tuple[int, int, dict[str, Any]] | None:
    """Load the newest checkpoint into `learner` (weights, optimiser, torch RNG);
    (step, version, the trainer's state), or None if the run has none yet."""
    found = _complete(Path(run_dir) / "checkpoints")
    if not found:
        return None
    path = found[-1]
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / STATE).read_text())
        if meta.get("format") != FORMAT:
            raise CheckpointError(f"{path}: checkpoint format {meta.get('format')!r}, this "
                                  f"peerd reads {FORMAT}")
        if meta["update"] != learner.update:
            raise CheckpointError(f"{path} holds a {meta['update']} update but the learner "
                                  f"trains {learner.update}: resume with --update "
                                  f"{meta['update']}")
        tensors = load_file(str(path / WEIGHTS))
        try:
            learner.load_tensors(tensors)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc} (another model or LoRA rank/targets?)"
                                  ) from exc
        trainer = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
        learner.optimizer.load_state_dict(trainer["optimizer"])
        torch.set_rng_state(trainer["torch_rng"])
        if trainer.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(trainer["cuda_rng"])
        return int(meta["step"]), int(meta["version"]), dict(meta["state"])
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}; move it aside to "
                              f"resume from the one before") from exc


def checkpoints(run_dir: Path | str) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    return _complete(Path(run_dir) / "checkpoints")


def latest_checkpoint(run_dir: Path) -> Path:
    """The newest complete checkpoint of a run dir; ValueError naming what is missing."""
    found = checkpoints(run_dir)
    if not found:
        raise ValueError(f"{run_dir}: no checkpoint under {run_dir / 'checkpoints'} (is it a "
                         "run dir of `peerd rl train`, and did the run save one?)")
    return found[-1]


# ---- writing ---------------------------------------------------------------------------


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], update: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"update": update})
    fsync(path)


def _write_trainer(path: Path, learner: Learner) -> None:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    with path.open("wb") as f:
        torch.save({"optimizer": learner.optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(), "cuda_rng": cuda}, f)
        f.flush()
        os.fsync(f.fileno())


def _write_state(path: Path, body: str) -> None:
    with path.open("w") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())



def _complete(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    steps = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE).is_file()]
    return [p for _, p in sorted(steps)]


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _why(final: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc)
    if exc.errno == errno.ENOSPC:
        todo = "free space on that disk or pass another --out"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        todo = "make it a writable directory or pass another --out"
    else:
        todo = "fix it and resume with --resume"
    return (f"cannot write checkpoint {final}: {reason} ({exc.filename or final.parent}); "
            f"{todo}. The previous checkpoints are intact.")
