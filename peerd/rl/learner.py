"""The trainer's model: per-token log-probs of completions, one optimiser step, the
tensors a new policy version publishes.

A `Learner` holds the whole model as plain transformers loads it
(`reference_model(resolve(spec))`), trained in full or through peft LoRA adapters on
the attention projections, with AdamW (no weight decay) over what is trained.

Under `torchrun` (`init_distributed` first) the model is wrapped in torch's
DistributedDataParallel: every rank is handed the SAME whole batch, takes its own rows
of it, and DDP's all-reduce averages the gradients. No gradient crosses ranks any other
way. Rank 0 alone exports and checkpoints; every rank steps, so all stay identical.

Loss aggregation across micro-batches and ranks. `loss_fn(new_logp, part)` returns the
loss of the rows it is given, normalised inside that part: by its completion tokens
(`aggregation="token"`, GRPO's token-level mean) or by its sequences ("sequence", a
mean of per-sequence means, or Dr.GRPO's sum / (B * T) with T the padded width, which
micro-batches keep because rows are sliced, never columns). Part i's loss is scaled by
its share of the whole batch, n_i / N (tokens or sequences), so the sum of the parts'
gradients is the gradient of the whole batch's loss. DDP then AVERAGES gradients over
the W ranks, so each rank also multiplies by W: the mean over ranks of
W * sum_i(n_ri / N * grad loss_ri) is sum_ri(n_ri / N * grad loss_ri), the whole
batch's gradient in one process. N is counted on the whole batch, which every rank has,
so no extra collective is needed for it.

The fused check. A batch may carry `check_tolerance` ([B]; NaN for rows not checked):
then the training forward's own log-probs (the policy's, before the step) are compared
with each checked row's behaviour log-probs as the trainer's separate check would
(mean |ours - theirs| a token), saving that check's forward pass. The comparison comes
after the gradients are accumulated and before the optimiser steps: if any row is over
its tolerance, the gradients are dropped and no step is taken (`StepStats.stepped`
False), so a lie never reaches the weights; the deviations say whose. Under DDP each
rank measures its own rows and one all-reduce gives every rank all of them, so all
ranks decide alike.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from peerd.inference.model.source import reference_model, resolve
from peerd.rl.logprobs import token_logprobs

UpdateKind = Literal["full", "lora"]
Aggregation = Literal["token", "sequence"]
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PEFT_PREFIX = "base_model.model."  # what peft puts in front of the HF module paths


@dataclass(frozen=True)
class TokenBatch:
    """B completions, each with its prompt, as tensors. Rows are right-padded.

    Columns of the [B, T] tensors are completion tokens: column t of row b is the t-th
    token the sampler generated for sequence b, whatever the length of its prompt."""

    input_ids: torch.Tensor  # [B, L] long: prompt + completion, then pad_id
    attention_mask: torch.Tensor  # [B, L] long: 1 on real tokens
    positions: torch.Tensor  # [B, T] long: where in L the logits predicting token t sit
    completion_ids: torch.Tensor  # [B, T] long: the completion tokens (0 past the end)
    completion_mask: torch.Tensor  # [B, T] float: 1 on real completion tokens
    behaviour_logprobs: torch.Tensor  # [B, T] float: the sampler's, 0 past the end
    advantages: torch.Tensor  # [B] float: one per completion
    reference_logprobs: torch.Tensor | None = None  # [B, T] float: for a KL term
    # [B] float: the deviation each row's behaviour log-probs may have from the training
    # forward's (the fused check, module docstring); NaN: the row is not checked
    check_tolerance: torch.Tensor | None = None

    @classmethod
    def from_sequences(cls, prompt_ids: Sequence[Sequence[int]],
                       completion_ids: Sequence[Sequence[int]],
                       behaviour_logprobs: Sequence[Sequence[float]],
                       advantages: Sequence[float], *, pad_id: int = 0) -> TokenBatch:
        n = len(prompt_ids)
        if not n or not len(completion_ids) == len(behaviour_logprobs) == len(advantages) == n:
            raise ValueError(f"a batch needs as many prompts, completions, log-prob lists and "
                             f"advantages, at least one: got {len(prompt_ids)}, "
                             f"{len(completion_ids)}, {len(behaviour_logprobs)}, "
                             f"{len(advantages)}")
        for b, (p, c, lp) in enumerate(zip(prompt_ids, completion_ids, behaviour_logprobs,
                                           strict=True)):
            if not p or not c or len(c) != len(lp):
                raise ValueError(f"sequence {b}: prompt of {len(p)} tokens, completion of "
                                 f"{len(c)} with {len(lp)} log-probs (need >= 1, = 1 each)")
        width = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids, strict=True))
        t_max = max(len(c) for c in completion_ids)
        input_ids = torch.full((n, width), pad_id, dtype=torch.long)
        attention = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((n, t_max), dtype=torch.long)
        targets = torch.zeros((n, t_max), dtype=torch.long)
        mask = torch.zeros((n, t_max))
        behaviour = torch.zeros((n, t_max))
        for b, (p, c, lp) in enumerate(zip(prompt_ids, completion_ids, behaviour_logprobs,
                                           strict=True)):
            input_ids[b, :len(p) + len(c)] = torch.tensor([*p, *c])
            attention[b, :len(p) + len(c)] = 1
            # the logits at position i predict token i + 1: completion token t sits at
            # len(p) + t, so it is read at len(p) + t - 1 (padding columns read position 0)
            positions[b, :len(c)] = torch.arange(len(p) - 1, len(p) + len(c) - 1)
            targets[b, :len(c)] = torch.tensor(c)
            mask[b, :len(c)] = 1.0
            behaviour[b, :len(c)] = torch.tensor(lp, dtype=torch.float32)
        return cls(input_ids, attention, positions, targets, mask, behaviour,
                   torch.tensor(advantages, dtype=torch.float32))

    @property
    def size(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def tokens(self) -> int:
        return int(self.completion_mask.sum().item())

    def rows(self, index: slice | torch.Tensor) -> TokenBatch:
        """The batch of these rows; columns (and so the padded width T) are kept."""
        return self._map(lambda t: t[index])

    def to(self, device: torch.device | str) -> TokenBatch:
        return self._map(lambda t: t.to(device))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> TokenBatch:
        ref, tol = self.reference_logprobs, self.check_tolerance
        return TokenBatch(fn(self.input_ids), fn(self.attention_mask), fn(self.positions),
                          fn(self.completion_ids), fn(self.completion_mask),
                          fn(self.behaviour_logprobs), fn(self.advantages),
                          None if ref is None else fn(ref), None if tol is None else fn(tol))


LossFn = Callable[[torch.Tensor, TokenBatch], tuple[torch.Tensor, Mapping[str, Any]]]


@dataclass(frozen=True, slots=True)
class StepStats:
    loss: float  # the whole batch's loss (over all ranks under DDP)
    grad_norm: float  # the total gradient norm before clipping
    seconds: float
    sequences: int  # in the whole batch
    tokens: int  # completion tokens in the whole batch
    stats: dict[str, float] = field(default_factory=dict)  # loss_fn's, aggregated as the loss
    # the fused check's (module docstring): each row's mean |ours - behaviour| a token
    # (NaN where not checked), and whether the optimiser stepped (False: a row was over)
    deviations: list[float] | None = None
    stepped: bool = True


class Learner:
    """The policy being trained. Build it with `Learner.load`."""

    def __init__(self, model: nn.Module, *, update: UpdateKind, lr: float,
                 device: torch.device, lora_scale: float | None,
                 reference: nn.Module | None, use_reference: bool) -> None:
        self.model: nn.Module = model  # the HF model, or the peft model around it
        self.update = update
        self.device = device
        self.lora_scale = lora_scale
        self._reference = reference  # full update: a frozen copy; LoRA: None (adapters off)
        self._use_reference = use_reference
        self.rank, self.world = ((dist.get_rank(), dist.get_world_size())
                                 if dist.is_available() and dist.is_initialized() else (0, 1))
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trained, lr=lr, weight_decay=0.0)
        self.module: nn.Module = model  # what forward passes go through: DDP when world > 1
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.module = DistributedDataParallel(model, device_ids=ids)
        model.train(True)

    @classmethod
    def load(cls, spec: str, *, update: UpdateKind = "full", lora_rank: int = 8,
             lora_alpha: int = 16, lora_targets: Sequence[str] = LORA_TARGETS,
             lr: float = 1e-5, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32, seed: int = 0,
             reference: bool = False) -> Learner:
        """The model named by `spec` (see peerd.inference.model.source.resolve), ready
        to train. `reference=True` keeps the version-0 policy for a KL term. `seed` fixes
        the LoRA initialisation (every rank must build the same adapters)."""
        if update not in ("full", "lora"):
            raise ValueError(f"update must be 'full' or 'lora', not {update!r}")
        torch.manual_seed(seed)
        dev = torch.device(device)
        model = reference_model(resolve(spec), device=dev, dtype=dtype)
        if update == "full":
            frozen = copy.deepcopy(model).requires_grad_(False).train(False) if reference \
                else None
            return cls(model, update="full", lr=lr, device=dev, lora_scale=None,
                       reference=frozen, use_reference=reference)
        if lora_rank < 1:
            raise ValueError(f"lora_rank must be >= 1, not {lora_rank}")
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0,
                            target_modules=list(lora_targets), bias="none")
        wrapped = get_peft_model(model, config)  # freezes the base, adds A (random), B (0)
        return cls(wrapped, update="lora", lr=lr, device=dev,
                   lora_scale=float(lora_alpha) / lora_rank, reference=None,
                   use_reference=reference)

    @property
    def use_reference(self) -> bool:
        """Whether the version-0 policy is kept (for a KL term)."""
        return self._use_reference

    # ---- log-probs -----------------------------------------------------------------

    def logprobs(self, batch: TokenBatch, *, temperature: float = 1.0) -> torch.Tensor:
        """[B, T] log-probs of each completion token under the policy, with gradient:
        log softmax(logits / temperature) at the sampled token, 0 past the end. Under
        DDP this goes through the DDP wrapper: for checks without a backward, `score`."""
        return token_logprobs(self.module, batch.to(self.device), temperature)

    @torch.no_grad()
    def score(self, batch: TokenBatch, *, temperature: float = 1.0) -> torch.Tensor:
        """`logprobs` without gradient, on CPU: to check a sampler's claimed log-probs."""
        return token_logprobs(self.model, batch.to(self.device), temperature).cpu()

    @torch.no_grad()
    def reference_logprobs(self, batch: TokenBatch, *,
                           temperature: float = 1.0) -> torch.Tensor:
        """[B, T] log-probs under the version-0 policy (needs `reference=True`), on CPU."""
        if not self._use_reference:
            raise RuntimeError("this learner was loaded without reference=True")
        with self._reference_module() as ref:
            return token_logprobs(ref, batch.to(self.device), temperature).cpu()

    @contextmanager
    def _reference_module(self) -> Iterator[nn.Module]:
        if self._reference is not None:
            yield self._reference
            return
        with self.model.disable_adapter():  # type: ignore[operator]  # peft's
            yield self.model

    # ---- one optimiser step --------------------------------------------------------

    def step(self, batch: TokenBatch, loss_fn: LossFn, *, temperature: float = 1.0,
             micro_batch: int | None = None, max_grad_norm: float = 1.0,
             aggregation: Aggregation = "token") -> StepStats:
        """One optimiser step on the whole `batch` (every rank passes the same one).

        Gradients are accumulated over micro-batches of `micro_batch` rows; the result
        is the step of one pass over the whole batch (the module docstring says why)."""
        start = time.perf_counter()
        if batch.size < self.world:
            raise ValueError(f"a batch of {batch.size} sequences cannot be split over "
                             f"{self.world} ranks")
        total = float(batch.tokens if aggregation == "token" else batch.size)
        if total <= 0:
            raise ValueError("the batch has no completion tokens")
        mine = batch.rows(slice(self.rank, None, self.world))  # this rank's rows
        size = micro_batch or mine.size
        parts = [mine.rows(slice(i, i + size)) for i in range(0, mine.size, size)]
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = 0.0
        stat_sums: dict[str, float] = {}
        # the fused check: this rank's rows' deviations, by row of the whole batch
        deviations = torch.zeros(batch.size, dtype=torch.float64)
        for i, part in enumerate(parts):
            part = part.to(self.device)
            share = float(part.tokens if aggregation == "token" else part.size) / total
            # DDP all-reduces on the backward of the last part only
            sync = i == len(parts) - 1 or self.world == 1
            with nullcontext() if sync else self.module.no_sync():  # type: ignore[operator]
                new_logp = token_logprobs(self.module, part, temperature)
                loss, stats = loss_fn(new_logp, part)
                (loss * (share * self.world)).backward()  # type: ignore[no-untyped-call]
            if batch.check_tolerance is not None:
                rows = self.rank + self.world * torch.arange(i * size, i * size + part.size)
                deviations[rows] = row_deviations(new_logp.detach(), part).cpu()
            loss_sum += float(loss.detach()) * share
            for key, value in stats.items():
                value = value.detach() if isinstance(value, torch.Tensor) else value
                stat_sums[key] = stat_sums.get(key, 0.0) + float(value) * share
        checked: list[float] | None = None
        if batch.check_tolerance is not None:
            if self.world > 1:  # each row was measured by one rank: the sum is every row
                deviations = deviations.to(self.device)
                dist.all_reduce(deviations)
                deviations = deviations.cpu()
            tolerance = batch.check_tolerance.to("cpu", torch.float64)
            deviations[tolerance.isnan()] = float("nan")
            checked = deviations.tolist()
            if bool((deviations > tolerance).any()):  # NaN compares False: unchecked rows
                self.optimizer.zero_grad(set_to_none=True)
                return StepStats(loss=float("nan"), grad_norm=float("nan"),
                                 seconds=time.perf_counter() - start, sequences=batch.size,
                                 tokens=batch.tokens, deviations=checked, stepped=False)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trained, max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(stat_sums)
        totals = torch.tensor([loss_sum, *(stat_sums[k] for k in keys)],
                              dtype=torch.float64)
        if self.world > 1:  # metrics only: each rank holds its rows' share of them
            totals = totals.to(self.device)
            dist.all_reduce(totals)
        values = totals.cpu().tolist()
        return StepStats(loss=values[0], grad_norm=float(grad_norm),
                         seconds=time.perf_counter() - start, sequences=batch.size,
                         tokens=batch.tokens, stats=dict(zip(keys, values[1:], strict=True)),
                         deviations=checked)

    # ---- what a new version publishes ----------------------------------------------

    def export(self, kind: UpdateKind | None = None
               ) -> tuple[dict[str, torch.Tensor], float | None]:
        """(tensors by name, LoRA scale or None): detached, contiguous, on CPU.

        "full": every parameter of the model under its HF name, once: a model with tied
        embeddings exports `model.embed_tokens.weight` and no `lm_head.weight` (the
        receiver ties it, as peerd's Head does). From a LoRA learner, "full" gives the
        merged weights (base + scale * B @ A) of the adapted modules and the base
        elsewhere. "lora": `M.lora_A` [r, in] and `M.lora_B` [out, r] for each adapted
        module M (an HF module path), and the scale alpha / r: the delta for `M.weight`
        is scale * B @ A. Defaults to the kind this learner trains."""
        kind = kind or self.update
        if kind == "lora":
            if self.update != "lora":
                raise ValueError("a learner that trains in full has no adapters to export")
            return _lora_adapters(self.model), self.lora_scale
        if self.update == "full":
            return {name: _cpu(p) for name, p in self.model.named_parameters()}, None
        adapters = _lora_adapters(self.model)
        assert self.lora_scale is not None
        out: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                continue  # the adapters themselves
            name = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
            module = name.removesuffix(".weight")
            if f"{module}.lora_A" in adapters:
                delta = adapters[f"{module}.lora_B"] @ adapters[f"{module}.lora_A"]
                out[name] = (_cpu(p).float() + self.lora_scale * delta).to(p.dtype)
            else:
                out[name] = _cpu(p)
        return out, None

    def load_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Set parameters from `export(self.update)`'s layout (a checkpoint's)."""
        names = _trained_names(self.model, self.update)
        unknown = sorted(set(tensors) - set(names))
        missing = sorted(set(names) - set(tensors))
        if unknown or missing:
            raise ValueError(f"tensors do not fit this {self.update} learner: "
                             f"unknown {unknown[:3]}, missing {missing[:3]}")
        with torch.no_grad():
            for name, param in names.items():
                param.copy_(tensors[name].to(param.device, param.dtype))


def _lora_adapters(model: nn.Module) -> dict[str, torch.Tensor]:
    """peft's adapters ("base_model.model.M.lora_A.default.weight") as {M.lora_A: A}."""
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                module = name.split(marker)[0].removeprefix(PEFT_PREFIX)
                out[f"{module}.{part}"] = _cpu(p)
    return out


def _trained_names(model: nn.Module, update: UpdateKind) -> dict[str, nn.Parameter]:
    """The trained parameters under their export names."""
    if update == "full":
        return dict(model.named_parameters())
    out: dict[str, nn.Parameter] = {}
    for name, p in model.named_parameters():
        for part in ("lora_A", "lora_B"):
            if f".{part}." in name:
                out[f"{name.split(f'.{part}.')[0].removeprefix(PEFT_PREFIX)}.{part}"] = p
    return out


def row_deviations(ours: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """[B] float64: each row's mean |ours - behaviour| over its completion tokens (the
    trainer's check, progress.mean_abs, on a batch)."""
    mask = batch.completion_mask.to(torch.float64)  # [B, T]
    diff = (ours.to(torch.float64) - batch.behaviour_logprobs.to(torch.float64)).abs()
    return (diff * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def with_check(batch: TokenBatch, tolerance: Sequence[float | None]) -> TokenBatch:
    """The batch carrying the fused check's tolerances (None: a row not checked)."""
    if len(tolerance) != batch.size:
        raise ValueError(f"{len(tolerance)} tolerances for {batch.size} rows")
    return replace(batch, check_tolerance=torch.tensor(
        [float("nan") if t is None else float(t) for t in tolerance], dtype=torch.float64))


def _cpu(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True).contiguous()


def with_reference(batch: TokenBatch, reference_logprobs: torch.Tensor) -> TokenBatch:
    """The batch carrying the reference policy's log-probs, for a KL term in loss_fn."""
    return replace(batch, reference_logprobs=reference_logprobs)


def broadcast_batch(batch: TokenBatch | None) -> TokenBatch:
    """Rank 0's batch on every rank (the others pass None): `step` wants the whole batch
    everywhere. Outside a process group, the batch itself."""
    if not (dist.is_available() and dist.is_initialized()):
        if batch is None:
            raise ValueError("no batch to train on")
        return batch
    box: list[TokenBatch | None] = [batch.to("cpu") if batch is not None else None]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        raise ValueError("rank 0 has no batch to share")
    return box[0]


def init_distributed(device: str | torch.device = "cpu") -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on CPU, NCCL on CUDA);
    (rank, world size). A process not started by torchrun is rank 0 of 1. On CUDA, load
    the learner on f"cuda:{LOCAL_RANK}"."""
    import os

    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = torch.device(device).type == "cuda"
        if cuda:  # NCCL's collectives (broadcast_batch's too) run on the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()
