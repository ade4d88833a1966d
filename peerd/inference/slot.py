"""A daemon's model slot, the inference system's service, and the options it was
started with (what a request may ask for is in options.py).

The slot is none (the peer serves no model), loading, ready or failed. As a service
it loads the model in the background once started (the API answers 503 "still
loading" meanwhile), then owns the model's part of our ledger entry: the layers we
serve, the accelerator they run on and the shard sessions' load. It serves the
OpenAI-compatible `/v1` routes.

Light on purpose: the daemon and the API import this whether or not the peer serves
a model; torch and transformers load only when a model does.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from trio_typing import TaskStatus  # trio-stubs (with libp2p) lack trio.TaskStatus

from peerd import compute
from peerd.api.errors import ApiError
from peerd.api.openai import routes
from peerd.api.recall import Recall
from peerd.inference.face import LanguageModel, ModelUnavailable
from peerd.inference.options import SpeculativeOptions
from peerd.service import EntryFields, Service
from protocols.ledger import Load
from protocols.shard import FEATURE_SESSIONS

if TYPE_CHECKING:
    from starlette.routing import BaseRoute

    from peerd.inference.runtime import ModelRuntime
    from peerd.ledger.gossip import LedgerGossip
    from peerd.node import Node

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ShardLimits:
    max_sessions: int = 32
    max_kv_bytes: int = 2 * 2**30  # KV charged to all sessions together, as they grow
    max_length: int = 8192  # positions one session may reach
    session_ttl_s: float = 300.0  # a session idle this long is closed
    kv_headroom_positions: int = 128  # KV charged beyond what a session holds (lending.py)
    compute_quantum_positions: int = 32  # a peer's credit a round at the compute (turns.py)
    compute_turn_budget: int = 256  # the most positions x layers a turn computes


@dataclass(frozen=True, slots=True)
class ModelOptions:
    spec: str
    layers: tuple[int, int] | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    torch_threads: int = 0  # 0: torch's default
    limits: ShardLimits = field(default_factory=ShardLimits)
    speculative: SpeculativeOptions = field(default_factory=SpeculativeOptions)
    # API requests reuse a pooled session's prompt prefix; None: where it is safe (float32)
    prompt_cache: bool | None = None
    audit_rate: float = 0.0  # the share of requests whose route is audited (audit.py)


class ModelSlot(Service):
    """A daemon's model slot: none, loading, ready or failed. The API reads it."""

    name = "model"

    def __init__(self, node: Node, ledger: LedgerGossip, options: ModelOptions | None,
                 progress: Progress = lambda phase: None) -> None:
        self.node = node
        self.ledger = ledger
        self.options = options
        self.progress = progress
        self.state = "none" if options is None else "loading"
        self.phase = ""
        self.error = ""
        self.runtime: ModelRuntime | None = None
        self._face: LanguageModel | None = None
        self.settled = trio.Event()  # ready or failed (set at once when there is no model)
        # the peer's memory, for the API's `memory` option (the daemon hands it over)
        self.recall: Recall | None = None

    async def run(self, *, task_status: TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve at once; load the model (if any) in the background."""
        task_status.started()
        if self.options is None:
            self.settled.set()
            return
        try:
            await self.load()
        finally:
            self.settled.set()

    async def load(self) -> None:
        """Load the model; on failure record why and keep the peer running."""
        assert self.options is not None

        def step(phase: str) -> None:
            self.phase = phase
            self.progress(phase)

        try:
            # torch and transformers: only when needed, and imported off the event loop
            # (seconds during which the peer would neither gossip nor answer)
            await compute.run(importlib.import_module, "peerd.inference.runtime",
                              abandon_on_cancel=True)
            from peerd.inference.runtime import ModelRuntime

            self.runtime = await ModelRuntime.start(self.node, self.ledger.book, self.options,
                                                    step)
            self.state = "ready"
        except Exception as exc:
            log.exception("loading %s failed", self.options.spec)
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            self.node.events.publish("model.failed", spec=self.options.spec, error=self.error)
            return
        r = self.runtime
        self.ledger.republish()  # the layers we serve, at once
        step(f"serving layers [{r.block.start}, {r.block.end}) at {r.tokens_per_s:.1f} "
             "tokens/s")
        self.node.events.publish("model.ready", model_id=r.model_id,
                                 layers=[r.block.start, r.block.end])

    def face(self, model: str | None = None) -> LanguageModel:
        """The loaded model's typed face (face.py). ModelUnavailable, saying why, while
        there is none, or when `model` names another model than ours (its id or the
        SPEC we were started with)."""
        if self.state == "none":
            raise ModelUnavailable("none", "this peer serves no model; ask a peer started "
                                   "with --model, or restart this one with --model SPEC")
        if self.state == "loading":
            raise ModelUnavailable("loading", f"the model is still loading ({self.phase}); "
                                   "try again shortly")
        if self.state == "failed" or self.runtime is None:
            raise ModelUnavailable("failed", f"the model failed to load: {self.error}")
        assert self.options is not None
        if model is not None and model not in (self.runtime.model_id, self.options.spec):
            raise ModelUnavailable("other", f"model {model!r} is not served here; this peer "
                                   f"serves {self.runtime.model_id!r}")
        if self._face is None:
            from peerd.inference.served import ServedModel  # torch: only with a model

            self._face = ServedModel(self.runtime)
        return self._face

    def entry_fields(self) -> EntryFields:
        r = self.runtime
        if r is None:
            return {}
        turns = r.server.compute  # the queue: turns waited for, and the one held
        fields: EntryFields = {"models": (r.served,), "load": Load(
            sessions=len(r.server.sessions), queue=turns.waiting + int(turns.busy)),
            "features": (FEATURE_SESSIONS,)}
        if r.hardware is not None:
            fields["hardware"] = r.hardware
        return fields

    def routes(self) -> Sequence[BaseRoute]:
        return [*routes(self),
                Route("/routed-around/{peer_id}", self._forgive, methods=["DELETE"])]

    async def _forgive(self, request: Request) -> Response:
        """`peerd forgive`: our requests may take `peer_id` again (its ban, and any
        proofs of wrong output against it, forgotten)."""
        peer_id = request.path_params["peer_id"]
        if self.state == "loading":
            return ApiError(503, "the model is still loading: try again once `peerd status` "
                            "says it is ready", "service_unavailable").response()
        if self.runtime is None:
            return ApiError(409, "this peer serves no model: its requests route around "
                            "nobody", code="no_model").response()
        out = await self.runtime.generator.forgive(peer_id)
        if not out["was_routed_around"] and not out["proofs_forgotten"]:
            return ApiError(404, f"{peer_id!r:.120} is not routed around and was never "
                            "proven wrong here (see `peerd status`)", param="peer_id",
                            code="not_routed_around").response()
        return JSONResponse(out)

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.to_json()}
        if self.runtime is not None:
            out["lent"] = self.runtime.server.lent()  # who holds what of this peer
            # the peers our requests route around now, and why (a failure they caused)
            out["routed_around"] = self.runtime.generator.bans.listed(time.monotonic())
            out["audits"] = self.runtime.generator.audits.status()
        return out

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state}
        if self.options is not None:
            out["spec"] = self.options.spec
            out["speculative"] = self.options.speculative.to_json()
            cache = self.options.prompt_cache
            out["prompt_cache"] = "auto" if cache is None else cache
        if self.state == "loading":
            out["phase"] = self.phase
        if self.error:
            out["error"] = self.error
        if self.runtime is not None:
            r = self.runtime
            out.update(model_id=r.model_id, layers=[r.block.start, r.block.end],
                       num_layers=r.block.num_layers, device=str(r.block.device),
                       dtype=str(r.block.dtype).removeprefix("torch."),
                       tokens_per_s=round(r.tokens_per_s, 2), sessions=len(r.server.sessions),
                       # of our own requests' sessions, those idle for the next request
                       pooled_sessions=r.generator.pipeline.pooled)
        return out
