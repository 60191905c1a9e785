"""Per-connection HTTP limits. Defaults follow the official SDK where it has one (4 MiB body)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_body_bytes: int = 4 * 1024 * 1024
    max_header_bytes: int = 16 * 1024  # nginx's large_client_header_buffers is 4 x 8k; 16k covers tokens
    max_headers: int = 100
    request_timeout: float = 30.0  # a started request must arrive whole within this (slow-loris guard)
    keepalive_timeout: float = 75.0  # nginx's default: agents reuse connections between tool calls
    max_pipelined: int = 64  # requests of one connection being handled at once; the rest wait, unread
    send_timeout: float = 60.0  # nginx's: a client that reads none of its answers this long is disconnected
    sse_keepalive_interval: float = 15.0  # comment lines keep proxies from timing out idle streams
    stream_buffer_bytes: int = 8 * 1024 * 1024  # a stream reader this far behind is disconnected
