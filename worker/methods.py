"""MCP methods, the same code for every protocol version; the `Call` says which version asked.

Each handler takes the `Call` and its raw params and returns the result object, or an awaitable of it.
Handlers raise `RpcError` for protocol errors; errors inside a tool become `isError` results.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
import types
from collections.abc import Callable
from typing import Any

import msgspec

from mcpherd.shared import events
from mcpherd.shared.signing import Signer
from mcpherd.worker import jsonrpc as rpc
from mcpherd.worker.app import App, PromptDef, ResourceDef, ToolDef
from mcpherd.shared.l2 import L2Cache
from mcpherd.worker.cache import ResultCache, cache_key
from mcpherd.worker.content import CONTENT_TYPES, PromptMessage, TextContent
from mcpherd.worker.context import LOG_LEVELS, ClientError, InputRequired, ToolError
from mcpherd.worker.invoke import Invoker, convert_arguments, decode_arguments, start_eagerly

log = logging.getLogger("mcpherd.worker")
MODERN = "2026-07-28"
INPUT_STATE_TTL = 600.0
# 2026-07-28 caching hints (SEP-2549). Lists depend only on the deployed code: public, but a reload may
# change them, so no freshness is promised. A resource may be user-specific: private.
LIST_HINTS = {"ttlMs": 0, "cacheScope": "public"}
READ_HINTS = {"ttlMs": 0, "cacheScope": "private"}


class Meta(msgspec.Struct):
    meta: dict[str, Any] | None = msgspec.field(default=None, name="_meta")


class ListParams(msgspec.Struct):
    cursor: str | None = None


class RequestParams(msgspec.Struct):
    """The params fields the transport and `tools/call` read, decoded once per request (`Call.envelope`).

    Lenient on purpose: the 2026-07-28 ladder compares headers with whatever the body holds before any
    method checks types. A handler uses it only when the fields have its types (`_call_params`), and
    otherwise decodes its own strict Struct, whose error names the field.
    """

    meta: dict[str, Any] | None = msgspec.field(default=None, name="_meta")
    name: Any = None
    uri: Any = None
    arguments: msgspec.Raw = msgspec.Raw(b"{}")
    inputResponses: Any = None
    requestState: Any = None


request_params = msgspec.json.Decoder(RequestParams)


class CallToolParams(msgspec.Struct):
    name: str
    arguments: msgspec.Raw = msgspec.Raw(b"{}")
    inputResponses: dict[str, Any] | None = None
    requestState: str | None = None


class ReadParams(msgspec.Struct):
    uri: str
    inputResponses: dict[str, Any] | None = None
    requestState: str | None = None


class GetPromptParams(msgspec.Struct):
    name: str
    arguments: msgspec.Raw = msgspec.Raw(b"{}")
    inputResponses: dict[str, Any] | None = None
    requestState: str | None = None


class CompleteRef(msgspec.Struct):
    type: str
    name: str | None = None
    uri: str | None = None


class CompleteArgument(msgspec.Struct):
    name: str
    value: str


class CompleteContext(msgspec.Struct):
    arguments: dict[str, str] | None = None


class CompleteParams(msgspec.Struct):
    ref: CompleteRef
    argument: CompleteArgument
    context: CompleteContext | None = None


class SetLevelParams(msgspec.Struct):
    level: str


class InputState(msgspec.Struct, array_like=True):
    """The signed `requestState` of a 2026-07-28 multi-round request: what was already answered.

    Bound to the method, its target (tool, prompt or URI) and a digest of the arguments, so a state
    cannot be replayed on another request; it expires after INPUT_STATE_TTL. A fresh timestamp makes
    every round's state differ even when the answers do not.
    """

    method: str
    target: str
    arguments_digest: bytes
    expires: float
    answers: dict[str, Any]


_decoders = {t: msgspec.json.Decoder(t) for t in (ListParams, CallToolParams, ReadParams, GetPromptParams,
                                                  CompleteParams, SetLevelParams)}


def params_of(call: Any, struct_type: type[Any]) -> Any:
    return rpc.decode_params(call.params, _decoders[struct_type])


class Methods:
    def __init__(self, app: App, invoker: Invoker, secret: bytes, page_size: int = 100,
                 cache: ResultCache | None = None, l2: L2Cache | None = None) -> None:
        self.app = app
        self.cache = cache
        self.l2 = l2
        self.invoker = invoker
        self.page_size = page_size
        self._state_signer = Signer(secret, "request-state")
        self.table: dict[str, Callable[[Any], Any]] = {
            "tools/list": self.tools_list,
            "tools/call": self.tools_call,
            "resources/list": self.resources_list,
            "resources/templates/list": self.templates_list,
            "resources/read": self.resources_read,
            "prompts/list": self.prompts_list,
            "prompts/get": self.prompts_get,
            "completion/complete": self.complete,
        }
        # Removed in 2026-07-28 (ping, logging/setLevel, resources/(un)subscribe answer 404 there).
        self.handshake_only: dict[str, Callable[[Any], Any]] = {
            "ping": self.ping,
            "logging/setLevel": self.set_level,
            "resources/subscribe": self.subscribe,
            "resources/unsubscribe": self.unsubscribe,
        }

    def capabilities(self, modern: bool) -> dict[str, Any]:
        caps: dict[str, Any] = {}
        if self.app.tools:
            caps["tools"] = {"listChanged": True}
        if self.app.resources or self.app.templates:
            caps["resources"] = {"subscribe": True, "listChanged": True}
        if self.app.prompts:
            caps["prompts"] = {"listChanged": True}
        if self.app.completers:
            caps["completions"] = {}
        if not modern:
            caps["logging"] = {}
        return caps

    def server_info(self) -> dict[str, str]:
        return {"name": self.app.name, "version": self.app.version}

    # -- simple methods ------------------------------------------------------------------------
    def ping(self, call: Any) -> dict[str, Any]:
        return {}

    def set_level(self, call: Any) -> dict[str, Any]:
        level = params_of(call, SetLevelParams).level
        if level not in LOG_LEVELS:
            raise rpc.RpcError(rpc.INVALID_PARAMS, f"Invalid params: unknown log level {level!r}")
        call.endpoint.sessions.set_log_level(call.session.token, level)  # kept past a rebuild
        self._share(call, events.SetLogLevel(call.session.token, level))
        return {}

    def subscribe(self, call: Any) -> dict[str, Any]:
        return self._subscription(call, True)

    def unsubscribe(self, call: Any) -> dict[str, Any]:
        return self._subscription(call, False)

    def _subscription(self, call: Any, on: bool) -> dict[str, Any]:
        uri = params_of(call, ReadParams).uri
        event = events.Subscribe(call.session.token, uri, on)
        try:
            events.encode(event)  # every worker must learn of it, in one entry of the event ring
        except ValueError:
            raise rpc.RpcError(rpc.INVALID_PARAMS, f"Invalid params: uri is too long to subscribe to "
                                                   f"({len(uri.encode())} bytes; at most ~900)") from None
        call.endpoint.sessions.set_subscription(call.session.token, uri, on)  # kept past a rebuild
        self._share(call, event)
        return {}

    def _share(self, call: Any, event: Any) -> None:
        """Session state other workers need (they may hold the GET stream or serve the next call)."""
        cluster = call.endpoint.cluster
        if cluster is not None and not cluster.standalone:
            cluster.publish(event, wait=False)

    def _page(self, call: Any, items: list[dict[str, Any]], key: str) -> dict[str, Any]:
        cursor = params_of(call, ListParams).cursor
        start = _decode_cursor(cursor) if cursor else 0
        page = items[start:start + self.page_size]
        result: dict[str, Any] = {key: page}
        if start + self.page_size < len(items):
            result["nextCursor"] = _encode_cursor(start + self.page_size)
        if call.modern:
            result.update(LIST_HINTS)
        return result

    def tools_list(self, call: Any) -> dict[str, Any]:
        return self._page(call, [t.listing for t in self.app.tools.values()], "tools")

    def resources_list(self, call: Any) -> dict[str, Any]:
        return self._page(call, [r.listing for r in self.app.resources.values()], "resources")

    def templates_list(self, call: Any) -> dict[str, Any]:
        return self._page(call, [r.listing for r in self.app.templates.values()], "resourceTemplates")

    def prompts_list(self, call: Any) -> dict[str, Any]:
        return self._page(call, [p.listing for p in self.app.prompts.values()], "prompts")

    # -- tools ---------------------------------------------------------------------------------
    def tools_call(self, call: Any) -> Any:
        params = _call_params(call)
        tool = self.app.tools.get(params.name)
        if tool is None:
            raise rpc.RpcError(rpc.INVALID_PARAMS, f"Unknown tool: {params.name}")
        call.tool_name = tool.name
        args = decode_arguments(tool.signature, params.arguments, "tool", tool.name)
        if call.modern:
            self._open_round(call, tool.name, params.arguments, params)
        if tool.cache_ttl and self.cache is not None:
            key = cache_key(tool.name, params.arguments)
            cached = self.cache.get(key)
            if cached is not None:
                return dict(cached)
            call.cache_key = key
            if self.l2 is not None and self.l2.available:
                return self._through_l2(call, tool, args, key)
        return self._run_tool(call, tool, args)

    async def _through_l2(self, call: Any, tool: ToolDef, args: Any, key: str) -> Any:
        """L1 missed: try the hosts' shared L2 before computing."""
        assert self.l2 is not None and self.cache is not None
        shared = await self.l2.get(key)
        if shared is not None:
            self.cache.put(key, shared, tool.cache_ttl or 0.0, tool.cache_tags)
            return dict(shared)
        outcome = self._run_tool(call, tool, args)
        return await outcome if hasattr(outcome, "__await__") else outcome

    def _run_tool(self, call: Any, tool: ToolDef, args: Any) -> Any:
        context = call.context() if tool.signature.context_param else None
        try:
            outcome = self.invoker.call(tool.fn, tool.signature, args, context)
            if type(outcome) is types.CoroutineType:  # an async tool: most finish in their first step
                done, outcome = start_eagerly(call.loop, outcome)
                if not done:
                    return self._finish_tool(call, tool, outcome)
            elif hasattr(outcome, "__await__"):  # a sync tool's pool future
                return self._finish_tool(call, tool, outcome)
        except Exception as exc:
            return self._tool_failure(call, tool, exc)
        result = tool_result(tool, outcome)
        return self._cached(call, tool, result) if call.cache_key else result

    async def _finish_tool(self, call: Any, tool: ToolDef, outcome: Any) -> Any:
        try:
            value = await outcome
        except Exception as exc:
            return self._tool_failure(call, tool, exc)
        return self._cached(call, tool, tool_result(tool, value))

    def _cached(self, call: Any, tool: ToolDef, result: dict[str, Any]) -> dict[str, Any]:
        """Keep successful results of cacheable tools (errors are never cached)."""
        if call.cache_key and self.cache is not None and not result.get("isError"):
            # A copy, taken now: the call goes on to add its protocol version's fields to `result`
            # (2026-07-28's resultType and _meta) before the L2 write runs, and a reader of either
            # cache may speak another version. Hits are copied again (`tools_call`), so this one stays clean.
            entry = dict(result)
            self.cache.put(call.cache_key, entry, tool.cache_ttl or 0.0, tool.cache_tags)
            if self.l2 is not None:
                asyncio.get_running_loop().create_task(
                    self.l2.put(call.cache_key, entry, tool.cache_ttl or 0.0, tool.cache_tags))
        return result

    def _tool_failure(self, call: Any, tool: ToolDef, exc: Exception) -> dict[str, Any]:
        if isinstance(exc, rpc.RpcError):
            raise exc
        if isinstance(exc, InputRequired):
            return self.input_required(call, exc)
        if isinstance(exc, ClientError):
            message = f"The client refused a request the tool needed: {exc}"
        elif isinstance(exc, ToolError):
            message = str(exc)
        else:
            log.info("tool %s raised %s: %s", tool.name, type(exc).__name__, exc)
            message = str(exc) or type(exc).__name__
        return {"content": [TextContent(message)], "isError": True}

    # -- 2026-07-28 multi-round requests (tools/call, prompts/get, resources/read) ---------------
    def _open_round(self, call: Any, target: str, raw_args: msgspec.Raw, params: Any) -> None:
        """Collect the answers so far: those signed into requestState plus the new inputResponses."""
        # The raw arguments, digested only if a requestState is opened or sealed (most calls do neither).
        call.round_key = (call.message.method, target, raw_args)
        answers: dict[str, Any] = {}
        call.answers = answers
        if params.requestState is not None:
            answers.update(self._open_state(call, params.requestState).answers)
        if params.inputResponses:
            answers.update(params.inputResponses)

    def _open_state(self, call: Any, token: str) -> InputState:
        payload = self._state_signer.unseal(token)
        try:
            state = msgspec.msgpack.decode(payload, type=InputState) if payload else None
        except msgspec.DecodeError:
            state = None
        if state is None or (state.method, state.target, state.arguments_digest) != _bound(call.round_key) \
                or state.expires < time.time():
            raise rpc.RpcError(rpc.INVALID_PARAMS, "Invalid or expired requestState",
                               {"reason": "invalid_request_state"})
        return state

    def input_required(self, call: Any, exc: InputRequired) -> dict[str, Any]:
        method, target, digest = _bound(call.round_key)
        state = InputState(method, target, digest, time.time() + INPUT_STATE_TTL, call.answers or {})
        return {
            "resultType": "input_required",
            "inputRequests": exc.requests,
            "requestState": self._state_signer.seal(msgspec.msgpack.encode(state)),
        }

    # -- resources -----------------------------------------------------------------------------
    def resources_read(self, call: Any) -> Any:
        params = params_of(call, ReadParams)
        uri = params.uri
        resource, variables = self._find_resource(uri)
        if resource is None:
            code = rpc.INVALID_PARAMS if call.modern else rpc.RESOURCE_NOT_FOUND
            raise rpc.RpcError(code, f"Resource not found: {uri}", {"uri": uri})
        args = convert_arguments(resource.signature, variables, f"resource {uri!r}")
        if call.modern:
            self._open_round(call, uri, msgspec.Raw(b"{}"), params)
        context = call.context() if resource.signature.context_param else None
        return self._shaped(call, resource.fn, resource.signature, args, context,
                            lambda value: resource_result(call, resource, uri, value))

    def _shaped(self, call: Any, fn: Any, signature: Any, args: Any, context: Any,
                shape: Callable[[Any], Any]) -> Any:
        """Call a resource or prompt function; an unanswered question becomes input_required."""
        try:
            outcome = self.invoker.call(fn, signature, args, context)
        except InputRequired as exc:
            return self.input_required(call, exc)
        if hasattr(outcome, "__await__"):
            return self._shaped_later(call, outcome, shape)
        return shape(outcome)

    async def _shaped_later(self, call: Any, outcome: Any, shape: Callable[[Any], Any]) -> Any:
        try:
            return shape(await outcome)
        except InputRequired as exc:
            return self.input_required(call, exc)

    def _find_resource(self, uri: str) -> tuple[ResourceDef | None, dict[str, str]]:
        resource = self.app.resources.get(uri)
        if resource is not None:
            return resource, {}
        for template in self.app.templates.values():
            assert template.pattern is not None
            match = template.pattern.match(uri)
            if match:
                return template, match.groupdict()
        return None, {}

    def resource_exists(self, uri: str) -> bool:
        return self._find_resource(uri)[0] is not None

    # -- prompts and completion ----------------------------------------------------------------
    def prompts_get(self, call: Any) -> Any:
        params = params_of(call, GetPromptParams)
        prompt = self.app.prompts.get(params.name)
        if prompt is None:
            raise rpc.RpcError(rpc.INVALID_PARAMS, f"Unknown prompt: {params.name}")
        args = decode_arguments(prompt.signature, params.arguments, "prompt", params.name)
        if call.modern:
            self._open_round(call, prompt.name, params.arguments, params)
        context = call.context() if prompt.signature.context_param else None
        return self._shaped(call, prompt.fn, prompt.signature, args, context,
                            lambda value: prompt_result(prompt, value))

    def complete(self, call: Any) -> Any:
        params = params_of(call, CompleteParams)
        target = params.ref.name if params.ref.type == "ref/prompt" else params.ref.uri
        completer = self.app.completers.get((f"{params.ref.type}:{target}", params.argument.name))
        context_args = params.context.arguments if params.context and params.context.arguments else {}
        values = completer(params.argument.name, params.argument.value, context_args) if completer else []
        if hasattr(values, "__await__"):
            return _then(values, completion_result)
        return completion_result(values)


# -- result shapes ---------------------------------------------------------------------------------
def _call_params(call: Any) -> Any:
    """The envelope when its fields have `CallToolParams`' types (every well-formed call), else the
    strict decode, for its error message."""
    params = call.envelope
    if params is not None and type(params.name) is str \
            and (params.requestState is None or type(params.requestState) is str) \
            and (params.inputResponses is None or type(params.inputResponses) is dict):
        return params
    return params_of(call, CallToolParams)


def tool_result(tool: ToolDef, value: Any) -> dict[str, Any]:
    if type(value) is str and tool.output_type is None:
        return {"content": [TextContent(value)]}  # the common case, first
    if isinstance(value, dict) and "content" in value and tool.output_type is None:
        return value  # a complete CallToolResult built by the tool itself
    if tool.output_type is not None and not _is_content_value(value):
        structured = {"result": value} if tool.wrap_output else value
        builtins = msgspec.to_builtins(structured)
        text = rpc.encode(builtins).decode()
        return {"content": [TextContent(text)], "structuredContent": builtins}
    return {"content": content_list(value)}


def _is_content_value(value: Any) -> bool:
    if isinstance(value, CONTENT_TYPES):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, CONTENT_TYPES) for v in value)


def content_list(value: Any) -> list[Any]:
    if isinstance(value, str):
        return [TextContent(value)]
    if isinstance(value, CONTENT_TYPES):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(v, CONTENT_TYPES) for v in value):
        return list(value)
    if value is None:
        return []
    return [TextContent(rpc.encode(msgspec.to_builtins(value)).decode())]


def resource_result(call: Any, resource: ResourceDef, uri: str, value: Any) -> dict[str, Any]:
    result = value if isinstance(value, dict) and "contents" in value else {"contents": _contents(resource, uri, value)}
    if call.modern:
        for key, default in READ_HINTS.items():
            result.setdefault(key, default)
    return result


def _contents(resource: ResourceDef, uri: str, value: Any) -> list[dict[str, Any]]:
    if isinstance(value, (bytes, bytearray)):
        entry: dict[str, Any] = {"uri": uri, "blob": base64.b64encode(value).decode("ascii")}
    else:
        entry = {"uri": uri, "text": value if isinstance(value, str) else rpc.encode(value).decode()}
    if resource.mime_type:
        entry["mimeType"] = resource.mime_type
    return [entry]


def prompt_result(prompt: PromptDef, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        messages: list[Any] = [PromptMessage("user", TextContent(value))]
    elif isinstance(value, (PromptMessage, dict)):
        messages = [value]
    else:
        messages = list(value)
    result: dict[str, Any] = {"messages": messages}
    if prompt.description:
        result["description"] = prompt.description
    return result


def completion_result(values: list[str]) -> dict[str, Any]:
    values = list(values)
    return {"completion": {"values": values[:100], "total": len(values), "hasMore": len(values) > 100}}


async def _then(awaitable: Any, shape: Callable[[Any], Any]) -> Any:
    return shape(await awaitable)


def _digest(raw: msgspec.Raw | bytes) -> bytes:
    canonical = msgspec.json.encode(msgspec.json.decode(raw), order="sorted")
    return hashlib.sha256(canonical).digest()[:16]


def _bound(round_key: tuple[str, str, msgspec.Raw | bytes]) -> tuple[str, str, bytes]:
    """(method, target, raw arguments) -> what a requestState is bound to: the arguments' digest."""
    method, target, raw_args = round_key
    raw = bytes(raw_args)
    return method, target, _digest(raw) if raw else raw


def _encode_cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o{offset}".encode()).decode()


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor.encode()).decode()
        if text.startswith("o") and text[1:].isdigit():
            return int(text[1:])
    except ValueError:
        pass
    raise rpc.RpcError(rpc.INVALID_PARAMS, "Invalid params: unknown pagination cursor")
