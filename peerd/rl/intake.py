"""The trainer's rule on the shape of a group a sampler sends, pure.

Before a group is scored and offered to the buffer it must be what the trainer asked
for: `size` completions of one prompt, all of one version no newer than the
trainer's, each made by the sampler that delivered it, each on the trainer's own
tokenisation of the slot's prompt, 1..`max_tokens` completion tokens with one
behaviour log-prob each. Anything else is "malformed": the slot goes out again and
the sampler is told why (trainer.py). The signatures were checked before this
(protocols/rollout.py); what is checked here is what a signature cannot vouch for.
"""

from __future__ import annotations

from collections.abc import Sequence

from peerd.rl.types import Rollout


def group_fault(rollouts: Sequence[Rollout], *, peer: str, size: int, max_tokens: int,
                version: int, prompt_ids: Sequence[int]) -> str:
    """Why `rollouts`, delivered by `peer` for one slot, are not a group the trainer
    at `version` can take (a sentence), or "" when they are."""
    if len(rollouts) != size:
        return f"{len(rollouts)} completions for a group of {size}"
    versions = {r.version for r in rollouts}
    if len(versions) != 1:
        return "one group, several versions"
    (made_at,) = versions
    if made_at > version:
        return f"version {made_at} is newer than the trainer's {version}"
    want = list(prompt_ids)
    for r in rollouts:
        if r.sampler != peer:
            return f"a rollout of {r.sampler[:16]} relayed by {peer[:16]}"
        if list(r.prompt_ids) != want:
            return "prompt ids are not the trainer's tokenisation of the prompt"
        if not r.completion_ids or len(r.completion_ids) > max_tokens:
            return f"{len(r.completion_ids)} completion tokens (1..{max_tokens})"
        if len(r.behaviour_logprobs) != len(r.completion_ids):
            return "one behaviour log-prob a token is required"
    return ""
