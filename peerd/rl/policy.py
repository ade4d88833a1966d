"""The peer's loaded model as a versioned policy: RL samplers generate with it, the
trainer's new versions are applied to it.

`LocalPolicy` wraps a ShardBlock holding ALL the model's layers and its Head (a peer
serving a slice of the layers cannot sample alone; pipeline samplers are a later
step). Version 0 is the model as loaded. A version is applied ATOMICALLY and only
BETWEEN generations: a generation holds the policy's lock from its first forward to
its last token, and `apply` waits for the lock, checks every tensor before it changes
any, then copies them all. So every token of a completion comes from one version, the
version stamped on it.

Updates name tensors as Hugging Face names of the whole model
(`model.layers.3.self_attn.q_proj.weight`, `model.embed_tokens.weight`,
`model.norm.weight`, `lm_head.weight`). A FULL tensor replaces the parameter; a DELTA
is added to the VERSION-0 base of that name, never to the current value, so LoRA
versions (each carrying its whole adapter set) do not stack. The base of a tensor is
kept in memory from the first delta that touches it (re-read from the checkpoint when
a full update had already replaced it). Tensors must match the parameter's shape and
dtype exactly (`parameters()` says what they are): the publisher or the weight
receiver casts, so a sampler never silently rounds a version it claims to serve.

Shared weights: the ShardBlock is the same one the shard server serves to other
peers' pipeline sessions. Those sessions are not under this lock: a version applied
while one is open changes the weights under it from its next step on. A peer that
samples for an RL run belongs to that run (the run owns its weights); whether it
should still be routed other peers' sessions is the router's decision, not this
module's. All torch work, copies included, runs on the process's compute thread
(peerd.compute: one torch thread per process), so a copy never interleaves with a
forward: it lands between steps.

Behaviour log-probs: each completion token's log-probability under the distribution
it was actually drawn from: log softmax(logits / temperature), cut to the top-p
nucleus and renormalised when top_p < 1 (the nucleus rule of inference/sampling.py).
Temperature 0 is greedy: the argmax, and its log-probability at temperature 1 (the
distribution a temperature-1 trainer scores it under; a greedy rollout is for
evaluation, not for an importance ratio).
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
import trio

from peerd import compute
from peerd.inference.model.head import Head
from peerd.inference.model.shard import ShardBlock, ShardCache
from peerd.inference.model.source import load_config
from peerd.inference.model.weights import read_tensors

if TYPE_CHECKING:
    from peerd.inference.runtime import ModelRuntime

LAYER_PREFIX = "model.layers."
HEAD_NAMES = {"model.embed_tokens.weight": "embed_tokens.weight",
              "model.norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"}
SEED_MASK = (1 << 63) - 1


class PolicyError(Exception):
    """A version or a generation this policy cannot take; the message says why. Nothing
    was changed."""


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


class LocalPolicy:
    """This peer's whole model as a versioned policy (see the module docstring)."""

    def __init__(self, block: ShardBlock, head: Head) -> None:
        if block.start != 0 or block.end != block.num_layers:
            raise PolicyError(
                f"a sampler needs all {block.num_layers} layers of {block.model_id}; this "
                f"peer serves [{block.start}, {block.end}) (pipeline samplers are not "
                "supported yet: start the peer with the whole model)")
        self.block = block
        self.head = head
        self.version = 0
        self.generations = 0  # completed, for status
        self._lock = trio.Lock()  # held by a generation; apply waits for it
        self._params = self._parameters()
        self._base: dict[str, torch.Tensor] = {}  # version-0 values of tensors deltas touch
        self._replaced: set[str] = set()  # changed by a full update since version 0

    @classmethod
    def from_runtime(cls, runtime: ModelRuntime) -> LocalPolicy:
        return cls(runtime.block, runtime.head)

    @property
    def model_id(self) -> str:
        return self.block.model_id

    @property
    def vocab_size(self) -> int:
        return self.head.vocab_size

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        """HF name -> the parameter it sets. With tied embeddings `lm_head.weight` and
        `model.embed_tokens.weight` are the same parameter."""
        params: dict[str, torch.nn.Parameter] = {}
        for local, p in self.block.named_parameters():
            _, i, rest = local.split(".", 2)  # "layers", "{i}", "self_attn.q_proj.weight"
            params[f"{LAYER_PREFIX}{int(i) + self.block.start}.{rest}"] = p
        mine = dict(self.head.named_parameters(remove_duplicate=False))
        for hf, local in HEAD_NAMES.items():
            params[hf] = mine[local]
        return params

    def parameters(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """HF name -> (shape, dtype) of every tensor a version may name."""
        return {n: (tuple(p.shape), p.dtype) for n, p in self._params.items()}

    # ---- versions ------------------------------------------------------------------------

    async def apply(self, version: int, *, full: Mapping[str, torch.Tensor] | None = None,
                    deltas: Mapping[str, torch.Tensor] | None = None) -> None:
        """Move to `version`: `full` tensors replace, `deltas` are added to the version-0
        base. Waits for a running generation; raises PolicyError (changing nothing) for
        a version not ahead of ours, an unknown name, or a shape or dtype mismatch."""
        full, deltas = dict(full or {}), dict(deltas or {})
        async with self._lock:
            if version <= self.version:
                raise PolicyError(f"version {version} is not ahead of this policy's "
                                  f"{self.version}: versions only move forward")
            await compute.run(self._apply, full, deltas)
            self.version = version

    async def reset(self) -> None:
        """Back to version 0, the model as loaded (a new run starts from it): every
        tensor a version changed gets its base value again. Waits for a generation."""
        async with self._lock:
            if self.version:
                await compute.run(self._reset)
            self.version = 0

    def _reset(self) -> None:
        reread = self._read_base(sorted(self._replaced - self._base.keys()))
        with torch.inference_mode():
            values: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
            for name, base in {**self._base, **reread}.items():
                self._target(values, name, base)
            for param, value in values.values():
                param.copy_(value)
        self._replaced.clear()  # the deltas' bases stay: they are version 0's values

    def _apply(self, full: dict[str, torch.Tensor], deltas: dict[str, torch.Tensor]) -> None:
        """Check all, compute all, then copy all (on the compute thread)."""
        both = full.keys() & deltas.keys()
        if both:
            raise PolicyError(f"{sorted(both)[0]!r} is both replaced and given a delta")
        self._check(full, "full tensor")
        self._check(deltas, "delta")
        new_base: dict[str, torch.Tensor] = {}
        missing = [n for n in deltas if n not in self._base and n in self._replaced]
        reread = self._read_base(missing)
        with torch.inference_mode():
            values: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
            for name, tensor in full.items():
                self._target(values, name, tensor)
            for name, delta in deltas.items():
                base = self._base.get(name)
                if base is None:
                    base = reread[name] if name in reread else self._params[name].detach().clone()
                    new_base[name] = base
                self._target(values, name, base + delta.to(base.device))
            for param, value in values.values():  # nothing can fail past this point
                param.copy_(value)
        self._base.update(new_base)
        self._replaced.update(full)

    def _check(self, tensors: Mapping[str, torch.Tensor], what: str) -> None:
        for name, tensor in tensors.items():
            param = self._params.get(name)
            if param is None:
                raise PolicyError(f"{what} {name!r:.120} names no parameter of "
                                  f"{self.model_id}")
            if not isinstance(tensor, torch.Tensor):
                raise PolicyError(f"{what} {name!r} is a {type(tensor).__name__}, not a tensor")
            if tuple(tensor.shape) != tuple(param.shape) or tensor.dtype != param.dtype:
                raise PolicyError(
                    f"{what} {name!r} is {list(tensor.shape)} {tensor.dtype}; the parameter "
                    f"is {list(param.shape)} {param.dtype}")
            if not bool(torch.isfinite(tensor).all()):
                raise PolicyError(f"{what} {name!r} holds non-finite values")

    def _target(self, values: dict[int, tuple[torch.nn.Parameter, torch.Tensor]], name: str,
                value: torch.Tensor) -> None:
        """Record `value` for `name`'s parameter; a tied parameter named twice must be
        given the same value both times."""
        param = self._params[name]
        seen = values.get(id(param))
        if seen is not None and not torch.equal(seen[1].to(value.device), value):
            raise PolicyError(f"{name!r} is tied to another name given a different value")
        values[id(param)] = (param, value)

    def _read_base(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Version-0 values of `names`, from the checkpoint (tied lm_head: the embeddings)."""
        if not names:
            return {}
        stored = {n: ("model.embed_tokens.weight" if n == "lm_head.weight" and self.head.tied
                      else n) for n in names}
        config = load_config(self.block.source)
        read = read_tensors(self.block.source, config, sorted(set(stored.values())),
                            dtype=self.block.dtype, device=self._params[names[0]].device)
        return {n: read[s] for n, s in stored.items()}

    @asynccontextmanager
    async def holding(self) -> AsyncIterator[int]:
        """Keep the current version while inside (apply waits); yields it."""
        async with self._lock:
            yield self.version

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
                            eos_ids: Iterable[int], at_version: int | None = None
                            ) -> Generation:
        """`n` completions of each prompt, all at one version (held throughout). Each
        prompt is prefilled once and its n completions decoded as one batch. The same
        seed and version give the same tokens. With `at_version`, raises VersionMismatch
        unless the policy is at it when the generation starts."""
        if n < 1 or max_tokens < 1 or not temperature >= 0.0 or not 0.0 < top_p <= 1.0:
            raise PolicyError(f"n={n}, max_tokens={max_tokens}, temperature={temperature}, "
                              f"top_p={top_p}: out of range")
        eos = frozenset(eos_ids)
        vocab = self.vocab_size
        for ids in prompts:
            if not ids or not all(0 <= t < vocab for t in ids):
                raise PolicyError(f"a prompt of {len(ids)} token ids, empty or outside "
                                  f"the vocabulary of {vocab}")
        async with self._lock:
            if at_version is not None and at_version != self.version:
                raise VersionMismatch(self.version, at_version)
            groups = []
            for i, ids in enumerate(prompts):
                sampler = _Sampler(self, list(ids), n, temperature, top_p, max_tokens,
                                   [completion_seed(seed, i, g) for g in range(n)], eos)
                await compute.run(sampler.prefill)
                while not sampler.done:
                    await compute.run(sampler.step)  # one token of every live row
                groups.append(sampler.completions())
            self.generations += 1
            return Generation(self.version, groups)


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
    """One prompt's n completions, decoded as a batch on the compute thread: `prefill`,
    then `step` until `done`. A row that meets EOS leaves the batch (its cache rows
    are dropped), so the rest decode without it."""

    def __init__(self, policy: LocalPolicy, prompt: list[int], n: int, temperature: float,
                 top_p: float, max_tokens: int, seeds: list[int], eos: frozenset[int]
                 ) -> None:
        self.policy = policy
        self.prompt = prompt
        self.temperature, self.top_p, self.max_tokens = temperature, top_p, max_tokens
        self.eos = eos
        self.gens = [torch.Generator(device="cpu").manual_seed(s) for s in seeds]
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.lps: list[list[float]] = [[] for _ in range(n)]
        self.live = list(range(n))  # rows still decoding, in cache order
        self.cache: ShardCache | None = None
        self.logits: Any = None  # [len(live), V] for the next choice
        self.pos = 0

    @property
    def done(self) -> bool:
        return not self.live

    def prefill(self) -> None:
        block, head = self.policy.block, self.policy.head
        self.cache = block.new_cache()
        ids = torch.tensor([self.prompt], dtype=torch.long)  # [1, P]
        hidden = block.forward(head.embed(ids), 0, self.cache)  # [1, P, H]
        logits = head.logits(hidden[:, -1:])[:, 0]  # [1, V]
        self.cache.kv.batch_repeat_interleave(len(self.live))
        self.logits = logits.expand(len(self.live), -1)  # [n, V]
        self.pos = len(self.prompt)
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
