"""The floor: the least work a 2026-07-28 MCP server does for a `tools/call` echo, on the same stack.

It sits between the bare ceiling (bare_server.py: no MCP at all) and mcpherd, and answers one question:
how close to the bare ceiling can an MCP server in Python on uvloop + httptools + msgspec get? It reads
the request's headers and makes every check the spec asks of this one request, each the cheapest way:
- the Host allowed and no foreign Origin (DNS rebinding), Accept and Content-Type;
- a JSON-RPC request whose `_meta` names the protocol version and the client capabilities;
- the `MCP-Protocol-Version`, `Mcp-Method` and `Mcp-Name` headers agreeing with the body;
- the tool's arguments decoded into its typed Struct.

It answers with `resultType` and the server's `_meta`, and records the call in mcpherd's shared-memory
metrics as a worker does. It does nothing else: any other request gets a 400 and the connection is
closed; no sessions, no ordering of pipelined answers, no limits, no timeouts, no other method. It is
the ceiling's connection class with headers read: the same reads and the same end-of-turn writes.

So no MCP server on this stack can be faster than this one: bare -> floor is the price of MCP itself,
floor -> mcpherd the price of being a whole server. Only the 2026-07-28 scenario: a handshake-era floor
would need sessions.

    python bench/floor_server.py --port 8002 [--host 127.0.0.1]
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any

import msgspec

from bare_server import EchoConnection, _send, run  # the ceiling's reads, end-of-turn writes and command line
from mcpherd.shared import layout
from mcpherd.shared.metrics import Recorder

VERSION = "2026-07-28"
VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
SERVER_META = {"io.modelcontextprotocol/serverInfo": {"name": "floor-server", "version": "1.0.0"}}


class EchoArguments(msgspec.Struct, forbid_unknown_fields=True):
    text: str


class Params(msgspec.Struct):
    name: str
    arguments: msgspec.Raw
    meta: dict[str, Any] = msgspec.field(name="_meta")


class Request(msgspec.Struct):
    jsonrpc: str
    id: int | str
    method: str
    params: Params


class TextContent(msgspec.Struct, tag_field="type", tag="text"):
    text: str


async def echo(text: str) -> str:
    return text


TOOLS = {"echo": (echo, msgspec.json.Decoder(EchoArguments))}
_decode = msgspec.json.Decoder(Request).decode
_encode = msgspec.json.Encoder().encode
_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
_REFUSED = b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"


class Floor:
    """What every connection shares: the allowed Host values and the metrics."""

    def __init__(self, host: str, port: int) -> None:
        self.hosts = {host, f"{host}:{port}", "localhost", f"localhost:{port}"}
        self.segment = layout.Segment.create(1)
        self.recorder = Recorder(self.segment.cell(0), list(TOOLS))


class FloorConnection(EchoConnection):
    """The ceiling's connection (same reads, same writes) that also reads the URL and the headers."""

    __slots__ = ("floor", "url", "headers")

    def __init__(self, floor: Floor) -> None:
        self.floor = floor
        self.url = b""
        self.headers: dict[bytes, bytes] = {}
        super().__init__()  # makes the parser, which looks for `on_url` and `on_header` now

    def on_url(self, url: bytes) -> None:
        self.url = url
        self.headers = {}

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_message_complete(self) -> None:
        started = time.perf_counter_ns()
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks = []
        try:
            payload, method, tool = self._answer(body)
        except (msgspec.DecodeError, LookupError, ValueError, StopIteration):
            self._refuse()
            return
        self.floor.recorder.answered(method, True, time.perf_counter_ns() - started, tool, False)
        assert self.transport is not None
        _send(self.transport, _HEAD % len(payload) + payload, False)

    def _answer(self, body: bytes) -> tuple[bytes, str, str]:
        headers = self.headers
        if self.url != b"/mcp" or self.parser.get_method() != b"POST" or b"origin" in headers \
                or headers[b"host"].decode("latin-1") not in self.floor.hosts \
                or b"application/json" not in headers[b"accept"] \
                or not headers[b"content-type"].startswith(b"application/json"):
            raise ValueError("not the request this server answers")
        request = _decode(body)
        params = request.params
        version = headers[b"mcp-protocol-version"].decode("latin-1")
        if request.jsonrpc != "2.0" or params.meta[VERSION_KEY] != version or version != VERSION \
                or CAPABILITIES_KEY not in params.meta or request.method != "tools/call" \
                or headers[b"mcp-method"].decode("latin-1") != request.method \
                or headers[b"mcp-name"].decode("latin-1") != params.name:
            raise ValueError("headers and body disagree")
        fn, decoder = TOOLS[params.name]
        coroutine = fn(**msgspec.structs.asdict(decoder.decode(params.arguments)))
        try:
            coroutine.send(None)
            raise ValueError("the tool suspended")
        except StopIteration as stop:
            text = stop.value
        result = {"content": [TextContent(text)], "resultType": "complete", "_meta": SERVER_META}
        return _encode({"jsonrpc": "2.0", "id": request.id, "result": result}), request.method, params.name

    def _refuse(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_REFUSED)
            self.transport.close()


def connections(host: str, port: int) -> Callable[[], asyncio.Protocol]:
    return functools.partial(FloorConnection, Floor(host, port))


if __name__ == "__main__":
    run(__doc__.splitlines()[0], connections)
