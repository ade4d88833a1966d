"""The model itself, on one peer (no networking here).

    source.py     a model SPEC -> ModelSource; its config, tokenizer, reference model
    weights.py    read named tensors (only those) from safetensors or a GGUF file
    shard.py      ShardBlock: decoder layers [start, end) with a per-session KV cache
    head.py       Head: embeddings, final norm and lm_head, kept by the entry peer
    attention.py  attention whose result for a query does not depend on the pass
    tensors.py    tensors to and from the wire (raw bytes + dtype + shape)
"""
