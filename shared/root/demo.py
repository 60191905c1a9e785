"""The built-in demo app: every fixture the official MCP conformance suite calls, plus a few realistic
tools (echo, a CPU-bound one, a slow I/O one, a cacheable one).

Served by `mcpherd serve` when no `--app` is given. The fixture texts are the ones the suite's own
reference server returns, so our tests can assert exact outputs.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import time
from typing import Annotated, Any

import msgspec

from mcpherd import App, Context, ToolError, mcp_header
from mcpherd.worker.cache import cache_key
from mcpherd.worker.content import (
    AudioContent,
    EmbeddedResource,
    ImageContent,
    PromptMessage,
    TextContent,
    TextResourceContents,
    audio,
    image,
    text_resource,
)

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")
WAV = base64.b64decode("UklGRiYAAABXQVZFZm10IBAAAAABAAEAQB8AAAB9AAACABAAZGF0YQIAAAA=")

app = App("mcpherd-demo", version="1.0.0")


# -- conformance fixtures: tools (test_simple_text first: the suite calls tools[0] with no arguments) --
@app.tool()
def test_simple_text() -> str:
    """Returns a simple text response."""
    return "This is a simple text response for testing."


@app.tool()
def test_image_content() -> ImageContent:
    """Returns an image (a 1x1 PNG)."""
    return image(PNG)


@app.tool()
def test_audio_content() -> AudioContent:
    """Returns a short WAV clip."""
    return audio(WAV, "audio/wav")


@app.tool()
def test_embedded_resource() -> EmbeddedResource:
    """Returns an embedded text resource."""
    return text_resource("test://embedded-resource", "This is an embedded resource content.", "text/plain")


@app.tool()
def test_multiple_content_types() -> list[Any]:
    """Returns text, an image and an embedded resource together."""
    return [
        TextContent("Multiple content types test:"),
        image(PNG),
        text_resource("test://mixed-content-resource", '{"test":"data","value":123}', "application/json"),
    ]


@app.tool()
async def test_tool_with_logging(ctx: Context) -> str:
    """Sends three log messages while it runs."""
    ctx.info("Tool execution started")
    await asyncio.sleep(0.05)
    ctx.info("Tool processing data")
    await asyncio.sleep(0.05)
    ctx.info("Tool execution completed")
    return "Tool with logging executed successfully"


@app.tool()
def test_error_handling() -> str:
    """Always fails, as a tool result with isError (not a protocol error)."""
    raise ToolError("This tool intentionally returns an error for testing")


@app.tool()
async def test_tool_with_progress(ctx: Context) -> str:
    """Reports progress 0, 50 and 100 of 100."""
    for step in (0, 50, 100):
        ctx.report_progress(step, 100, f"Completed step {step} of 100")
        if step < 100:
            await asyncio.sleep(0.05)
    return str(ctx.progress_token)


@app.tool()
async def test_sampling(prompt: str, ctx: Context) -> str:
    """Asks the client's LLM to answer the prompt."""
    messages = [{"role": "user", "content": {"type": "text", "text": prompt}}]
    result = await ctx.sample(messages, 100)
    return f"LLM response: {result.get('content', {}).get('text', '')}"


@app.tool()
async def test_elicitation(message: str, ctx: Context) -> str:
    """Asks the user for a username and email address."""
    schema = {"type": "object", "properties": {
        "username": {"type": "string", "description": "User's response"},
        "email": {"type": "string", "description": "User's email address"},
    }, "required": ["username", "email"]}
    answer = await ctx.elicit(message, schema)
    return f"User response: action={answer.get('action')}, content={_json(answer.get('content'))}"


@app.tool()
async def test_elicitation_sep1034_defaults(ctx: Context) -> str:
    """Elicits a form whose fields have default values (SEP-1034)."""
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "description": "User name", "default": "John Doe"},
        "age": {"type": "integer", "description": "User age", "default": 30},
        "score": {"type": "number", "description": "User score", "default": 95.5},
        "status": {"type": "string", "description": "User status", "enum": ["active", "inactive", "pending"],
                   "default": "active"},
        "verified": {"type": "boolean", "description": "Verification status", "default": True},
    }, "required": []}
    answer = await ctx.elicit("Please review and update the form fields with defaults", schema)
    return f"Elicitation completed: action={answer.get('action')}, content={_json(answer.get('content'))}"


@app.tool()
async def test_elicitation_sep1330_enums(ctx: Context) -> str:
    """Elicits every enum form of SEP-1330: untitled, titled, legacy, multi-select."""
    titled = [{"const": f"value{i}", "title": t} for i, t in enumerate(("First Option", "Second Option",
                                                                          "Third Option"), 1)]
    choices = [{"const": f"value{i}", "title": t} for i, t in enumerate(("First Choice", "Second Choice",
                                                                           "Third Choice"), 1)]
    options = ["option1", "option2", "option3"]
    schema = {"type": "object", "properties": {
        "untitledSingle": {"type": "string", "description": "Select one option", "enum": options},
        "titledSingle": {"type": "string", "description": "Select one option with titles", "oneOf": titled},
        "legacyEnum": {"type": "string", "description": "Select one option (legacy)", "enum": ["opt1", "opt2", "opt3"],
                       "enumNames": ["Option One", "Option Two", "Option Three"]},
        "untitledMulti": {"type": "array", "description": "Select multiple options", "minItems": 1, "maxItems": 3,
                          "items": {"type": "string", "enum": options}},
        "titledMulti": {"type": "array", "description": "Select multiple options with titles", "minItems": 1,
                        "maxItems": 3, "items": {"anyOf": choices}},
    }, "required": []}
    answer = await ctx.elicit("Please select options from the enum fields", schema)
    return f"Elicitation completed: action={answer.get('action')}, content={_json(answer.get('content'))}"


@app.tool()
async def test_reconnection(ctx: Context) -> str:
    """Closes its SSE stream mid-call; the client resumes it with Last-Event-ID (SEP-1699)."""
    ctx.close_stream()
    await asyncio.sleep(0.1)
    return ("Reconnection test completed successfully. If you received this, the client properly "
            "reconnected after stream closure.")


JSON_SCHEMA_2020_12 = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "$defs": {"address": {"$anchor": "addressDef", "type": "object",
                          "properties": {"street": {"type": "string"}, "city": {"type": "string"}}}},
    "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"},
                   "contactMethod": {"type": "string", "enum": ["phone", "email"]},
                   "phone": {"type": "string"}, "email": {"type": "string"}},
    "allOf": [{"anyOf": [{"required": ["phone"]}, {"required": ["email"]}]}],
    "if": {"properties": {"contactMethod": {"const": "phone"}}, "required": ["contactMethod"]},
    "then": {"required": ["phone"]},
    "else": {"required": ["email"]},
    "additionalProperties": False,
}


@app.tool(input_schema=JSON_SCHEMA_2020_12)
def json_schema_2020_12_tool(**arguments: Any) -> str:
    """Tool with JSON Schema 2020-12 features"""
    return f"JSON Schema 2020-12 tool called with: {_json(arguments)}"


# -- 2026-07-28 fixtures ----------------------------------------------------------------------------
@app.tool()
async def test_missing_capability(ctx: Context) -> str:
    """Needs the client's sampling capability; refused with -32021 without it."""
    result = await ctx.sample([{"role": "user", "content": {"type": "text", "text": "Say hello"}}], 20)
    return str(result.get("content", {}).get("text", ""))


@app.tool()
async def test_streaming_elicitation(ctx: Context) -> str:
    """Asks a question the stateless way (an InputRequiredResult), never as a request on the stream."""
    schema = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    answer = await ctx.elicit("What is your name?", schema, key="user_name")
    return f"Hello, {answer.get('content', {}).get('name', '')}!"


@app.tool()
async def test_logging_tool(ctx: Context) -> str:
    """Logs one message; only sent when the request asked for a log level."""
    ctx.info("test_logging_tool ran")
    return "logged"


@app.tool()
async def test_trigger_tool_change() -> str:
    """Announces a change of the tool list to every listener."""
    await app.notify_list_changed("tools")
    return "tools/list_changed sent"


@app.tool()
async def test_trigger_prompt_change() -> str:
    """Announces a change of the prompt list to every listener."""
    await app.notify_list_changed("prompts")
    return "prompts/list_changed sent"


@app.tool()
async def test_trigger_resource_update(uri: str = "test://watched-resource") -> str:
    """Announces that a resource changed to every subscriber."""
    await app.notify_resource_updated(uri)
    return f"notifications/resources/updated sent for {uri}"


NAME_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


@app.tool()
async def test_input_required_result_elicitation(ctx: Context) -> str:
    """Asks for the user's name, then greets them."""
    answer = await ctx.elicit("What is your name?", NAME_SCHEMA, key="user_name")
    return f"Hello, {answer.get('content', {}).get('name', '')}!"


@app.tool()
async def test_input_required_result_sampling(ctx: Context) -> str:
    """Asks the client's LLM a question."""
    question = [{"role": "user", "content": {"type": "text", "text": "What is the capital of France?"}}]
    answer = await ctx.sample(question, 100, key="capital_question")
    return f"The model said: {answer.get('content', {}).get('text', '')}"


@app.tool()
async def test_input_required_result_list_roots(ctx: Context) -> str:
    """Asks the client for its roots."""
    answer = await ctx.list_roots(key="client_roots")
    return "Roots: " + ", ".join(str(r.get("uri")) for r in answer.get("roots", []))


@app.tool()
async def test_input_required_result_request_state(ctx: Context) -> str:
    """Asks for a confirmation; the answer travels back with signed request state."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    answer = await ctx.elicit("Please confirm", schema, key="confirm")
    return f"state-ok: confirmed={answer.get('content', {}).get('ok')}"


@app.tool()
async def test_input_required_result_multiple_inputs(ctx: Context) -> str:
    """Asks three questions at once: an elicitation, a sampling and the roots."""
    answers = await ctx.request_inputs({
        "user_name": {"method": "elicitation/create", "params": {"message": "What is your name?",
                                                                 "requestedSchema": NAME_SCHEMA}},
        "greeting": {"method": "sampling/createMessage", "params": {
            "messages": [{"role": "user", "content": {"type": "text", "text": "Generate a greeting"}}],
            "maxTokens": 50}},
        "client_roots": {"method": "roots/list", "params": {}},
    })
    return f"Got {len(answers)} answers: {', '.join(sorted(answers))}"


@app.tool()
async def test_input_required_result_multi_round(ctx: Context) -> str:
    """Asks two questions, one round each."""
    name = await ctx.elicit("Step 1: What is your name?", NAME_SCHEMA, key="step1")
    color_schema = {"type": "object", "properties": {"color": {"type": "string"}}, "required": ["color"]}
    color = await ctx.elicit("Step 2: What is your favorite color?", color_schema, key="step2")
    return f"{name.get('content', {}).get('name')} likes {color.get('content', {}).get('color')}"


@app.tool()
async def test_input_required_result_tampered_state(ctx: Context) -> str:
    """Asks a question; a tampered requestState on the retry is refused."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    await ctx.elicit("Please confirm", schema, key="confirm")
    return "confirmed"


@app.tool()
async def test_input_required_result_capabilities(ctx: Context) -> str:
    """Asks only what the client declared it can answer."""
    requests: dict[str, dict[str, Any]] = {}
    if ctx.supports("sampling"):
        requests["summary"] = {"method": "sampling/createMessage", "params": {
            "messages": [{"role": "user", "content": {"type": "text", "text": "Summarize"}}], "maxTokens": 50}}
    if ctx.supports("elicitation"):
        requests["user_name"] = {"method": "elicitation/create", "params": {"message": "What is your name?",
                                                                            "requestedSchema": NAME_SCHEMA}}
    if ctx.supports("roots"):
        requests["client_roots"] = {"method": "roots/list", "params": {}}
    if not requests:
        return "The client declared no capability to ask with."
    answers = await ctx.request_inputs(requests)
    return f"Answered: {', '.join(sorted(answers))}"


@app.tool()
def test_x_mcp_header(region: Annotated[str, mcp_header("Region")]) -> str:
    """Echoes its region argument, which clients mirror into the Mcp-Param-Region header."""
    return f"region={region}"


# -- realistic tools ----------------------------------------------------------------------------------
@app.tool()
async def echo(text: str) -> str:
    """Returns the text unchanged."""
    return text


@app.tool()
def hash_work(data: str, rounds: int = 1000) -> str:
    """CPU-bound: iterated SHA-256 of the data (runs in the worker's thread pool)."""
    digest = data.encode()
    for _ in range(max(0, min(rounds, 10_000_000))):
        digest = hashlib.sha256(digest).digest()
    return digest.hex()


@app.tool()
async def slow_io(seconds: float = 0.5) -> str:
    """Slow I/O: waits without holding the event loop (like a remote API call)."""
    await asyncio.sleep(max(0.0, min(seconds, 60.0)))
    return f"waited {seconds:g}s"


class Forecast(msgspec.Struct):
    city: str
    temperature_c: float
    computed_at: float


@app.tool(cache_ttl=30, cache_tags=["weather"])
def weather(city: str) -> Forecast:
    """Cacheable: a (fake) forecast, cached for 30 s and invalidated by tag "weather"."""
    seed = int(hashlib.sha256(city.lower().encode()).hexdigest()[:6], 16)
    return Forecast(city, round((seed % 400) / 10 - 5, 1), time.time())


@app.tool()
async def refresh_weather(city: str = "") -> str:
    """Drops cached forecasts on every worker (one city, or all of them); returns once all applied it."""
    if city:
        acknowledged = await app.invalidate(key=cache_key("weather", _json({"city": city}).encode()))
    else:
        acknowledged = await app.invalidate(tag="weather")
    if not acknowledged:
        raise ToolError("the invalidation was not acknowledged by every worker in time")
    return f"forecasts invalidated: {city or 'all'}"


# -- resources --------------------------------------------------------------------------------------
@app.resource("test://static-text", name="static-text", title="Static Text Resource",
              description="A static text resource for testing", mime_type="text/plain")
def static_text() -> str:
    return "This is the content of the static text resource."


@app.resource("test://static-binary", name="static-binary", title="Static Binary Resource",
              description="A static binary resource (image) for testing", mime_type="image/png")
def static_binary() -> bytes:
    return PNG


@app.resource("test://watched-resource", name="watched-resource", title="Watched Resource",
              description="A resource clients can subscribe to", mime_type="text/plain")
def watched_resource() -> str:
    return "Watched resource content"


@app.resource("test://template/{id}/data", name="template", title="Resource Template",
              description="A resource template with parameter substitution", mime_type="application/json")
def template_data(id: str) -> str:
    return _json({"id": id, "templateTest": True, "data": f"Data for ID: {id}"})


# -- prompts ----------------------------------------------------------------------------------------
@app.prompt(title="Simple Test Prompt")
def test_simple_prompt() -> str:
    """A simple prompt without arguments"""
    return "This is a simple prompt for testing."


@app.prompt(title="Prompt With Arguments")
def test_prompt_with_arguments(arg1: Annotated[str, msgspec.Meta(description="First test argument")],
                               arg2: Annotated[str, msgspec.Meta(description="Second test argument")]) -> str:
    """A prompt with required arguments"""
    return f"Prompt with arguments: arg1='{arg1}', arg2='{arg2}'"


@app.prompt(title="Prompt With Embedded Resource")
def test_prompt_with_embedded_resource(
        resourceUri: Annotated[str, msgspec.Meta(description="URI of the resource to embed")]) -> list[PromptMessage]:
    """A prompt that includes an embedded resource"""
    resource = EmbeddedResource(TextResourceContents(resourceUri, "Embedded resource content for testing.",
                                                     "text/plain"))
    return [PromptMessage("user", resource), PromptMessage("user", TextContent("Please process the embedded resource above."))]


@app.prompt(title="Prompt With Image")
def test_prompt_with_image() -> list[PromptMessage]:
    """A prompt that includes image content"""
    return [PromptMessage("user", image(PNG)), PromptMessage("user", TextContent("Please analyze the image above."))]


@app.prompt()
async def test_input_required_result_prompt(ctx: Context) -> str:
    """A prompt that first asks the user which context to use"""
    schema = {"type": "object", "properties": {"context": {"type": "string"}}, "required": ["context"]}
    answer = await ctx.elicit("What context should the prompt use?", schema, key="user_context")
    return f"Use this context: {answer.get('content', {}).get('context', '')}"


@app.completion(prompt="test_prompt_with_arguments", argument="arg1")
def complete_arg1(argument: str, value: str, context: dict[str, str]) -> list[str]:
    return [v for v in ("test", "testing", "tested", "other") if v.startswith(value)]


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


# -- cluster introspection (last, so the conformance fixtures keep their order) -------------------------
@app.tool()
async def whoami() -> int:
    """Returns the process id of the worker that served this call (tests use it to tell workers apart)."""
    return os.getpid()
