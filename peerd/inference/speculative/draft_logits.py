"""The target's lm_head as a drafter uses it: over a draft vocabulary, in whatever form
multiplies fastest on this device. A draft only has to be a good guess; verification
always uses the target's own precision and whole vocabulary, so nothing here can change
what a request answers, only how fast the drafts come.

One lm_head call is most of a draft step (a tree's level scores its 4 expanded nodes
against every row). On a float32 CPU head the rows are kept:
- in bfloat16 where the CPU multiplies it natively (AVX-512 BF16, AMX): several times
  faster than float32 there;
- elsewhere (AVX2 only: torch emulates bfloat16) in int8, through fbgemm's kernels:
  each row quantized with its own scale, the features per call to 7 bits, so that
  AVX2's 16-bit intermediate sums cannot overflow. On a Zen 2 host a tree's draft took
  a third of its bfloat16 time with the same k (bench/README.md);
- in bfloat16 where this torch has no int8 kernels.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from peerd.inference.model.head import Head
from peerd.inference.speculative.drafters import DraftError
from peerd.inference.speculative.vocab import VocabError, validate
from peerd.machine import cpu_bf16_fast


@functools.cache
def int8_kernels() -> bool:
    """Whether this torch multiplies int8 rows by float features on the CPU (fbgemm's
    dynamic linear): tried once on a small product."""
    try:
        rows = pack_int8(torch.randn(8, 16))
        out = torch.ops.quantized.linear_dynamic(torch.randn(2, 16), rows, True)
        return tuple(out.shape) == (2, 8)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def pack_int8(weight: torch.Tensor) -> Any:
    """weight [n, H] -> fbgemm's packed int8 rows, one scale a row. torch announces the
    end of its quantized tensors (a future release): int8_kernels() then fails and the
    rows stay bfloat16."""
    w = weight.detach().float().cpu()
    scales = (w.abs().amax(dim=1).clamp_min(1e-12) / 127.0).double()  # [n]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*quantize_per_channel.*deprecated")
        q = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long),
                                       0, torch.qint8)
    return torch.ops.quantized.linear_prepack(q, None)


def draft_form(head: Head) -> str:
    """How this head's rows are kept for drafting: float32, bfloat16, int8, or the
    head's own dtype ("same") off the CPU or when the head is not float32."""
    if head.device.type != "cpu" or head.dtype != torch.float32:
        return "same"
    if cpu_bf16_fast():
        return "bfloat16"
    return "int8" if int8_kernels() else "bfloat16"


class Rows:
    """Some rows of lm_head [n, H], kept in a drafting `form` (see draft_form), and
    their product with features."""

    def __init__(self, weight: torch.Tensor, form: str) -> None:
        self.n = int(weight.shape[0])
        self.form = form
        self.packed = pack_int8(weight) if form == "int8" else None
        self.weight: torch.Tensor | None = None
        if self.packed is None:
            self.weight = weight.detach() if form == "same" else weight.detach().to(
                getattr(torch, form))  # [n, H]

    def __len__(self) -> int:
        return self.n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, H], normed -> logits [B, T, n] float32."""
        if self.packed is not None:
            flat = x.float().reshape(-1, x.shape[-1]).contiguous()  # [B*T, H]
            out: torch.Tensor = torch.ops.quantized.linear_dynamic(
                flat, self.packed, True)  # [B*T, n]
            return out.reshape(*x.shape[:-1], self.n)
        assert self.weight is not None
        return nn.functional.linear(x.to(self.weight.dtype), self.weight).float()


class DraftLogits:
    """The target's final norm and lm_head, for drafting, over a draft vocabulary (see
    vocab.py: its rows of lm_head only) plus, per session, the rows of the context's
    tokens outside it (`rows`), each kept in the form that drafts fastest here (see
    the module's docstring)."""

    def __init__(self, head: Head, vocab: Sequence[int] | None = None,
                 form: str | None = None) -> None:
        self.head = head
        self.form = form or draft_form(head)
        weight = head.lm_head.weight.detach()  # [V, H]
        self.member: torch.Tensor | None = None  # [V] bool: in the draft vocabulary
        self.ids: torch.Tensor | None = None  # [K]: the draft vocabulary's token ids
        if vocab is not None and len(vocab) < head.vocab_size:
            try:
                validate(vocab, head.vocab_size)
            except VocabError as exc:
                raise DraftError(str(exc)) from exc
            self.ids = torch.tensor(sorted(vocab), dtype=torch.long, device=head.device)
            self.member = torch.zeros(head.vocab_size, dtype=torch.bool, device=head.device)
            self.member[self.ids] = True
            weight = weight[self.ids]  # [K, H]
        self.main = Rows(weight, self.form)  # lm_head itself when nothing changes

    @property
    def size(self) -> int:
        return len(self.main)

    def outside(self, tokens: Sequence[int]) -> list[int]:
        """Those of `tokens` that the draft vocabulary leaves out."""
        if self.member is None or not tokens:
            return []
        ids = torch.tensor(tokens, dtype=torch.long, device=self.member.device)
        return [int(t) for t in ids[~self.member[ids]].tolist()]

    def rows(self, tokens: Sequence[int]) -> Rows:
        """The lm_head rows of `tokens`, in the drafting form (int8 rows quantize as
        the same rows of the whole matrix do: one scale a row)."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.head.device)
        return Rows(self.head.lm_head.weight.detach()[ids], self.form)

    def columns(self, extra: Sequence[int]) -> torch.Tensor | None:
        """The token id of each logit column when `extra` tokens' rows are appended
        [K + m]; None when the columns are the whole vocabulary in order."""
        if self.ids is None and not extra:
            return None
        base = self.ids if self.ids is not None else torch.arange(self.size,
                                                                  device=self.head.device)
        return torch.cat([base, torch.tensor(list(extra), dtype=torch.long,
                                             device=base.device)])  # [K + m]

    @torch.inference_mode()
    def __call__(self, features: torch.Tensor, extra: Rows | None = None) -> torch.Tensor:
        """features [B, T, H] -> logits [B, T, K (+ m)] float32: a column per draft
        vocabulary id, then one per row of `extra` (see `columns`)."""
        x = self.head.norm(features.to(self.head.dtype))  # [B, T, H]
        logits = self.main(x)  # [B, T, K]
        if extra is None:
            return logits
        return torch.cat([logits, extra(x)], dim=-1)  # [B, T, K + m]
