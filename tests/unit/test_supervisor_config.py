"""supervisor/config.py: the TOML file, command-line overrides on top, and refusals that name the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mcpherd.supervisor.config import Config, ConfigError, load, parse_bind

NO_FLAGS: dict[str, object] = {}


def toml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "mcpherd.toml"
    path.write_text(text)
    return str(path)


def refusal(path: str | None, overrides: dict[str, object]) -> str:
    with pytest.raises(ConfigError) as caught:
        load(path, overrides)
    return str(caught.value)


def test_no_file_and_no_flags_gives_the_documented_defaults() -> None:
    config = load(None, NO_FLAGS)
    assert config == Config()
    assert (config.app, config.bind, config.workers) == ("mcpherd.demo:app", ["127.0.0.1:8000"], "auto")
    assert (config.timeout, config.graceful_timeout, config.max_requests, config.max_rss_mb) == (30.0, 30.0, 0, 0)
    assert (config.restart.max_restarts, config.restart.window_s) == (5, 30.0)


def test_the_file_is_read_and_flags_override_it(tmp_path: Path) -> None:
    path = toml(tmp_path, 'workers = 3\ntimeout = 5\nbind = ["127.0.0.1:9000"]\n[restart]\nmax_restarts = 9\n')
    config = load(path, {"workers": 6, "timeout": None, "max_requests": 100})
    assert config.workers == 6  # the flag wins
    assert config.timeout == 5.0  # a flag not given (None) leaves the file's value
    assert config.max_requests == 100
    assert config.binds == [("127.0.0.1", 9000)]
    assert config.restart.max_restarts == 9 and config.restart.window_s == 30.0


def test_a_table_given_by_flags_merges_into_the_files_table(tmp_path: Path) -> None:
    path = toml(tmp_path, "[autoscale]\nmin_workers = 3\n")
    config = load(path, {"autoscale": {"enabled": True}})
    assert config.autoscale.enabled and config.autoscale.min_workers == 3


@pytest.mark.parametrize(("text", "flags", "message"), [
    ("tmeout = 3\n", NO_FLAGS, "invalid configuration: unknown key `tmeout`"),
    ("[restart]\nmax_restart = 3\n", NO_FLAGS, "restart: Object contains unknown field `max_restart`"),
    ('workers = "many"\n', NO_FLAGS, "workers: Invalid enum value 'many'"),
    ('max_requests = "10"\n', NO_FLAGS, "max_requests: Expected `int`, got `str`"),
    ('[restart]\nmax_restarts = "5"\n', NO_FLAGS, "restart.max_restarts: Expected `int`, got `str`"),
    ("restart = 5\n", NO_FLAGS, "restart: Expected `object`, got `int`"),
    ("", {"workers": 0}, "workers must be between 1 and 1024"),
    ("", {"workers": 1025}, "workers must be between 1 and 1024"),
    ("", {"timeout": -1.0}, "timeout and graceful_timeout must be positive"),
    ("", {"graceful_timeout": 0.0}, "timeout and graceful_timeout must be positive"),
    ("", {"max_requests_jitter": -1}, "max_requests, max_requests_jitter and max_rss_mb must be >= 0"),
    ("", {"app": "mcpherd.demo"}, "app must look like module:attribute"),
    ("", {"bind": ["localhost"]}, "bind address must look like HOST:PORT"),
    ("", {"bind": ["127.0.0.1:70000"]}, "bind address must look like HOST:PORT"),
    ("bind = []\n", NO_FLAGS, "at least one bind address is required"),
    ("[restart]\nwindow_s = 0\n", NO_FLAGS, "restart: max_restarts must be >= 0, window_s and backoff_max_s > 0"),
    ("[redis]\nmax_connections = 0\n", NO_FLAGS, "redis: redis.max_connections must be at least 1"),
    ("max_sessions = 0\n", NO_FLAGS, "max_sessions must be at least 1"),
    ("resume_buffer_mb = 0\n", NO_FLAGS, "resume_buffer_mb must be at least 1"),
])
def test_a_bad_value_is_refused_with_a_message_naming_the_key(tmp_path: Path, text: str, flags: dict[str, object],
                                                              message: str) -> None:
    assert message in refusal(toml(tmp_path, text), flags)


def test_an_unreadable_or_malformed_file_is_refused(tmp_path: Path) -> None:
    missing = tmp_path / "absent.toml"
    assert refusal(str(missing), NO_FLAGS) == f"cannot read configuration file {missing}: No such file or directory"
    assert refusal(toml(tmp_path, "workers = [\n"), NO_FLAGS).startswith(
        f"configuration file {tmp_path / 'mcpherd.toml'} is not valid TOML: ")


@pytest.mark.parametrize(("address", "parsed"), [
    ("127.0.0.1:8000", ("127.0.0.1", 8000)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[::1]:8443", ("::1", 8443)),
    (":9000", ("127.0.0.1", 9000)),  # no host: loopback, never every interface
    ("localhost:65535", ("localhost", 65535)),
])
def test_parse_bind(address: str, parsed: tuple[str, int]) -> None:
    assert parse_bind(address) == parsed


@pytest.mark.parametrize("address", ["localhost", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "[::1]:http"])
def test_parse_bind_refuses(address: str) -> None:
    with pytest.raises(ValueError, match="bind address must look like HOST:PORT"):
        parse_bind(address)
