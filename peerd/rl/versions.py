"""A peer's loaded weights as versions of an RL policy: the layers of a ShardBlock it
serves (all of them, or a slice: a pipeline sampler's shard) and, when it samples, its
Head. The whole-model policy (policy.py) and a pipeline's shards (shard_gate.py) are
both this.

Version 0 is the model as loaded. A version is applied ATOMICALLY and only when no
one holds the current one: `apply` checks every tensor before it changes any, then
copies them all, once every hold has been released. A hold (`hold()`, a generation's;
`try_hold()`, a pipeline session's) keeps the version from its start to its release,
so everything computed under it comes from one version. While an apply waits, no new
hold is given (`try_hold` says None; `hold` waits): holders come and go, and an apply
must not starve. A hold may be revocable: when `apply` has waited `revoke_after_s`
for holders, it revokes those (the holder ends what it computes, then releases), so a
pipeline session left open cannot hold a shard back for ever; holds that cannot be
revoked (a generation, which ends by itself) are waited for.

Updates name tensors as Hugging Face names of the whole model
(`model.layers.3.self_attn.q_proj.weight`, `model.embed_tokens.weight`,
`model.norm.weight`, `lm_head.weight`). A FULL tensor replaces the parameter; a DELTA
is added to the VERSION-0 base of that name, never to the current value, so LoRA
versions (each carrying its whole adapter set) do not stack. The base of a tensor is
kept in memory from the first delta that touches it (re-read from the checkpoint when
a full update had already replaced it). Tensors must match the parameter's shape and
dtype exactly (`parameters()` says what they are): the publisher or the weight
receiver casts, so a peer never silently rounds a version it claims to serve.

All torch work, copies included, runs on the process's compute thread
(peerd.compute: one torch thread per process), so a copy never interleaves with a
forward: it lands between steps.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import torch
import trio

from peerd import compute
from peerd.inference.model.source import load_config
from peerd.inference.model.weights import read_tensors

if TYPE_CHECKING:
    from peerd.inference.model.head import Head
    from peerd.inference.model.shard import ShardBlock

log = logging.getLogger(__name__)

LAYER_PREFIX = "model.layers."
HEAD_NAMES = {"model.embed_tokens.weight": "embed_tokens.weight",
              "model.norm.weight": "norm.weight", "lm_head.weight": "lm_head.weight"}
REVOKE_AFTER_S = 30.0  # an apply waits this long for revocable holders, then revokes them
REVOKED_GONE_S = 30.0  # and this long for the revoked ones to release


class PolicyError(Exception):
    """A version or a generation this policy cannot take; the message says why. Nothing
    was changed."""


class Hold:
    """One holder's claim on a version (released once; `revoke` asks the holder to end)."""

    def __init__(self, owner: VersionedWeights, version: int,
                 revoke: Callable[[], None] | None) -> None:
        self.owner = owner
        self.version = version
        self.revoke = revoke
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.owner._let_go(self)


class VersionedWeights:
    """`block`'s layers (and `head`'s tensors, if given) as a versioned policy (see the
    module docstring)."""

    def __init__(self, block: ShardBlock, head: Head | None = None, *,
                 revoke_after_s: float = REVOKE_AFTER_S) -> None:
        self.block = block
        self.head = head
        self.version = 0
        self.revoke_after_s = revoke_after_s
        self._params = self._parameters()
        self._base: dict[str, torch.Tensor] = {}  # version-0 values of tensors deltas touch
        self._replaced: set[str] = set()  # changed by a full update since version 0
        self._holds: set[Hold] = set()
        self._released = trio.Event()  # set when the last hold goes
        self._writing = trio.Lock()  # one apply or reset at a time
        self._settled = trio.Event()  # set when no apply waits or works
        self._settled.set()

    @property
    def model_id(self) -> str:
        return self.block.model_id

    @property
    def applying(self) -> bool:
        """An apply (or reset) waits for holders or copies now: no new hold is given."""
        return not self._settled.is_set()

    @property
    def holders(self) -> int:
        return len(self._holds)

    def _parameters(self) -> dict[str, torch.nn.Parameter]:
        """HF name -> the parameter it sets. With tied embeddings `lm_head.weight` and
        `model.embed_tokens.weight` are the same parameter."""
        params: dict[str, torch.nn.Parameter] = {}
        for local, p in self.block.named_parameters():
            _, i, rest = local.split(".", 2)  # "layers", "{i}", "self_attn.q_proj.weight"
            params[f"{LAYER_PREFIX}{int(i) + self.block.start}.{rest}"] = p
        if self.head is not None:
            mine = dict(self.head.named_parameters(remove_duplicate=False))
            for hf, local in HEAD_NAMES.items():
                params[hf] = mine[local]
        return params

    def parameters(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """HF name -> (shape, dtype) of every tensor a version may name."""
        return {n: (tuple(p.shape), p.dtype) for n, p in self._params.items()}

    # ---- holds ---------------------------------------------------------------------------

    def try_hold(self, revoke: Callable[[], None] | None = None) -> Hold | None:
        """Hold the current version now, or None while an apply waits or works."""
        if self.applying:
            return None
        hold = Hold(self, self.version, revoke)
        self._holds.add(hold)
        return hold

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[int]:
        """Keep the current version while inside (waiting for an apply in progress to
        end first); yields it."""
        while (got := self.try_hold()) is None:
            await self._settled.wait()
        try:
            yield got.version
        finally:
            got.release()

    def _let_go(self, hold: Hold) -> None:
        self._holds.discard(hold)
        if not self._holds:
            self._released.set()

    @asynccontextmanager
    async def _exclusive(self) -> AsyncIterator[None]:
        """No holder from entry to exit; new holds wait (or are refused) meanwhile."""
        async with self._writing:
            self._settled = trio.Event()
            try:
                await self._wait_holders()
                yield
            finally:
                self._settled.set()

    async def _wait_holders(self) -> None:
        with trio.move_on_after(self.revoke_after_s):
            await self._until_free()
            return
        revocable = [h for h in self._holds if h.revoke is not None]
        log.info("revoking %d holds of version %d after %.0f s", len(revocable),
                 self.version, self.revoke_after_s)
        for hold in revocable:
            assert hold.revoke is not None
            hold.revoke()
        try:
            with trio.fail_after(REVOKED_GONE_S):
                await self._until_free()
        except trio.TooSlowError:
            raise PolicyError(f"{len(self._holds)} holders of version {self.version} did not"
                              " let go") from None

    async def _until_free(self) -> None:
        while self._holds:
            self._released = trio.Event()
            await self._released.wait()

    # ---- versions ------------------------------------------------------------------------

    async def apply(self, version: int, *, full: Mapping[str, torch.Tensor] | None = None,
                    deltas: Mapping[str, torch.Tensor] | None = None) -> None:
        """Move to `version`: `full` tensors replace, `deltas` are added to the version-0
        base. Waits for the holders; raises PolicyError (changing nothing) for a version
        not ahead of ours, an unknown name, or a shape or dtype mismatch."""
        full, deltas = dict(full or {}), dict(deltas or {})
        if version <= self.version:
            raise PolicyError(f"version {version} is not ahead of this policy's "
                              f"{self.version}: versions only move forward")
        async with self._exclusive():
            if version <= self.version:  # another apply went first while we waited
                raise PolicyError(f"version {version} is not ahead of this policy's "
                                  f"{self.version}: versions only move forward")
            await compute.run(self._apply, full, deltas)
            self.version = version

    async def reset(self) -> None:
        """Back to version 0, the model as loaded (a new run starts from it): every
        tensor a version changed gets its base value again. Waits for the holders."""
        async with self._exclusive():
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
        tied = self.head is not None and self.head.tied
        stored = {n: ("model.embed_tokens.weight" if n == "lm_head.weight" and tied else n)
                  for n in names}
        config = load_config(self.block.source)
        read = read_tensors(self.block.source, config, sorted(set(stored.values())),
                            dtype=self.block.dtype, device=self._params[names[0]].device)
        return {n: read[s] for n, s in stored.items()}
