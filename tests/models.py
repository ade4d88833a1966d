"""Tiny random Llama models on disk, complete enough to load offline.

`tiny_llama_dir(base, ...)` writes config.json, safetensors weights (sharded by
default, so the index path is exercised) and a small byte-level BPE tokenizer with a
ChatML template: everything `from_pretrained(dir)` and peerd's loaders need, nothing
fetched from the hub. Weights come from `torch.manual_seed(seed)`, so a directory is
a pure function of its arguments; a second call with the same arguments (and the same
base) returns the directory already written.

    @pytest.fixture(scope="session")
    def tiny(tmp_path_factory):
        return tiny_llama_dir(tmp_path_factory)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# What the tokenizer's merges are learnt from: any fixed text will do.
CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 4,
    "A peer-to-peer daemon serves a language model as a pipeline of layer shards.",
    "Each shard runs a contiguous range of decoder layers and keeps a KV cache.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "What is the capital of France? The capital of France is Paris.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 + - * / = ( ) [ ] { }",
]


def tiny_llama_dir(base: Path | pytest.TempPathFactory, *, seed: int = 0, layers: int = 4,
                   hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                   intermediate: int = 128, vocab: int = 384, tied: bool = False,
                   init_std: float = 0.1, shard_size: str | None = "200KB") -> Path:
    """A tiny LlamaForCausalLM saved under `base`; returns its directory.

    init_std is 5x transformers' default 0.02 so that random logits are spread out and
    greedy decoding has clear winners (no near-ties for float rounding to flip)."""
    name = (f"tiny-llama-s{seed}-l{layers}-h{hidden}-a{heads}-kv{kv_heads}-i{intermediate}"
            f"-v{vocab}{'-tied' if tied else ''}-std{init_std}-{shard_size or 'single'}")
    root = base if isinstance(base, Path) else _shared_root(base)
    directory = root / name
    if (directory / "config.json").is_file():
        return directory

    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tiny_tokenizer(vocab)
    special = {t: int(tokenizer.convert_tokens_to_ids(t))  # type: ignore[arg-type]
               for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=512, rms_norm_eps=1e-5, initializer_range=init_std,
        tie_word_embeddings=tied, bos_token_id=special["<|im_start|>"],
        eos_token_id=special["<|im_end|>"], pad_token_id=special["<|endoftext|>"],
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    tmp = directory.with_name(directory.name + ".partial")
    model.save_pretrained(tmp, max_shard_size=shard_size or "50GB")
    tokenizer.save_pretrained(tmp)
    tmp.rename(directory)  # whole or absent: a crashed run leaves no half a model
    return directory


_roots: dict[int, Path] = {}


def _shared_root(factory: pytest.TempPathFactory) -> Path:
    """One directory per TempPathFactory, so repeated calls hit the cache."""
    if id(factory) not in _roots:
        _roots[id(factory)] = factory.mktemp("models")
    return _roots[id(factory)]


def _tiny_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    return fast
