"""EAGLE head files: fp16 safetensors whose header names the target the head was
trained for (model_id, shapes, and a fingerprint of the embedding matrix), so that
`load_eagle` refuses it for any other model; optionally the head's draft vocabulary
(vocab.py) as one more tensor."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from peerd.inference.model.head import Head
from peerd.inference.speculative.drafters import DraftError
from peerd.inference.speculative.eagle import EagleConfig, EagleDrafter, EagleHead
from peerd.inference.speculative.vocab import VocabError, validate

FORMAT = "peerd-eagle"
FORMAT_VERSION = "2"  # 2: an optional draft vocabulary
READS_VERSIONS = ("1", "2")
VOCAB_TENSOR = "draft_vocab"  # int32 [K]: the ids drafts are scored over (vocab.py)
DATA_DIR = Path(__file__).resolve().parents[2] / "data"  # peerd/data
# model_id -> the head shipped in peerd/data for it (see scripts/train_eagle_smollm2.sh)
SHIPPED = {"SmolLM2-135M-Instruct.Q4_1": "eagle-smollm2.safetensors"}


def fingerprint(head: Head) -> str:
    """sha256 of the signs of 64 embedding rows spread over the vocabulary. Signs, not
    values: they survive loading the target in float32, bfloat16 or float16 alike, and
    4096 bits of them tell two trained (or two random) models apart."""
    weight = head.embed_tokens.weight
    rows = torch.linspace(0, weight.shape[0] - 1, 64).long()  # [64]
    signs = (weight[rows].float() > 0).flatten().to(torch.uint8)  # [64 * H] of 0/1
    h = hashlib.sha256(f"{weight.shape[0]}x{weight.shape[1]}:".encode())
    h.update(bytes(signs.tolist()))
    return h.hexdigest()


def target_metadata(head: Head) -> dict[str, str]:
    """What a head file records about the model it drafts for."""
    return {"model_id": head.model_id, "hidden_size": str(head.hidden_size),
            "vocab_size": str(head.vocab_size), "num_layers": str(head.num_layers),
            "embed_fingerprint": fingerprint(head)}


def save_eagle(eagle: EagleHead, head: Head, path: Path,
               extra: dict[str, Any] | None = None, vocab: Sequence[int] | None = None,
               vocab_info: dict[str, Any] | None = None) -> None:
    """Write `eagle` as fp16 safetensors, for the target `head`, with its draft `vocab`
    if any; `extra` (how it was trained) and `vocab_info` (where the vocabulary came
    from) go into the header as JSON."""
    meta = {"format": FORMAT, "version": FORMAT_VERSION, **target_metadata(head),
            "config": json.dumps(asdict(eagle.config)),
            "training": json.dumps(extra or {}, sort_keys=True)}
    tensors = {k: v.detach().to("cpu", torch.float16).contiguous()
               for k, v in eagle.state_dict().items()}
    _write(path, meta, tensors, head, vocab, vocab_info)


def _write(path: Path, meta: dict[str, str], tensors: dict[str, torch.Tensor], head: Head,
           vocab: Sequence[int] | None, vocab_info: dict[str, Any] | None) -> None:
    from safetensors.torch import save_file

    meta, tensors = dict(meta), dict(tensors)
    meta.pop(VOCAB_TENSOR, None)
    tensors.pop(VOCAB_TENSOR, None)
    if vocab is not None:
        try:
            validate(vocab, head.vocab_size)
        except VocabError as exc:
            raise DraftError(str(exc)) from exc
        tensors[VOCAB_TENSOR] = torch.tensor(sorted(vocab), dtype=torch.int32)
        meta[VOCAB_TENSOR] = json.dumps({"size": len(vocab), **(vocab_info or {})},
                                        sort_keys=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.chmod(0o644)  # safetensors writes 0600; the shipped head is package data
    tmp.replace(path)  # whole or absent


def read_eagle_file(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The header metadata and tensors of a head file; DraftError if it is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise DraftError(f"{path} is not a peerd EAGLE head: {exc}") from exc
    if meta.get("format") != FORMAT:
        raise DraftError(f"{path} is not a peerd EAGLE head: its header has no "
                         f"format={FORMAT!r}")
    if meta.get("version") not in READS_VERSIONS:
        raise DraftError(f"{path}: EAGLE head format version {meta.get('version')!r}; this "
                         f"peerd reads versions {', '.join(READS_VERSIONS)}")
    return meta, tensors


def training_record(path: Path) -> Any:
    """How the head in `path` was trained: its header's record as `save_eagle` wrote it
    ({} when it has none; the text itself when that is not JSON). The header alone is
    read, not the weights."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get("training", "{}")
    except (OSError, SafetensorError, ValueError, RuntimeError) as exc:
        raise DraftError(f"{path} is not a peerd EAGLE head: {exc}") from exc
    try:
        return json.loads(text)
    except ValueError:
        return text


def load_eagle(path: Path, head: Head, name: str = "eagle") -> EagleDrafter:
    """The head in `path` as a drafter for `head`'s model, on head's device, in float32
    (bfloat16 where the head is): refused with a DraftError naming both models when it
    was trained for another one."""
    path = Path(path)
    meta, tensors = read_eagle_file(path)
    mine = target_metadata(head)
    differs = [k for k in ("hidden_size", "vocab_size", "embed_fingerprint")
               if meta.get(k) != mine[k]]
    if differs:
        raise DraftError(
            f"{path} is an EAGLE head for {meta.get('model_id', '?')!r}, not for "
            f"{head.model_id!r}: the models differ in {', '.join(differs)} (train one for "
            f"this model: peerd draft train --model ...)")
    vocab = tensors.pop(VOCAB_TENSOR, None)
    if vocab is not None and (vocab.dim() != 1 or vocab.dtype.is_floating_point):
        raise DraftError(f"{path}: its {VOCAB_TENSOR} is not a list of token ids "
                         f"({vocab.dtype}, shape {list(vocab.shape)})")
    try:
        known = {f.name for f in fields(EagleConfig)}
        config = EagleConfig(**{k: v for k, v in json.loads(meta["config"]).items()
                                if k in known})
        eagle = EagleHead(config)
        eagle.load_state_dict(tensors, strict=True)  # into float32 parameters
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise DraftError(f"{path} is not a peerd EAGLE head: {exc}") from exc
    eagle.to(head.device)
    if head.dtype == torch.bfloat16:  # the weights only: RoPE frequencies stay float32
        for module in (eagle.feature_norm, eagle.fc, eagle.layer, eagle.upper):
            module.to(torch.bfloat16)
    ids = None if vocab is None else [int(t) for t in vocab.tolist()]
    try:
        return EagleDrafter(head, eagle, name=name, vocab=ids)
    except DraftError as exc:
        raise DraftError(f"{path}: {exc}") from exc


def set_vocab(path: Path, head: Head, vocab: Sequence[int] | None,
              info: dict[str, Any] | None = None) -> None:
    """Rewrite the head file `path` with draft vocabulary `vocab` (None: none, draft
    over the whole vocabulary); its weights (as stored) and header stay."""
    path = Path(path)
    load_eagle(path, head)  # refuses a head for another model, or a broken file
    meta, tensors = read_eagle_file(path)
    _write(path, {**meta, "version": FORMAT_VERSION}, tensors, head, vocab, info)


def default_eagle_path(model_id: str) -> Path | None:
    """The head shipped with peerd for `model_id`, or None when there is none."""
    name = SHIPPED.get(model_id)
    if name is None or not (DATA_DIR / name).is_file():
        return None
    return DATA_DIR / name
