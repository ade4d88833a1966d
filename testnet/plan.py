"""What a testnet's peers serve: a model's layers split into pipeline stages.

Pure planning, no processes: `up --model SPEC --stages S` cuts the model's decoder
layers into S contiguous stages as equal as possible and gives peer i stage i mod S,
so N > S peers make replicas (peer S serves what peer 0 does) and S = 1 gives every
peer the whole model. Peers share this machine's cores, so each gets
cores // N torch threads unless told otherwise: N peers on 2 cores must not
oversubscribe them.
"""

from __future__ import annotations

from dataclasses import dataclass

from peerd.config import DTYPES
from peerd.machine import cores as machine_cores
from testnet.state import TestnetError

Layers = tuple[int, int]  # decoder layers [start, end)


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """Who serves what: the model, its size, and peer i's layers at `layers[i]`."""

    spec: str  # what `peerd start --model` gets
    model_id: str  # what the peers advertise in the ledger
    num_layers: int
    stages: list[Layers]
    layers: list[Layers]  # per peer: stages[i % len(stages)]
    torch_threads: int  # per peer
    dtype: str = "auto"  # what `peerd start --dtype` gets


def stage_layers(num_layers: int, stages: int) -> list[Layers]:
    """`stages` contiguous ranges covering [0, num_layers), sizes differing by at most one
    (the first ones get the extra layers): 30 / 3 -> 0:10 10:20 20:30; 30 / 4 -> 0:8
    8:16 16:23 23:30."""
    if not 1 <= stages <= num_layers:
        raise TestnetError(
            f"--stages must be between 1 and the model's {num_layers} layers, got {stages}"
        )
    size, extra = divmod(num_layers, stages)
    out = []
    start = 0
    for i in range(stages):
        end = start + size + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def default_torch_threads(peers: int, cores: int | None = None) -> int:
    """max(1, cores // peers): the machine's cores shared out between the peers."""
    return max(1, (cores or machine_cores()) // peers)


def rollout_stages(model: str | None, stages: int | None) -> int:
    """The stages of a testnet whose peers sample RL rollouts (`up --rollout`): one by
    default (every peer a sampler holding the whole model); with --stages S, pipeline
    samplers: the peers holding layer 0 sample through --rollout shard peers."""
    if model is None:
        raise TestnetError("--rollout needs --model SPEC: a sampler generates with its model")
    return 1 if stages is None else stages


def plan_model(
    spec: str,
    peers: int,
    stages: int | None = None,
    torch_threads: int | None = None,
    dtype: str = "auto",
) -> ModelPlan:
    """Resolve `spec` (offline; reads the model's config, a few seconds) and split it.

    Raises `TestnetError` if the model cannot be found or the split is impossible.
    """
    stages = peers if stages is None else stages
    if stages > peers:
        raise TestnetError(
            f"--stages {stages} needs at least {stages} peers (got --peers "
            f"{peers}): every stage must have a peer serving it"
        )
    if torch_threads is not None and torch_threads < 1:
        raise TestnetError(f"--torch-threads must be at least 1, got {torch_threads}")
    if dtype not in DTYPES:
        raise TestnetError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    # transformers loads here, not at import: `python -m testnet status` stays quick.
    from peerd.inference.model.source import ModelError, num_layers, resolve

    try:
        source = resolve(spec)
        total = num_layers(source)
    except ModelError as exc:
        raise TestnetError(f"cannot serve --model {spec}: {exc}") from None
    except Exception as exc:  # transformers on a file it cannot parse: no one type
        raise TestnetError(
            f"cannot read the model config of --model {spec} ({type(exc).__name__}: {exc}); "
            "is the file complete and a supported (Llama-architecture) model?"
        ) from None
    split = stage_layers(total, stages)
    return ModelPlan(
        spec=spec,
        model_id=source.model_id,
        num_layers=total,
        stages=split,
        layers=[split[i % stages] for i in range(peers)],
        torch_threads=torch_threads or default_torch_threads(peers),
        dtype=dtype,
    )
