"""The admin protocol between `mcpherd <command>` and the master, over a local Unix stream socket.

Newline-delimited JSON, one request per line, one reply per line, in order; a connection may carry
any number of requests. Protocol version 1:

    request  {"v": 1, "cmd": "status" | "reload" | "scale" | "invalidate" | "stop" | "config",
              "args": {...}}
             scale:      {"workers": N} or {"delta": +K / -K}
             invalidate: {"key": K} | {"tag": T} | {"prefix": P} | {"all": true}
    reply    {"ok": true, "result": ...}
             {"ok": false, "error": {"code": "...", "message": "one sentence"}}

Error codes: bad_request (not JSON, unknown command or arguments), unsupported_version, refused
(the master declined: a reload already failing, a scale outside its bounds), timeout.
The socket path: `--admin-socket`, else `$RUNTIME_DIRECTORY/admin.sock` (systemd), else
`$XDG_RUNTIME_DIR/mcpherd/admin.sock`, else `/tmp/mcpherd-<uid>/admin.sock`; directory 0700, socket
0600, and the master serves only root and its own uid (SO_PEERCRED).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import msgspec

VERSION = 1
MAX_LINE = 64 * 1024
COMMANDS = ("status", "reload", "scale", "invalidate", "stop", "config")


class Request(msgspec.Struct, forbid_unknown_fields=True):
    cmd: Literal["status", "reload", "scale", "invalidate", "stop", "config"]
    v: int = VERSION
    args: dict[str, Any] = msgspec.field(default_factory=dict)


class ScaleArgs(msgspec.Struct, forbid_unknown_fields=True):
    workers: int | None = None
    delta: int | None = None


class InvalidateArgs(msgspec.Struct, forbid_unknown_fields=True):
    key: str | None = None
    tag: str | None = None
    prefix: str | None = None
    all: bool = False


class Error(msgspec.Struct):
    code: str
    message: str


class Reply(msgspec.Struct, omit_defaults=True):
    ok: bool
    result: Any = None
    error: Error | None = None


_request = msgspec.json.Decoder(Request)
_reply = msgspec.json.Decoder(Reply)
_encoder = msgspec.json.Encoder()


class UnsupportedVersion(ValueError):
    """A well-formed request in a protocol version this master does not speak."""


def decode_request(line: bytes) -> Request:
    """Raises ValueError (UnsupportedVersion for a version mismatch) with one clear sentence."""
    try:
        request = _request.decode(line)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a valid request: {exc}") from None
    except RecursionError:  # msgspec's answer to JSON nested past the recursion limit
        raise ValueError("not a valid request: nested too deeply") from None
    if request.v != VERSION:
        raise UnsupportedVersion(f"protocol version {request.v} is not supported (this master speaks {VERSION})")
    return request


def encode(message: Any) -> bytes:
    return _encoder.encode(message) + b"\n"


def decode_reply(line: bytes) -> Reply:
    return _reply.decode(line)


def socket_path(explicit: str | None = None) -> str:
    if explicit:
        return explicit
    if os.environ.get("RUNTIME_DIRECTORY"):
        return os.path.join(os.environ["RUNTIME_DIRECTORY"].split(":")[0], "admin.sock")
    if os.environ.get("XDG_RUNTIME_DIR"):
        return os.path.join(os.environ["XDG_RUNTIME_DIR"], "mcpherd", "admin.sock")
    return f"/tmp/mcpherd-{os.getuid()}/admin.sock"
