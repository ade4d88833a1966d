"""THE one place memory items go into a prompt.

Without memory the chat is the user's prompt alone, exactly what a run without SEDM
sends, so the no-memory arm of a replay is the plain task. With memory the items
come first in the same user message, as a note, in the order given, each after a
blank line, then the prompt after a blank line:

    user: "Notes that helped on similar tasks:\\n\\n<item 1>\\n\\n<item 2>\\n\\n<prompt>"

Why in the user message rather than as a system message or as prior chat turns: the
arms of an A/B replay then differ by the note's text alone (the template's own default
system prompt, SmolLM2's for one, stays in both, where a system note would replace
it); every chat template takes it (some refuse a system role); and an item is not
always a question and its answer (a rule, a correction, an insight), while a worked
example written "Q: ...\\nA: ..." still reads as one in a note.

SCECs record the item texts, not this layout: replays depend on it byte for byte, so
changing it changes every replay's prompt and makes recorded outputs stale as
references.
"""

from __future__ import annotations

from collections.abc import Sequence

from peerd.inference.face import Message

NOTE_HEADER = "Notes that helped on similar tasks:"


def messages(prompt: str, memory: Sequence[str]) -> list[Message]:
    """The chat for `prompt` given the item texts `memory`, in that order."""
    return [{"role": "user", "content": with_notes(prompt, memory)}]


def with_notes(prompt: str, memory: Sequence[str]) -> str:
    """The user message `prompt` with the item texts `memory` before it (the prompt
    alone without memory). The OpenAI API's `memory` option writes the last user
    message of a chat so, and a plain completion's prompt."""
    if not memory:
        return prompt
    return "\n\n".join([NOTE_HEADER, *(text.strip() for text in memory), prompt])
