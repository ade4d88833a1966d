"""What a training run is asked to do (`peerd rl train`, `POST /v1/rl/runs`).

Torch-free: the CLI builds a `RunSpec` from its flags, the API from a JSON body, and
both get the same checks and the same messages. `RunSpec.parse` names the bad field.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any

MODES = ("sync", "async")
UPDATES = ("full", "lora")
AGGREGATIONS = ("token", "seq-mean", "dr-grpo")
RUN_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
MAX_GROUP = 64
MAX_BATCH = 256  # prompts a step
MAX_STEPS = 1_000_000
MAX_STALENESS = 64
MAX_NEW_TOKENS = 2048
MAX_MEMORY_SCECS = 100_000
MAX_RANKS = 8  # learner processes on one machine (torchrun)


class SpecError(ValueError):
    """A run's setting is out of range; the message names it and says what is allowed."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name


@dataclass(frozen=True, slots=True)
class RunSpec:
    model: str  # the SPEC of the policy: the samplers must serve the same model id
    task: str = "add"  # add | gsm8k | FILE.jsonl
    mode: str = "sync"
    samplers: int = 0  # 0: every sampler found ("auto"); N: wait for N
    group: int = 4  # completions per prompt (G)
    batch: int = 8  # prompts per step
    steps: int = 20
    staleness: int = 1  # async: trainer version - rollout version <= S at training time
    update: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lr: float = 1e-5
    kl: float = 0.0  # k3 to the reference policy; 0 keeps no reference
    # learner processes: 1 trains in the peer's own process; N > 1 starts N under
    # torchrun (DDP: gloo on CPU, NCCL on CUDA) and talks to rank 0 (ranks.py)
    ranks: int = 1
    clip_eps: float = 0.2
    is_cap: float = 2.0  # truncated importance weight of an off-policy token
    aggregation: str = "token"  # token | seq-mean | dr-grpo (Dr.GRPO also skips std)
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    seed: int = 0
    run_id: str = ""  # default: set by the service
    out: str = ""  # run dir; default <data dir>/rl/<run id>
    resume: bool = False
    checkpoint_every: int = 5  # steps; the last step is always saved
    sampler_timeout_s: float = 120.0  # a sampler's answer to one request
    sampler_wait_s: float = 300.0  # the run fails after this long without a sampler
    # mean |behaviour - trainer| log-prob a token allowed to a sampler computing in
    # float32 (honest ones deviate by about 2e-5), and in bfloat16 or float16 (honest
    # ones by up to about 0.08): bench/README.md, "Echo", the sampler check
    verify_tolerance: float = 1e-3
    verify_tolerance_half: float = 0.15
    verify_old: int = 1  # groups of older versions re-scored a step (async), a sample
    # on a peer with the memory: SCECs the run keeps there as admission tasks, one per
    # trained group (its first rollout), at most this many a run; 0: none
    memory_scecs: int = 256

    @classmethod
    def parse(cls, body: Any) -> RunSpec:
        """From a JSON object; SpecError names the first bad field."""
        if not isinstance(body, dict):
            raise SpecError("body", "must be a JSON object")
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - set(known))
        if unknown:
            raise SpecError(unknown[0], f"unknown setting; known: {', '.join(sorted(known))}")
        values: dict[str, Any] = {}
        for name, value in body.items():
            default: Any = known[name].default
            if isinstance(default, bool):
                if not isinstance(value, bool):
                    raise SpecError(name, "must be true or false")
            elif isinstance(default, int):
                if isinstance(value, bool) or not isinstance(value, int):
                    raise SpecError(name, "must be an integer")
                if abs(value) >= 2**62:
                    raise SpecError(name, f"{value} is out of range")
            elif isinstance(default, float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise SpecError(name, "must be a number")
                try:
                    value = float(value)
                except OverflowError:
                    raise SpecError(name, f"{value} is out of range") from None
            elif not isinstance(value, str):
                raise SpecError(name, "must be a string")
            values[name] = value
        if "model" not in values:
            raise SpecError("model", "is required (the SPEC the samplers serve, e.g. smollm2)")
        spec = cls(**values)
        spec.check()
        return spec

    def check(self) -> None:
        def within(name: str, lo: float, hi: float) -> None:
            v = getattr(self, name)
            if not (math.isfinite(v) and lo <= v <= hi):
                raise SpecError(name, f"{v} is outside [{lo}, {hi}]")

        if not self.model.strip():
            raise SpecError("model", "is empty")
        if not self.task.strip():
            raise SpecError("task", "is empty (add, gsm8k or FILE.jsonl)")
        if self.mode not in MODES:
            raise SpecError("mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        if self.update not in UPDATES:
            raise SpecError("update", f"{self.update!r} is not one of {', '.join(UPDATES)}")
        if self.aggregation not in AGGREGATIONS:
            raise SpecError("aggregation", f"{self.aggregation!r} is not one of "
                            f"{', '.join(AGGREGATIONS)}")
        within("samplers", 0, 1024)
        within("group", 2, MAX_GROUP)  # one completion has no group to compare with
        within("batch", 1, MAX_BATCH)
        within("steps", 1, MAX_STEPS)
        within("staleness", 0, MAX_STALENESS)
        within("lora_rank", 1, 256)
        within("lora_alpha", 1e-3, 1e4)
        within("lr", 0.0, 1.0)
        within("kl", 0.0, 100.0)
        within("clip_eps", 0.0, 10.0)
        within("is_cap", 1.0, 1e6)
        within("temperature", 0.05, 2.0)  # sampling: a greedy group has nothing to learn
        within("top_p", 1e-3, 1.0)
        within("max_tokens", 1, MAX_NEW_TOKENS)
        within("seed", 0, 2**62)
        within("checkpoint_every", 1, MAX_STEPS)
        within("sampler_timeout_s", 1.0, 3600.0)
        within("sampler_wait_s", 1.0, 86400.0)
        within("verify_tolerance", 0.0, 10.0)
        within("verify_tolerance_half", 0.0, 10.0)
        within("verify_old", 0, MAX_BATCH)
        within("memory_scecs", 0, MAX_MEMORY_SCECS)
        within("ranks", 1, MAX_RANKS)
        if self.ranks > self.group:  # a step may train a single group: a row a rank
            raise SpecError("ranks", f"{self.ranks} ranks need groups of at least as many "
                            f"completions (group is {self.group}): every rank trains its "
                            "own rows of a step's batch")
        if self.run_id and not RUN_ID.match(self.run_id):
            raise SpecError("run_id", "1-64 characters of letters, digits, '.', '_', '-'")
        if "\0" in self.out:  # no path holds one: the run dir's mkdir raised ValueError
            raise SpecError("out", "a path cannot hold a NUL character")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
