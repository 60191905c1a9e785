"""Configuration: a TOML file (`--config`) decoded into msgspec Structs; command-line flags override it.

Every flag has a key of the same name (dashes become underscores). An unknown key or a bad value is
refused with a message naming the key, at start (exit 2) and on SIGHUP (the running configuration
stays). Example:

    app = "myproject.server:app"
    bind = ["127.0.0.1:8000", "[::1]:8000"]
    workers = "auto"            # or a number
    timeout = 30                # seconds a worker's loop may stall before it is killed
    graceful_timeout = 30
    max_requests = 0            # recycle a worker after this many requests (0: never)
    max_requests_jitter = 0
    max_rss_mb = 0              # recycle a worker above this resident size (0: never)
    max_sessions = 100000       # per worker: sessions whose local state it holds; past it the oldest
                                # idle ones are forgotten (their ids stay valid and are rebuilt)
    resume_buffer_mb = 64       # per worker: SSE events kept for Last-Event-ID; past it the oldest
                                # events of the streams quiet longest are let go

    metrics_bind = "127.0.0.1:9464"   # Prometheus /metrics; "off" disables
    admin_socket = ""           # default: $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR or /tmp/mcpherd-<uid>

    [restart]                   # OTP restart intensity, per slot
    max_restarts = 5
    window_s = 30

    [redis]                     # optional: several hosts behind one load balancer
    url = "redis://:password@10.0.0.5:6379/0"   # rediss:// for TLS
    key_prefix = "mcpherd:"
    socket_timeout = 0.25
    max_connections = 32        # per process; a burst of cache misses waits for one

    [alerts]                    # logged once when they fire or clear; mcpherd_alert_active{alert}
    cpu_percent = 85
    memory_percent = 90
    p99_s = 5
    error_rate = 0.05
    cache_hit_ratio = 0.70

    [autoscale]                 # off unless enabled: a fixed count is what `workers` says
    enabled = false
    min_workers = 2
    max_workers = 0             # 0: the CPUs this process may use
    scale_up_at = 0.80          # mean busy ratio of the workers' event loops
    scale_down_at = 0.30
    up_after_s = 5
    down_after_s = 30
    cooldown_s = 30
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

import msgspec

from mcpherd.supervisor.alerts import AlertThresholds
from mcpherd.supervisor.autoscale import AutoscalePolicy


class ConfigError(Exception):
    """One clear sentence naming the offending key."""


def parse_bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"bind address must look like HOST:PORT or [IPv6]:PORT, got {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "127.0.0.1", int(port)


class Restart(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    max_restarts: int = 5
    window_s: float = 30.0
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0 or self.window_s <= 0 or self.backoff_max_s <= 0:
            raise ValueError("max_restarts must be >= 0, window_s and backoff_max_s > 0")


class Redis(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Past one machine: hosts share cache, invalidations and sessions through Redis (or Valkey)."""

    url: str = ""  # redis://[:password@]host:port/db or rediss:// for TLS; empty: one host only
    key_prefix: str = "mcpherd:"
    socket_timeout: float = 0.25  # a slow Redis must never slow a tool call down by more than this
    connect_timeout: float = 1.0
    max_entry_bytes: int = 1024 * 1024  # larger results stay in L1 only
    # Per process (each worker, the bridge): more concurrent cache reads wait for one of these. 16 workers
    # on 10 hosts stay at ~5,000 connections, half of Redis's default maxclients.
    max_connections: int = 32

    def __post_init__(self) -> None:
        if self.url and not self.url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis.url must start with redis://, rediss:// or unix://")
        if self.socket_timeout <= 0 or self.connect_timeout <= 0 or self.max_entry_bytes <= 0:
            raise ValueError("redis timeouts and max_entry_bytes must be positive")
        if self.max_connections < 1:
            raise ValueError("redis.max_connections must be at least 1")


class Autoscale(AutoscalePolicy, frozen=True, kw_only=True):
    enabled: bool = False


class Config(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    app: str = "mcpherd.demo:app"
    bind: list[str] = msgspec.field(default_factory=lambda: ["127.0.0.1:8000"])
    workers: int | Literal["auto"] = "auto"
    timeout: float = 30.0
    graceful_timeout: float = 30.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_rss_mb: int = 0
    tool_threads: int = 32
    max_sessions: int = 100_000  # per worker: sessions whose local state it holds (~1 KB each); ids stay valid
    resume_buffer_mb: int = 64  # per worker: what its SSE streams keep for resumption (worker/sessions.py)
    allowed_hosts: list[str] = msgspec.field(default_factory=list)
    allowed_origins: list[str] = msgspec.field(default_factory=list)
    secret_file: str = ""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_file: str = ""
    pid_file: str = ""
    metrics_bind: str = "127.0.0.1:9464"
    admin_socket: str = ""
    restart: Restart = msgspec.field(default_factory=Restart)
    autoscale: Autoscale = msgspec.field(default_factory=Autoscale)
    redis: Redis = msgspec.field(default_factory=Redis)
    alerts: AlertThresholds = msgspec.field(default_factory=AlertThresholds)

    def __post_init__(self) -> None:
        if not self.bind:
            raise ValueError("at least one bind address is required")
        for address in self.bind:
            parse_bind(address)
        if isinstance(self.workers, int) and not 1 <= self.workers <= 1024:
            raise ValueError("workers must be between 1 and 1024, or \"auto\"")
        if self.timeout <= 0 or self.graceful_timeout <= 0:
            raise ValueError("timeout and graceful_timeout must be positive")
        if min(self.max_requests, self.max_requests_jitter, self.max_rss_mb) < 0:
            raise ValueError("max_requests, max_requests_jitter and max_rss_mb must be >= 0")
        if ":" not in self.app:
            raise ValueError("app must look like module:attribute")
        if self.max_sessions < 1:
            raise ValueError("max_sessions must be at least 1")
        if self.resume_buffer_mb < 1:
            raise ValueError("resume_buffer_mb must be at least 1")
        if self.metrics_bind != "off":
            parse_bind(self.metrics_bind)

    @property
    def binds(self) -> list[tuple[str, int]]:
        return [parse_bind(address) for address in self.bind]


def load(path: str | None, overrides: dict[str, Any]) -> Config:
    """The file (if any) with `overrides` (explicit command-line flags) on top, validated."""
    document: dict[str, Any] = {}
    if path:
        try:
            document = tomllib.loads(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"configuration file {path} is not valid TOML: {exc}") from None
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(document.get(key), dict):
            document[key] = {**document[key], **value}
        elif value is not None:
            document[key] = value
    try:
        return msgspec.convert(document, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_name_key(str(exc))}") from None


def _name_key(message: str) -> str:
    # msgspec says "Expected `int`, got `str` - at `$.restart.max_restarts`": put the key first.
    text, sep, where = message.rpartition(" - at `$.")
    if sep:
        return f"{where.rstrip('`')}: {text}"
    return message.replace("Object contains unknown field", "unknown key")


def effective(config: Config) -> dict[str, Any]:
    return msgspec.to_builtins(config)  # type: ignore[no-any-return]
