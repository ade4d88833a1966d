"""The compute side of pipelined inference (no networking here).

    source.py   a model SPEC -> ModelSource; its config, tokenizer, reference model
    weights.py  read named tensors (only those) from safetensors or a GGUF file
    shard.py    ShardBlock: decoder layers [start, end) with a per-session KV cache
    head.py     Head: embeddings, final norm and lm_head, kept by the entry peer

This file imports nothing on purpose: `peerd.inference.routing` and friends are pure
and must not pay for importing torch and transformers.
"""
