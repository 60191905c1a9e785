"""The ceiling: a bare JSON-RPC `tools/call` echo on uvloop + httptools + msgspec, one process.

No MCP at all: no header checks, no protocol versions, no sessions. It parses the HTTP request,
decodes the JSON-RPC body into typed Structs, answers `{"content": [{"type": "text", "text": ...}]}`
and keeps the connection alive. Whatever mcpherd costs above this is the price of being an MCP
server; no Python server on this stack can be much faster than this one. Like mcpherd's worker it sends
the answers of one loop turn together at the turn's end (one wake-up of the client per batch rather than
per answer), so the ceiling has every transport trick the worker has.

    python bench/bare_server.py --port 8001 [--host 127.0.0.1]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Callable

import httptools
import msgspec
import uvloop


class Arguments(msgspec.Struct):
    text: str = ""


class Params(msgspec.Struct):
    name: str = ""
    arguments: Arguments = msgspec.field(default_factory=Arguments)


class Request(msgspec.Struct):
    id: int | str | None = None
    method: str = ""
    params: Params = msgspec.field(default_factory=Params)


class TextContent(msgspec.Struct, tag_field="type", tag="text"):
    text: str


class Result(msgspec.Struct):
    content: list[TextContent]


class Response(msgspec.Struct):
    jsonrpc: str
    id: int | str | None
    result: Result


class ErrorResponse(msgspec.Struct):
    jsonrpc: str
    id: None
    error: dict[str, object]


_decode = msgspec.json.Decoder(Request).decode
_encode = msgspec.json.Encoder().encode
_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
_HEAD_CLOSE = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: %d\r\n\r\n"
_PARSE_ERROR = _encode(ErrorResponse("2.0", None, {"code": -32700, "message": "Parse error"}))


class EchoConnection(asyncio.Protocol):
    """One keep-alive connection; httptools calls `on_body`/`on_message_complete` from `data_received`."""

    __slots__ = ("transport", "parser", "chunks")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.chunks: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        try:
            request = _decode(body)
            payload = _encode(Response("2.0", request.id, Result([TextContent(request.params.arguments.text)])))
        except msgspec.DecodeError:
            payload = _PARSE_ERROR
        assert self.transport is not None
        keep_alive = self.parser.should_keep_alive()
        _send(self.transport, (_HEAD if keep_alive else _HEAD_CLOSE) % len(payload) + payload, not keep_alive)


_pending: list[tuple[asyncio.Transport, bytes, bool]] = []


def _send(transport: asyncio.Transport, data: bytes, close: bool) -> None:
    """Write at the end of this loop turn, with every other answer of the turn."""
    if not _pending:
        asyncio.get_running_loop().call_soon(_flush)
    _pending.append((transport, data, close))


def _flush() -> None:
    for transport, data, close in _pending:
        if not transport.is_closing():
            transport.write(data)
            if close:
                transport.close()
    _pending.clear()


async def serve(host: str, port: int, protocol: Callable[[], asyncio.Protocol]) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(protocol, host, port, backlog=2048, reuse_address=True)
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


def run(description: str, protocol_for: Callable[[str, int], Callable[[], asyncio.Protocol]]) -> None:
    """The command line of a bench server (--host, --port); serves until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvloop.run(serve(args.host, args.port, protocol_for(args.host, args.port)))


if __name__ == "__main__":
    run(__doc__.splitlines()[0], lambda _host, _port: EchoConnection)
