"""One rank of a learner group (ranks.py), as torchrun runs it:
`python -m torch.distributed.run --standalone --nproc-per-node N -m peerd.rl.rank_worker
--device DEV`.

Rank 0 connects to the daemon's socket (ranks.py says how it is kept private), proves
itself with the token from its environment, and takes the run's settings; every rank
loads the learner. Then rank 0 serves the daemon's commands one at a time: those that
change the weights (train, load_tensors, resume, close) it broadcasts, and every rank
runs them; the others (score, score_at, remember, export, save) only rank 0 runs,
since every rank holds the same weights after every step.

A rank that fails a broadcast command exits (its traceback in RUN_DIR/ranks/rank<R>.log):
the ranks could be out of step, so torchrun ends the group and the run fails saying so.
A command only rank 0 runs is answered with its error, and the group goes on.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import traceback
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    args = argparse.ArgumentParser(prog="peerd.rl.rank_worker")
    args.add_argument("--device", default="cpu")
    device = args.parse_args(argv).device
    from peerd.rl.ranks import BROADCAST, LOGS_ENV, SOCKET_ENV, TOKEN_ENV, recv_frame, send_frame

    rank = int(os.environ.get("RANK", "0"))
    _redirect(Path(os.environ[LOGS_ENV]) / f"rank{rank}.log")
    sock: socket.socket | None = None
    if rank == 0:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(os.environ[SOCKET_ENV])
        send_frame(sock, {"op": "hello", "token": os.environ[TOKEN_ENV]})

    import torch
    import torch.distributed as dist

    from peerd.rl.learner import init_distributed

    local = int(os.environ.get("LOCAL_RANK", "0"))
    init_distributed(device)
    setup = _shared(recv_frame(sock)[0] if sock is not None else None)
    try:
        policy = _load(setup, device if torch.device(device).type != "cuda"
                       else f"cuda:{local}")
        pids: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(pids, os.getpid())  # also: every rank has loaded
    except Exception as exc:
        if sock is not None:
            send_frame(sock, _error(exc))
        raise
    if sock is not None:
        send_frame(sock, {"ok": True, "pids": pids})
    while True:
        if sock is not None:
            try:
                head, blob = recv_frame(sock)
            except EOFError:  # the daemon is gone: so is the group
                head, blob = {"op": "close"}, b""
            command = _decode(head, blob)
            if command["op"] in BROADCAST:
                _shared(command)
        else:
            command = _shared(None)
        op = command["op"]
        try:
            reply, data = _run(policy, command)
        except Exception as exc:
            if sock is None:
                raise
            send_frame(sock, _error(exc))
            if op in BROADCAST:
                raise
            continue
        if sock is not None:
            send_frame(sock, reply, data)
        if op == "close":
            dist.destroy_process_group()
            return 0


def _shared(command: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0's command on every rank (pickled between our own ranks only)."""
    import torch.distributed as dist

    box: list[Any] = [command]
    dist.broadcast_object_list(box, src=0)
    return dict(box[0])


def _load(setup: dict[str, Any], device: str) -> Any:
    from peerd.inference.model.shard import set_torch_threads
    from peerd.rl.learner import Learner
    from peerd.rl.learner_policy import Policy

    set_torch_threads(int(setup["threads"]))
    spec = setup["spec"]
    learner = Learner.load(spec["model"], update=spec["update"], lora_rank=spec["lora_rank"],
                           lora_alpha=int(spec["lora_alpha"]), lr=spec["lr"],
                           seed=spec["seed"], reference=spec["kl"] > 0, device=device)
    return Policy(learner, spec["aggregation"], keep=int(setup["keep"]))


def _decode(head: dict[str, Any], blob: bytes) -> dict[str, Any]:
    """The daemon's frame as a command: rollouts as Rollouts, tensors as tensors."""
    from peerd.rl.ranks import rollout_of

    command = dict(head)
    if "rollouts" in command:
        command["rollouts"] = [rollout_of(r) for r in command["rollouts"]]
    if blob:
        from safetensors.torch import load

        command["tensors"] = load(blob)
    return command


def _run(policy: Any, c: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
    from peerd.rl.grpo import GrpoLoss

    op = c["op"]
    if op == "score":
        return {"ok": True, "logprobs": policy.score(c["rollouts"], c["temperature"])}, b""
    if op == "score_at":
        got = policy.score_at(int(c["version"]), c["rollouts"], c["temperature"])
        return {"ok": True, "logprobs": got}, b""
    if op == "remember":
        policy.remember(int(c["version"]), policy.export()[0])
        return {"ok": True}, b""
    if op == "train":
        stats = policy.train(c["rollouts"], c["advantages"], GrpoLoss(**c["loss"]),
                             c["temperature"], c.get("tolerances"))
        return {"ok": True, "stats": stats}, b""
    if op == "export":
        from safetensors.torch import save

        tensors, scale = policy.export()
        return {"ok": True, "scale": scale}, save(tensors)
    if op == "load_tensors":
        policy.load_tensors(c["tensors"])
        return {"ok": True}, b""
    if op == "save":
        path = policy.save(Path(c["run_dir"]), int(c["step"]), int(c["version"]), c["state"])
        return {"ok": True, "path": None if path is None else str(path)}, b""
    if op == "resume":
        found = policy.resume(Path(c["run_dir"]))
        return {"ok": True, "found": None if found is None else list(found)}, b""
    if op == "close":
        return {"ok": True}, b""
    raise ValueError(f"unknown command {op!r}")


def _error(exc: BaseException) -> dict[str, Any]:
    traceback.print_exc()
    return {"ok": False, "type": type(exc).__name__, "message": str(exc),
            "error": f"{type(exc).__name__}: {exc}"}


def _redirect(path: Path) -> None:
    """This rank's stdout and stderr (Python's and C's) to its own log."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
