"""The tools every peer can offer: `calculator`, `read_file`, `memory_search`; and, on a
peer that serves a model, `ask` and `vote` (asking.py).

Each is a typed tool (tool.py): its schemas come from the models below. Which ones a
peer offers, and at what capacity, is its config (`tools`, `tools_dir`; see
`offered`). The calculator is Symphony's (agents/calculator.py), not a copy; read_file
reads only inside the tools directory (reading.py); memory_search is the peer's SEDM
memory's recall, reached through `Recall` (api/recall.py) as Symphony reaches it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import trio
from pydantic import BaseModel, ConfigDict, Field

from peerd.agents.calculator import MAX_EXPRESSION_CHARS, evaluate
from peerd.api.recall import Recall
from peerd.inference.face import LanguageModel, ModelUnavailable
from peerd.plans.asking import RunTask, ask, vote
from peerd.plans.reading import MAX_PATH_CHARS, MAX_RETURN_BYTES, ReadRefused, read_inside
from peerd.plans.tool import Tool, ToolError, typed_tool
from protocols.memory import DOMAIN

# name -> calls at once by default (`tools = ["calculator:16"]` sets another)
DEFAULT_CAPACITY = {"calculator": 16, "read_file": 4, "memory_search": 4, "ask": 2,
                    "vote": 1}
BUILTINS = tuple(DEFAULT_CAPACITY)
MAX_QUERY_CHARS = 2000
MAX_NOTES = 20


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")  # an unknown argument is a caller's mistake


class CalculatorArgs(_Closed):
    expression: str = Field(min_length=1, max_length=MAX_EXPRESSION_CHARS,
                            description="Plain arithmetic: numbers, + - * /, parentheses")


class CalculatorResult(BaseModel):
    value: str = Field(description="The exact value, rounded to 6 decimals")


class ReadFileArgs(_Closed):
    path: str = Field(min_length=1, max_length=MAX_PATH_CHARS,
                      description="Relative to the peer's tools directory")
    max_bytes: int = Field(default=16 * 1024, ge=1, le=MAX_RETURN_BYTES,
                           description="Return at most this many bytes of the file")


class ReadFileResult(BaseModel):
    path: str
    size: int = Field(description="The whole file's size in bytes")
    text: str = Field(description="Its first max_bytes as UTF-8 (bad bytes replaced)")
    truncated: bool


class MemorySearchArgs(_Closed):
    query: str = Field(min_length=1, max_length=MAX_QUERY_CHARS)
    k: int = Field(default=3, ge=1, le=MAX_NOTES, description="At most this many notes")
    domain: str | None = Field(default=None, pattern=f"^{DOMAIN.pattern}$",
                               description="Only notes of this domain")


class Note(BaseModel):
    id: str
    text: str
    domain: str
    score: float = Field(description="similarity x learned weight: what ranked it")


class MemorySearchResult(BaseModel):
    notes: list[Note]


def calculator(capacity: int = DEFAULT_CAPACITY["calculator"]) -> Tool:
    async def calculate(args: CalculatorArgs) -> CalculatorResult:
        value = evaluate(args.expression)
        if value is None:
            raise ToolError(f"{args.expression!r} is not plain arithmetic the calculator can "
                            "compute exactly (numbers, + - * /, parentheses; no division by "
                            "zero; magnitudes up to 10^12)")
        return CalculatorResult(value=value)

    return typed_tool("calculator", "Exact arithmetic on one expression.", calculate,
                      capacity=capacity)


def read_file(root: Path, capacity: int = DEFAULT_CAPACITY["read_file"]) -> Tool:
    async def read(args: ReadFileArgs) -> ReadFileResult:
        try:
            # a read past the deadline is left to finish in its thread (trio-stubs are older)
            got = await trio.to_thread.run_sync(read_inside, root, args.path,  # type: ignore[call-arg]
                                                args.max_bytes, abandon_on_cancel=True)
        except ReadRefused as exc:
            raise ToolError(str(exc)) from None
        return ReadFileResult(path=got.path, size=got.size, text=got.text,
                              truncated=got.truncated)

    return typed_tool("read_file", "Read a text file inside this peer's tools directory.",
                      read, capacity=capacity)


def memory_search(recall: Callable[[], Recall | None],
                  capacity: int = DEFAULT_CAPACITY["memory_search"]) -> Tool:
    """`recall()` is the peer's memory when it has one (the daemon hands it over after
    the services are built)."""

    async def search(args: MemorySearchArgs) -> MemorySearchResult:
        memory = recall()
        if memory is None:
            raise ToolError("this peer keeps no memory to search")
        try:
            notes = await memory.notes(args.query, args.k, args.domain)
        except ModelUnavailable as exc:
            raise ToolError(f"the memory is not ready: {exc}") from None
        return MemorySearchResult(notes=[
            Note(id=n.id, text=n.text, domain=n.domain, score=n.score) for n in notes])

    return typed_tool("memory_search", "The notes this peer's memory (SEDM) holds for a "
                      "query, best first.", search, capacity=capacity)


def offered(names: Sequence[tuple[str, int | None]], tools_dir: Path | None,
            recall: Callable[[], Recall | None], *,
            model: Callable[[], LanguageModel] | None = None,
            run_task: RunTask | None = None) -> list[Tool]:
    """The built-ins a peer's config names, as (name, capacity or None for the default).
    read_file is left out without a tools directory, ask without a model to ask, vote
    without Symphony to run its task (the config refuses naming them then)."""
    out: list[Tool] = []
    for name, capacity in names:
        cap = capacity or DEFAULT_CAPACITY[name]
        if name == "calculator":
            out.append(calculator(cap))
        elif name == "memory_search":
            out.append(memory_search(recall, cap))
        elif name == "read_file" and tools_dir is not None:
            out.append(read_file(tools_dir, cap))
        elif name == "ask" and model is not None:
            out.append(ask(model, cap))
        elif name == "vote" and run_task is not None:
            out.append(vote(run_task, cap))
    return out
