"""The official Python SDK client (PyPI `mcp` 2.3.0) against a live worker, in both protocol eras.

`mode="legacy"` runs the initialize handshake (2025-11-25, sessions, requests to the client on the SSE
stream); `mode="2026-07-28"` is stateless, and the SDK answers InputRequiredResults with the same
callbacks and retries by itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import mcp
import mcp_types as types
import pytest

from mcpherd.demo import app as demo_app

MODES = ["legacy", "2026-07-28"]
TIME_LIMIT = 30.0


class Answers:
    """Client-side callbacks that record what the server asked."""

    def __init__(self) -> None:
        self.sampled: list[types.CreateMessageRequestParams] = []
        self.elicited: list[types.ElicitRequestParams] = []
        self.logged: list[Any] = []

    async def sample(self, context: Any, params: types.CreateMessageRequestParams) -> types.CreateMessageResult:
        self.sampled.append(params)
        return types.CreateMessageResult(role="assistant", content=types.TextContent(type="text", text="Paris"),
                                         model="test-model", stop_reason="endTurn")

    async def elicit(self, context: Any, params: types.ElicitRequestParams) -> types.ElicitResult:
        self.elicited.append(params)
        replies: dict[str, dict[str, str | int | float | bool | list[str] | None]] = {
            "Step 1: What is your name?": {"name": "Ada"}, "Step 2: What is your favorite color?": {"color": "green"}}
        default: dict[str, str | int | float | bool | list[str] | None] = {"username": "ada", "email": "ada@example.com"}
        return types.ElicitResult(action="accept", content=replies.get(params.message, default))

    async def log(self, params: types.LoggingMessageNotificationParams) -> None:
        self.logged.append(params.data)


def run(worker: str, mode: str, scenario: Callable[[mcp.Client, Answers], Awaitable[None]],
        **options: Any) -> Answers:
    answers = Answers()

    async def main() -> None:
        with anyio.fail_after(TIME_LIMIT):
            async with mcp.Client(worker, mode=mode, sampling_callback=answers.sample,
                                  elicitation_callback=answers.elicit, logging_callback=answers.log,
                                  **options) as client:
                await scenario(client, answers)

    anyio.run(main)
    return answers


def text_of(block: Any) -> str:
    assert isinstance(block, types.TextContent), block
    return block.text


def only_text(result: types.CallToolResult) -> str:
    assert not result.is_error and len(result.content) == 1
    return text_of(result.content[0])


@pytest.mark.parametrize("mode", MODES)
def test_connect_list_call_and_read(worker: str, mode: str) -> None:
    async def scenario(client: mcp.Client, _: Answers) -> None:
        assert client.protocol_version == ("2025-11-25" if mode == "legacy" else "2026-07-28")
        tools = await client.list_tools()
        assert [tool.name for tool in tools.tools] == list(demo_app.tools)
        echo = next(tool for tool in tools.tools if tool.name == "echo")
        assert echo.input_schema == {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}
        assert only_text(await client.call_tool("echo", {"text": "héllo, wörld ✓"})) == "héllo, wörld ✓"
        resource = await client.read_resource("test://static-text")
        assert len(resource.contents) == 1
        content = resource.contents[0]
        assert isinstance(content, types.TextResourceContents)
        assert (str(content.uri), content.mime_type, content.text) == (
            "test://static-text", "text/plain", "This is the content of the static text resource.")
        failed = await client.call_tool("test_error_handling", {})
        assert failed.is_error and text_of(failed.content[0]) == "This tool intentionally returns an error for testing"
        prompt = await client.get_prompt("test_prompt_with_arguments", {"arg1": "a", "arg2": "b"})
        assert text_of(prompt.messages[0].content) == "Prompt with arguments: arg1='a', arg2='b'"

    run(worker, mode, scenario)


def test_legacy_sampling_request_mid_call(worker: str) -> None:
    async def scenario(client: mcp.Client, answers: Answers) -> None:
        result = await client.call_tool("test_sampling", {"prompt": "What is the capital of France?"})
        assert only_text(result) == "LLM response: Paris"

    answers = run(worker, "legacy", scenario)
    assert len(answers.sampled) == 1
    asked = answers.sampled[0]
    assert asked.max_tokens == 100 and len(asked.messages) == 1
    assert text_of(asked.messages[0].content) == "What is the capital of France?"


def test_modern_sampling_through_input_required(worker: str) -> None:
    async def scenario(client: mcp.Client, answers: Answers) -> None:
        result = await client.call_tool("test_input_required_result_sampling", {})
        assert only_text(result) == "The model said: Paris"

    answers = run(worker, "2026-07-28", scenario)
    assert len(answers.sampled) == 1
    assert text_of(answers.sampled[0].messages[0].content) == "What is the capital of France?"


def test_modern_multi_round_elicitation(worker: str) -> None:
    async def scenario(client: mcp.Client, answers: Answers) -> None:
        result = await client.call_tool("test_input_required_result_multi_round", {})
        assert only_text(result) == "Ada likes green"

    answers = run(worker, "2026-07-28", scenario)
    assert [p.message for p in answers.elicited] == ["Step 1: What is your name?", "Step 2: What is your favorite color?"]


def test_legacy_elicitation_progress_and_logging(worker: str) -> None:
    reported: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        reported.append((progress, total, message))

    async def scenario(client: mcp.Client, answers: Answers) -> None:
        elicited = await client.call_tool("test_elicitation", {"message": "Who are you?"})
        assert only_text(elicited) == \
            'User response: action=accept, content={"username":"ada","email":"ada@example.com"}'
        assert only_text(await client.call_tool("test_tool_with_progress", {}, progress_callback=on_progress))
        logged = await client.call_tool("test_tool_with_logging", {})
        assert only_text(logged) == "Tool with logging executed successfully"

    answers = run(worker, "legacy", scenario)
    assert [p.message for p in answers.elicited] == ["Who are you?"]
    assert reported == [(0, 100, "Completed step 0 of 100"), (50, 100, "Completed step 50 of 100"),
                        (100, 100, "Completed step 100 of 100")]
    assert answers.logged == ["Tool execution started", "Tool processing data", "Tool execution completed"]
