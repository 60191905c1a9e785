"""The Streamable HTTP endpoint (`/mcp`): every protocol version from 2025-03-26 to 2026-07-28.

Routing by era, as the spec and the official SDK do it:
- `MCP-Protocol-Version` names a version that is not a handshake version -> the stateless 2026-07-28
  path (`modern.py`): POST only, every request self-contained.
- otherwise the handshake era: `initialize` creates a session, every later request carries
  `Mcp-Session-Id`; a request without a version header is 2025-03-26 (spec: transports, "Protocol
  Version Header").
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Awaitable
from typing import Any

import msgspec

from mcpherd.worker import jsonrpc as rpc
from mcpherd.worker.call import Call
from mcpherd.worker.http import HANDED_OFF, Request, Response, ResponseLike
from mcpherd.worker.invoke import start_eagerly
from mcpherd.worker.methods import Methods, RequestParams, request_params
from mcpherd.worker.security import AllowList
from mcpherd.worker.sessions import HANDSHAKE_VERSIONS, MAX_LOG_EVENTS, Session, SessionError, SessionStore, StreamLog
from mcpherd.worker.sse import EventStream

log = logging.getLogger("mcpherd.worker")
SUPPORTED_VERSIONS = (*HANDSHAKE_VERSIONS, "2026-07-28")
LATEST_HANDSHAKE = HANDSHAKE_VERSIONS[-1]
RETRY_MS = 1000  # how soon a client should reconnect to a stream we closed


def text(status: int, message: str, headers: list[tuple[str, str]] | None = None) -> Response:
    return Response(status, message.encode() + b"\n", "text/plain; charset=utf-8", headers or [])


def rpc_error(status: int, code: int, message: str, request_id: Any = None, data: Any = None) -> Response:
    return Response.json(status, rpc.error(request_id, code, message, data))


# Header value -> answer. A client sends the same values on every request, so each is parsed once;
# the bound keeps a client that varies them from growing the caches. Callers pass the header value
# (`request.headers.get("accept", "")`): one Python call per check on the hot path, not two.
@functools.lru_cache(maxsize=256)
def accepts(accept: str) -> tuple[bool, bool]:
    """(json, sse) acceptable for this Accept value, with wildcards (RFC 9110 12.5.1)."""
    kinds = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    wildcard = "*/*" in kinds
    return (wildcard or "application/json" in kinds or "application/*" in kinds,
            wildcard or "text/event-stream" in kinds or "text/*" in kinds)


@functools.lru_cache(maxsize=256)
def is_json(content_type: str) -> bool:
    """Content-Type is application/json (any parameters, any case)."""
    return content_type.lower().startswith("application/json")


class Endpoint:
    def __init__(self, methods: Methods, sessions: SessionStore, hosts: AllowList, origins: AllowList,
                 path: str = "/mcp") -> None:
        from mcpherd.worker.modern import ModernEndpoint

        self.loop = asyncio.get_running_loop()
        self.methods = methods
        self.sessions = sessions
        self.hosts = hosts
        self.origins = origins
        self.path = path
        self.inflight: dict[tuple[str, Any], Call] = {}  # (session token, request id) -> call
        self.modern = ModernEndpoint(self)
        self.cluster: Any = None  # worker/cluster.py Cluster, set by the worker
        self.recorder: Any = None  # shared/metrics.py Recorder, set by a worker with a shared-memory cell
        self.server_meta = msgspec.Raw(rpc.encode({"io.modelcontextprotocol/serverInfo": methods.server_info()}))

    # -- entry ---------------------------------------------------------------------------------
    def handle(self, request: Request) -> ResponseLike | Awaitable[ResponseLike]:
        if request.path != self.path:
            return text(404, "Not Found")
        rejected = self._check_origin(request)
        if rejected is not None:
            return rejected
        version = request.headers.get("mcp-protocol-version")
        if version is not None and version not in HANDSHAKE_VERSIONS:
            return self.modern.handle(request, version)
        if request.method == "POST":
            return self._post(request, version)
        if request.method == "GET":
            return self._get(request, version)
        if request.method == "DELETE":
            return self._delete(request, version)
        return text(405, "Method Not Allowed", [("allow", "GET, POST, DELETE")])

    def _check_origin(self, request: Request) -> Response | None:
        if not self.hosts.allows(request.header("host")):
            return text(421, "Misdirected Request: Host header not allowed")
        origin = request.headers.get("origin")
        if origin is not None and not self.origins.allows(origin):
            return text(403, "Forbidden: Origin not allowed")
        return None

    # -- POST (handshake era) ------------------------------------------------------------------
    def _post(self, request: Request, version: str | None) -> ResponseLike | Awaitable[ResponseLike]:
        wants_json, wants_sse = accepts(request.headers.get("accept", ""))
        if not (wants_json and wants_sse):
            return rpc_error(406, rpc.INVALID_REQUEST,
                             "Not Acceptable: Client must accept both application/json and text/event-stream")
        if not is_json(request.headers.get("content-type", "")):
            return rpc_error(415, rpc.INVALID_REQUEST, "Unsupported Media Type: Content-Type must be application/json")
        try:
            decoded = rpc.decode_body(request.body)
        except rpc.RpcError as exc:
            return rpc_error(exc.http_status, exc.code, exc.message)
        if isinstance(decoded, list):
            return self._post_batch(request, version, decoded)
        try:
            rpc.check_message(decoded)
        except rpc.RpcError as exc:
            return rpc_error(400, exc.code, exc.message, _id_of(decoded))
        if decoded.method == "initialize" and decoded.is_request:  # a notification has no id to answer
            return self._initialize(request, decoded)
        session_or_error = self._session_for(request, version)
        if isinstance(session_or_error, Response):
            return session_or_error
        return self._dispatch(request, session_or_error, decoded)

    def _post_batch(self, request: Request, version: str | None, batch: list[rpc.Message]) -> ResponseLike:
        session_or_error = self._session_for(request, version)
        if isinstance(session_or_error, Response):
            return session_or_error
        if session_or_error.protocol_version != "2025-03-26":
            return rpc_error(400, rpc.INVALID_REQUEST, "Invalid request: batches are not allowed after 2025-03-26")
        if not batch or any(m.is_request for m in batch):
            # Requests in a batch would need one combined stream of answers; notifications and
            # responses are what 2025-03-26 clients actually batch.
            return rpc_error(400, rpc.INVALID_REQUEST, "Invalid request: only notifications and responses may be batched")
        try:
            for message in batch:  # every message is checked before any of them takes effect
                rpc.check_message(message)
        except rpc.RpcError as exc:
            return rpc_error(400, exc.code, exc.message)
        for message in batch:
            self._accept_one_way(session_or_error, message)
        return Response(202)

    def _session_for(self, request: Request, version: str | None) -> Session | Response:
        token = request.headers.get("mcp-session-id")
        if token is None:
            return rpc_error(400, rpc.INVALID_REQUEST, "Bad Request: Mcp-Session-Id header is required")
        try:
            session = self.sessions.lookup(token, request.header("authorization"))
        except SessionError as exc:
            return rpc_error(exc.status, rpc.INVALID_REQUEST, exc.message)
        # A header naming another supported version is tolerated, as the official SDK does (some
        # clients send 2025-03-26 on later sessions); the session's negotiated version governs.
        return session

    def _initialize(self, request: Request, message: rpc.Message) -> Response:
        if request.headers.get("mcp-session-id"):
            return rpc_error(400, rpc.INVALID_REQUEST, "Invalid request: initialize must not carry a session id",
                             message.id)
        try:
            params = rpc.loads(message.params) if message.params is not msgspec.UNSET else {}
        except rpc.RpcError as exc:
            return rpc_error(400, exc.code, exc.message, message.id)
        if not isinstance(params, dict):
            return rpc_error(400, rpc.INVALID_PARAMS, "Invalid params: expected an object", message.id)
        requested = params.get("protocolVersion")
        version = requested if requested in HANDSHAKE_VERSIONS else LATEST_HANDSHAKE
        offered = params.get("capabilities")
        capabilities: dict[str, Any] = offered if isinstance(offered, dict) else {}
        session = self.sessions.create(version, capabilities, request.header("authorization"),
                                       params.get("clientInfo") or {})
        result: dict[str, Any] = {
            "protocolVersion": version,
            "capabilities": self.methods.capabilities(modern=False),
            "serverInfo": self.methods.server_info(),
        }
        if self.methods.app.instructions:
            result["instructions"] = self.methods.app.instructions
        return Response.json(200, rpc.response(_id_of(message), result), [("mcp-session-id", session.token)])

    def _dispatch(self, request: Request, session: Session, message: rpc.Message) -> ResponseLike | Awaitable[ResponseLike]:
        if not message.is_request:
            self._accept_one_way(session, message)
            return Response(202)
        method = message.method
        handler = self.methods.table.get(method) or self.methods.handshake_only.get(method)  # type: ignore[arg-type]
        if handler is None:
            return Response.json(200, rpc.error(_id_of(message), rpc.METHOD_NOT_FOUND, f"Method not found: {method}"),
                                 self._session_headers(session))
        call = Call(self, request, message, session.protocol_version, session, _envelope_of(message))
        return self.run(call, handler)

    def run(self, call: Call, handler: Any) -> ResponseLike | Awaitable[ResponseLike]:
        """Run a method handler; answer at once when it finishes without waiting on anything."""
        try:
            outcome = handler(call)
            if type(outcome) is not dict and hasattr(outcome, "__await__"):  # most results are a dict
                done, outcome = start_eagerly(self.loop, outcome)
                if not done:
                    self._remember(call)
                    return call.pending_response(outcome)
        except rpc.RpcError as exc:
            return self.error_response(call, exc)
        except Exception as exc:
            self.log_handler_error(call, exc)
            return self.error_response(call, rpc.RpcError(rpc.INTERNAL_ERROR, "Internal error"))
        if call.http is not None:  # it wrote to a stream before finishing
            call._finish(call._result_bytes(outcome), ok=True)
            return call.http
        return call.respond_now(outcome)

    def error_response(self, call: Call, exc: rpc.RpcError) -> ResponseLike | Awaitable[ResponseLike]:
        body = rpc.error(call.request_id, exc.code, exc.message, exc.data)
        if call.http is not None:
            call._finish(body, ok=False)
            return call.http
        call.record(False)
        return Response.json(self.modern.status_for(exc.code) if call.modern else 200, body,
                             self.response_headers(call))

    def _remember(self, call: Call) -> None:
        if call.session is not None:
            self.inflight[(call.session.token, call.request_id)] = call

    def forget(self, call: Call) -> None:
        if call.session is not None:
            self.inflight.pop((call.session.token, call.request_id), None)

    def log_handler_error(self, call: Call, exc: BaseException) -> None:
        log.error("%s failed", call.message.method, exc_info=exc)

    def _accept_one_way(self, session: Session, message: rpc.Message) -> None:
        """Client notifications and responses: nothing to answer, some state to update."""
        if message.is_response:
            request_id = str(message.id)
            waiter = session.pending.get(request_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(message)
            elif waiter is None and self.cluster is not None and not self.cluster.owns(request_id):
                owner = request_id.split("-", 1)[0]
                self.cluster.forward(owner, msgspec.msgpack.encode([session.token, msgspec.json.encode(message)]))
            return
        if message.method == "notifications/cancelled" and message.params is not msgspec.UNSET:
            try:
                params = rpc.loads(message.params)
            except rpc.RpcError:
                return  # a notification has no answer: one that cannot be read cancels nothing
            cancelled_id = params.get("requestId") if isinstance(params, dict) else None
            # Only ids can name a request; anything else (a list, an object) is not hashable either.
            call = self.inflight.get((session.token, cancelled_id)) if isinstance(cancelled_id, (str, int)) else None
            if call is not None:
                call.cancelled.set()
                if call.task is not None:
                    call.task.cancel()

    def deliver_forwarded(self, payload: bytes) -> None:
        """A client's answer to one of our requests, POSTed to another worker and forwarded here."""
        try:  # from another host it came through Redis, where anything may have been written
            token, body = msgspec.msgpack.decode(payload)
            message = msgspec.json.decode(body, type=rpc.Message)
        except (msgspec.DecodeError, ValueError, TypeError, RecursionError) as exc:
            log.warning("ignored an answer forwarded to this worker that cannot be decoded: %s", exc)
            return
        session = self.sessions.sessions.get(token) if isinstance(token, str) else None
        waiter = session.pending.get(str(message.id)) if session is not None else None
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    # -- response headers and stream priming ---------------------------------------------------
    def response_headers(self, call: Call) -> list[tuple[str, str]]:
        return self._session_headers(call.session) if call.session is not None else []

    def _session_headers(self, session: Session) -> list[tuple[str, str]]:
        return [("mcp-session-id", session.token)]

    def prime(self, session: Session, log_: StreamLog, stream: EventStream) -> None:
        """2025-11-25: a stream opens with an event id and empty data, so the client can resume it."""
        if session.protocol_version >= "2025-11-25":
            stream.send(b"", f"{log_.stream_id}.0", RETRY_MS)

    # -- GET: the session's stream for server-initiated messages, or a resumption ---------------
    def _get(self, request: Request, version: str | None) -> ResponseLike:
        if not accepts(request.headers.get("accept", ""))[1]:
            return rpc_error(406, rpc.INVALID_REQUEST, "Not Acceptable: Client must accept text/event-stream")
        session_or_error = self._session_for(request, version)
        if isinstance(session_or_error, Response):
            return session_or_error
        session = session_or_error
        last_event_id = request.headers.get("last-event-id")
        if last_event_id:
            return self._resume(request, session, last_event_id)
        if session.get_stream is not None and session.get_stream.live is not None:
            return rpc_error(409, rpc.INVALID_REQUEST, "Conflict: only one GET stream per session is allowed")
        if session.get_stream is None:
            session.get_stream = self.sessions.open_stream(session, "g")
        return self._attach(session, session.get_stream, [])

    def _resume(self, request: Request, session: Session, last_event_id: str) -> ResponseLike:
        stream_id, _, seq = last_event_id.rpartition(".")
        log_ = session.streams.get(stream_id)
        if log_ is None and self.cluster is not None and stream_id and not self.cluster.owns(stream_id):
            owner = stream_id.split("-", 1)[0]
            if owner[:8] != self.cluster.tag[:8] and self.sessions.mirror is not None and seq.isdigit():
                return self._resume_from_redis(session, stream_id, int(seq))
            return self._hand_off(request, owner)
        if log_ is None or not (seq.isascii() and seq.isdigit()):  # "²".isdigit(), but int("²") raises
            return rpc_error(404, rpc.INVALID_REQUEST, "Not Found: unknown Last-Event-ID for this session")
        after = int(seq)
        missing = log_.missing_after(after)
        if missing and log_.done and not log_.events:  # its result is gone too: the client must not wait for it
            return rpc_error(404, rpc.INVALID_REQUEST, "Not Found: this stream's events are no longer held")
        if missing:
            log.info("resuming stream %s after event %d: %d of the events that followed it are no longer held "
                     "(resume_buffer_mb, or %d per stream); the client gets the rest",
                     stream_id, after, missing, MAX_LOG_EVENTS)
        if log_.live is not None:
            log_.live.end()  # the client reconnected: the old connection is a ghost
        return self._attach(session, log_, log_.replay_after(after))

    def _resume_from_redis(self, session: Session, stream_id: str, after: int) -> ResponseLike:
        """The stream's owner is on another host: replay and follow its copy in Redis."""
        stream = EventStream(self._session_headers(session))
        self.prime(session, StreamLog(stream_id), stream)
        self.loop.create_task(self.sessions.mirror.replay(session.token, stream_id, after, stream))
        return stream

    def _hand_off(self, request: Request, owner: str) -> ResponseLike:
        """The stream lives on another worker: give it this very connection (SCM_RIGHTS)."""
        connection = request.connection
        fd = connection.duplicate_fd()
        if fd is None or not self.cluster.handoff(owner, request_bytes(request), fd):
            if fd is not None:
                os.close(fd)
            return rpc_error(404, rpc.INVALID_REQUEST, "Not Found: the worker holding this stream is gone")
        os.close(fd)
        return HANDED_OFF

    def _attach(self, session: Session, log_: StreamLog, replay: list[tuple[str, bytes]]) -> ResponseLike:
        stream = EventStream(self._session_headers(session))
        self.prime(session, log_, stream)
        for event_id, data in replay:
            stream.send(data, event_id)
        if log_.done:
            stream.end()
        else:
            log_.live = stream
            stream.on_detach.append(lambda s: _unlink(log_, s))
        return stream

    # -- DELETE (ends the session on every worker before answering) --------------------------------------------------------------------------------
    def _delete(self, request: Request, version: str | None) -> ResponseLike | Awaitable[ResponseLike]:
        session_or_error = self._session_for(request, version)
        if isinstance(session_or_error, Response):
            return session_or_error
        for key in [k for k in self.inflight if k[0] == session_or_error.token]:
            task = self.inflight[key].task
            if task is not None:
                task.cancel()
        session = session_or_error
        ending = self.sessions.nonce_and_expiry(session.token)
        self.sessions.terminate(session)
        if self.cluster is None or ending is None:
            return Response(200)
        from mcpherd.shared.events import SessionEnded

        return self._after(self.cluster.publish(SessionEnded(session.token, *ending)), Response(200))

    async def _after(self, done: Awaitable[Any], response: Response) -> Response:
        await done
        return response

    # -- server-initiated notifications --------------------------------------------------------
    def broadcast(self, method: str, params: dict[str, Any], uri: str | None = None) -> int:
        """Send to every session (subscribed to `uri` when given) and every matching listener."""
        data = rpc.notification(method, params)
        sent = 0
        for session in list(self.sessions.sessions.values()):
            if uri is not None and uri not in session.subscriptions:
                continue
            if session.get_stream is not None:
                session.get_stream.append(data)
                sent += 1
        return sent + self.modern.broadcast(method, params, uri)


def request_bytes(request: Request) -> bytes:
    """The request as it arrived (near enough: header names are lower-case), for a hand-off."""
    target = f"{request.path}?{request.query}" if request.query else request.path
    lines = [f"{request.method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in request.headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body


def _unlink(log_: StreamLog, stream: EventStream) -> None:
    if log_.live is stream:
        log_.live = None


def _envelope_of(message: rpc.Message) -> RequestParams | None:
    """The params' common fields (`_meta`, a tool call's), or None when params are no such object: the
    method's own decode then says what is wrong."""
    if message.params is msgspec.UNSET:
        return None
    try:
        envelope: RequestParams = request_params.decode(message.params)
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
    return envelope


def _id_of(message: rpc.Message) -> Any:
    return None if message.id is msgspec.UNSET else message.id
