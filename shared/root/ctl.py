"""The operator's commands: `mcpherd status | top | reload | scale | invalidate | stop`, over the admin
socket (protocol in mcpherd.shared.admin).

Exit codes: 0 done; 1 the server answered with an error; 2 usage error; 3 no server reachable.
Messages are one sentence on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from typing import Any

import msgspec

from mcpherd.shared import admin

EXIT_OK, EXIT_SERVER_ERROR, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


class Unreachable(Exception):
    pass


class ServerError(Exception):
    pass


class AdminClient:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as exc:
            self.sock.close()
            raise Unreachable(f"no mcpherd master is reachable at {path} ({exc.strerror or exc})") from None
        self.buffer = b""

    def call(self, cmd: str, **args: Any) -> Any:
        try:
            try:
                self.sock.sendall(admin.encode({"v": admin.VERSION, "cmd": cmd, "args": args}))
            except (BrokenPipeError, ConnectionResetError):
                pass  # a master that refused us answered and closed at once: its reply is still to be read
            while b"\n" not in self.buffer:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise Unreachable(f"the master at {self.path} closed the connection")
                self.buffer += chunk
        except (TimeoutError, socket.timeout):
            raise ServerError(f"the master at {self.path} did not answer in time") from None
        except OSError as exc:
            raise Unreachable(f"lost the master at {self.path} ({exc.strerror or exc})") from None
        line, self.buffer = self.buffer.split(b"\n", 1)
        reply = admin.decode_reply(line)
        if not reply.ok:
            assert reply.error is not None
            raise ServerError(f"{reply.error.message} ({reply.error.code})")
        return reply.result

    def close(self) -> None:
        self.sock.close()


def add_commands(commands: Any) -> None:
    def command(name: str, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = commands.add_parser(name, help=help)
        parser.add_argument("--admin-socket", help="path of the master's admin socket")
        return parser

    status = command("status", "show the workers and totals")
    status.add_argument("--json", action="store_true", help="print the status document")
    command("top", "refresh the status table every second until Ctrl-C")
    reload = command("reload", "graceful reload: a new generation of workers")
    reload.add_argument("--no-wait", action="store_true", help="return at once")
    reload.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the new generation")
    scale = command("scale", "set the worker count: N, +K or -K")
    scale.add_argument("count", type=_scale_args, help="N, +K or -K")  # checked before connecting: exit 2
    invalidate = command("invalidate", "drop cached tool results on every worker")
    target = invalidate.add_mutually_exclusive_group(required=True)
    target.add_argument("--key")
    target.add_argument("--tag")
    target.add_argument("--prefix")
    target.add_argument("--all", action="store_true")
    stop = command("stop", "graceful stop")
    stop.add_argument("--now", action="store_true", help="immediate stop instead of graceful")
    command("config", "print the effective configuration")


def run(args: argparse.Namespace) -> int:
    path = admin.socket_path(args.admin_socket)
    try:
        client = AdminClient(path)
        try:
            return _dispatch(client, args)
        finally:
            client.close()
    except Unreachable as exc:
        print(f"mcpherd: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except ServerError as exc:
        print(f"mcpherd: {exc}", file=sys.stderr)
        return EXIT_SERVER_ERROR
    except KeyboardInterrupt:
        return EXIT_OK


def _dispatch(client: AdminClient, args: argparse.Namespace) -> int:
    if args.command == "status":
        document = client.call("status")
        print(msgspec.json.format(msgspec.json.encode(document)).decode() if args.json else table(document))
    elif args.command == "top":
        while True:
            print("\x1b[H\x1b[2J" + table(client.call("status")), flush=True)
            time.sleep(1.0)
    elif args.command == "reload":
        started = client.call("reload")
        print(f"reloading: generation {started['previous_generation']} -> {started['generation']}")
        if not args.no_wait:
            return _wait_for_generation(client, started["generation"], args.timeout)
    elif args.command == "scale":
        print(f"workers target: {client.call('scale', **args.count)['workers_target']}")
    elif args.command == "invalidate":
        selector = {k: v for k, v in (("key", args.key), ("tag", args.tag), ("prefix", args.prefix)) if v}
        result = client.call("invalidate", **(selector or {"all": True}))
        state = "every worker acknowledged" if result["acknowledged"] else "NOT every worker acknowledged"
        print(f"invalidated (event {result['seq']}): {state}")
        return EXIT_OK if result["acknowledged"] else EXIT_SERVER_ERROR
    elif args.command == "stop":
        client.call("stop", graceful=not args.now)
        print("stopping")
    elif args.command == "config":
        print(msgspec.json.format(msgspec.json.encode(client.call("config"))).decode())
    return EXIT_OK


def _scale_args(count: str) -> dict[str, int]:
    text = count.strip()
    if text[:1] in "+-" and text[1:].isdigit():
        return {"delta": int(text)}
    if text.isdigit():
        return {"workers": int(text)}
    raise argparse.ArgumentTypeError(f"scale takes N, +K or -K, not {count!r}")


def _wait_for_generation(client: AdminClient, generation: int, timeout: float) -> int:
    deadline, shown = time.monotonic() + timeout, ""
    while time.monotonic() < deadline:
        document = client.call("status")
        if document["master"]["reload_failed"]:
            print(f"mcpherd: reload failed: {document['master']['reload_failed']}", file=sys.stderr)
            return EXIT_SERVER_ERROR
        workers = [w for w in document["workers"] if w["state"] != "stopped"]
        ready = [w for w in workers if w["generation"] == generation and w["state"] == "ready"]
        line = f"generation {generation}: {len(ready)}/{document['master']['workers_target']} workers serving"
        if line != shown:
            print(line, flush=True)
            shown = line
        if len(ready) >= document["master"]["workers_target"] and all(
                w["generation"] == generation for w in workers if w["state"] != "draining"):
            return EXIT_OK
        time.sleep(0.1)
    print(f"mcpherd: generation {generation} was not serving after {timeout:g}s", file=sys.stderr)
    return EXIT_SERVER_ERROR


def table(document: dict[str, Any]) -> str:
    """One row per worker plus totals, within 100 columns."""
    master, totals = document["master"], document["totals"]
    head = (f"mcpherd {master['version']}  master {master['pid']}  gen {master['generation']}  "
            f"up {master['uptime_s']:.0f}s  {' '.join(master['bind'])}  target {master['workers_target']}")
    columns = f"{'slot':>4} {'pid':>7} {'cpu':>3} {'gen':>3} {'state':<8} {'req/s':>8} {'total':>9} " \
              f"{'infl':>4} {'conn':>4} {'p50ms':>6} {'p99ms':>7} {'rss MB':>6} {'cpu%':>5} {'rst':>3}"
    rows = [head, columns]
    for w in document["workers"]:
        rows.append(f"{w['slot']:>4} {w['pid'] or '-':>7} {w['cpu']:>3} {w['generation'] or '-':>3} "
                    f"{w['state']:<8} {w['requests_per_s']:>8.1f} {w['requests_total']:>9} {w['inflight']:>4} "
                    f"{w['connections']:>4} {_ms(w['p50_ms']):>6} {_ms(w['p99_ms']):>7} "
                    f"{w['rss_bytes'] / 2**20:>6.1f} {w['cpu_percent']:>5.1f} {w['restarts']:>3}")
    ratio = totals["cache_hit_ratio"]
    rows.append(f"total: {totals['requests_per_s']:.1f} req/s, {totals['requests_total']} requests, "
                f"{totals['errors_total']} errors, cache hit ratio "
                f"{'-' if ratio is None else f'{ratio:.1%}'}")
    for alert in master.get("alerts") or []:
        rows.append(f"ALERT {alert['alert']}: {alert['reason']}")
    return "\n".join(row[:100] for row in rows)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
