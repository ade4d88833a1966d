"""One model on one peer: load it, serve a span of its layers, generate through the swarm.

`ModelRuntime.start(node, options)` resolves the model, picks the layers (the user's
`--layers`, else the least-served window that fits memory, read from the ledger),
loads the shard and the head in worker threads, measures the shard's throughput,
registers the shard server and the entry-side pipeline. The model slot (slot.py)
advertises what it serves, `served` (model id, layers, dtype, tokens/s), in the ledger.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import psutil
import torch
import trio

from peerd import compute
from peerd.inference.generate import Generator
from peerd.inference.model import gguf_cache
from peerd.inference.model.head import Head
from peerd.inference.model.shard import ShardBlock, set_torch_threads
from peerd.inference.model.source import ModelSource, load_config, load_tokenizer, resolve
from peerd.inference.model.tensors import DTYPE_NAMES, TORCH_DTYPES
from peerd.inference.slot import ModelOptions, Progress
from peerd.inference.speculative.acceptance import TokenClasses
from peerd.inference.speculative.catalog import DrafterCatalog
from peerd.inference.swarm.pipeline import Pipeline
from peerd.inference.swarm.placement import choose_layers, window_size
from peerd.inference.swarm.routing import route_peers, servers_by_model
from peerd.inference.swarm.server import ShardServer
from peerd.ledger.book import Ledger
from peerd.node import Node
from peerd.turns import Turns
from protocols.ledger import MAX_LAYERS, Hardware, ModelServed

log = logging.getLogger(__name__)
T = TypeVar("T")

PLACEMENT_WAIT_S = 3.0  # how long a new peer listens to the ledger before choosing layers
MEMORY_FRACTION = 0.6  # of available memory a peer may fill with layers


async def _loading(fn: Callable[..., T], *args: Any) -> T:
    """Run a loading step (reading weights, a tokenizer, a warm-up) on the compute
    thread, abandoned by a shutdown instead of waited for: it changes nothing but its
    own result, and a shard of a big model can take minutes to read."""
    return await compute.run(fn, *args, abandon_on_cancel=True)


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return device


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype != "auto":
        return TORCH_DTYPES[dtype]
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32  # CPU matmuls in half precision are slow and lossy


class ModelRuntime:
    def __init__(self, node: Node, source: ModelSource, block: ShardBlock, head: Head,
                 tokenizer: Any, generator: Generator, server: ShardServer,
                 tokens_per_s: float, hardware: Hardware | None) -> None:
        self.node = node
        self.source = source
        self.block = block
        self.head = head
        self.tokenizer = tokenizer
        self.generator = generator
        self.server = server
        self.tokens_per_s = tokens_per_s
        self.hardware = hardware  # the accelerator, if the model runs on one
        self.served = ModelServed(model_id=source.model_id, layer_start=block.start,
                                  layer_end=block.end, dtype=DTYPE_NAMES[block.dtype],
                                  tokens_per_s=round(tokens_per_s, 2),
                                  num_layers=block.num_layers)

    @property
    def model_id(self) -> str:
        return self.source.model_id

    @classmethod
    async def start(cls, node: Node, ledger: Ledger, options: ModelOptions,
                    progress: Progress = lambda phase: None) -> ModelRuntime:
        if options.torch_threads:
            await compute.run(set_torch_threads, options.torch_threads)
        device = pick_device(options.device)
        dtype = pick_dtype(options.dtype, device)
        hardware = None
        if device == "cuda":
            props = torch.cuda.get_device_properties(0)
            hardware = Hardware(device="cuda", memory_bytes=int(props.total_memory),
                                cpu_count=os.cpu_count() or 0, accelerator=props.name)
        progress(f"resolving {options.spec}")
        source = await _loading(resolve, options.spec)
        if source.gguf_file is not None and not await _loading(gguf_cache.is_converted,
                                                               source.gguf_path):
            progress(f"reading {source.gguf_file}'s metadata (once on this machine: "
                     "seconds)")
        config = await _loading(load_config, source)
        num_layers = int(config.num_hidden_layers)
        if not 0 < num_layers <= MAX_LAYERS:
            raise ValueError(f"{source.model_id} has {num_layers} decoder layers; a peer "
                             f"serves models of 1 to {MAX_LAYERS} (what a ledger entry may "
                             "say)")
        layers = options.layers or await cls._place(node, ledger, source.model_id, num_layers,
                                                    config, dtype)
        start, end = layers
        if not 0 <= start < end <= num_layers:
            raise ValueError(f"--layers {start}:{end} is outside the model's 0:{num_layers}")
        progress(f"loading layers [{start}, {end}) of {source.model_id} ({device}, "
                 f"{DTYPE_NAMES[dtype]})")
        block = await _loading(
            lambda: ShardBlock(source, start, end, device=device, dtype=dtype, config=config))
        progress("loading embeddings and lm_head")
        head = await _loading(lambda: Head(source, device=device, dtype=dtype, config=config))
        tokenizer = await _loading(load_tokenizer, source)
        progress("measuring throughput")
        tokens_per_s = await _loading(measure_tokens_per_s, block)

        # the shard's and the generator's compute, one turn at a time, fair between peers
        turns = Turns(quantum=options.limits.compute_quantum_positions * (end - start))
        server = ShardServer(node, block, options.limits, turns)
        server.register()
        pipeline = Pipeline(node, source.model_id)
        pipeline.register()
        node.keep_connected(lambda: route_peers(
            servers_by_model(ledger.entries()).get(source.model_id, []), node.peer_id,
            (start, end)))
        drafters = DrafterCatalog(head, tokenizer, device=device, dtype=dtype)
        generator = Generator(node, ledger, pipeline, head, model_id=source.model_id,
                              num_layers=num_layers, eos_ids=eos_ids(tokenizer, config),
                              compute=turns, wire_dtype=DTYPE_NAMES[dtype],
                              drafters=drafters,
                              token_classes=token_classes_of(tokenizer, head.vocab_size),
                              default_speculative=options.speculative,
                              max_session_length=options.limits.max_length,
                              prompt_cache=options.prompt_cache,
                              audit_rate=options.audit_rate)
        if options.speculative.enabled:
            progress(f"loading the drafter ({options.speculative.draft})")
            await generator.drafter(options.speculative)
        return cls(node, source, block, head, tokenizer, generator, server, tokens_per_s,
                   hardware)

    @staticmethod
    async def _place(node: Node, ledger: Ledger, model_id: str, num_layers: int, config: Any,
                     dtype: torch.dtype) -> tuple[int, int]:
        """Least-served window that fits memory, after listening to the ledger a while."""
        with trio.move_on_after(PLACEMENT_WAIT_S):
            while not node.connected_peers() or len(ledger) < 2:  # noqa: ASYNC110
                await trio.sleep(0.1)  # (the ledger has no change event to wait on)
        await trio.sleep(0.2)  # let the first snapshots land
        listed = servers_by_model(ledger.entries()).get(model_id, [])
        servers = [s for s in listed if s.peer_id != node.peer_id]
        budget = int(psutil.virtual_memory().available * MEMORY_FRACTION)
        window = window_size(num_layers, layer_bytes(config, dtype), budget)
        return choose_layers(servers, num_layers, window)


def token_classes_of(tokenizer: Any, vocab_size: int) -> Callable[[], TokenClasses]:
    """The vocabulary's importance classes for adaptive verification, built on first use
    (decoding every token takes a second or two) and kept."""
    built: list[TokenClasses] = []

    def get() -> TokenClasses:
        if not built:
            built.append(TokenClasses.from_tokenizer(tokenizer, vocab_size))
        return built[0]

    return get


def layer_bytes(config: Any, dtype: torch.dtype) -> int:
    """Approximate weight bytes of one decoder layer (attention + MLP)."""
    h = int(config.hidden_size)
    inter = int(config.intermediate_size)
    kv = int(config.num_key_value_heads) * int(getattr(config, "head_dim", h // int(
        config.num_attention_heads)))
    params = h * h * 2 + h * kv * 2 + 3 * h * inter
    return params * torch.empty((), dtype=dtype).element_size()


def eos_ids(tokenizer: Any, config: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return ids


def measure_tokens_per_s(block: ShardBlock, steps: int = 8) -> float:
    """Single-token decode steps through the whole block after a short prefill."""
    cache = block.new_cache()
    hidden = torch.randn(1, 16, block.hidden_size, dtype=block.dtype, device=block.device)
    block.forward(hidden, 0, cache)
    one = hidden[:, :1, :]
    t0 = time.perf_counter()
    for i in range(steps):
        block.forward(one, 16 + i, cache)
    return steps / max(time.perf_counter() - t0, 1e-9)

