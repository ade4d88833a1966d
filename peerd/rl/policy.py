"""The peer's whole loaded model as a versioned policy: RL samplers generate with it,
the trainer's new versions are applied to it.

`LocalPolicy` is the VersionedWeights (versions.py: applied atomically, never while
held, LoRA deltas on the version-0 base) of a ShardBlock holding ALL the model's
layers and its Head; a peer serving a slice of the layers samples through a pipeline
(pipeline_policy.py). A generation holds the version from its first forward to its
last token (one generation at a time), so every token of a completion comes from one
version, the version stamped on it.

Shared weights: the ShardBlock is the same one the shard server serves to other
peers' pipeline sessions. Those sessions are not held: a version applied while one is
open changes the weights under it from its next step on. A peer that samples for an
RL run belongs to that run (the run owns its weights); whether it should still be
routed other peers' sessions is the router's decision, not this module's (a pipeline
sampler routes only through peers whose sessions hold their versions: shard_gate.py).

Behaviour log-probs: each completion token's log-probability under the distribution
it was actually drawn from: log softmax(logits / temperature), cut to the top-p
nucleus and renormalised when top_p < 1 (the nucleus rule of inference/sampling.py).
Temperature 0 is greedy: the argmax, and its log-probability at temperature 1 (the
distribution a temperature-1 trainer scores it under; a greedy rollout is for
evaluation, not for an importance ratio).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import trio

from peerd import compute
from peerd.inference.model.head import Head
from peerd.inference.model.shard import ShardBlock, ShardCache
from peerd.rl.versions import PolicyError, VersionedWeights

if TYPE_CHECKING:
    from peerd.inference.runtime import ModelRuntime

SEED_MASK = (1 << 63) - 1
# Rows (completions) decoded in one forward, at most: bounds a batch's KV cache and
# logits ([rows, vocab] float32) whatever the request's prompts x group.
MAX_ROWS = 64


class VersionMismatch(PolicyError):
    """A generation asked for a version this policy is not at (when it came to run)."""

    def __init__(self, have: int, want: int) -> None:
        super().__init__(f"the policy is at version {have}, not {want}")
        self.have = have
        self.want = want


class Completion(NamedTuple):
    """One sampled completion: its token ids and their behaviour log-probs."""

    ids: tuple[int, ...]
    logprobs: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Generation:
    """Completions of several prompts, all generated at `version`."""

    version: int
    groups: list[list[Completion]]  # groups[i]: the n completions of prompt i


class LocalPolicy(VersionedWeights):
    """This peer's whole model as a versioned policy (see the module docstring)."""

    block: ShardBlock
    head: Head

    def __init__(self, block: ShardBlock, head: Head, *, max_rows: int = MAX_ROWS) -> None:
        if block.start != 0 or block.end != block.num_layers:
            raise PolicyError(
                f"a sampler needs all {block.num_layers} layers of {block.model_id}; this "
                f"peer serves [{block.start}, {block.end}) (a peer with a slice of the "
                "layers samples through a pipeline: pipeline_policy.py)")
        if max_rows < 1:
            raise PolicyError(f"max_rows={max_rows}: a batch needs a row")
        super().__init__(block, head)
        self.max_rows = max_rows  # rows a forward, at most (batch_rows)
        self.generations = 0  # completed, for status
        self._lock = trio.Lock()  # one generation at a time, taken inside its hold

    @classmethod
    def from_runtime(cls, runtime: ModelRuntime) -> LocalPolicy:
        return cls(runtime.block, runtime.head)

    @property
    def vocab_size(self) -> int:
        return self.head.vocab_size

    # ---- generation ----------------------------------------------------------------------

    async def generate(self, prompt_ids: Sequence[int], *, n: int, temperature: float,
                       top_p: float, max_tokens: int, seed: int, eos_ids: Iterable[int]
                       ) -> list[Completion]:
        """`n` completions of one prompt at the current version."""
        out = await self.generate_many([prompt_ids], n=n, temperature=temperature,
                                       top_p=top_p, max_tokens=max_tokens, seed=seed,
                                       eos_ids=eos_ids)
        return out.groups[0]

    async def generate_many(self, prompts: Sequence[Sequence[int]], *, n: int,
                            temperature: float, top_p: float, max_tokens: int, seed: int,
                            eos_ids: Iterable[int], at_version: int | None = None,
                            seeds: Sequence[int] = ()) -> Generation:
        """`n` completions of each prompt, all at one version (held throughout). Prompts
        of one token length are decoded together (`batch_rows`: at most `max_rows` rows
        a forward), each prefilled once. The same seed (or `seeds`, one a prompt: see
        `prompt_streams`) and version give the same tokens, whatever the batches. With
        `at_version`, raises VersionMismatch unless the policy is at it when the
        generation starts."""
        check_generation(prompts, n, temperature, top_p, max_tokens, self.vocab_size)
        streams = prompt_streams(seed, seeds, len(prompts))
        eos = frozenset(eos_ids)
        async with self.hold() as version, self._lock:
            if at_version is not None and at_version != version:
                raise VersionMismatch(version, at_version)
            done: dict[tuple[int, int], Completion] = {}
            for rows in batch_rows([len(p) for p in prompts], n, self.max_rows):
                sampler = _Sampler(self, prompts, rows, temperature, top_p, max_tokens,
                                   streams, eos)
                await compute.run(sampler.prefill)
                while not sampler.done:
                    await compute.run(sampler.step)  # one token of every live row
                done.update(zip(rows, sampler.completions(), strict=True))
            self.generations += 1
            return Generation(version, [[done[i, g] for g in range(n)]
                                        for i in range(len(prompts))])


def batch_rows(lengths: Sequence[int], n: int, max_rows: int) -> list[list[tuple[int, int]]]:
    """The rows (prompt index, completion index) of a request of prompts of these token
    lengths, in batches decoded together: prompts of one length only (a batch shares
    its positions: the block takes no padding mask), whole groups of n while
    `max_rows` holds max_rows // n of them, else a group split in batches of
    `max_rows` rows (each prefills its prompt again). In order of first appearance."""
    by_length: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        by_length.setdefault(length, []).append(i)
    batches: list[list[tuple[int, int]]] = []
    for same in by_length.values():
        if n >= max_rows:
            batches += [[(i, g) for g in range(k, min(n, k + max_rows))]
                        for i in same for k in range(0, n, max_rows)]
        else:
            per = max_rows // n
            batches += [[(i, g) for i in same[k:k + per] for g in range(n)]
                        for k in range(0, len(same), per)]
    return batches


def check_generation(prompts: Sequence[Sequence[int]], n: int, temperature: float,
                     top_p: float, max_tokens: int, vocab: int) -> None:
    """PolicyError unless a generation's arguments are in range."""
    if n < 1 or max_tokens < 1 or not temperature >= 0.0 or not 0.0 < top_p <= 1.0:
        raise PolicyError(f"n={n}, max_tokens={max_tokens}, temperature={temperature}, "
                          f"top_p={top_p}: out of range")
    for ids in prompts:
        if not ids or not all(0 <= t < vocab for t in ids):
            raise PolicyError(f"a prompt of {len(ids)} token ids, empty or outside "
                              f"the vocabulary of {vocab}")


def prompt_streams(seed: int, seeds: Sequence[int], count: int) -> list[tuple[int, int]]:
    """Each of `count` prompts' (seed, index) for `completion_seed`: with `seeds` (one a
    prompt), prompt i draws as it would alone in a request with seed seeds[i] (index
    0), so how prompts are grouped into requests changes no token; else (seed, i)."""
    if seeds:
        if len(seeds) != count:
            raise PolicyError(f"{len(seeds)} seeds for {count} prompts")
        return [(s, 0) for s in seeds]
    return [(seed, i) for i in range(count)]


def completion_seed(seed: int, prompt_index: int, index: int) -> int:
    """The seed of completion `index` of prompt `prompt_index`: its own random stream,
    so its tokens do not depend on its batch (nor on rows that stopped before it)."""
    digest = hashlib.sha256(f"{seed}:{prompt_index}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & SEED_MASK


def choose(logits: torch.Tensor, temperature: float, top_p: float,
           gens: Sequence[torch.Generator]) -> tuple[list[int], list[float]]:
    """logits [B, V] -> a token per row and its behaviour log-prob (module docstring)."""
    if temperature == 0.0:
        lp = torch.log_softmax(logits.float(), dim=-1)  # [B, V]
        tokens = lp.argmax(dim=-1)  # [B]
    else:
        lp = torch.log_softmax(logits.float() / temperature, dim=-1)  # [B, V]
        if top_p < 1.0:
            lp = nucleus(lp, top_p)
        probs = lp.exp()  # [B, V]
        tokens = torch.cat([torch.multinomial(probs[b], 1, generator=g)
                            for b, g in enumerate(gens)])  # [B]
    chosen = lp.gather(1, tokens[:, None])[:, 0]  # [B]
    return tokens.tolist(), chosen.tolist()


def nucleus(lp: torch.Tensor, top_p: float) -> torch.Tensor:
    """log-probs [B, V] -> the smallest top-probability prefix whose mass reaches top_p
    (at least one token), renormalised; -inf elsewhere."""
    sorted_lp, order = torch.sort(lp, dim=-1, descending=True)  # [B, V], [B, V]
    sorted_p = sorted_lp.exp()
    keep = torch.cumsum(sorted_p, dim=-1) - sorted_p < top_p  # [B, V] bool
    kept = torch.where(keep, sorted_lp, torch.full_like(sorted_lp, float("-inf")))
    kept = kept - torch.logsumexp(kept, dim=-1, keepdim=True)  # renormalised
    return torch.full_like(lp, float("-inf")).scatter(1, order, kept)  # [B, V]


class _Sampler:
    """Rows of prompts of one token length, decoded as a batch on the compute thread:
    `prefill` (each prompt once, all in one forward; a row takes its prompt's KV),
    then `step` until `done`. A row that meets EOS or max_tokens leaves the batch (its
    cache rows are dropped), so the rest decode without it."""

    def __init__(self, policy: LocalPolicy, prompts: Sequence[Sequence[int]],
                 rows: list[tuple[int, int]], temperature: float, top_p: float,
                 max_tokens: int, streams: Sequence[tuple[int, int]],
                 eos: frozenset[int]) -> None:
        self.policy = policy
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.eos = eos
        firsts = list(dict.fromkeys(i for i, _ in rows))  # the batch's prompts, in order
        self.prompts = [list(prompts[i]) for i in firsts]
        self.source = [firsts.index(i) for i, _ in rows]  # row -> its prompt in the batch
        self.gens = [torch.Generator(device="cpu").manual_seed(completion_seed(*streams[i], g))
                     for i, g in rows]
        self.ids: list[list[int]] = [[] for _ in rows]
        self.lps: list[list[float]] = [[] for _ in rows]
        self.live = list(range(len(rows)))  # rows still decoding, in cache order
        self.cache: ShardCache | None = None
        self.logits: Any = None  # [len(live), V] for the next choice
        self.pos = 0

    @property
    def done(self) -> bool:
        return not self.live

    def prefill(self) -> None:
        block, head = self.policy.block, self.policy.head
        self.cache = block.new_cache()
        ids = torch.tensor(self.prompts, dtype=torch.long)  # [U, P], one length
        hidden = block.forward(head.embed(ids), 0, self.cache)  # [U, P, H]
        logits = head.logits(hidden[:, -1:])[:, 0]  # [U, V]
        source = torch.tensor(self.source, dtype=torch.long, device=block.device)  # [R]
        self.cache.kv.batch_select_indices(source)  # [U, ...] -> [R, ...]
        self.logits = logits[source.to(logits.device)]  # [R, V]
        self.pos = len(self.prompts[0])
        self._choose()

    def step(self) -> None:
        assert self.cache is not None
        block, head = self.policy.block, self.policy.head
        last = torch.tensor([[self.ids[r][-1]] for r in self.live], dtype=torch.long)  # [B, 1]
        hidden = block.forward(head.embed(last), self.pos, self.cache)  # [B, 1, H]
        self.logits = head.logits(hidden)[:, 0]  # [B, V]
        self.pos += 1
        self._choose()

    def _choose(self) -> None:
        # sampled on the CPU, whatever the model's device: the generators are CPU ones,
        # and the same seed gives the same tokens on any device
        tokens, lps = choose(self.logits.cpu(), self.temperature, self.top_p,
                             [self.gens[r] for r in self.live])
        keep = []
        for j, (r, t, lp) in enumerate(zip(self.live, tokens, lps, strict=True)):
            self.ids[r].append(t)
            self.lps[r].append(lp)
            if t not in self.eos and len(self.ids[r]) < self.max_tokens:
                keep.append(j)
        if len(keep) < len(self.live):
            self.live = [self.live[j] for j in keep]
            if keep:
                assert self.cache is not None
                self.cache.kv.batch_select_indices(
                    torch.tensor(keep, dtype=torch.long, device=self.policy.block.device))

    def completions(self) -> list[Completion]:
        return [Completion(tuple(i), tuple(lp)) for i, lp in zip(self.ids, self.lps,
                                                                  strict=True)]
