"""`python -m testnet`: the command line over `testnet.launcher` and `testnet.proxy`.

Thin on purpose: every command is one launcher call plus printing, so what a user
types and what a test or benchmark script calls behave the same. Errors the user
can act on (`TestnetError`) print one message and exit 1, without a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

import click
from rich.console import Console
from rich.table import Table

from peerd.config import DTYPES
from testnet import launcher, proxy
from testnet.launcher import PeerInfo
from testnet.state import DEFAULT_BASE_PORT, TestnetError

P = ParamSpec("P")
R = TypeVar("R")

run_dir_option = click.option(
    "--run-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where the run's state, data dirs and logs live [default: testnet/.run].",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON, not a table.")


def _user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a TestnetError into a red message and exit code 1."""

    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except TestnetError as exc:
            Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            sys.exit(1)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@click.group()
def main() -> None:
    """A local testnet of real peerd processes on 127.0.0.1."""


@main.command()
@click.option("--peers", "n", type=click.IntRange(1, 1000), required=True, help="How many.")
@click.option(
    "--latency-ms",
    type=click.FloatRange(0),
    default=0.0,
    show_default=True,
    help="One-way delay added to every peer-to-peer link (RTT is twice this).",
)
@run_dir_option
@click.option(
    "--base-port",
    type=int,
    default=DEFAULT_BASE_PORT,
    show_default=True,
    help="Peer i gets API port P+i, libp2p port P+1000+i, proxy port P+2000+i.",
)
@click.option(
    "--heartbeat-s",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Ledger heartbeat passed to every peer [default: the daemon's].",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@click.option(
    "--start-timeout-s",
    type=click.FloatRange(min=1),
    default=60.0,
    show_default=True,
    help="How long peers get to answer GET /health.",
)
@click.option(
    "--model",
    metavar="SPEC",
    default=None,
    help="Serve this model (e.g. smollm2) as a pipeline: peer i serves stage i mod S.",
)
@click.option(
    "--stages",
    type=click.IntRange(1),
    default=None,
    help="Split the model's layers into S contiguous stages [default: --peers; 1 with "
    "--rollout].",
)
@click.option(
    "--torch-threads",
    type=click.IntRange(1),
    default=None,
    help="torch threads per peer [default: cores // peers, at least 1].",
)
@click.option(
    "--dtype",
    type=click.Choice(DTYPES),
    default="auto",
    show_default=True,
    help="The peers' compute dtype (peerd start --dtype); bfloat16 makes many-position "
    "passes (speculative verification) cheaper on CPUs with AVX512-BF16 or AMX.",
)
@click.option(
    "--model-timeout-s",
    type=click.FloatRange(min=1),
    default=launcher.MODEL_TIMEOUT_S,
    show_default=True,
    help="With --model: how long peers get to load it and see every stage in their ledgers.",
)
@click.option(
    "--rollout",
    is_flag=True,
    help="With --model: every peer samples RL rollouts for a trainer (peerd start --rollout): "
    "each holding the whole model (one stage, the default then), or with --stages S as "
    "pipeline samplers.",
)
@click.option(
    "--peer-arg",
    "peer_args",
    multiple=True,
    metavar="ARG",
    help="Append ARG to every peer's `peerd start` command; repeatable, and one word each "
    "(--peer-arg=--prompt-cache, or --peer-arg=--kv-headroom --peer-arg=64).",
)
@json_option
@_user_errors
def up(
    n: int,
    latency_ms: float,
    run_dir: Path | None,
    base_port: int,
    heartbeat_s: float | None,
    log_level: str,
    start_timeout_s: float,
    model: str | None,
    stages: int | None,
    torch_threads: int | None,
    dtype: str,
    model_timeout_s: float,
    rollout: bool,
    peer_args: tuple[str, ...],
    as_json: bool,
) -> None:
    """Start N peers bootstrapped to each other; return once all are healthy.

    With --model, also wait until every peer has loaded its stage of the model and
    every peer's ledger lists every stage.
    """
    if model is not None and not as_json:
        Console(stderr=True).print(
            f"starting {n} peers serving {model}; loading can take minutes", highlight=False
        )
    infos = launcher.up(
        n, run_dir, base_port, latency_ms,
        heartbeat_s=heartbeat_s, log_level=log_level, start_timeout_s=start_timeout_s,
        model=model, stages=stages, torch_threads=torch_threads, dtype=dtype,
        model_timeout_s=model_timeout_s,
        peer_args=[*peer_args, *(["--rollout"] if rollout else [])],
    )  # fmt: skip
    _print(infos, as_json)


@main.command()
@run_dir_option
@json_option
@_user_errors
def status(run_dir: Path | None, as_json: bool) -> None:
    """Show every peer: pid, liveness, addresses and measured RTTs."""
    _print(launcher.status(run_dir), as_json)


@main.command()
@click.argument("name")
@run_dir_option
@_user_errors
def kill(name: str, run_dir: Path | None) -> None:
    """SIGKILL peer NAME (e.g. peer1), as a crash would."""
    if launcher.kill(run_dir, name):
        click.echo(f"killed {name}")
    else:
        click.echo(f"{name} was not running")


@main.command()
@run_dir_option
@_user_errors
def down(run_dir: Path | None) -> None:
    """Stop every peer and the proxy (SIGTERM, SIGKILL after 5 s); keep their logs."""
    stopped = launcher.down(run_dir)
    click.echo(f"stopped {stopped} process(es)")


@main.command(name="proxy")
@click.option(
    "--map",
    "links",
    multiple=True,
    required=True,
    metavar="LISTEN:BACKEND",
    help="Forward LISTEN_PORT to BACKEND_PORT on 127.0.0.1; repeatable.",
)
@click.option(
    "--latency-ms",
    type=click.FloatRange(0),
    required=True,
    help="Delay added to each direction of every connection.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
def proxy_command(links: tuple[str, ...], latency_ms: float, log_level: str) -> None:
    """Run the link-latency proxy in the foreground (`up` starts it for you)."""
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    try:
        parsed = [proxy.Link.parse(spec) for spec in links]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--map") from None
    try:
        proxy.run(parsed, latency_ms)
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        raise click.ClickException(f"proxy cannot listen: {exc}") from None


def _print(infos: list[PeerInfo], as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps([info.to_json() for info in infos], indent=2))
        return
    table = Table(title=f"testnet: {sum(p.alive for p in infos)}/{len(infos)} peers alive")
    with_model = any(p.layers is not None for p in infos)
    columns = ["name", "alive", "pid", "peer id", "api", "announce", "peers", "rtt ms"]
    for column in columns + (["layers", "model"] if with_model else []):
        table.add_column(column)
    for p in infos:
        rtts = " ".join(f"{other}={ms:.1f}" for other, ms in sorted(p.rtt_ms.items()))
        row = [
            p.name,
            "[green]yes[/green]" if p.alive else "[red]no[/red]",
            str(p.pid),
            "…" + p.peer_id[-8:],
            p.api,
            p.announce,
            str(len(p.connected)) if p.alive and not p.error else (p.error or "-"),
            rtts or "-",
        ]
        if with_model:
            row.append(f"{p.layers[0]}:{p.layers[1]}" if p.layers else "-")
            row.append(_MODEL_STATE_STYLE.get(p.model_state or "", p.model_state or "-"))
        table.add_row(*row)
    Console().print(table)


_MODEL_STATE_STYLE = {
    "ready": "[green]ready[/green]",
    "loading": "[yellow]loading[/yellow]",
    "failed": "[red]failed[/red]",
}
