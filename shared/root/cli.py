"""`mcpherd` command line. `serve` runs the master; the other commands talk to it."""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys
from typing import Any

LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"
_log_file: str = ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcpherd", description="Run MCP servers on every CPU.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve an MCP app with one pinned worker per CPU")
    serve.add_argument("--config", help="TOML configuration file (flags override it)")
    serve.add_argument("--app", help="MODULE:ATTR of an mcpherd App (default: the demo app)")
    serve.add_argument("--bind", action="append", help="HOST:PORT, repeatable (default 127.0.0.1:8000)")
    serve.add_argument("--workers", help='"auto" (the CPUs this process may use) or a number')
    serve.add_argument("--timeout", type=float, help="seconds a worker's event loop may stall (default 30)")
    serve.add_argument("--graceful-timeout", type=float, help="seconds to finish in-flight work (default 30)")
    serve.add_argument("--max-requests", type=int, help="recycle a worker after this many requests")
    serve.add_argument("--max-requests-jitter", type=int, help="random extra requests before recycling")
    serve.add_argument("--max-rss", type=int, dest="max_rss_mb", help="recycle a worker above this many MB")
    serve.add_argument("--allowed-host", action="append", dest="allowed_hosts", help="extra Host header value")
    serve.add_argument("--allowed-origin", action="append", dest="allowed_origins", help="extra Origin value")
    serve.add_argument("--secret-file", help="file holding the cluster signing secret (>= 16 bytes)")
    serve.add_argument("--metrics-bind", help='HOST:PORT for Prometheus /metrics (default 127.0.0.1:9464), or "off"')
    serve.add_argument("--admin-socket", help="path of the admin socket")
    serve.add_argument("--autoscale", choices=["on", "off"], help="scale the worker count with load")
    serve.add_argument("--redis", help="redis:// or rediss:// URL shared by every host of the cluster")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-file", help="append logs here instead of stderr (reopened on SIGUSR1)")
    from mcpherd.ctl import add_commands

    add_commands(commands)
    return parser


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    keys = ("app", "bind", "workers", "timeout", "graceful_timeout", "max_requests", "max_requests_jitter",
            "max_rss_mb", "allowed_hosts", "allowed_origins", "secret_file", "log_level", "log_file",
            "metrics_bind", "admin_socket")
    values = {key: getattr(args, key) for key in keys}
    if getattr(args, "autoscale", None) is not None:
        values["autoscale"] = {"enabled": args.autoscale == "on"}
    if getattr(args, "redis", None):
        values["redis"] = {"url": args.redis}
    if values["workers"] is not None and values["workers"] != "auto":
        values["workers"] = int(values["workers"]) if values["workers"].isdigit() else values["workers"]
    return values


def setup_logging(level: str, log_file: str) -> None:
    global _log_file
    _log_file = log_file
    handler: logging.Handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def reopen_log_file() -> None:
    """SIGUSR1: after logrotate moved the file, start a new one at the configured path."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.close()


def serve(args: argparse.Namespace) -> int:
    from mcpherd.supervisor.config import ConfigError, load
    from mcpherd.supervisor.master import serve as run_master

    overrides = overrides_from(args)
    try:
        config = load(args.config, overrides)
    except ConfigError as exc:
        print(f"mcpherd: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_file)
    faulthandler.enable()  # systemd's watchdog aborts a hung master (SIGABRT): log where it hung
    try:
        return run_master(config, args.config, overrides)
    except ConfigError as exc:
        print(f"mcpherd: {exc}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # usage errors exit 2 (argparse)
    if args.command == "serve":
        return serve(args)
    from mcpherd.ctl import run as run_command

    return int(run_command(args))
