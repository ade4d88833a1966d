"""A policy version as a manifest and content-addressed chunks, and back (pure; torch at
the edges only).

`build_manifest` turns named tensors into a `protocols.weights.Manifest` and the chunks
it names; `assemble` turns a manifest and chunks back into tensors, checking every
size and hash first. The bytes of a tensor are its raw little-endian elements, so the
same tensor yields the same chunks on every machine.

LoRA layout (shared with the learner, peerd/rl/learner.py): for each adapted module
`M` (an HF module path such as `model.layers.3.self_attn.q_proj`) a version carries
`M.lora_A` [r, in] and `M.lora_B` [out, r]; the receiver adds
`lora_scale * B @ A` to the base (version 0) tensor `M.weight` (`lora_deltas`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from protocols.weights import (
    DEFAULT_CHUNK_BYTES,
    ITEMSIZE,
    BadChunk,
    BadManifest,
    Manifest,
    TensorEntry,
    digest,
)

# torch dtype <-> manifest dtype, and the little-endian integer view that carries its bits
_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_NAMES = {v: k for k, v in _TORCH.items()}
_BITS = {4: (torch.int32, "<i4"), 2: (torch.int16, "<i2")}
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


class MissingChunks(LookupError):
    """`assemble` was given a manifest without all the chunks it needs (our bug or an
    incomplete pull, not a peer's lie)."""


def build_manifest(run_id: str, model_id: str, version: int, kind: str,
                   tensors: Mapping[str, torch.Tensor], *,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, lora_scale: float | None = None,
                   ) -> tuple[Manifest, dict[bytes, bytes]]:
    """The manifest of `tensors` (in name order) and its chunks by SHA-256. Raises
    BadManifest for values no receiver would accept (checked as a receiver does)."""
    chunks: dict[bytes, bytes] = {}
    entries = []
    for name in sorted(tensors):
        t = tensors[name]
        if t.dtype not in _NAMES:
            raise BadManifest(f"{name}: dtype {t.dtype} not one of {', '.join(ITEMSIZE)}")
        raw = tensor_bytes(t)
        hashes = []
        for start in range(0, len(raw), chunk_bytes):
            piece = raw[start:start + chunk_bytes]
            h = digest(piece)
            chunks[h] = piece
            hashes.append(h)
        entries.append(TensorEntry(name=name, dtype=_NAMES[t.dtype], shape=tuple(t.shape),
                                   nbytes=len(raw), chunks=tuple(hashes)))
    manifest = Manifest(run_id=run_id, model_id=model_id, version=version, kind=kind,
                        chunk_bytes=chunk_bytes, tensors=tuple(entries),
                        lora_scale=None if lora_scale is None else float(lora_scale))
    manifest.check()
    return manifest, chunks


def assemble(manifest: Manifest, chunks: Mapping[bytes, bytes],
             names: Iterable[str] | None = None, *, hashed: bool = False
             ) -> dict[str, torch.Tensor]:
    """{name: tensor} for `names` (default: every tensor) of `manifest`.

    Raises BadManifest when the manifest's sizes do not add up, BadChunk when a chunk's
    length or SHA-256 is not what its name says, MissingChunks when one is absent, and
    KeyError for a name the manifest does not list. `hashed`: the caller vouches that
    every chunk's SHA-256 was checked against its name already (the weights store checks
    each as it comes in): only lengths are checked here, not the hashes again."""
    manifest.check()
    by_name = {t.name: t for t in manifest.tensors}
    wanted = list(by_name) if names is None else list(names)
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise KeyError(f"version {manifest.version} of {manifest.run_id} has no tensor "
                       f"{unknown[0]!r} ({len(unknown)} unknown)")
    out: dict[str, torch.Tensor] = {}
    for name in wanted:
        entry = by_name[name]
        buf = bytearray()
        for i, h in enumerate(entry.chunks):
            piece = chunks.get(h)
            if piece is None:
                raise MissingChunks(f"{name}: chunk {i} ({h.hex()[:16]}) is missing")
            size = min(manifest.chunk_bytes, entry.nbytes - i * manifest.chunk_bytes)
            if hashed:
                if len(piece) != size:
                    raise BadChunk(f"{name} chunk {i} ({h.hex()[:16]}) is {len(piece)} "
                                   f"bytes, expected {size}")
            else:
                check_chunk(h, piece, size, where=f"{name} chunk {i}")
            buf += piece
        out[name] = tensor_from_bytes(buf, entry.dtype, entry.shape)
    return out


def check_chunk(h: bytes, data: bytes, size: int, *, where: str = "chunk") -> None:
    """Raise BadChunk unless `data` is `size` bytes whose SHA-256 is `h`."""
    if len(data) != size:
        raise BadChunk(f"{where} ({h.hex()[:16]}) is {len(data)} bytes, expected {size}")
    if digest(data) != h:
        raise BadChunk(f"{where}: SHA-256 is not {h.hex()[:16]}...")


def tensor_bytes(t: torch.Tensor) -> bytes:
    """The raw little-endian bytes of `t`'s elements, in row-major order."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    itemsize = ITEMSIZE[_NAMES[t.dtype]]
    int_dtype, le = _BITS[itemsize]
    return flat.view(int_dtype).numpy().astype(le, copy=False).tobytes()


def tensor_from_bytes(data: bytes | bytearray, dtype: str, shape: Sequence[int]
                      ) -> torch.Tensor:
    int_dtype, le = _BITS[ITEMSIZE[dtype]]
    array = np.frombuffer(data, dtype=le).astype(le[1:], copy=True)  # native order, owned
    return torch.from_numpy(array).view(int_dtype).view(_TORCH[dtype]).reshape(tuple(shape))


# ---- what a version means to a receiver ------------------------------------------------


def lora_deltas(adapters: Mapping[str, torch.Tensor], scale: float
                ) -> dict[str, torch.Tensor]:
    """{`M.weight`: scale * B @ A} for each module `M` with `M.lora_A` [r, in] and
    `M.lora_B` [out, r] in `adapters`; float32, to ADD to the base tensor `M.weight`.
    Raises ValueError for an unpaired adapter, a name outside the layout, or shapes
    that do not chain."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in adapters.items():
        module, _, part = name.rpartition(".")
        if part not in ("lora_A", "lora_B") or not module:
            raise ValueError(f"adapter {name!r}: expected M.lora_A or M.lora_B")
        modules.setdefault(module, {})[part] = t
    out: dict[str, torch.Tensor] = {}
    for module, pair in sorted(modules.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise ValueError(f"{module}: lora_A and lora_B come in pairs")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{module}: lora_B {list(b.shape)} @ lora_A {list(a.shape)} "
                             "do not chain ([out, r] @ [r, in])")
        out[f"{module}.weight"] = scale * (b.float() @ a.float())  # [out, in]
    return out


def layer_names(names: Iterable[str], start: int, end: int, num_layers: int, *,
                head: bool) -> list[str]:
    """The tensors of `names` a peer serving decoder layers [start, end) needs:
    `model.layers.{i}.*` for i in the range, and every tensor outside the layers
    (embeddings, final norm, lm_head) when it holds the head. A peer holding layer 0
    or the last layer holds the head (`holds_head`); a whole-model peer needs all."""
    if not 0 <= start < end <= num_layers:
        raise ValueError(f"layers [{start}, {end}) not within a {num_layers}-layer model")
    out = []
    for name in names:
        m = _LAYER.match(name)
        if m is None:
            if head:
                out.append(name)
        elif start <= int(m.group(1)) < end:
            out.append(name)
    return out


def holds_head(start: int, end: int, num_layers: int) -> bool:
    return start == 0 or end == num_layers
