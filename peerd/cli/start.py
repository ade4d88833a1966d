"""`peerd start`: run a peer in the foreground (peerd.daemon, imported when it runs)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click

from peerd import __version__
from peerd.cli.client import console, fail
from peerd.config import (
    DEFAULT_API,
    DEVICES,
    DTYPES,
    MEMORY_EMBEDDERS,
    MEMORY_REPLAYS,
    ConfigError,
    load_config,
)
from peerd.inference.options import DRAFT_KINDS, MAX_GAMMA, VERIFY_MODES, spoken


@click.command()
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Where the identity, token and ledger live [$PEERD_HOME or "
              "~/.local/share/peerd].")
@click.option("--listen", multiple=True, metavar="MULTIADDR",
              help="libp2p listen address (repeatable) [/ip4/0.0.0.0/tcp/4001].")
@click.option("--announce", multiple=True, metavar="MULTIADDR",
              help="Address to advertise instead of the listen addresses (repeatable).")
@click.option("--bootstrap", multiple=True, metavar="MULTIADDR",
              help="A peer to join through, /ip4/H/tcp/P/p2p/ID (repeatable).")
@click.option("--api", metavar="HOST:PORT", help=f"Local HTTP API address [{DEFAULT_API}].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=Path),
              help="TOML config file [<data dir>/config.toml if present].")
@click.option("--name", help="Human-readable peer name [short peer id].")
@click.option("--skill", "skills", multiple=True, help="Advertise a skill (repeatable).")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]),
              help="Log verbosity [info].")
@click.option("--heartbeat-s", type=float, help="Ledger heartbeat in seconds [10].")
@click.option("--model", metavar="SPEC", help="Serve a model: smollm2, a .gguf file, a model "
              "directory or a cached Hugging Face repo id.")
@click.option("--layers", metavar="A:B", help="Serve decoder layers [A, B) [the least-served "
              "window that fits memory].")
@click.option("--device", type=click.Choice(DEVICES), help="[auto]")
@click.option("--dtype", type=click.Choice(DTYPES),
              help="Compute dtype [auto: float32 on CPU, bfloat16/float16 on CUDA].")
@click.option("--torch-threads", type=int, help="torch intra-op threads [all cores]; set it "
              "when several peers share a machine.")
@click.option("--speculative", metavar="DRAFT[,VERIFY[,GAMMA]]",
              help="Decode speculatively by default: DRAFT is "
              f"{spoken(DRAFT_KINDS[1:])}; "
              f"VERIFY {spoken(VERIFY_MODES)} [auto]; GAMMA 1-{MAX_GAMMA} [auto]. "
              "Requests may override it.")
@click.option("--prompt-cache/--no-prompt-cache", default=None,
              help="API requests reuse the KV a pooled pipeline session holds of their prompt "
              "(earlier chat turns) [auto: on where the route computes and sends float32, "
              "off in bfloat16/float16, where greedy output would part from a fresh "
              "prefill's].")
@click.option("--audit-rate", type=float, metavar="P",
              help="The share of requests whose route this peer audits: what the route "
              "returned, against a replay with each hop's layers computed by another peer "
              "too; a hop whose output disagrees is routed around [0.05; 0: never].")
@click.option("--rollout", is_flag=True, default=None,
              help="Sample RL rollouts for trainers (`peerd rl train`) with this peer's model, "
              "which then follows the trainer's policy versions; needs --model (with "
              "--layers: a pipeline sampler's shard, sampling when it holds layer 0).")
@click.option("--weights-http-port", metavar="PORT|off",
              help="Serve held RL weight chunks over HTTP on the listen host at PORT too "
              "(pullers check every chunk's hash) [0: any free port; off: libp2p only].")
@click.option("--memory-embedder", type=click.Choice(MEMORY_EMBEDDERS), default=None,
              help="The memory's sentence embedder [auto: all-MiniLM-L6-v2 when installed, "
              "else word hashing].")
@click.option("--memory-replay", type=click.Choice(MEMORY_REPLAYS), default=None,
              help="Where memory candidates are replayed: local, farm (on other peers, "
              "accepted when two agree) [auto: local with --model, else farm].")
@click.option("--memory-abstract-every-s", type=float, metavar="S",
              help="Seconds between rounds in which the memory rewrites its proven items as "
              "general insights for its other domains, each admitted only by replay there "
              "[1800; 0: only on request].")
@click.option("--tools", metavar="NAME[:CAP],...",
              help="Typed tools to offer the swarm, each with the calls it runs at once "
              "[calculator, memory_search, and read_file with --tools-dir].")
@click.option("--tools-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The directory read_file reads in (nothing outside it) [read_file off].")
@click.option("--mcp", multiple=True, metavar='"CMD ARGS"',
              help="An external MCP server (stdio) whose tools this peer offers the swarm; "
              "the command line is split like a shell's, run without one (repeatable).")
@click.option("--mcp-capacity", type=int,
              help="Calls of each external MCP tool run at once [4].")
@click.option("--mcp-deadline-s", type=float,
              help="Seconds an external MCP server has for one call [30].")
def start(config_file: Path | None, **flags: Any) -> None:
    """Run a peer in the foreground until SIGINT or SIGTERM."""
    try:
        config = load_config(flags, config_file=config_file)
    except ConfigError as exc:
        fail(str(exc), 2)
    # After the settings are read: a wrong one is told in a fraction of a second, not
    # after the seconds that importing the whole daemon takes
    from peerd.daemon import StartupError, run

    def announce(info: dict[str, Any]) -> None:
        console.print(f"[bold green]peerd {__version__}[/] peer [bold]{info['name']}[/]")
        console.print(f"  peer id  {info['peer_id']}", highlight=False)
        for addr in info["addrs"]:
            console.print(f"  listen   {addr}", highlight=False)
        console.print(f"  api      {info['api']}", highlight=False)
        console.print(f"  data dir {config.data_dir}", highlight=False)
        console.file.flush()

    def progress(phase: str) -> None:
        console.print(f"  [cyan]model[/]    {phase}", highlight=False)
        console.file.flush()

    try:
        code = run(config, announce=announce, progress=progress)
    except StartupError as exc:
        fail(str(exc), 1)
    # Everything is flushed and closed by now. Skip the interpreter's teardown: with a
    # model loaded, its garbage collection alone took seconds, past the 2 s we promise.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
