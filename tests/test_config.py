"""Settings (flags > env > TOML > defaults) and the identity kept in the data dir."""

from __future__ import annotations

import random
import stat
from pathlib import Path

import pytest
from libp2p.crypto.secp256k1 import create_new_key_pair as new_secp256k1_key_pair
from libp2p.identity_utils import save_identity

from peerd.config import (
    DEFAULT_API,
    DEFAULT_LISTEN,
    Config,
    ConfigError,
    load_config,
)
from peerd.identity import (
    KEY_FILE,
    IdentityError,
    load_or_create_key,
    load_or_create_token,
    peer_id_of,
)

PEER = "12D3KooWHQ19zguyZjzzm5QCruHTL7f8nYuLqSM3f8e6URCnoRR9"
BOOT = f"/ip4/10.0.0.1/tcp/4001/p2p/{PEER}"
BOOT2 = f"/ip4/10.0.0.2/tcp/4002/p2p/{PEER}"


def write_toml(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def config_error(**kw: object) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        load_config(**kw)  # type: ignore[arg-type]
    return err.value


# ---- precedence -----------------------------------------------------------------


def test_defaults(tmp_path: Path) -> None:
    cfg = load_config(environ={"PEERD_HOME": str(tmp_path)})
    assert cfg.data_dir == tmp_path
    assert cfg.listen == (DEFAULT_LISTEN,)
    assert cfg.api == DEFAULT_API and cfg.api_host == "127.0.0.1" and cfg.api_port == 4100
    assert cfg.bootstrap == () and cfg.skills == ()
    assert cfg.ttl_s == cfg.heartbeat_s * cfg.ttl_heartbeats


def test_flags_beat_env_beat_file_beat_defaults(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "peerd.toml", """
name = "from-file"
heartbeat_s = 5.0
ttl_heartbeats = 4
skills = ["file-skill"]
log_level = "warning"
""")
    env = {"PEERD_NAME": "from-env", "PEERD_HEARTBEAT_S": "2.5", "PEERD_TTL_HEARTBEATS": "6",
           "PEERD_HOME": str(tmp_path / "home")}
    flags = {"name": "from-flag", "api": None, "skills": ()}  # None / () = not passed
    cfg = load_config(flags, config_file=toml, environ=env)
    assert cfg.name == "from-flag"  # flag > env > file
    assert cfg.heartbeat_s == 2.5 and cfg.ttl_heartbeats == 6  # env > file
    assert cfg.skills == ("file-skill",) and cfg.log_level == "warning"  # file > default
    assert cfg.api == DEFAULT_API  # default
    assert cfg.data_dir == tmp_path / "home"  # PEERD_HOME is the data dir


def test_peerd_data_dir_beats_peerd_home(tmp_path: Path) -> None:
    env = {"PEERD_HOME": str(tmp_path / "home"), "PEERD_DATA_DIR": str(tmp_path / "explicit")}
    assert load_config(environ=env).data_dir == tmp_path / "explicit"


def test_data_dir_flag_beats_peerd_home(tmp_path: Path) -> None:
    cfg = load_config({"data_dir": tmp_path / "flag"}, environ={"PEERD_HOME": str(tmp_path)})
    assert cfg.data_dir == tmp_path / "flag"


def test_config_toml_in_the_data_dir_is_read(tmp_path: Path) -> None:
    write_toml(tmp_path / "config.toml", '[peerd]\nname = "found"\ntarget_peers = 3\n')
    cfg = load_config(environ={"PEERD_HOME": str(tmp_path)})
    assert cfg.name == "found" and cfg.target_peers == 3
    # ... also when the data dir comes from a flag.
    cfg = load_config({"data_dir": str(tmp_path)}, environ={})
    assert cfg.name == "found"


def test_lists_from_env_are_comma_separated(tmp_path: Path) -> None:
    env = {
        "PEERD_HOME": str(tmp_path),
        "PEERD_SKILLS": "summarise, translate ,,code",
        "PEERD_BOOTSTRAP": f"{BOOT},{BOOT2}",
        "PEERD_LISTEN": "/ip4/127.0.0.1/tcp/0, /ip4/127.0.0.1/tcp/4005",
    }
    cfg = load_config(environ=env)
    assert cfg.skills == ("summarise", "translate", "code")
    assert cfg.bootstrap == (BOOT, BOOT2)
    assert cfg.listen == ("/ip4/127.0.0.1/tcp/0", "/ip4/127.0.0.1/tcp/4005")


def test_lists_from_toml_and_flags(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "c.toml", f'bootstrap = ["{BOOT}"]\n')
    cfg = load_config({"skills": ("a", "b")}, config_file=toml,
                      environ={"PEERD_HOME": str(tmp_path)})
    assert cfg.bootstrap == (BOOT,) and cfg.skills == ("a", "b")


def test_the_shares_settings_reach_the_shard_limits(tmp_path: Path) -> None:
    from peerd.daemon import model_options

    cfg = load_config(environ={"PEERD_HOME": str(tmp_path), "PEERD_MODEL": "smollm2",
                               "PEERD_KV_HEADROOM_POSITIONS": "64",
                               "PEERD_COMPUTE_QUANTUM_POSITIONS": "8",
                               "PEERD_COMPUTE_TURN_BUDGET": "512"})
    options = model_options(cfg)
    assert options is not None
    limits = options.limits
    assert (limits.kv_headroom_positions, limits.compute_quantum_positions,
            limits.compute_turn_budget) == (64, 8, 512)


def test_numbers_from_env_strings(tmp_path: Path) -> None:
    cfg = load_config(environ={"PEERD_HOME": str(tmp_path), "PEERD_HEARTBEAT_S": "0.5",
                               "PEERD_TARGET_PEERS": "12"})
    assert cfg.heartbeat_s == 0.5 and cfg.target_peers == 12


def test_the_tool_suspicion_is_seconds_from_the_environment(tmp_path: Path) -> None:
    home = {"PEERD_HOME": str(tmp_path)}
    assert load_config(environ=home).tool_suspect_s == 30.0
    assert load_config(environ={**home, "PEERD_TOOL_SUSPECT_S": "0"}).tool_suspect_s == 0.0
    err = config_error(environ={**home, "PEERD_TOOL_SUSPECT_S": "-1"})
    assert err.setting == "tool_suspect_s" and err.source == "PEERD_TOOL_SUSPECT_S"


def test_the_audit_rate_is_a_share_and_reaches_the_model(tmp_path: Path) -> None:
    from peerd.daemon import model_options

    home = {"PEERD_HOME": str(tmp_path), "PEERD_MODEL": "smollm2"}
    assert load_config(environ=home).audit_rate == 0.05
    options = model_options(load_config({"audit_rate": 0.25}, environ=home))
    assert options is not None and options.audit_rate == 0.25
    for bad in ("1.5", "-0.1", "nan", "often"):
        err = config_error(environ={**home, "PEERD_AUDIT_RATE": bad})
        assert err.setting == "audit_rate" and err.source == "PEERD_AUDIT_RATE"


def test_prompt_cache_is_a_switch_from_any_source(tmp_path: Path) -> None:
    home = {"PEERD_HOME": str(tmp_path), "PEERD_MODEL": "smollm2"}
    # unset: on where reuse is safe, which the route decides (tests/test_prompt_cache.py)
    assert load_config(environ=home).prompt_cache is None
    for word, want in [("true", True), ("On", True), ("1", True), ("no", False)]:
        assert load_config(environ={**home, "PEERD_PROMPT_CACHE": word}).prompt_cache is want
    toml = write_toml(tmp_path / "c.toml", "prompt_cache = true\n")
    assert load_config(config_file=toml, environ=home).prompt_cache is True
    assert load_config({"prompt_cache": False}, config_file=toml,
                       environ=home).prompt_cache is False  # the flag wins
    assert load_config(config_file=toml, environ={**home, "PEERD_PROMPT_CACHE": "auto"}
                       ).prompt_cache is None  # back to the default


# ---- errors name the setting and the source -------------------------------------


@pytest.mark.parametrize("api", ["nonsense", "127.0.0.1", ":4100", "127.0.0.1:http",
                                 "127.0.0.1:70000", "127.0.0.1:-1"])
def test_bad_api_flag(tmp_path: Path, api: str) -> None:
    err = config_error(flags={"api": api}, environ={"PEERD_HOME": str(tmp_path)})
    assert err.setting == "api" and err.source == "--api"
    assert "api" in str(err) and "--api" in str(err) and api in str(err)


def test_bad_api_from_env_names_the_variable(tmp_path: Path) -> None:
    err = config_error(environ={"PEERD_HOME": str(tmp_path), "PEERD_API": "localhost"})
    assert err.setting == "api" and err.source == "PEERD_API"
    assert "PEERD_API" in str(err)


def test_unknown_key_in_toml_names_key_and_file(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "c.toml", 'name = "x"\nlisten_port = 4001\n')
    err = config_error(config_file=toml, environ={"PEERD_HOME": str(tmp_path)})
    assert err.setting == "listen_port" and err.source == str(toml)
    assert "listen_port" in str(err) and str(toml) in str(err)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "c.toml", "name = \n")
    err = config_error(config_file=toml, environ={"PEERD_HOME": str(tmp_path)})
    assert str(toml) in str(err) and "TOML" in str(err)


def test_missing_config_file_names_it(tmp_path: Path) -> None:
    err = config_error(config_file=tmp_path / "nope.toml", environ={})
    assert str(tmp_path / "nope.toml") in str(err)


def test_bad_multiaddr_in_bootstrap(tmp_path: Path) -> None:
    err = config_error(flags={"bootstrap": ("/ip4/999.1.1.1/tcp/1/p2p/x",)},
                       environ={"PEERD_HOME": str(tmp_path)})
    assert err.setting == "bootstrap" and err.source == "--bootstrap"
    assert "not a multiaddr" in str(err)


def test_bootstrap_without_p2p_part(tmp_path: Path) -> None:
    toml = write_toml(tmp_path / "c.toml", 'bootstrap = ["/ip4/10.0.0.1/tcp/4001"]\n')
    err = config_error(config_file=toml, environ={"PEERD_HOME": str(tmp_path)})
    assert err.setting == "bootstrap" and err.source == str(toml)
    assert "/p2p/" in str(err)


def test_bootstrap_from_env_without_p2p_names_the_variable(tmp_path: Path) -> None:
    err = config_error(environ={"PEERD_HOME": str(tmp_path),
                                "PEERD_BOOTSTRAP": f"{BOOT},/ip4/10.0.0.9/tcp/1"})
    assert err.setting == "bootstrap" and err.source == "PEERD_BOOTSTRAP"


def test_listen_must_be_tcp(tmp_path: Path) -> None:
    err = config_error(flags={"listen": ("/ip4/0.0.0.0/udp/4001/quic-v1",)},
                       environ={"PEERD_HOME": str(tmp_path)})
    assert err.setting == "listen" and "tcp" in str(err).lower()


@pytest.mark.parametrize(("var", "value", "setting"), [
    ("PEERD_HEARTBEAT_S", "often", "heartbeat_s"),
    ("PEERD_HEARTBEAT_S", "0", "heartbeat_s"),
    ("PEERD_HEARTBEAT_S", "nan", "heartbeat_s"),
    ("PEERD_TTL_HEARTBEATS", "1.5", "ttl_heartbeats"),
    ("PEERD_TTL_HEARTBEATS", "0", "ttl_heartbeats"),
    ("PEERD_TARGET_PEERS", "many", "target_peers"),
    ("PEERD_LOG_LEVEL", "loud", "log_level"),
    ("PEERD_NAME", "n" * 65, "name"),
    ("PEERD_PROMPT_CACHE", "maybe", "prompt_cache"),
    ("PEERD_PROMPT_CACHE", "true", "prompt_cache"),  # without a model to cache for
    ("PEERD_COMPUTE_TURN_BUDGET", "0", "compute_turn_budget"),
    ("PEERD_COMPUTE_QUANTUM_POSITIONS", "-3", "compute_quantum_positions"),
    ("PEERD_KV_HEADROOM_POSITIONS", "lots", "kv_headroom_positions"),
])
def test_bad_env_values(tmp_path: Path, var: str, value: str, setting: str) -> None:
    err = config_error(environ={"PEERD_HOME": str(tmp_path), var: value})
    assert err.setting == setting and err.source == var
    assert setting in str(err) and var in str(err)


@pytest.mark.parametrize(("text", "setting"), [
    ('skills = "one"\nname = 5\n', "name"),
    ("target_peers = true\n", "target_peers"),
    ("listen = [1, 2]\n", "listen"),
    ('heartbeat_s = "soon"\n', "heartbeat_s"),
    ("heartbeat_s = true\n", "heartbeat_s"),  # not silently 1.0 s
    ("ttl_heartbeats = 2.5\n", "ttl_heartbeats"),  # not silently truncated to 2
    ('prompt_cache = "sometimes"\n', "prompt_cache"),
    ("prompt_cache = 1\n", "prompt_cache"),
])
def test_bad_types_in_toml(tmp_path: Path, text: str, setting: str) -> None:
    toml = write_toml(tmp_path / "c.toml", text)
    err = config_error(config_file=toml, environ={"PEERD_HOME": str(tmp_path)})
    assert err.setting == setting and err.source == str(toml)


def test_unknown_flag(tmp_path: Path) -> None:
    err = config_error(flags={"colour": "blue"}, environ={"PEERD_HOME": str(tmp_path)})
    assert err.setting == "colour"


def test_config_is_frozen() -> None:
    cfg = Config(data_dir=Path("/tmp/x"))
    with pytest.raises(AttributeError):
        cfg.name = "other"  # type: ignore[misc]


# ---- identity -------------------------------------------------------------------


def test_identity_is_stable_across_reloads(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = load_or_create_key(data_dir)
    again = load_or_create_key(data_dir)
    assert peer_id_of(first) == peer_id_of(again)
    assert again.private_key.get_type().name == "Ed25519"
    assert str(peer_id_of(first)).startswith("12D3KooW")


def test_key_file_is_private(tmp_path: Path) -> None:
    load_or_create_key(tmp_path / "data")
    mode = stat.S_IMODE((tmp_path / "data" / KEY_FILE).stat().st_mode)
    assert mode == 0o600


@pytest.mark.parametrize("garbage", [
    b"",
    b"not a key at all",
    random.Random(1234).randbytes(68),
    b"\x08\x01\x12\x05short",  # an ed25519 key of the wrong length
])
def test_corrupt_key_file_is_an_error_not_a_new_identity(tmp_path: Path,
                                                         garbage: bytes) -> None:
    key_file = tmp_path / KEY_FILE
    key_file.write_bytes(garbage)
    with pytest.raises(IdentityError) as err:
        load_or_create_key(tmp_path)
    assert str(key_file) in str(err.value)
    assert key_file.read_bytes() == garbage  # never overwritten with a new key


def test_key_of_another_type_is_refused(tmp_path: Path) -> None:
    save_identity(new_secp256k1_key_pair(), tmp_path / KEY_FILE)
    before = (tmp_path / KEY_FILE).read_bytes()
    with pytest.raises(IdentityError) as err:
        load_or_create_key(tmp_path)
    assert str(tmp_path / KEY_FILE) in str(err.value)
    assert (tmp_path / KEY_FILE).read_bytes() == before


def test_api_token_is_stable_and_private(tmp_path: Path) -> None:
    token = load_or_create_token(tmp_path)
    assert load_or_create_token(tmp_path) == token and len(token) >= 16
    assert stat.S_IMODE((tmp_path / "api_token").stat().st_mode) == 0o600


def test_corrupt_api_token_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "api_token").write_bytes(b"\x00\x01short")
    with pytest.raises(IdentityError) as err:
        load_or_create_token(tmp_path)
    assert str(tmp_path / "api_token") in str(err.value)
