"""THE one place memory items go into a prompt.

Without memory the chat is the user's prompt alone, exactly what a run without SEDM
sends (so the no-memory arm of a replay is the plain task, and the model's template
adds its own default system prompt, as SmolLM2's does). With memory the items come
first as one system note, in the order given, each after a blank line:

    system: "Notes that helped on similar tasks:\\n\\n<item 1>\\n\\n<item 2>"
    user:   "<prompt>"

A system note rather than prior chat turns, because an item is not always a question
and its answer (a rule, a correction, an insight): a 135M instruct model reads a
short note before the question as context, and a worked example written as
"Q: ...\\nA: ..." in it still reads as one. SCECs record the item texts, not this
layout: replays depend on it byte for byte, so changing it changes every replay's
prompt (and invalidates recorded outputs as references).
"""

from __future__ import annotations

from collections.abc import Sequence

from peerd.inference.face import Message

NOTE_HEADER = "Notes that helped on similar tasks:"


def messages(prompt: str, memory: Sequence[str]) -> list[Message]:
    """The chat for `prompt` given the item texts `memory`, in that order."""
    chat: list[Message] = []
    if memory:
        note = "\n\n".join([NOTE_HEADER, *(text.strip() for text in memory)])
        chat.append({"role": "system", "content": note})
    chat.append({"role": "user", "content": prompt})
    return chat
