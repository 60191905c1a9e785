"""The application API: `App` with `@app.tool()`, `@app.resource()`, `@app.prompt()`.

Definitions are plain data built once at import time. Everything a request needs (the argument
Struct that msgspec decodes into, the JSON Schemas, the encoded list entries) is derived here so the
request path does no reflection.
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, get_type_hints

import msgspec

from mcpherd.worker.context import Context
from mcpherd.worker.content import CONTENT_TYPES

Lifespan = Callable[["App"], contextlib.AbstractAsyncContextManager[Any]]


class ToolAnnotations(msgspec.Struct, omit_defaults=True):
    title: str | None = None
    readOnlyHint: bool | None = None
    destructiveHint: bool | None = None
    idempotentHint: bool | None = None
    openWorldHint: bool | None = None


@dataclass(slots=True)
class Signature:
    """How to call a user function: its arguments as a msgspec Struct, plus where the Context goes."""

    args_type: Any  # a Struct type, or dict[str, Any] for a tool that declares its own input schema
    names: tuple[str, ...]
    context_param: str | None
    is_async: bool
    schema: dict[str, Any]
    passes_mapping: bool = False  # True: the arguments arrive as **kwargs, validated by the schema only


@dataclass(slots=True)
class ToolDef:
    name: str
    fn: Callable[..., Any]
    signature: Signature
    description: str | None
    title: str | None
    annotations: ToolAnnotations | None
    output_type: Any  # None when results are unstructured content
    output_schema: dict[str, Any] | None
    wrap_output: bool  # a non-object return is wrapped as {"result": value}
    cache_ttl: float | None
    cache_tags: tuple[str, ...]
    meta: dict[str, Any] | None
    listing: dict[str, Any] = field(default_factory=dict)
    header_params: tuple[tuple[str, str, str], ...] = ()  # (argument, Mcp-Param-<token>, JSON type)


@dataclass(slots=True)
class ResourceDef:
    uri: str
    name: str
    fn: Callable[..., Any]
    signature: Signature
    description: str | None
    mime_type: str | None
    title: str | None
    pattern: re.Pattern[str] | None  # set for templates
    listing: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PromptDef:
    name: str
    fn: Callable[..., Any]
    signature: Signature
    description: str | None
    title: str | None
    listing: dict[str, Any] = field(default_factory=dict)


Completer = Callable[[str, str, dict[str, str]], Any]


class App:
    """An MCP application: tools, resources and prompts served by every mcpherd worker."""

    def __init__(self, name: str, version: str = "0.0.0", *, instructions: str | None = None) -> None:
        self.name = name
        self.version = version
        self.instructions = instructions
        self.tools: dict[str, ToolDef] = {}
        self.resources: dict[str, ResourceDef] = {}
        self.templates: dict[str, ResourceDef] = {}
        self.prompts: dict[str, PromptDef] = {}
        self.completers: dict[tuple[str, str], Completer] = {}
        self.lifespans: list[Lifespan] = []
        self.runtime: Any = None  # set by the worker: subscriptions, invalidation, notifications

    # -- decorators ----------------------------------------------------------------------------
    def tool(
        self,
        name: str | None = None,
        *,
        title: str | None = None,
        description: str | None = None,
        annotations: ToolAnnotations | None = None,
        cache_ttl: float | None = None,
        cache_tags: list[str] | tuple[str, ...] = (),
        structured: bool | None = None,
        meta: dict[str, Any] | None = None,
        input_schema: dict[str, Any] | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a tool. `input_schema` replaces the schema derived from the type hints; the
        function then receives the arguments as keyword arguments without conversion."""

        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            tool_name = name or fn.__name__
            if input_schema is not None:
                signature = mapping_signature(fn, input_schema)
            else:
                signature = derive_signature(fn, f"{tool_name}_arguments")
            output_type, output_schema, wrap = derive_output(fn, structured)
            tool = ToolDef(tool_name, fn, signature, description or _doc(fn), title, annotations,
                           output_type, output_schema, wrap, cache_ttl, tuple(cache_tags), meta)
            tool.listing = _tool_listing(tool)
            tool.header_params = header_params(signature.schema)
            self.tools[tool_name] = tool
            return fn

        return register

    def resource(
        self,
        uri: str,
        *,
        name: str | None = None,
        title: str | None = None,
        description: str | None = None,
        mime_type: str | None = None,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            signature = derive_signature(fn, f"{fn.__name__}_resource_arguments")
            pattern = template_pattern(uri)
            resource = ResourceDef(uri, name or fn.__name__, fn, signature, description or _doc(fn),
                                   mime_type, title, pattern)
            resource.listing = _resource_listing(resource)
            (self.templates if pattern else self.resources)[uri] = resource
            return fn

        return register

    def prompt(
        self, name: str | None = None, *, title: str | None = None, description: str | None = None
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def register(fn: Callable[..., Any]) -> Callable[..., Any]:
            prompt_name = name or fn.__name__
            signature = derive_signature(fn, f"{prompt_name}_prompt_arguments")
            prompt = PromptDef(prompt_name, fn, signature, description or _doc(fn), title)
            prompt.listing = _prompt_listing(prompt)
            self.prompts[prompt_name] = prompt
            return fn

        return register

    def completion(self, *, prompt: str | None = None, resource_template: str | None = None,
                   argument: str) -> Callable[[Completer], Completer]:
        """Register `fn(argument_name, partial_value, context_arguments) -> list[str]`."""
        ref = f"ref/prompt:{prompt}" if prompt else f"ref/resource:{resource_template}"

        def register(fn: Completer) -> Completer:
            self.completers[(ref, argument)] = fn
            return fn

        return register

    def lifespan(self, fn: Lifespan) -> Lifespan:
        """An async context manager entered in every worker after it starts, exited when it stops."""
        self.lifespans.append(fn)
        return fn

    # -- runtime calls from tools --------------------------------------------------------------
    def invalidate(self, *, key: str | None = None, tag: str | None = None, prefix: str | None = None,
                   all: bool = False) -> Any:
        """Drop cached tool results on every worker of the cluster.

        In an async tool, `await app.invalidate(tag="weather")`: it resolves (True) once every worker
        has applied it, so nothing stale is served after it returns. In a sync tool (a pool thread)
        the call itself blocks until then. Keys are `<tool>:<canonical JSON arguments>`
        (see `cache_key`); `prefix="weather:"` drops every cached call of the weather tool.
        """
        if not (key or tag or prefix or all):
            raise ValueError("invalidate needs key=, tag=, prefix= or all=True")
        if self.runtime is None:
            raise RuntimeError("invalidate() works inside a running worker")
        return self.runtime.invalidate(key, tag, prefix, all)

    async def notify_resource_updated(self, uri: str) -> None:
        if self.runtime is not None:
            await self.runtime.resource_updated(uri)

    async def notify_list_changed(self, kind: str) -> None:
        """kind: "tools", "resources" or "prompts"."""
        if self.runtime is not None:
            await self.runtime.list_changed(kind)

    @contextlib.asynccontextmanager
    async def run_lifespans(self) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            for lifespan in self.lifespans:
                await stack.enter_async_context(lifespan(self))
            yield


# -- derivation ------------------------------------------------------------------------------------
def derive_signature(fn: Callable[..., Any], struct_name: str) -> Signature:
    hints = get_type_hints(fn, include_extras=True)
    fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
    context_param = None
    for param in inspect.signature(fn).parameters.values():
        annotation = hints.get(param.name, Any)
        if annotation is Context or param.name in ("ctx", "context") and annotation is Any:
            context_param = param.name
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"{fn.__qualname__}: *args/**kwargs cannot be described as a schema")
        if param.default is inspect.Parameter.empty:
            fields.append((param.name, annotation))
        else:
            fields.append((param.name, annotation, param.default))
    args_type = msgspec.defstruct(struct_name, fields, kw_only=True)
    return Signature(args_type, tuple(f[0] for f in fields), context_param,
                     inspect.iscoroutinefunction(fn), object_schema(args_type))


def mapping_signature(fn: Callable[..., Any], schema: dict[str, Any]) -> Signature:
    if schema.get("type") != "object":
        raise TypeError(f"{fn.__qualname__}: an input schema must have type object")
    context_param = next((p.name for p in inspect.signature(fn).parameters.values()
                          if get_type_hints(fn).get(p.name) is Context), None)
    return Signature(dict[str, Any], (), context_param, inspect.iscoroutinefunction(fn), schema, True)


def mcp_header(token: str) -> msgspec.Meta:
    """Mirror an argument into an `Mcp-Param-<token>` header (2026-07-28), for gateways that route on it.

    Use as `region: Annotated[str, mcp_header("Region")]`.
    """
    return msgspec.Meta(extra_json_schema={"x-mcp-header": token})


def header_params(schema: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """Top-level arguments annotated with `x-mcp-header`, for the request validation ladder."""
    found = []
    for name, prop in schema.get("properties", {}).items():
        token = prop.get("x-mcp-header") if isinstance(prop, dict) else None
        if isinstance(token, str) and prop.get("type") in ("string", "integer", "boolean"):
            found.append((name, f"mcp-param-{token.lower()}", prop["type"]))
    return tuple(found)


def object_schema(struct_type: Any) -> dict[str, Any]:
    """A self-contained JSON Schema (2020-12) for a Struct: its own object schema, helpers in $defs."""
    (top,), components = msgspec.json.schema_components([struct_type], ref_template="#/$defs/{name}")
    name = top["$ref"].rsplit("/", 1)[1]
    schema = dict(components.pop(name))
    schema.pop("title", None)
    if components:
        schema["$defs"] = components
    schema.setdefault("properties", {})
    return schema


def derive_output(fn: Callable[..., Any], structured: bool | None) -> tuple[Any, dict[str, Any] | None, bool]:
    """Typed returns get an outputSchema; text, content blocks and untyped returns do not.

    MCP requires an output schema of type object, so any other type is wrapped as {"result": value}.
    """
    returns = get_type_hints(fn, include_extras=True).get("return", Any)
    if structured is False or returns in (Any, str, None, type(None), list) or _is_content(returns) \
            or getattr(returns, "__args__", None) == (Any,):
        return None, None, False
    if _is_object_like(returns):
        return returns, _plain_schema(returns), False
    wrapper = msgspec.defstruct(f"{fn.__name__}_output", [("result", returns)])
    return returns, object_schema(wrapper), True


def _plain_schema(tp: Any) -> dict[str, Any]:
    (top,), components = msgspec.json.schema_components([tp], ref_template="#/$defs/{name}")
    if "$ref" in top:
        name = top["$ref"].rsplit("/", 1)[1]
        top = dict(components.pop(name))
        top.pop("title", None)
    if components:
        top["$defs"] = components
    return top


def _is_object_like(tp: Any) -> bool:
    if tp is dict or getattr(tp, "__origin__", None) is dict:
        return True
    if not inspect.isclass(tp):
        return False
    is_typed_dict = hasattr(tp, "__total__") and hasattr(tp, "__annotations__")
    return issubclass(tp, msgspec.Struct) or hasattr(tp, "__dataclass_fields__") or is_typed_dict


def _is_content(tp: Any) -> bool:
    if tp in CONTENT_TYPES:
        return True
    args = getattr(tp, "__args__", ())
    return bool(args) and all(_is_content(a) for a in args)


_TEMPLATE_VAR = re.compile(r"\{(\w+)\}")


def template_pattern(uri: str) -> re.Pattern[str] | None:
    """RFC 6570 level-1 templates (`{name}`) as a regex; None for a fixed URI."""
    if "{" not in uri:
        return None
    parts = _TEMPLATE_VAR.split(uri)
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[^/]+)" for i, p in enumerate(parts))
    return re.compile(f"^{regex}$")


def _doc(fn: Callable[..., Any]) -> str | None:
    doc = inspect.getdoc(fn)
    return doc.strip() if doc else None


def _tool_listing(tool: ToolDef) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": tool.name}
    if tool.title:
        entry["title"] = tool.title
    if tool.description:
        entry["description"] = tool.description
    entry["inputSchema"] = tool.signature.schema
    if tool.output_schema is not None:
        entry["outputSchema"] = tool.output_schema
    if tool.annotations is not None:
        entry["annotations"] = msgspec.to_builtins(tool.annotations)
    if tool.meta:
        entry["_meta"] = tool.meta
    return entry


def _resource_listing(resource: ResourceDef) -> dict[str, Any]:
    entry: dict[str, Any] = {"uriTemplate" if resource.pattern else "uri": resource.uri, "name": resource.name}
    for key, value in (("title", resource.title), ("description", resource.description),
                       ("mimeType", resource.mime_type)):
        if value:
            entry[key] = value
    return entry


def _prompt_listing(prompt: PromptDef) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": prompt.name}
    if prompt.title:
        entry["title"] = prompt.title
    if prompt.description:
        entry["description"] = prompt.description
    required = set(prompt.signature.schema.get("required", ()))
    entry["arguments"] = [
        {"name": arg, "required": arg in required} | _arg_description(prompt.signature.schema, arg)
        for arg in prompt.signature.names
    ]
    return entry


def _arg_description(schema: dict[str, Any], arg: str) -> dict[str, str]:
    description = schema["properties"].get(arg, {}).get("description")
    return {"description": description} if description else {}
