"""A daemon's model slot and the options it was started with (what a request may ask
for is in options.py).

Light on purpose: the daemon and the API import this whether or not the peer serves
a model; torch and transformers load only when a model does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from peerd.inference.options import SpeculativeOptions

if TYPE_CHECKING:
    from peerd.inference.runtime import ModelRuntime
    from peerd.node import Node

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ShardLimits:
    max_sessions: int = 32
    max_kv_bytes: int = 2 * 2**30  # KV reserved for all sessions' max_length together
    max_length: int = 8192  # positions one session may reach
    session_ttl_s: float = 300.0  # a session idle this long is closed


@dataclass(frozen=True, slots=True)
class ModelOptions:
    spec: str
    layers: tuple[int, int] | None = None
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    torch_threads: int = 0  # 0: torch's default
    limits: ShardLimits = field(default_factory=ShardLimits)
    speculative: SpeculativeOptions = field(default_factory=SpeculativeOptions)
    prompt_cache: bool = False  # API requests reuse a pooled session's prompt prefix


class ModelSlot:
    """A daemon's model slot: none, loading, ready or failed. The API reads it."""

    def __init__(self, options: ModelOptions | None) -> None:
        self.options = options
        self.state = "none" if options is None else "loading"
        self.phase = ""
        self.error = ""
        self.runtime: ModelRuntime | None = None

    async def load(self, node: Node, progress: Progress = lambda phase: None) -> None:
        """Load the model; on failure record why and keep the peer running."""
        assert self.options is not None

        def step(phase: str) -> None:
            self.phase = phase
            progress(phase)

        try:
            from peerd.inference.runtime import ModelRuntime  # torch: only when needed

            self.runtime = await ModelRuntime.start(node, self.options, step)
            self.state = "ready"
        except Exception as exc:
            log.exception("loading %s failed", self.options.spec)
            self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
            node.events.publish("model.failed", spec=self.options.spec, error=self.error)
            return
        node.events.publish("model.ready", model_id=self.runtime.model_id,
                            layers=[self.runtime.block.start, self.runtime.block.end])

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state}
        if self.options is not None:
            out["spec"] = self.options.spec
            out["speculative"] = self.options.speculative.to_json()
            out["prompt_cache"] = self.options.prompt_cache
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
