"""`peerd memory learn`: the memory learning from scored runs of a task.

Each run asks this peer's model one training question of the task (peerd/rl/tasks.py:
`add`, `gsm8k`, a JSONL file) with what the memory gives it, scores the answer, keeps
the run as an SCEC and offers what it teaches (distill.py: a worked example when it
passed, a correction when it failed) to the admission desk, waiting for the verdict
before the next run: the memory the next run gets is the one the verdict left. Every
`control_every`-th run goes without memory, to keep the domain's no-memory baseline
current (an item's measured use is its score against that baseline).
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from peerd.inference.options import SamplingParams
from peerd.memory.distill import distill
from peerd.memory.scec import Task
from peerd.memory.scec import scec_hash as hash_of
from protocols.memory import DOMAIN

if TYPE_CHECKING:
    from peerd.memory.service import Memory

MAX_RUNS = 10_000


class SpecError(ValueError):
    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


@dataclass(frozen=True, slots=True)
class LearnSpec:
    task: str = "add"  # add, add:LO-HI, gsm8k or FILE.jsonl (peerd/rl/tasks.py)
    n: int = 20  # scored runs
    seed: int = 0  # which training questions
    k: int | None = None  # items a run is given (the controller's top_k)
    max_tokens: int = 64
    control_every: int = 5  # every this many runs, one without memory (0: never)
    domain: str = ""  # the items' domain (default: from the task)

    @classmethod
    def parse(cls, body: dict[str, Any]) -> LearnSpec:
        known = {f.name for f in fields(cls)}
        for name in body:
            if name not in known:
                raise SpecError(name, f"unknown setting (known: {', '.join(sorted(known))})")
        spec = cls(**body)
        for name, lo, hi in (("n", 1, MAX_RUNS), ("seed", 0, 2**62), ("max_tokens", 1, 1024),
                             ("control_every", 0, MAX_RUNS)):
            value = getattr(spec, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise SpecError(name, f"an integer in {lo}..{hi}")
        if spec.k is not None and (not isinstance(spec.k, int) or isinstance(spec.k, bool)
                                   or not 0 <= spec.k <= 32):
            raise SpecError("k", "an integer in 0..32")
        if not isinstance(spec.task, str) or not spec.task:
            raise SpecError("task", "add, add:LO-HI, gsm8k or a path to a .jsonl file")
        if not isinstance(spec.domain, str) or (spec.domain and not DOMAIN.fullmatch(
                spec.domain)):
            raise SpecError("domain", "1-32 of a-z 0-9 . _ -")
        return spec


def domain_of(task_name: str) -> str:
    """The memory domain of a task: arithmetic for add, gsm8k, a file's stem."""
    if task_name == "add" or task_name.startswith("add:"):
        return "arithmetic"
    name = re.sub(r"[^a-z0-9._-]+", "-", task_name.lower()).strip("-._")[:32]
    return name or "general"


@dataclass
class LearnJob:
    spec: LearnSpec
    domain: str
    state: str = "running"  # running, done, failed, stopped
    runs: int = 0
    passed: int = 0  # runs the scorer passed
    with_memory: int = 0  # runs given at least one item
    proposed: int = 0
    admitted: int = 0
    refused: dict[str, int] = field(default_factory=dict)  # by reason
    error: str = ""
    started: float = field(default_factory=time.time)
    ended: float = 0.0
    stopping: bool = False  # asked to stop after the run in hand

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["spec"] = asdict(self.spec)
        return out


async def learn(memory: Memory, job: LearnJob) -> None:
    """Run the job's scored runs; the job records the counts as they go."""
    from peerd.rl.tasks import load_task

    spec = job.spec
    task = load_task(spec.task, seed=spec.seed)
    params = SamplingParams(max_tokens=spec.max_tokens)
    for i in range(spec.n):
        if job.stopping:
            break
        problem = task.problem(i)
        t = Task(prompt=problem.prompt, answer=problem.answer, scorer="number",
                 domain=job.domain)
        control = spec.control_every > 0 and i % spec.control_every == 0
        outcome, scec, given = await memory.solve(t, k=spec.k, memory=not control,
                                                  params=params)
        job.runs += 1
        job.passed += outcome.score >= 1.0
        job.with_memory += bool(given)
        for candidate in distill(t.prompt, outcome.output, t.answer, outcome.score):
            job.proposed += 1
            c = await memory.propose(candidate.text, job.domain, candidate.kind,
                                     origin=hash_of(scec))
            await c.done.wait()
            if c.state == "admitted":
                job.admitted += 1
            else:
                job.refused[c.reason] = job.refused.get(c.reason, 0) + 1
        memory.node.events.publish("memory.learn", **job.to_json())
