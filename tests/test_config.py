"""Agent config: file < env < flags precedence, and errors that name the key and where it came from."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

import agent.config as config_mod
from agent.config import (
    AgentConfig,
    ConfigError,
    enforce_insecure_loopback,
    env_var_name,
    is_loopback,
    load_config,
    split_listen,
)


@pytest.fixture(autouse=True)
def _no_system_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read the real /etc/gpusoc/agent.toml of the machine running the tests."""
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent" / "agent.toml"))


def _toml(tmp_path: Path, body: str) -> str:
    path = tmp_path / "agent.toml"
    path.write_text(body)
    return str(path)


def test_defaults() -> None:
    cfg = load_config(None, env={})
    assert cfg == AgentConfig(host=socket.gethostname())
    assert cfg.listen == "0.0.0.0:7443"
    assert cfg.insecure is False
    assert cfg.tls_client_ca == "/etc/gpusoc/tls/console-ca.pem"
    assert cfg.sample_interval_s == 1.0
    assert cfg.buffer_max_bytes == 64 * 1024 * 1024
    assert cfg.log_level == "info"


def test_precedence_file_env_flags(tmp_path: Path) -> None:
    path = _toml(
        tmp_path,
        """
[agent]
host = "gpu-file"
listen = "10.0.0.1:7000"
sample_interval_s = 2
simulate_gpus = 4
log_level = "debug"
""",
    )
    env = {"GPUSOC_AGENT_SAMPLE_INTERVAL_S": "0.5", "GPUSOC_AGENT_HOST": "gpu-env", "OTHER": "x"}
    overrides: dict[str, object] = {"host": "gpu-flag", "simulate_gpus": None, "listen": "[::1]:0"}
    cfg = load_config(path, env=env, overrides=overrides)
    assert cfg.host == "gpu-flag"  # flag beats env beats file
    assert cfg.sample_interval_s == 0.5  # env beats file
    assert isinstance(cfg.sample_interval_s, float)
    assert cfg.simulate_gpus == 4  # None override = flag not given
    assert cfg.listen == "[::1]:0"
    assert cfg.log_level == "debug"
    assert cfg.buffer_seconds == 3600.0  # untouched default


def test_env_types() -> None:
    env = {
        "GPUSOC_AGENT_INSECURE": "1",
        "GPUSOC_AGENT_SIMULATE_GPUS": "8",
        "GPUSOC_AGENT_BUFFER_MAX_BYTES": "2_000_000",
        "GPUSOC_AGENT_LOG_LEVEL": "WARNING",
        "GPUSOC_AGENT_TRAINING_SOCKET": "",
    }
    cfg = load_config(None, env=env)
    assert cfg.insecure is True
    assert cfg.simulate_gpus == 8
    assert cfg.buffer_max_bytes == 2_000_000
    assert cfg.log_level == "warning"
    assert cfg.training_socket == ""
    assert load_config(None, env={"GPUSOC_AGENT_INSECURE": "off"}).insecure is False


def test_string_overrides_are_parsed() -> None:
    cfg = load_config(None, env={}, overrides={"sample_interval_s": "0.25", "insecure": True})
    assert cfg.sample_interval_s == 0.25
    assert cfg.insecure is True


def test_every_field_has_an_env_var() -> None:
    for f in dataclasses.fields(AgentConfig):
        assert env_var_name(f.name) == "GPUSOC_AGENT_" + f.name.upper()


def test_config_file_from_env(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[agent]\nhost = "from-env-file"\n')
    assert load_config(None, env={"GPUSOC_AGENT_CONFIG": path}).host == "from-env-file"
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(None, env={"GPUSOC_AGENT_CONFIG": str(tmp_path / "missing.toml")})


# --------------------------------------------------------------------------- errors


def test_file_range_error_names_key_and_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[agent]\nsample_interval_s = 0.01\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(err.value) == f"{path}: [agent] sample_interval_s = 0.01: must be between 0.1 and 60"
    assert err.value.key == "sample_interval_s"
    assert err.value.source == path


def test_env_type_error_names_variable() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={"GPUSOC_AGENT_SIMULATE_GPUS": "x"})
    assert str(err.value) == "GPUSOC_AGENT_SIMULATE_GPUS='x': not an integer"
    assert err.value.key == "simulate_gpus"


def test_flag_error_names_key() -> None:
    with pytest.raises(ConfigError, match=r"^command line: simulate_gpus = 65: must be between 0 and 64$"):
        load_config(None, env={}, overrides={"simulate_gpus": 65})


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ('host = ""', "host", "host ="),
        ('listen = "nohostport"', "listen", "expected HOST:PORT"),
        ('listen = "::1:7443"', "listen", "must be in brackets"),
        ('listen = "[::1]:70000"', "listen", "0..65535"),
        ('listen = "[nope]:1"', "listen", "not an IPv6 address"),
        ('insecure = "yes"', "insecure", "must be true or false"),
        ("tls_cert = 5", "tls_cert", "must be a string"),
        ('tls_key = ""', "tls_key", "must not be empty"),
        ("simulate_gpus = 1.5", "simulate_gpus", "not an integer"),
        ("simulate_gpus = true", "simulate_gpus", "not an integer"),
        ("simulate_gpus = -1", "simulate_gpus", "between 0 and 64"),
        ('sample_interval_s = "1"', "sample_interval_s", "not a number"),
        ("sample_interval_s = inf", "sample_interval_s", "finite"),
        ("buffer_seconds = 59", "buffer_seconds", "must be >= 60"),
        ("buffer_max_bytes = 1000", "buffer_max_bytes", "must be >= 1048576"),
        ('state_dir = " "', "state_dir", "must not be empty"),
        ('log_level = "verbose"', "log_level", "debug, info, warning, error"),
    ],
)
def test_each_file_error_names_the_key(tmp_path: Path, body: str, key: str, fragment: str) -> None:
    path = _toml(tmp_path, f"[agent]\n{body}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = str(err.value)
    assert message.startswith(f"{path}: [agent] {key} = "), message
    assert fragment in message
    assert err.value.key == key


@pytest.mark.parametrize(
    ("var", "value", "fragment"),
    [
        ("GPUSOC_AGENT_INSECURE", "maybe", "not a boolean"),
        ("GPUSOC_AGENT_SAMPLE_INTERVAL_S", "fast", "not a number"),
        ("GPUSOC_AGENT_SAMPLE_INTERVAL_S", "nan", "finite"),
        ("GPUSOC_AGENT_BUFFER_SECONDS", "10", ">= 60"),
        ("GPUSOC_AGENT_LISTEN", "0.0.0.0", "HOST:PORT"),
    ],
)
def test_each_env_error_names_the_variable(var: str, value: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, env={var: value})
    assert str(err.value).startswith(f"{var}={value!r}: ")
    assert fragment in str(err.value)
    assert err.value.source == var


def test_unknown_file_key(tmp_path: Path) -> None:
    path = _toml(tmp_path, "[agent]\nsample_rate = 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    message = str(err.value)
    assert f"{path}: unknown key 'sample_rate' in [agent] (" in message
    assert "sample_interval_s" in message and "log_level" in message  # lists the known keys
    assert err.value.key == "sample_rate"


def test_unknown_top_level(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown table 'tls' at top level"):
        load_config(_toml(tmp_path, '[tls]\ncert = "x"\n'), env={})
    with pytest.raises(
        ConfigError, match=r"unknown key 'listen' at top level; agent settings go under \[agent\]"
    ):
        load_config(_toml(tmp_path, 'listen = "127.0.0.1:1"\n'), env={})


def test_unknown_env_var_and_override() -> None:
    with pytest.raises(ConfigError, match=r"unknown environment variable GPUSOC_AGENT_SAMPLE_RATE"):
        load_config(None, env={"GPUSOC_AGENT_SAMPLE_RATE": "1"})
    with pytest.raises(ConfigError, match=r"unknown override 'verbose'"):
        load_config(None, env={}, overrides={"verbose": True})


def test_bad_toml_reports_line_and_column(tmp_path: Path) -> None:
    path = _toml(tmp_path, '[agent]\nhost = "a"\nlisten = \n')
    with pytest.raises(ConfigError, match=r"invalid TOML: .*line 3, column \d+") as err:
        load_config(path, env={})
    assert str(err.value).startswith(f"{path}: ")


def test_missing_explicit_file_is_an_error(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.toml"):
        load_config(missing, env={})


def test_missing_default_file_is_fine() -> None:
    assert load_config(None, env={}).listen == "0.0.0.0:7443"


def test_default_file_is_read_when_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_PATH", _toml(tmp_path, "[agent]\nsimulate_gpus = 2\n"))
    assert load_config(None, env={}).simulate_gpus == 2


def test_empty_file_and_empty_table(tmp_path: Path) -> None:
    assert load_config(_toml(tmp_path, ""), env={}).insecure is False
    assert load_config(_toml(tmp_path, "[agent]\n"), env={}).insecure is False


# --------------------------------------------------------------------------- listen / loopback


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("0.0.0.0:7443", ("0.0.0.0", 7443)),
        ("[::]:0", ("::", 0)),
        ("[::1]:7443", ("::1", 7443)),
        ("gpu-01.example.com:1", ("gpu-01.example.com", 1)),
    ],
)
def test_split_listen(listen: str, expected: tuple[str, int]) -> None:
    assert split_listen(listen) == expected


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:7443", True),
        ("127.9.9.9:1", True),
        ("localhost:7443", True),
        ("[::1]:7443", True),
        ("[::ffff:127.0.0.1]:1", True),
        ("0.0.0.0:7443", False),
        ("[::]:7443", False),
        ("10.0.0.5:7443", False),
        ("gpu-01:7443", False),
        ("garbage", False),
    ],
)
def test_is_loopback(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


def test_insecure_non_loopback_is_rewritten_with_warning() -> None:
    cfg = load_config(None, env={"GPUSOC_AGENT_INSECURE": "true"}, overrides={"listen": "0.0.0.0:9000"})
    fixed, warning = enforce_insecure_loopback(cfg)
    assert fixed.listen == "127.0.0.1:9000"
    assert fixed.insecure is True
    assert warning is not None and "0.0.0.0:9000" in warning and "127.0.0.1:9000" in warning
    assert cfg.listen == "0.0.0.0:9000"  # the original is not mutated


def test_insecure_loopback_and_secure_are_untouched() -> None:
    loop = load_config(None, env={}, overrides={"insecure": True, "listen": "[::1]:0"})
    assert enforce_insecure_loopback(loop) == (loop, None)
    secure = load_config(None, env={})
    assert enforce_insecure_loopback(secure) == (secure, None)
