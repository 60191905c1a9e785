"""What `App` derives from a function's signature: the schemas, the listings, template matching."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import pytest

from mcpherd import App, Context, mcp_header
from mcpherd.worker.app import template_pattern
from mcpherd.worker.invoke import convert_arguments, decode_arguments
from mcpherd.worker.jsonrpc import RpcError


class Point(msgspec.Struct):
    x: int
    y: int = 0


class Total(msgspec.Struct):
    total: float


def test_input_schema_from_type_hints_without_the_context() -> None:
    app = App("t")

    @app.tool(title="Measure")
    def measure(a: int, where: Point, ctx: Context, b: str = "x", tags: list[str] | None = None) -> Total:
        """Measures things."""
        return Total(1.0)

    assert app.tools["measure"].listing == {
        "name": "measure", "title": "Measure", "description": "Measures things.",
        "inputSchema": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "where": {"$ref": "#/$defs/Point"},
                           "b": {"type": "string", "default": "x"},
                           "tags": {"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}],
                                    "default": None}},
            "required": ["a", "where"],
            "$defs": {"Point": {"title": "Point", "type": "object", "required": ["x"],
                                "properties": {"x": {"type": "integer"}, "y": {"type": "integer", "default": 0}}}}},
        "outputSchema": {"type": "object", "properties": {"total": {"type": "number"}}, "required": ["total"]},
    }
    assert app.tools["measure"].signature.context_param == "ctx"


def test_output_schema_wraps_non_objects_and_skips_text_and_content() -> None:
    app = App("t")

    @app.tool()
    def count(n: Annotated[int, msgspec.Meta(ge=0, description="how many")]) -> int:
        return n

    @app.tool()
    def table() -> dict[str, int]:
        return {}

    @app.tool()
    def say() -> str:
        return ""

    @app.tool(structured=False)
    def raw() -> Total:
        return Total(0)

    tools = app.tools
    assert tools["count"].listing["inputSchema"] == {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "description": "how many"}},
        "required": ["n"]}
    assert tools["count"].listing["outputSchema"] == {
        "type": "object", "properties": {"result": {"type": "integer"}}, "required": ["result"]}
    assert tools["count"].wrap_output and not tools["table"].wrap_output
    assert tools["table"].listing["outputSchema"] == {"type": "object", "additionalProperties": {"type": "integer"}}
    assert "outputSchema" not in tools["say"].listing and "outputSchema" not in tools["raw"].listing
    assert tools["say"].listing["inputSchema"] == {"type": "object", "properties": {}, "required": []}


def test_declared_input_schema_and_header_params() -> None:
    app = App("t")
    schema = {"type": "object", "properties": {"q": {"type": "string"}}}

    @app.tool(input_schema=schema)
    def search(**arguments: Any) -> str:
        return ""

    @app.tool()
    def routed(region: Annotated[str, mcp_header("Region")], flag: Annotated[bool, mcp_header("Flag")] = False,
               size: Annotated[float, mcp_header("Size")] = 1.0) -> str:
        return region

    assert app.tools["search"].listing["inputSchema"] is schema and app.tools["search"].signature.passes_mapping
    assert app.tools["routed"].listing["inputSchema"]["properties"]["region"] == {"type": "string",
                                                                                  "x-mcp-header": "Region"}
    # Only string, integer and boolean arguments can travel in a header.
    assert app.tools["routed"].header_params == (("region", "mcp-param-region", "string"),
                                                 ("flag", "mcp-param-flag", "boolean"))
    with pytest.raises(TypeError, match="type object"):
        app.tool(input_schema={"type": "array"})(lambda: None)
    with pytest.raises(TypeError, match=r"\*args/\*\*kwargs"):
        app.tool()(lambda *values: None)


def test_arguments_decode_with_errors_naming_the_field() -> None:
    app = App("t")

    @app.tool()
    def place(where: Point, label: str = "") -> str:
        return label

    signature = app.tools["place"].signature
    decoded = decode_arguments(signature, msgspec.Raw(b'{"where":{"x":1}}'), "tool", "place")
    assert (decoded.where, decoded.label) == (Point(1, 0), "")
    assert decode_arguments(signature, msgspec.Raw(b'{"where":{"x":2},"extra":1}'), "tool", "t").where == Point(2, 0)
    for raw, message in ((b'{"where":{"x":"1"}}', "Expected `int`, got `str` - at `where.x`"),
                         (b"{}", "Object missing required field `where`"),
                         (b"[1]", "Expected `object`, got `array`"),
                         (b"null", "Object missing required field `where`")):
        with pytest.raises(RpcError) as error:
            decode_arguments(signature, msgspec.Raw(raw), "tool", "place")
        assert (error.value.code, error.value.message) == (-32602, f"Invalid arguments for tool 'place': {message}")


def test_templates_match_level_one_variables() -> None:
    pattern = template_pattern("test://template/{id}/data")
    assert pattern is not None and template_pattern("test://static") is None
    match = pattern.match("test://template/42/data")
    assert match is not None and match.groupdict() == {"id": "42"}
    for uri in ("test://template//data", "test://template/a/b/data", "test://template/42/data/x",
                "test://templateX42/data", "xtest://template/42/data"):
        assert pattern.match(uri) is None, uri
    dotted = template_pattern("file:///{name}.txt")
    assert dotted is not None and dotted.match("file:///notes.txt") and not dotted.match("file:///notesXtxt")


def test_template_registration_listing_and_typed_variables() -> None:
    app = App("t")

    @app.resource("test://items/{kind}/{id}", title="Item", mime_type="application/json")
    def item(kind: str, id: int) -> str:
        """One item."""
        return ""

    @app.resource("test://fixed", name="fixed")
    def fixed() -> str:
        return ""

    assert list(app.templates) == ["test://items/{kind}/{id}"] and list(app.resources) == ["test://fixed"]
    assert app.templates["test://items/{kind}/{id}"].listing == {
        "uriTemplate": "test://items/{kind}/{id}", "name": "item", "title": "Item", "description": "One item.",
        "mimeType": "application/json"}
    assert app.resources["test://fixed"].listing == {"uri": "test://fixed", "name": "fixed"}
    # URI variables are always text; a typed parameter receives its value converted.
    args = convert_arguments(app.templates["test://items/{kind}/{id}"].signature, {"kind": "a", "id": "42"}, "r")
    assert (args.kind, args.id) == ("a", 42)
    with pytest.raises(RpcError) as error:
        convert_arguments(app.templates["test://items/{kind}/{id}"].signature, {"kind": "a", "id": "x"}, "r")
    assert error.value.code == -32602 and "`id`" in error.value.message


def test_prompt_arguments_listing() -> None:
    app = App("t")

    @app.prompt(title="Review")
    def review(code: Annotated[str, msgspec.Meta(description="the code")], ctx: Context, tone: str = "kind") -> str:
        """Reviews code."""
        return ""

    @app.prompt()
    def bare() -> str:
        return ""

    assert app.prompts["review"].listing == {
        "name": "review", "title": "Review", "description": "Reviews code.",
        "arguments": [{"name": "code", "required": True, "description": "the code"},
                      {"name": "tone", "required": False}]}
    assert app.prompts["bare"].listing == {"name": "bare", "arguments": []}
