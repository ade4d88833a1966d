"""`peerd start`: bring a peer up in the foreground and take it down cleanly.

Start-up checks what a user can get wrong (ports in use, unreadable key or
database) before anything runs, and reports it in one line. SIGINT/SIGTERM close
the API, leave gossip, flush the ledger and exit 0 within two seconds.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import multiaddr
import trio

from peerd.agents.skills import make_matcher
from peerd.agents.solver import ModelSolver
from peerd.agents.symphony import Symphony
from peerd.api.app import create_app
from peerd.api.server import ApiBindError, bind, serve
from peerd.config import Config
from peerd.datadir import (
    RUNTIME_FILE,
    DataDirInUse,
    lock_data_dir,
    write_runtime_file,
)
from peerd.identity import IdentityError, ensure_data_dir, load_or_create_key, load_or_create_token
from peerd.inference.face import LanguageModel
from peerd.inference.model.source import ModelError, resolve
from peerd.inference.options import SpeculativeOptions
from peerd.inference.request import TokenConstraint
from peerd.inference.slot import ModelOptions, ModelSlot, Progress, ShardLimits
from peerd.ledger.gossip import LedgerGossip
from peerd.ledger.store import LedgerStoreError
from peerd.memory.service import Memory
from peerd.node import Node, open_node
from peerd.plans.mcp_endpoint import McpEndpoint, PlanAnswer, PlanFn
from peerd.plans.mcp_settings import McpSettings
from peerd.plans.planner import ToolSpecLike
from peerd.plans.planning import Plans
from peerd.plans.service import Tools
from peerd.rl.rollout_service import Rollouts
from peerd.rl.training import Training
from peerd.rl.weights import WeightStore
from peerd.service import Service

log = logging.getLogger("peerd")

SHUTDOWN_GRACE_S = 1.5


class StartupError(RuntimeError):
    """Something the user must fix before the peer can start; the message says what."""


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()), stream=sys.stderr,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )
    if level != "debug":
        # py-libp2p logs routine churn (failed dials, resets) at info and warning, and
        # some of its modules set their own logger's level, so quiet each one.
        for name in ["libp2p", "multiaddr", "async_service",
                     *logging.root.manager.loggerDict]:
            if name.split(".")[0] in ("libp2p", "multiaddr", "async_service"):
                logging.getLogger(name).setLevel(logging.ERROR)


def check_listen_ports(listen: tuple[str, ...]) -> None:
    for addr in listen:
        ma = multiaddr.Multiaddr(addr)
        port = int(ma.value_for_protocol("tcp"))
        if port == 0:
            continue
        try:
            ip = ma.value_for_protocol("ip4")
            family = socket.AF_INET
        except Exception:
            ip = ma.value_for_protocol("ip6")
            family = socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((ip, port))
            except OSError as exc:
                raise StartupError(
                    f"listen address {addr} is not available ({exc.strerror}); another peerd "
                    "may be running — pass --listen /ip4/0.0.0.0/tcp/PORT with a free port"
                ) from None


def run(config: Config, *, announce: Any = print, progress: Any = None) -> int:
    """Run the daemon until a signal; returns the exit code."""
    setup_logging(config.log_level)
    try:
        ensure_data_dir(config.data_dir)
        lock_data_dir(config.data_dir)
        key_pair = load_or_create_key(config.data_dir)
        token = load_or_create_token(config.data_dir)
        check_listen_ports(config.listen)
        api_config, sockets = bind(config.api_host, config.api_port)
        if config.model:
            resolve(config.model)  # a wrong SPEC fails now, in words, not after start-up
    except (IdentityError, ApiBindError, DataDirInUse, ModelError) as exc:
        raise StartupError(str(exc)) from None
    try:
        trio.run(_main, config, key_pair, token, api_config, sockets, announce,
                 progress or (lambda phase: log.info("model: %s", phase)))
    except* LedgerStoreError as group:  # opening the store, inside the node's nursery
        error: BaseException = group
        while isinstance(error, BaseExceptionGroup):
            error = error.exceptions[0]
        raise StartupError(str(error)) from None
    finally:
        (config.data_dir / RUNTIME_FILE).unlink(missing_ok=True)
    return 0


def model_options(config: Config) -> ModelOptions | None:
    if not config.model:
        return None
    limits = ShardLimits(max_sessions=config.max_sessions,
                         max_kv_bytes=config.kv_cache_mb * 2**20,
                         kv_headroom_positions=config.kv_headroom_positions,
                         compute_quantum_positions=config.compute_quantum_positions,
                         compute_turn_budget=config.compute_turn_budget)
    return ModelOptions(spec=config.model, layers=config.layer_range, device=config.device,
                        dtype=config.dtype, torch_threads=config.torch_threads, limits=limits,
                        speculative=SpeculativeOptions.parse_flag(config.speculative),
                        prompt_cache=config.prompt_cache, audit_rate=config.audit_rate)


def step_constraint(model: LanguageModel, tools: Sequence[ToolSpecLike]) -> TokenConstraint:
    """The planner's steps under its tools' grammar (plans/constrain.py, imported when a
    plan first needs it: it loads torch, which a peer without a model never does)."""
    from peerd.plans.constrain import step_constraint as build
    return build(model, tools)


def plan_over_mcp(plans: Plans) -> PlanFn:
    """/mcp's `plan` tool: a plan over every live tool, its end awaited."""
    async def plan(goal: str) -> PlanAnswer:
        text, plan_id, ok = await plans.settle(goal)
        return PlanAnswer(text, plan_id, ok)
    return plan


def build_services(node: Node, config: Config, progress: Progress) -> list[Service]:
    """The systems this peer runs, in start order: one line each. A system that needs
    another is given it here."""
    ledger = LedgerGossip(node)
    model = ModelSlot(node, ledger, model_options(config), progress)
    # Only a peer that can work bids, so only it needs the skill matcher.
    solver = ModelSolver(model) if model.options is not None else None
    symphony = Symphony(node, ledger, solver, make_matcher(config.skill_matcher),
                        skills=config.skills, warm_up=solver is not None)
    # RL policy versions: published, pulled and re-served (chunks over HTTP as well)
    weights = WeightStore(node, ledger=ledger, http_port=None if config.weights_http_port < 0
                          else config.weights_http_port)
    training = Training(node, ledger, weights, config.data_dir,  # RL runs asked of us
                        torch_threads=config.torch_threads)
    # SEDM: items admitted by replay on our model (a peer without one farms its replays
    # out to peers that serve one: --memory-replay)
    memory = Memory(node, model if model.options is not None else None, config.data_dir,
                    embedder=config.memory_embedder, replay=config.memory_replay,
                    abstract_every_s=config.memory_abstract_every_s)
    # typed tools for the swarm (Gradientsys): the built-ins the config names, and the
    # tools of the external MCP servers it names (--mcp), run in the service's nursery;
    # ask and vote reach the swarm's model through ours, so only a peer that serves one
    # offers them
    face = model.face if model.options is not None else None
    tools = Tools(node, ledger, builtins=config.tool_choices, tools_dir=config.tools_dir,
                  model=face, run_task=symphony.run_task if face is not None else None,
                  mcp=config.mcp, mcp_settings=McpSettings(
                      capacity=config.mcp_capacity, deadline_s=config.mcp_deadline_s,
                      ready_s=config.mcp_ready_s, max_restarts=config.mcp_restarts),
                  suspect_s=config.tool_suspect_s)
    # ReAct plans over the swarm's tools, their steps written by our model
    plans = Plans(node, tools, config.data_dir, model=face, make_constraint=step_constraint)
    # the API's `memory` option and the memory_search tool draw on it
    model.recall = symphony.recall = tools.recall = plans.recall = memory
    # and keeps their scored runs as SCECs
    symphony.scored = training.scored = plans.scored = memory
    services: list[Service] = [ledger, model, symphony, weights, training, memory, tools,
                               plans, McpEndpoint(tools, plan=plan_over_mcp(plans))]
    if config.rollout:
        services.append(Rollouts(node, ledger, model, weights))
    return services


async def _main(config: Config, key_pair: Any, token: str, api_config: Any, sockets: Any,
                announce: Any, progress: Progress) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with open_node(config, key_pair) as node:
            await node.start(*build_services(node, config, progress))
            shutdown = trio.Event()
            # The bound port, not the configured one: `--api 127.0.0.1:0` picks a free port.
            api_port = sockets.insecure_sockets[0].getsockname()[1]
            api_url = config.api_url(api_port)
            info = {"peer_id": node.peer_id, "name": node.name, "pid": os.getpid(),
                    "api": api_url, "addrs": node.addrs(), "started_at": time.time()}
            write_runtime_file(config.data_dir, info)
            announce(info)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve, create_app(node, token), api_config, sockets,
                                   shutdown)
                async for signum in signals:
                    log.info("%s received; shutting down", signal.Signals(signum).name)
                    break
                shutdown.set()
                # Give the API a moment to finish in-flight responses, then stop everything.
                nursery.cancel_scope.deadline = trio.current_time() + SHUTDOWN_GRACE_S / 3
    log.info("stopped")
