"""Tensors to and from the wire: raw little-endian bytes + dtype + shape, never pickle."""

from __future__ import annotations

import torch

from protocols.shard import WireTensor

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_NAMES = {v: k for k, v in TORCH_DTYPES.items()}


def to_wire(t: torch.Tensor, dtype: str | None = None) -> WireTensor:
    """Serialise `t` (optionally cast to the wire dtype `dtype`)."""
    if dtype is not None:
        t = t.to(TORCH_DTYPES[dtype])
    t = t.detach().contiguous().cpu()
    name = DTYPE_NAMES[t.dtype]
    # bfloat16 has no numpy dtype: move the raw 16-bit words.
    raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    return WireTensor(dtype=name, shape=tuple(t.shape), data=raw.numpy().tobytes())


def from_wire(w: WireTensor, *, device: str = "cpu", dtype: torch.dtype | None = None
              ) -> torch.Tensor:
    """Deserialise (after `w.check()`), optionally casting to the compute dtype."""
    w.check()
    target = TORCH_DTYPES[w.dtype]
    carrier = torch.int16 if target == torch.bfloat16 else target
    t = torch.frombuffer(bytearray(w.data), dtype=carrier).reshape(w.shape)
    if carrier is not target:
        t = t.view(target)
    t = t.to(device)
    return t if dtype is None else t.to(dtype)
