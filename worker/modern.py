"""Protocol 2026-07-28 over HTTP: one self-contained POST per request, no session.

The validation ladder follows the spec (and the official SDK's order, so clients see the same error
for the same mistake): envelope `_meta` present -> headers agree with the body (`MCP-Protocol-Version`,
`Mcp-Method`, `Mcp-Name`, `Mcp-Param-*`) -> version supported -> method exists.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import msgspec

from mcpherd.worker import jsonrpc as rpc
from mcpherd.worker.call import Call
from mcpherd.worker.methods import RequestParams, request_params
from mcpherd.worker.http import Request, Response, ResponseLike
from mcpherd.worker.sse import EventStream
from mcpherd.worker.streamable import accepts, is_json, rpc_error  # imported once: a per-request import costs ~0.7 us

if TYPE_CHECKING:
    from mcpherd.worker.streamable import Endpoint

MODERN_VERSIONS = ("2026-07-28",)
VERSION_KEY = "io.modelcontextprotocol/protocolVersion"
CAPABILITIES_KEY = "io.modelcontextprotocol/clientCapabilities"
NAME_PARAM = {"tools/call": "name", "prompts/get": "name", "resources/read": "uri"}
_STATUS = {rpc.PARSE_ERROR: 400, rpc.INVALID_REQUEST: 400, rpc.INVALID_PARAMS: 400, rpc.HEADER_MISMATCH: 400,
           rpc.MISSING_REQUIRED_CLIENT_CAPABILITY: 400, rpc.UNSUPPORTED_PROTOCOL_VERSION: 400,
           rpc.METHOD_NOT_FOUND: 404}
_B64_SENTINEL = re.compile(r"^=\?base64\?(?P<payload>.*)\?=$")


class Listener:
    """A `subscriptions/listen` stream and the notifications it opted in to.

    Every notification on it, the acknowledgement first, names the subscription (the listen request's
    id) in `_meta`, so a client multiplexing several listens can tell them apart.
    """

    def __init__(self, stream: EventStream, wanted: dict[str, Any], subscription_id: Any) -> None:
        self.stream = stream
        self.meta = {"io.modelcontextprotocol/subscriptionId": subscription_id}
        self.methods = {m for key, m in (("toolsListChanged", "notifications/tools/list_changed"),
                                         ("promptsListChanged", "notifications/prompts/list_changed"),
                                         ("resourcesListChanged", "notifications/resources/list_changed"))
                        if wanted.get(key) is True}
        uris = wanted.get("resourceSubscriptions")
        self.uris = {u for u in uris if isinstance(u, str)} if isinstance(uris, list) else set()

    def wants(self, method: str, uri: str | None) -> bool:
        if method == "notifications/resources/updated":
            return uri in self.uris
        return method in self.methods

    def send(self, method: str, params: dict[str, Any]) -> bool:
        return self.stream.send(rpc.notification(method, {**params, "_meta": self.meta}))


class ModernEndpoint:
    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.listeners: set[Listener] = set()

    @staticmethod
    def status_for(code: int) -> int:
        return _STATUS.get(code, 200)

    def handle(self, request: Request, header_version: str) -> ResponseLike | Awaitable[ResponseLike]:
        if request.method != "POST":
            return Response(405, b"", None, [("allow", "POST")])
        wants_json, wants_sse = accepts(request.headers.get("accept", ""))
        if not wants_json:
            return rpc_error(406, rpc.INVALID_REQUEST, "Not Acceptable: Client must accept application/json")
        if not is_json(request.headers.get("content-type", "")):
            return rpc_error(415, rpc.INVALID_REQUEST, "Unsupported Media Type: Content-Type must be application/json")
        try:
            message = rpc.decode_body(request.body)
        except rpc.RpcError as exc:
            return rpc_error(400, exc.code, "Parse error" if exc.code == rpc.PARSE_ERROR else exc.message)
        if isinstance(message, list):
            return rpc_error(400, rpc.INVALID_REQUEST, "Invalid request: batches are not supported in 2026-07-28")
        if message.is_notification:
            return Response(202)  # no client-to-server notification has a meaning on this wire
        try:
            rpc.check_message(message)
            if not message.is_request:
                raise rpc.RpcError(rpc.INVALID_REQUEST, "Invalid request: clients must not POST responses")
            envelope = self._ladder(request, message, header_version)
        except rpc.RpcError as exc:
            return rpc_error(self.status_for(exc.code), exc.code, exc.message, _id(message), exc.data)
        if message.method == "subscriptions/listen" and not wants_sse:
            return rpc_error(406, rpc.INVALID_REQUEST, "Not Acceptable: subscriptions/listen needs text/event-stream")
        return self._dispatch(request, message, envelope)

    def _ladder(self, request: Request, message: rpc.Message, header_version: str) -> RequestParams:
        try:
            envelope: RequestParams = rpc.decode_params(message.params, request_params)
        except rpc.RpcError:
            raise rpc.RpcError(rpc.INVALID_PARAMS, "Invalid params: params must be an object") from None
        meta = envelope.meta
        if not isinstance(meta, dict) or VERSION_KEY not in meta or CAPABILITIES_KEY not in meta:
            raise rpc.RpcError(rpc.INVALID_PARAMS, f"params._meta must carry {VERSION_KEY!r} and {CAPABILITIES_KEY!r}")
        if meta[VERSION_KEY] != header_version:
            raise rpc.RpcError(rpc.HEADER_MISMATCH,
                               "mcp-protocol-version header does not match the request envelope's protocol version")
        header = request.headers.get("mcp-method")
        if header != message.method and _ows(header) != message.method:  # the exact match first: the usual case
            raise rpc.RpcError(rpc.HEADER_MISMATCH, "mcp-method header does not match the request body's method")
        name_key = NAME_PARAM.get(str(message.method))
        if name_key is not None:
            body_value = getattr(envelope, name_key)
            header = request.headers.get("mcp-name")
            # A header equal to the body value matches, unless it is itself an encoded form (=?base64?...?=).
            if body_value is not None and (header is None or header != body_value or header.startswith("=?")) \
                    and decode_header_value(_ows(header)) != body_value:
                raise rpc.RpcError(rpc.HEADER_MISMATCH,
                                   f"mcp-name header does not match the request body's {name_key!r} parameter")
        if message.method == "tools/call":
            self._check_param_headers(request, envelope)
        if header_version not in MODERN_VERSIONS:
            raise rpc.RpcError(rpc.UNSUPPORTED_PROTOCOL_VERSION, "Unsupported protocol version",
                               {"supported": list(MODERN_VERSIONS), "requested": header_version})
        return envelope

    def _check_param_headers(self, request: Request, envelope: RequestParams) -> None:
        """`Mcp-Param-*` headers must mirror the arguments annotated with x-mcp-header, exactly."""
        tool = self.endpoint.methods.app.tools.get(envelope.name) if isinstance(envelope.name, str) else None
        if tool is None or not tool.header_params:
            return
        try:
            arguments = msgspec.json.decode(envelope.arguments)
        except (msgspec.DecodeError, RecursionError):
            arguments = None  # the tool's own decode reports it, after the ladder
        if not isinstance(arguments, dict):
            arguments = {}
        for argument, header, json_type in tool.header_params:
            raw = _ows(request.headers.get(header))
            value = arguments.get(argument)
            if value is None and raw is None:
                continue
            if value is None or raw is None:
                state = "missing" if raw is None else "present but the argument is absent"
                raise rpc.RpcError(rpc.HEADER_MISMATCH, f"{header} header is {state}")
            decoded = decode_header_value(raw)
            if decoded is None:
                raise rpc.RpcError(rpc.HEADER_MISMATCH, f"{header} header carries a malformed base64 value")
            if decoded != _render(value, json_type):
                raise rpc.RpcError(rpc.HEADER_MISMATCH, f"{header} header does not match argument {argument!r}")

    def _dispatch(self, request: Request, message: rpc.Message, envelope: RequestParams) -> ResponseLike | Awaitable[ResponseLike]:
        method = message.method
        assert isinstance(method, str) and envelope.meta is not None
        call = Call(self.endpoint, request, message, MODERN_VERSIONS[0], None, envelope)
        if method == "server/discover":
            return call.respond_now(self.discover())
        if method == "subscriptions/listen":
            try:
                return self.listen(call)
            except rpc.RpcError as exc:
                return self.endpoint.error_response(call, exc)
        handler = self.endpoint.methods.table.get(method)
        if handler is None:
            call.record(False)
            return rpc_error(404, rpc.METHOD_NOT_FOUND, f"Method not found: {method}", call.request_id)
        return self.endpoint.run(call, handler)

    def discover(self) -> dict[str, Any]:
        methods = self.endpoint.methods
        result: dict[str, Any] = {
            "supportedVersions": list(MODERN_VERSIONS),
            "capabilities": methods.capabilities(modern=True),
            "ttlMs": 0,
            "cacheScope": "public",
        }
        if methods.app.instructions:
            result["instructions"] = methods.app.instructions
        return result

    def listen(self, call: Call) -> EventStream:
        params = rpc.loads(call.params) if call.params is not msgspec.UNSET else {}
        wanted = params.get("notifications") if isinstance(params, dict) else None
        listener = Listener(EventStream([]), wanted if isinstance(wanted, dict) else {}, call.request_id)
        call.record(True)  # counted when the subscription starts; the stream then lives on
        acknowledged: dict[str, Any] = {key: True for key, m in (
            ("toolsListChanged", "notifications/tools/list_changed"),
            ("promptsListChanged", "notifications/prompts/list_changed"),
            ("resourcesListChanged", "notifications/resources/list_changed")) if m in listener.methods}
        if listener.uris:
            acknowledged["resourceSubscriptions"] = sorted(listener.uris)
        listener.send("notifications/subscriptions/acknowledged", {"notifications": acknowledged})
        self.listeners.add(listener)
        listener.stream.on_detach.append(lambda _s: self.listeners.discard(listener))
        return listener.stream

    def broadcast(self, method: str, params: dict[str, Any], uri: str | None) -> int:
        sent = 0
        for listener in list(self.listeners):
            if listener.wants(method, uri) and listener.send(method, params):
                sent += 1
        return sent


def decode_header_value(value: str | None) -> str | None:
    """`=?base64?...?=` carries values that cannot travel in a header as-is; None if malformed."""
    if value is None:
        return None
    if not value.startswith("=?base64?"):
        return value  # the common case, without the regex
    match = _B64_SENTINEL.fullmatch(value)
    if match is None:
        return value
    payload = match.group("payload")
    try:
        decoded = base64.b64decode(payload, validate=True)
        if base64.b64encode(decoded).decode("ascii") != payload:
            return None
        return decoded.decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None


def _render(value: Any, json_type: str) -> str | None:
    if isinstance(value, bool):
        return "true" if value else "false"
    if json_type == "integer" and isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if isinstance(value, (str, int, float)) else None


def _ows(value: str | None) -> str | None:
    """Header values exclude surrounding optional white space (RFC 9110 5.5)."""
    return value.strip(" \t") if value is not None else None


def _id(message: rpc.Message) -> Any:
    return None if message.id is msgspec.UNSET else message.id
