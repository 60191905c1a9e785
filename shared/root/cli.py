"""`mcpherd` command line."""

from __future__ import annotations

import argparse
import logging
import sys

from mcpherd.worker.server import WorkerConfig, listen, run


def parse_bind(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--bind must be HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mcpherd", description="Run MCP servers on every CPU.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve an MCP app")
    serve.add_argument("--app", default="mcpherd.demo:app", help="MODULE:ATTR of an mcpherd App")
    serve.add_argument("--bind", action="append", type=parse_bind, help="HOST:PORT (repeatable)")
    serve.add_argument("--allowed-host", action="append", default=[], help="extra Host header values")
    serve.add_argument("--allowed-origin", action="append", default=[], help="extra Origin values")
    serve.add_argument("--log-level", default="info")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    binds = args.bind or [("127.0.0.1", 8000)]
    config = WorkerConfig(app=args.app, allowed_hosts=args.allowed_host, allowed_origins=args.allowed_origin)
    try:
        sockets = [listen(host, port) for host, port in binds]
    except OSError as exc:
        print(f"mcpherd: cannot listen: {exc}", file=sys.stderr)
        return 1
    run(config, sockets)
    return 0
