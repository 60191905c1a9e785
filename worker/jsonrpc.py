"""JSON-RPC 2.0 framing for MCP, decoded and encoded with msgspec.

An incoming body decodes into `Message`; `params`, `result` and `error` stay raw until the method's
handler decodes them into its own Struct, so a message is parsed exactly once.
"""

from __future__ import annotations

from typing import Any

import msgspec

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
RESOURCE_NOT_FOUND = -32002  # handshake era; 2026-07-28 uses INVALID_PARAMS (SEP-2164)
HEADER_MISMATCH = -32020
MISSING_REQUIRED_CLIENT_CAPABILITY = -32021
UNSUPPORTED_PROTOCOL_VERSION = -32022

RequestId = int | str

_encoder = msgspec.json.Encoder()
encode = _encoder.encode


class ErrorObject(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: Any = None


class Message(msgspec.Struct, omit_defaults=True):
    """Any JSON-RPC message: request (id + method), notification (method), or response (id + result|error)."""

    jsonrpc: str | msgspec.UnsetType = msgspec.UNSET
    id: RequestId | None | msgspec.UnsetType = msgspec.UNSET
    method: str | msgspec.UnsetType = msgspec.UNSET
    params: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    result: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    error: ErrorObject | msgspec.UnsetType = msgspec.UNSET

    @property
    def is_request(self) -> bool:
        return self.method is not msgspec.UNSET and self.id is not msgspec.UNSET

    @property
    def is_notification(self) -> bool:
        return self.method is not msgspec.UNSET and self.id is msgspec.UNSET

    @property
    def is_response(self) -> bool:
        return self.method is msgspec.UNSET and (self.result is not msgspec.UNSET or self.error is not msgspec.UNSET)


class RpcError(Exception):
    """Raised by a method handler; becomes a JSON-RPC error response."""

    def __init__(self, code: int, message: str, data: Any = None, http_status: int = 200) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.http_status = http_status


_message_decoder = msgspec.json.Decoder(Message)
_batch_decoder = msgspec.json.Decoder(list[Message])


# msgspec follows nested JSON recursively and, past Python's recursion limit (~1,000 levels: a 2 KB
# body), raises RecursionError, not DecodeError. From a client that is bad input like any other.
NESTED_TOO_DEEPLY = "nested too deeply"


def decode_body(body: bytes) -> Message | list[Message]:
    """Raises RpcError(PARSE_ERROR) for bad JSON and RpcError(INVALID_REQUEST) for bad shapes.

    `params`, `result` and `error.data` stay raw, but their nesting is followed here too: a body this
    accepts decodes anywhere later (give or take the few frames between, which `decode_params`,
    `invoke.decode_arguments` and `loads` answer for)."""
    try:
        if body[:1] != b"{" and body.lstrip()[:1] == b"[":  # the first test spares the copy most of the time
            return _batch_decoder.decode(body)
        message = _message_decoder.decode(body)
    except msgspec.ValidationError as exc:
        raise RpcError(INVALID_REQUEST, f"Invalid request: {exc}", http_status=400) from None
    except msgspec.DecodeError as exc:
        raise RpcError(PARSE_ERROR, f"Parse error: {exc}", http_status=400) from None
    except RecursionError:
        raise RpcError(PARSE_ERROR, f"Parse error: {NESTED_TOO_DEEPLY}", http_status=400) from None
    return message


def check_message(message: Message) -> None:
    """The JSON-RPC envelope rules msgspec's types cannot express."""
    if message.jsonrpc != "2.0":
        raise RpcError(INVALID_REQUEST, 'Invalid request: "jsonrpc" must be "2.0"', http_status=400)
    if message.id is None:
        raise RpcError(INVALID_REQUEST, "Invalid request: MCP request ids must be a string or an integer",
                       http_status=400)
    if message.method is msgspec.UNSET and not message.is_response:
        raise RpcError(INVALID_REQUEST, 'Invalid request: expected "method", or "result"/"error"', http_status=400)


def decode_params(params: msgspec.Raw | msgspec.UnsetType, decoder: msgspec.json.Decoder[Any]) -> Any:
    try:
        return decoder.decode(b"{}" if params is msgspec.UNSET else params)  # a Raw decodes as is, no copy
    except msgspec.ValidationError as exc:
        raise RpcError(INVALID_PARAMS, f"Invalid params: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:  # e.g. invalid UTF-8 inside a string
        raise RpcError(INVALID_PARAMS, f"Invalid params: {exc}") from None
    except RecursionError:
        raise RpcError(INVALID_PARAMS, f"Invalid params: {NESTED_TOO_DEEPLY}") from None


def loads(raw: msgspec.Raw | bytes) -> Any:
    """Part of a decoded message (params, a result) as plain Python values; RpcError(INVALID_PARAMS) if
    it is nested too deeply to follow from here."""
    try:
        return msgspec.json.decode(raw)
    except RecursionError:
        raise RpcError(INVALID_PARAMS, f"Invalid params: {NESTED_TOO_DEEPLY}") from None


def response(request_id: RequestId | None, result: Any) -> bytes:
    return _encoder.encode({"jsonrpc": "2.0", "id": request_id, "result": result})


def error(request_id: RequestId | None, code: int, message: str, data: Any = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        err["data"] = data
    return _encoder.encode({"jsonrpc": "2.0", "id": request_id, "error": err})


def notification(method: str, params: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if params is not None:
        body["params"] = params
    return _encoder.encode(body)


def request(request_id: RequestId, method: str, params: dict[str, Any]) -> bytes:
    return _encoder.encode({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params})
