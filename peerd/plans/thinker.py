"""Who writes the planner's steps: a `Thinker` turns a transcript into one step's text.

- `ModelThinker`: the swarm's model through the inference face (`complete`), over the
  model's chat template: a system message with the step format and the offered tools
  (name, description, inputSchema without its titles), the goal as the user's (after
  the memory's notes, prompting.py, for a plan that asked for them), each
  earlier step as the assistant's and the observations after it as the user's. Given a
  `make_constraint` (the grammar slice's: the tools -> a token constraint), every step is
  decoded under it, so it parses; without one the text is parsed (step.py) and a
  failure is an observation for the next step.
- `ScriptedThinker`: the steps of a test, in order (a string, or a function of the
  transcript), with the transcripts it saw kept for the test to read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from peerd.inference.face import LanguageModel, Message
from peerd.inference.options import SamplingParams
from peerd.inference.request import TokenConstraint
from peerd.memory.prompting import with_notes
from peerd.plans.planner import ToolSpecLike, Transcript
from peerd.plans.step import MAX_ANSWER_CHARS, MAX_CALLS, MAX_THOUGHT_CHARS

MakeConstraint = Callable[[LanguageModel, Sequence[ToolSpecLike]], TokenConstraint]


@dataclass(frozen=True, slots=True)
class StepText:
    text: str
    tokens: int  # tokens the step cost (the model's output)
    constrained: bool = False


class Thinker(Protocol):
    async def think(self, transcript: Transcript) -> StepText: ...


class ScriptedThinker:
    """The steps of a test, in order; past the script, an answer saying so."""

    def __init__(self, steps: Sequence[str | Callable[[Transcript], str]], *,
                 tokens: int = 10, delay_s: float = 0.0) -> None:
        self.steps = list(steps)
        self.tokens, self.delay_s = tokens, delay_s
        self.seen: list[Transcript] = []

    async def think(self, transcript: Transcript) -> StepText:
        self.seen.append(transcript)
        if self.delay_s:
            await trio.sleep(self.delay_s)
        i = len(self.seen) - 1
        if i >= len(self.steps):
            return StepText('{"thought": "the script ended", "answer": ""}', self.tokens)
        step = self.steps[i]
        return StepText(step if isinstance(step, str) else step(transcript), self.tokens)


SYSTEM = f"""You plan with tools. At each step write ONE JSON object and nothing else:
{{"thought": "<why, at most {MAX_THOUGHT_CHARS} characters>", "calls": [{{"tool": "<tool name>", \
"arguments": {{...}}}}]}}
to call 1 to {MAX_CALLS} tools at once (they run in parallel), or
{{"thought": "<why>", "answer": "<the final answer, at most {MAX_ANSWER_CHARS} characters>"}}
when you know the answer. The arguments must follow the tool's input schema. After your \
calls you get their results (observations); then write the next step.

Tools:
"""

EXAMPLE = ('Example: {"thought": "I need the sum", "calls": [{"tool": "calculator", '
           '"arguments": {"expression": "2 + 3"}}]}')


def compact_schema(schema: Any) -> Any:
    """The schema without what only people read (titles)."""
    if isinstance(schema, dict):
        return {k: compact_schema(v) for k, v in schema.items() if k != "title"}
    if isinstance(schema, list):
        return [compact_schema(v) for v in schema]
    return schema


def tool_lines(tools: Sequence[ToolSpecLike]) -> str:
    return "\n".join(
        f"- {t.name}: {t.description} Input schema: "
        f"{json.dumps(compact_schema(t.input_schema), separators=(',', ':'))}"
        for t in tools)


def messages_of(transcript: Transcript) -> list[Message]:
    """The chat a model sees for the next step."""
    system = SYSTEM + tool_lines(transcript.tools)
    if any(t.name == "calculator" for t in transcript.tools):
        system += "\n" + EXAMPLE
    out: list[Message] = [{"role": "system", "content": system},
                          {"role": "user", "content": with_notes(f"Goal: {transcript.goal}",
                                                                 transcript.notes)}]
    for turn in transcript.turns:
        if turn.step:
            out.append({"role": "assistant", "content": turn.step})
        if turn.observations:
            out.append({"role": "user", "content": "Observations:\n"
                        + "\n".join(turn.observations)})
    if transcript.running:
        note = ("Still running (their results come later): "
                + ", ".join(transcript.running))
        if out[-1]["role"] == "user":
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + note}
        else:
            out.append({"role": "user", "content": note})
    if out[-1]["role"] == "assistant":  # a chat template wants the user's turn last
        out.append({"role": "user", "content": "Write the next step."})
    return out


class ModelThinker:
    """The planner's steps from the swarm's model. `model()` is the inference face (it
    raises ModelUnavailable while there is none)."""

    def __init__(self, model: Callable[[], LanguageModel], *,
                 make_constraint: MakeConstraint | None = None,
                 temperature: float = 0.0) -> None:
        self.model = model
        self.make_constraint = make_constraint
        self.temperature = temperature

    async def think(self, transcript: Transcript) -> StepText:
        model = self.model()
        params = SamplingParams(max_tokens=max(1, transcript.max_tokens),
                                temperature=self.temperature)
        request = await model.prepare_chat(messages_of(transcript), params)
        constraint = None
        if self.make_constraint is not None:  # off the loop: a first vocabulary takes ~1 s
            # a plan cancelled meanwhile leaves at once; the thread's work is dropped
            constraint = await trio.to_thread.run_sync(  # type: ignore[call-arg]
                self.make_constraint, model, transcript.tools, abandon_on_cancel=True)
        done = await model.complete(request, constraint=constraint)
        return StepText(done.text, done.stats.completion_tokens,
                        constrained=self.make_constraint is not None)
