"""The built-in tools that reach the swarm's model: `ask` (one chat completion) and
`vote` (a Symphony task: workers answer, the answer settles by vote).

Both are typed tools (tool.py) over what the daemon hands the Tools service, as it hands
it the memory's `Recall`: `ask` the inference face of the model this peer serves
(`ModelSlot.face`), `vote` Symphony's `run_task`. The daemon offers them on a peer that
serves a model. A model that is not ready, a swarm that cannot serve, or a task nobody
answered is the tool's refusal in words (`ToolError`), an observation for a planner.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from peerd.agents.record import TaskRecord, TaskSpec
from peerd.agents.requester import NoWorkers
from peerd.inference.face import LanguageModel, ModelUnavailable, Refused, SwarmUnavailable
from peerd.inference.options import SamplingParams
from peerd.plans.tool import Tool, ToolError, typed_tool
from protocols.beacon import MAX_WORKERS

MAX_PROMPT_CHARS = 4000
MAX_ASK_TOKENS = 512  # a tool's answer: a planner step reads it in an observation
MAX_VOTE_QUESTION_CHARS = 2000
VOTE_DEADLINE_S = 20.0  # each worker's, within a tool call's deadline (30 s by default)
VOTE_TOKENS = 256  # each worker's chain

RunTask = Callable[[TaskSpec], Awaitable[TaskRecord]]


class AskArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS,
                        description="The question or instruction for the model")
    max_tokens: int = Field(default=128, ge=1, le=MAX_ASK_TOKENS,
                            description="Answer in at most this many tokens")


class AskResult(BaseModel):
    text: str
    tokens: int = Field(description="Tokens the answer took")


class VoteArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: str = Field(min_length=1, max_length=MAX_VOTE_QUESTION_CHARS)
    workers: int = Field(default=3, ge=1, le=MAX_WORKERS,
                         description="Peers that answer and vote")
    answer_format: Literal["number", "choice", "text"] = Field(
        default="text", description="How answers are compared")


class Ballot(BaseModel):
    peer_id: str
    answer: str | None
    confidence: float
    weight: float


class VoteResult(BaseModel):
    answer: str | None = Field(description="The settled answer (null: none settled)")
    votes: list[Ballot]


def ask(model: Callable[[], LanguageModel], capacity: int = 2) -> Tool:
    async def run(args: AskArgs) -> AskResult:
        try:
            done = await model().chat([{"role": "user", "content": args.prompt}],
                                      SamplingParams(max_tokens=args.max_tokens))
        except (ModelUnavailable, SwarmUnavailable, Refused) as exc:
            raise ToolError(f"the model cannot answer now: {exc}") from None
        return AskResult(text=done.text, tokens=done.stats.completion_tokens)

    return typed_tool("ask", "Ask the swarm's language model; its answer as text.", run,
                      capacity=capacity)


def vote(run_task: RunTask, capacity: int = 1) -> Tool:
    async def run(args: VoteArgs) -> VoteResult:
        spec = TaskSpec(question=args.question, workers=args.workers,
                        answer_format=args.answer_format, deadline_s=VOTE_DEADLINE_S,
                        max_tokens=VOTE_TOKENS)
        try:
            record = await run_task(spec)
        except NoWorkers as exc:
            raise ToolError(f"no vote: {exc}") from None
        if record.status == "failed":
            raise ToolError(f"the vote failed: {record.error or 'no answer settled'}")
        return VoteResult(answer=record.answer, votes=[
            Ballot(peer_id=v.peer_id, answer=v.answer, confidence=round(v.confidence, 4),
                   weight=round(v.weight, 6)) for v in sorted(record.votes,
                                                              key=lambda v: v.seat)])

    return typed_tool("vote", "Put a question to several peers' models (a Symphony task): "
                      "the answer their votes settle on, and the votes.", run,
                      capacity=capacity)
