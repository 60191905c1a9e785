"""One JSON-RPC request in flight, and the HTTP response it will travel on.

A request's answer starts as a plain JSON response. If the handler sends anything before its result
(progress, a log message, a request to the client) the answer becomes an SSE stream, decided at that
moment, since the HTTP head has not been written yet. Handshake-era streams are logged in the
session so a client can resume them with Last-Event-ID on any connection.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import TYPE_CHECKING, Any

import msgspec

from mcpherd.worker import jsonrpc as rpc
from mcpherd.worker.context import LOG_LEVELS, ClientError, Context
from mcpherd.worker.http import Request, Response, ResponseLike
from mcpherd.worker.sessions import Session, StreamLog
from mcpherd.worker.sse import EventStream

if TYPE_CHECKING:
    from mcpherd.worker.streamable import Endpoint

_request_ids = itertools.count(1)


class Call:
    """Also the `RequestScope` that a tool's `Context` talks to."""

    __slots__ = ("endpoint", "loop", "request", "message", "params", "envelope", "request_id", "protocol_version",
                 "modern", "session", "meta", "answers", "round_key", "cache_key", "tool_name", "started",
                 "recorded", "_cancelled", "stream", "log", "http", "task", "finished", "waiting")

    def __init__(self, endpoint: Endpoint, request: Request, message: rpc.Message, version: str,
                 session: Session | None, envelope: Any) -> None:
        self.endpoint = endpoint
        self.loop = endpoint.loop
        self.request = request
        self.message = message
        self.params = message.params
        self.envelope = envelope  # methods.RequestParams decoded once for the transport, or None
        self.request_id: rpc.RequestId | None = message.id if isinstance(message.id, (int, str)) else None
        self.protocol_version = version
        self.modern = session is None
        self.session = session
        meta = envelope.meta if envelope is not None else None
        self.meta: dict[str, Any] = meta if isinstance(meta, dict) else {}
        self.answers: dict[str, Any] | None = None  # 2026-07-28 multi-round: answers so far
        self.round_key: tuple[str, str, msgspec.Raw | bytes] = ("", "", b"")  # method, target, raw arguments (methods._bound)
        self.cache_key = ""  # set when the result of this call may be cached
        self.tool_name = ""  # tools/call: which tool (its latency histogram)
        self.started = request.started  # the duration recorded is the whole request's, routing included
        self.recorded = False
        request.counted = True
        self._cancelled: asyncio.Event | None = None  # made when first asked for: most calls never are
        self.stream: EventStream | None = None
        self.log: StreamLog | None = None
        self.http: asyncio.Future[ResponseLike] | None = None
        self.task: asyncio.Future[Any] | None = None
        self.finished = False
        self.waiting = False  # counted in the in-flight gauge: it suspended before answering

    @property
    def cancelled(self) -> asyncio.Event:
        if self._cancelled is None:
            self._cancelled = asyncio.Event()
        return self._cancelled

    # -- RequestScope --------------------------------------------------------------------------
    @property
    def client_capabilities(self) -> dict[str, Any]:
        if self.session is not None:
            return self.session.capabilities
        caps = self.meta.get("io.modelcontextprotocol/clientCapabilities")
        return caps if isinstance(caps, dict) else {}

    @property
    def progress_token(self) -> str | int | None:
        token = self.meta.get("progressToken")
        return token if isinstance(token, (str, int)) else None

    def log_enabled(self, level: str) -> bool:
        if self.session is not None:
            threshold: Any = self.session.log_level
        else:
            threshold = self.meta.get("io.modelcontextprotocol/logLevel")  # absent: the client opted out
            if threshold not in LOG_LEVELS:
                return False
        return LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold)

    def context(self) -> Context:
        return Context(self, self.request_id, self.request.headers)

    def notify(self, method: str, params: dict[str, Any]) -> None:
        if not self.finished:
            self._emit(rpc.notification(method, params))

    async def ask(self, method: str, params: dict[str, Any]) -> Any:
        """Send a request to the client on this call's stream and wait for its answer."""
        session = self.session
        if session is None:
            raise RuntimeError("server-to-client requests need a handshake-era session")
        request_id = self.endpoint.sessions.next_id("r")
        waiter: asyncio.Future[Any] = self.loop.create_future()
        session.pending[request_id] = waiter
        try:
            self._emit(rpc.request(request_id, method, params))
            reply: rpc.Message = await waiter
        finally:
            session.pending.pop(request_id, None)
        if reply.error is not msgspec.UNSET:
            raise ClientError(reply.error.code, reply.error.message, reply.error.data)
        return msgspec.json.decode(reply.result) if reply.result is not msgspec.UNSET else None

    def close_stream(self) -> None:
        """End this call's SSE connection now; the client resumes it with Last-Event-ID (SEP-1699).

        Lets a long call free the connection (and any proxy slot) while it works. Only the
        handshake era can resume; a 2026-07-28 call keeps its stream.
        """
        if self.session is None or self.finished:
            return
        if self.log is None:
            self._open_stream()
        assert self.log is not None
        live, self.log.live = self.log.live, None
        if live is not None:
            live.end()

    # -- the HTTP answer -----------------------------------------------------------------------
    def record(self, ok: bool) -> None:
        """Count this request in the worker's metrics, once, when its final message is decided."""
        recorder = self.endpoint.recorder
        if self.recorded or recorder is None:
            return
        self.recorded = True
        recorder.answered(self.message.method, ok, time.perf_counter_ns() - self.started, self.tool_name, self.waiting)

    def respond_now(self, result: Any) -> Response:
        """The handler finished synchronously: a plain JSON response, no stream ever opened."""
        self.finished = True
        self.record(True)
        return Response(200, self._result_bytes(result), "application/json", self.endpoint.response_headers(self))

    def pending_response(self, task: asyncio.Future[Any]) -> asyncio.Future[ResponseLike]:
        """The handler suspended: the answer comes later. Only now is it in flight (the gauge): a call
        answered within its own callback is never seen by anyone in between."""
        self.task = task
        if not self.waiting and not self.recorded and self.endpoint.recorder is not None:
            self.waiting = True
            self.endpoint.recorder.enter()
        if self.http is None:
            self.http = self.loop.create_future()
        task.add_done_callback(self._task_done)
        return self.http

    def _task_done(self, task: asyncio.Future[Any]) -> None:
        self.endpoint.forget(self)
        if task.cancelled():
            self._finish(None, ok=False)
            return
        exc = task.exception()
        if isinstance(exc, rpc.RpcError):
            self._finish(rpc.error(self.request_id, exc.code, exc.message, exc.data), ok=False)
        elif exc is not None:
            self.endpoint.log_handler_error(self, exc)
            self._finish(rpc.error(self.request_id, rpc.INTERNAL_ERROR, "Internal error"), ok=False)
        else:
            self._finish(self._result_bytes(task.result()), ok=True)

    def _result_bytes(self, result: Any) -> bytes:
        if self.modern:
            # On a copy: `result` may be the tool's own dict (returned again, to a 2025-11-25 session) or a
            # cache entry. The server's _meta is encoded once (a Raw): the copy never goes anywhere else.
            result = dict(result)
            result.setdefault("resultType", "complete")
            result.setdefault("_meta", self.endpoint.server_meta)
        return rpc.response(self.request_id, result)

    def _finish(self, body: bytes | None, ok: bool) -> None:
        """Deliver the final message (None: cancelled, nothing to say) and close the stream."""
        self.finished = True
        self.record(ok)
        if self.stream is None and self.log is None:
            if self.http is not None and not self.http.done():
                response = Response.json(200, body, self.endpoint.response_headers(self)) if body else \
                    Response(202)
                self.http.set_result(response)
            return
        if body is not None:
            self._emit(body)
        if self.log is not None:
            self.log.finish()
            live, self.log.live = self.log.live, None
            if live is not None:
                live.end()
        elif self.stream is not None:
            self.stream.end()

    def _emit(self, data: bytes) -> None:
        if self.stream is None and self.log is None:
            self._open_stream()
        if self.log is not None:
            self.log.append(data)
        elif self.stream is not None:
            self.stream.send(data)

    def _open_stream(self) -> None:
        """Switch this answer to SSE (the HTTP head is not written yet, so we still may)."""
        stream = EventStream(self.endpoint.response_headers(self))
        self.stream = stream
        if self.session is not None:
            self.log = self.endpoint.sessions.open_stream(self.session)
            self.log.live = stream
            self.endpoint.prime(self.session, self.log, stream)
        if self.http is None:
            self.http = self.loop.create_future()
        if not self.http.done():
            self.http.set_result(stream)
