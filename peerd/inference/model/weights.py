"""Read named tensors from a checkpoint, and only those.

A shard of layers [10, 12) of a 30-layer model must not pay for the other 28 layers:
not in time, not in memory. Both formats allow it:

    safetensors  `safe_open` maps the file; `get_tensor(name)` reads one tensor. With
                 several files, model.safetensors.index.json says which holds what.
    GGUF         the file is memory-mapped (its tensor table parsed once per machine:
                 gguf_cache); `dequantize(t.data, t.tensor_type)` touches only that
                 tensor's bytes.

Names in and out are transformers' names ("model.layers.10.self_attn.q_proj.weight").
For GGUF they are mapped to llama.cpp's ("blk.10.attn_q.weight") with gguf-py's own
name map, and the tensor goes through transformers' own tensor processor, which undoes
llama.cpp's Q/K row permutation. The result equals, tensor for tensor, what
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` loads (tests check it).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from peerd.inference.model import gguf_cache
from peerd.inference.model.source import ModelError, ModelSource


def read_tensors(source: ModelSource, config: Any, names: Sequence[str], *,
                 dtype: torch.dtype, device: str | torch.device = "cpu"
                 ) -> dict[str, torch.Tensor]:
    """{transformers name: tensor} for exactly `names`, in `dtype` on `device`.

    `config` is the model's transformers config (GGUF needs its head counts)."""
    if source.gguf_file is not None:
        tensors = _read_gguf(source.gguf_path, config, names)
    else:
        tensors = _read_safetensors(source.path, names)
    return {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}


# ---- safetensors -----------------------------------------------------------------------


def _read_safetensors(directory: Path, names: Sequence[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    where = _safetensors_index(directory)
    missing = [n for n in names if n not in where]
    if missing:
        raise ModelError(f"{directory}: no tensor {missing[0]!r} in its safetensors files "
                         f"({len(missing)} missing); is this the model its config says?")
    out: dict[str, torch.Tensor] = {}
    by_file: dict[str, list[str]] = {}
    for name in names:
        by_file.setdefault(where[name], []).append(name)
    for file, wanted in by_file.items():
        with safe_open(str(directory / file), framework="pt", device="cpu") as f:
            for name in wanted:
                out[name] = f.get_tensor(name)
    return out


def _safetensors_index(directory: Path) -> dict[str, str]:
    """{tensor name: file name} from the index, or from the files' headers."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        return weight_map
    from safetensors import safe_open

    where: dict[str, str] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt", device="cpu") as f:  # reads the header only
            where.update(dict.fromkeys(f.keys(), file.name))
    return where


# ---- GGUF ------------------------------------------------------------------------------


def _read_gguf(path: Path, config: Any, names: Sequence[str]) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    arch_name, by_name = gguf_cache.tensor_table(str(path))
    if arch_name is None:
        raise ModelError(f"{path}: no general.architecture in the GGUF metadata")
    name_map = _gguf_name_map(arch_name, int(config.num_hidden_layers))
    # transformers builds its processor from the GGUF-parsed config; for Llama it reads
    # num_attention_heads and num_key_value_heads, which the HF config holds under the
    # same names.
    processor_class = TENSOR_PROCESSORS.get(arch_name, TensorProcessor)
    processor = processor_class(config=config.to_dict())  # type: ignore[no-untyped-call]
    out: dict[str, torch.Tensor] = {}
    for name in names:
        gguf_name = _to_gguf_name(name_map, name)
        tensor = by_name.get(gguf_name) if gguf_name is not None else None
        if tensor is None:
            raise ModelError(f"{path.name}: no GGUF tensor for {name!r} (looked for "
                             f"{gguf_name!r}); is this the model its metadata says?")
        weights = dequantize(tensor.data, tensor.tensor_type)  # float32, only these bytes
        weights = processor.process(  # type: ignore[no-untyped-call]
            weights=weights, name=gguf_name).weights
        # F32 tensors come back as read-only views of the memory map: copy those, and
        # only those (an embedding matrix copied twice is a needless peak on big vocabs)
        out[name] = torch.from_numpy(np.require(weights, requirements=["C", "W"]))
    return out


@functools.lru_cache(maxsize=8)
def _gguf_name_map(arch_name: str, n_layers: int) -> Any:
    """gguf-py's HF -> GGUF name map (what transformers' GGUF loader uses too)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((a for a, n in MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        raise ModelError(f"GGUF architecture {arch_name!r} is unknown to the installed gguf "
                         "package; upgrade gguf")
    return get_tensor_name_map(arch, n_layers)


def _to_gguf_name(name_map: Any, hf_name: str) -> str | None:
    """"model.layers.3.mlp.up_proj.weight" -> "blk.3.ffn_up.weight" (None if unmapped)."""
    base, _, suffix = hf_name.rpartition(".")
    gguf_base = name_map.get_name(base)
    return None if gguf_base is None else f"{gguf_base}.{suffix}"
