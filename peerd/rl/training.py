"""RL training runs as a service: `POST /v1/rl/runs` on a trainer peer.

A run loads its own copy of the policy (learner.py: transformers, full or LoRA),
finds the samplers in the ledger (samplers.py), and trains by GRPO (trainer.py),
publishing each new version through the weights service (weights.py) for the
samplers to pull. Its dir holds the checkpoints, `metrics.jsonl` (a line a step),
`run.json` (the settings) and, at the end, `summary.json` and `reward.png`. Progress
goes to `/events` (`rl.*`) and `/metrics`. An ended run lets go of its policy (the
model, the optimiser state); its counts stay, for the newest KEEP_ENDED ended runs.

In async mode the samplers push their rollouts (`/peerd/rollout-push/1.0.0`): this
service serves the push for every run and hands each push to its run's trainer. A push
for no run going here, or from a peer that holds no order of it, is refused before any
of its rollouts is read (`_expects`).

A trainer peer needs no model of its own (`peerd start` without --model will do): the
learner is separate from any model it serves.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio
from trio_typing import TaskStatus  # trio-stubs (with libp2p) lack trio.TaskStatus

from peerd.api.recall import ScoredRuns
from peerd.api.rl import RunRefused, routes
from peerd.ledger.gossip import LedgerGossip
from peerd.node import Node
from peerd.proven import AGAIN_BAN_S, ProofFile
from peerd.rl.metrics import TrainingCollector
from peerd.rl.rollouts import serve_pushes
from peerd.rl.run import RunSpec
from peerd.rl.types import Rollout
from peerd.rl.weights import WeightStore
from peerd.service import Service

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from peerd.rl.trainer import Trainer

log = logging.getLogger(__name__)

ENDED = ("done", "failed", "stopped")
KEEP_ENDED = 16  # ended runs whose summaries GET /v1/rl/runs still shows
LIARS_FILE = "liars.json"  # in the data dir's rl/: samplers caught lying to our runs


class Run:
    """One run on this peer: its settings, its dir, its trainer once started."""

    def __init__(self, spec: RunSpec, run_dir: Path) -> None:
        self.spec = spec
        self.dir = run_dir
        self.state = "starting"
        self.phase = "loading the policy"
        self.error = ""
        self.started = time.time()
        self.trainer: Trainer | None = None
        self.plot = ""
        self.ended = trio.Event()
        self.stopping = False

    def stop(self) -> None:
        """Stop after the step in hand; a run still loading stops before it trains."""
        self.stopping = True
        if self.trainer is not None:
            self.trainer.stop()

    def fail(self, message: str) -> None:
        self.state, self.error = "failed", message

    def to_json(self) -> dict[str, Any]:
        if self.trainer is not None:
            out = self.trainer.to_json()
        else:
            out = {"step": 0, "version": 0, "samples": 0, "samples_per_s": 0.0,
                   "elapsed_s": round(time.time() - self.started, 2), "refused": {},
                   "staleness": {}, "skipped_groups": 0, "trainer_idle_s": 0.0,
                   "admitted": 0, "last": {}, "samplers": [], "dropped": {}}
        if self.state in ENDED or self.trainer is None:
            out["state"] = self.state
        elif out["state"] in ENDED:  # trained, but the summary and plot are still being
            out["state"] = "finishing"  # written: the run has not ended (nor its turn)
        out.update(id=self.spec.run_id, spec=self.spec.to_json(), dir=str(self.dir),
                   metrics=str(self.dir / "metrics.jsonl"), plot=self.plot,
                   phase=self.phase if out["state"] == "starting" else "")
        if self.error:
            out["error"] = self.error
        return out


class Training(Service):
    name = "rl"

    def __init__(self, node: Node, ledger: LedgerGossip, weights: WeightStore,
                 data_dir: Path, *, torch_threads: int = 0) -> None:
        self.node = node
        self.torch_threads = torch_threads  # the learner's (0: torch's default)
        self.ledger = ledger
        self.weights = weights
        self.root = data_dir / "rl"
        # samplers our runs caught lying, asked by no run for a day (peerd/proven.py)
        self.liars = ProofFile(self.root / LIARS_FILE, first_s=AGAIN_BAN_S)
        self.runs: dict[str, Run] = {}  # the one going, and the newest that ended
        self._starting: str | None = None  # the run id of a start in progress
        # the peer's memory, which keeps a run's groups as SCECs (scecs.py; the daemon
        # hands it over)
        self.scored: ScoredRuns | None = None
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        serve_pushes(self.node, self._pushed, expects=self._expects)
        self.node.metrics.registry.register(TrainingCollector(self))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    def _expects(self, peer: str, run_id: str) -> str | None:
        """Why a push from `peer` for `run_id` is refused unread, or None: the cheap
        checks, before its rollouts are verified (a late push of an order that timed
        out is honest: refused, not an offence, as the trainer refuses it)."""
        run = self.runs.get(run_id)
        if run is None or run.trainer is None or run.state in ENDED:
            return "no_such_run"
        order = run.trainer.orders.get(peer)
        if order is None or order.done.is_set():
            run.trainer.progress.refused["unasked"] += 1
            return "unasked"
        return None

    def _pushed(self, peer: str, rollouts: list[Rollout]) -> dict[str, int]:
        """Rollouts pushed by a sampler (async mode), to the run they are for."""
        run = self.runs.get(rollouts[0].run_id)
        if run is None or run.trainer is None or run.state in ENDED:
            return {"no_such_run": len(rollouts)}
        return run.trainer.pushed(peer, rollouts)

    async def start_run(self, spec: RunSpec) -> Run:
        """Accept a run (RunRefused says why not) and start it in the background."""
        if self._nursery is None:
            raise RunRefused("the RL service is not running yet; try again shortly")
        run_id = spec.run_id or (Path(spec.out).name if spec.out and spec.resume else "")
        run_id = run_id or f"run-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        going = self._starting or next(
            (r.spec.run_id for r in self.runs.values() if r.state not in ENDED), None)
        if going is not None:  # one learner at a time: it is the whole machine's compute
            raise RunRefused(f"run {going!r} is still going on this peer; "
                             "one run at a time (see `peerd rl status`)")
        # the slot is taken before the first await: a second request arriving while
        # this one prepares its dir is refused, not started beside it
        self._starting = run_id
        try:
            run_dir = Path(spec.out) if spec.out else self.root / run_id
            spec = RunSpec(**{**spec.to_json(), "run_id": run_id, "out": str(run_dir)})
            await trio.to_thread.run_sync(_prepare_dir, run_dir, spec)
            run = Run(spec, run_dir)
            self.runs.pop(run_id, None)  # a run of that id that ended: now the newest
            self.runs[run_id] = run
            self._nursery.start_soon(self._go, run)
        finally:
            self._starting = None
        return run

    def _forget_ended(self) -> None:
        """Keep the newest KEEP_ENDED ended runs (their summaries), the oldest go."""
        ended = [rid for rid, r in self.runs.items() if r.state in ENDED]
        for rid in ended[:max(0, len(ended) - KEEP_ENDED)]:
            del self.runs[rid]

    async def _go(self, run: Run) -> None:
        try:
            # torch and transformers load only when a run starts, in a worker thread: a
            # first import takes seconds, which the event loop (and the API) must not
            session = await trio.to_thread.run_sync(_session_module)
            await session.run_training(self.node, self.ledger, self.weights, run,
                                       torch_threads=self.torch_threads, scored=self.scored,
                                       liars=self.liars)
            run.state = "done" if run.trainer is None or run.trainer.progress.state == "done" \
                else run.trainer.progress.state
        except trio.Cancelled:
            run.state = "stopped"
            raise
        except Exception as exc:
            log.exception("RL run %s failed", run.spec.run_id)
            cause = _leaf(exc)
            run.fail(f"{type(cause).__name__}: {cause}")
        finally:
            if run.trainer is not None:  # ended: the counts stay, the model goes
                run.trainer.release()
            run.ended.set()
            self._forget_ended()
            self.node.events.publish("rl.ended", run_id=run.spec.run_id, state=run.state,
                                     error=run.error)

    def routes(self) -> Sequence[BaseRoute]:
        return routes(self)

    def status(self) -> dict[str, Any]:
        return {"rl": {"runs": {rid: {"state": r.to_json()["state"],
                                      "step": r.to_json()["step"]}
                                for rid, r in self.runs.items()}}}


def _session_module() -> Any:
    from peerd.rl import session

    return session


def _prepare_dir(run_dir: Path, spec: RunSpec) -> None:
    """Make the run dir, or say why it cannot be; with resume, there must be a run."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".writable"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunRefused(f"cannot write the run dir {run_dir}: {exc.strerror or exc}; "
                         "pass --out DIR somewhere writable", "out") from None
    if spec.resume and not (run_dir / "checkpoints").is_dir():
        raise RunRefused(f"nothing to resume in {run_dir} (no checkpoints/); drop --resume "
                         "to start a new run", "resume")
    if not spec.resume and (run_dir / "checkpoints").is_dir():
        raise RunRefused(f"{run_dir} already holds a run; pass --resume to continue it, or "
                         "another --out/--run-id", "out")
    try:
        (run_dir / "run.json").write_text(json.dumps(spec.to_json(), indent=1))
    except OSError as exc:
        raise RunRefused(f"cannot write {run_dir / 'run.json'}: {exc.strerror or exc}",
                         "out") from None


def _leaf(exc: BaseException) -> BaseException:
    """The one exception inside nested groups of one (trio's nurseries wrap them)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
