"""The object a tool, resource or prompt may ask for: progress, logging, cancellation, client requests.

The same tool code runs under every protocol version. In the handshake era (2025-*) a request to the
client (sampling, elicitation, roots) is sent on the request's stream and awaited. Under 2026-07-28
there are no server-to-client requests: an unanswered question aborts the call with an
`InputRequiredResult`, the client retries with the answers, and the tool runs again from the top,
this time finding them. Tools must therefore ask their questions in a deterministic order.
Sync tools run in a worker thread; every method here may be called from that thread too.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any, Protocol

from mcpherd.worker.jsonrpc import INVALID_PARAMS, MISSING_REQUIRED_CLIENT_CAPABILITY, RpcError

LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")


class InputRequired(Exception):
    """Raised inside a 2026-07-28 call when the client must answer `requests` before it can go on."""

    def __init__(self, requests: dict[str, dict[str, Any]]) -> None:
        super().__init__("input required")
        self.requests = requests


_CAPABILITY_OF = {"sampling/createMessage": "sampling", "elicitation/create": "elicitation", "roots/list": "roots"}
_ANSWER_SHAPE = {"sampling/createMessage": "content", "elicitation/create": "action", "roots/list": "roots"}


class ToolError(Exception):
    """Raise in a tool to fail the call with this message as an `isError` result the model can read.

    Any other exception does the same; ToolError says the failure is expected, so it is not logged.
    """


class ClientError(Exception):
    """The client answered a server-to-client request with a JSON-RPC error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.data = data


class RequestScope(Protocol):
    """What the transport provides for one incoming request."""

    loop: asyncio.AbstractEventLoop
    protocol_version: str
    answers: dict[str, Any] | None  # 2026-07-28: inputResponses merged with answers carried in requestState

    @property
    def cancelled(self) -> asyncio.Event: ...
    @property
    def client_capabilities(self) -> dict[str, Any]: ...
    @property
    def progress_token(self) -> str | int | None: ...
    def notify(self, method: str, params: dict[str, Any]) -> None: ...
    def log_enabled(self, level: str) -> bool: ...
    async def ask(self, method: str, params: dict[str, Any]) -> Any: ...
    def close_stream(self) -> None: ...


class Context:
    """Passed to any function that declares a parameter of type `Context`."""

    def __init__(self, scope: RequestScope, request_id: str | int | None, headers: dict[str, str]) -> None:
        self._scope = scope
        self.request_id = request_id
        self.headers = headers
        self._asked = 0

    @property
    def protocol_version(self) -> str:
        return self._scope.protocol_version

    @property
    def client_capabilities(self) -> dict[str, Any]:
        return self._scope.client_capabilities

    @property
    def progress_token(self) -> str | int | None:
        return self._scope.progress_token

    @property
    def cancelled(self) -> bool:
        """True once the client sent notifications/cancelled for this request (long tools should poll)."""
        return self._scope.cancelled.is_set()

    # -- notifications (fire and forget, thread-safe) ------------------------------------------
    def report_progress(self, progress: float, total: float | None = None, message: str | None = None) -> None:
        token = self._scope.progress_token
        if token is None:
            return
        params: dict[str, Any] = {"progressToken": token, "progress": progress}
        if total is not None:
            params["total"] = total
        if message is not None:
            params["message"] = message
        self._notify("notifications/progress", params)

    def log(self, level: str, data: Any, logger: str | None = None) -> None:
        if level not in LOG_LEVELS:
            raise ValueError(f"unknown log level {level!r}; expected one of {', '.join(LOG_LEVELS)}")
        if not self._scope.log_enabled(level):
            return
        params: dict[str, Any] = {"level": level, "data": data}
        if logger is not None:
            params["logger"] = logger
        self._notify("notifications/message", params)

    def debug(self, data: Any) -> None:
        self.log("debug", data)

    def info(self, data: Any) -> None:
        self.log("info", data)

    def warning(self, data: Any) -> None:
        self.log("warning", data)

    def error(self, data: Any) -> None:
        self.log("error", data)

    def _notify(self, method: str, params: dict[str, Any]) -> None:
        if _on_loop(self._scope.loop):
            self._scope.notify(method, params)
        else:
            self._scope.loop.call_soon_threadsafe(self._scope.notify, method, params)

    def close_stream(self) -> None:
        """Close the connection carrying this call's stream; the client reconnects and resumes it."""
        if _on_loop(self._scope.loop):
            self._scope.close_stream()
        else:
            self._scope.loop.call_soon_threadsafe(self._scope.close_stream)

    # -- requests to the client ----------------------------------------------------------------
    async def elicit(self, message: str, requested_schema: dict[str, Any], *, key: str | None = None) -> dict[str, Any]:
        """Ask the user for input; returns the ElicitResult (`action`, `content`)."""
        params = {"mode": "form", "message": message, "requestedSchema": requested_schema}
        return await self._ask_one("elicitation/create", params, key)  # type: ignore[no-any-return]

    async def sample(self, messages: list[dict[str, Any]], max_tokens: int, *, key: str | None = None,
                     **options: Any) -> dict[str, Any]:
        """Ask the client's model for a completion; returns the CreateMessageResult."""
        params = {"messages": messages, "maxTokens": max_tokens, **options}
        return await self._ask_one("sampling/createMessage", params, key)  # type: ignore[no-any-return]

    async def list_roots(self, *, key: str | None = None) -> dict[str, Any]:
        return await self._ask_one("roots/list", {}, key)  # type: ignore[no-any-return]

    def supports(self, capability: str) -> bool:
        """Whether the client declared a capability ("sampling", "elicitation", "roots")."""
        return isinstance(self._scope.client_capabilities.get(capability), dict)

    async def request_inputs(self, requests: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Ask several questions at once: `{key: {"method": ..., "params": ...}}` -> `{key: result}`.

        Under 2026-07-28 they travel together in one InputRequiredResult; earlier versions send them
        as concurrent requests on the call's stream. A question the client has no capability for is
        refused with -32021 before anything is sent.
        """
        for request in requests.values():
            self._require_capability(request["method"])
        answers = self._scope.answers
        if answers is not None:
            missing = {k: v for k, v in requests.items() if k not in answers}
            if missing:
                raise InputRequired(missing)
            return {k: _checked_answer(k, requests[k]["method"], answers[k]) for k in requests}
        calls = [self._ask_on_loop(r["method"], r.get("params", {})) for r in requests.values()]
        return dict(zip(requests, await asyncio.gather(*calls)))

    def _require_capability(self, method: str) -> None:
        capability = _CAPABILITY_OF.get(method)
        if capability is not None and not self.supports(capability):
            raise RpcError(MISSING_REQUIRED_CLIENT_CAPABILITY,
                           f"Client did not declare the {capability} capability this request needs",
                           {"requiredCapabilities": {capability: {}}})

    async def _ask_one(self, method: str, params: dict[str, Any], key: str | None) -> Any:
        if key is None:
            key = f"{method.split('/')[0]}-{self._asked}"
            self._asked += 1
        answers = await self.request_inputs({key: {"method": method, "params": params}})
        return answers[key]

    async def _ask_on_loop(self, method: str, params: dict[str, Any]) -> Any:
        return await self._scope.ask(method, params)

    # -- blocking variants for sync tools running in the thread pool ---------------------------
    def elicit_sync(self, message: str, requested_schema: dict[str, Any]) -> dict[str, Any]:
        return self._block(self.elicit(message, requested_schema))  # type: ignore[no-any-return]

    def sample_sync(self, messages: list[dict[str, Any]], max_tokens: int, **options: Any) -> dict[str, Any]:
        return self._block(self.sample(messages, max_tokens, **options))  # type: ignore[no-any-return]

    def _block(self, coro: Any) -> Any:
        if _on_loop(self._scope.loop):
            coro.close()
            raise RuntimeError("the *_sync methods are for sync tools; async tools should await elicit()/sample()")
        return asyncio.run_coroutine_threadsafe(coro, self._scope.loop).result()


def _checked_answer(key: str, method: str, answer: Any) -> Any:
    """A client's answer is untrusted input: it must at least have the shape of the expected result."""
    if not isinstance(answer, dict) or _ANSWER_SHAPE[method] not in answer:
        raise RpcError(INVALID_PARAMS, f"Invalid params: inputResponses.{key} is not a valid result for {method}")
    return answer


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return threading.current_thread() is threading.main_thread() and not loop.is_running()
