"""MCP content blocks and result shapes as msgspec Structs: encoded straight to the wire format."""

from __future__ import annotations

import base64
from typing import Any

import msgspec


class Annotations(msgspec.Struct, omit_defaults=True):
    audience: list[str] | None = None
    priority: float | None = None
    lastModified: str | None = None


class TextContent(msgspec.Struct, tag_field="type", tag="text", omit_defaults=True):
    text: str
    annotations: Annotations | None = None
    meta: dict[str, Any] | None = msgspec.field(default=None, name="_meta")


class ImageContent(msgspec.Struct, tag_field="type", tag="image", omit_defaults=True):
    data: str  # base64
    mimeType: str
    annotations: Annotations | None = None
    meta: dict[str, Any] | None = msgspec.field(default=None, name="_meta")


class AudioContent(msgspec.Struct, tag_field="type", tag="audio", omit_defaults=True):
    data: str  # base64
    mimeType: str
    annotations: Annotations | None = None
    meta: dict[str, Any] | None = msgspec.field(default=None, name="_meta")


class TextResourceContents(msgspec.Struct, omit_defaults=True):
    uri: str
    text: str
    mimeType: str | None = None
    meta: dict[str, Any] | None = msgspec.field(default=None, name="_meta")


class BlobResourceContents(msgspec.Struct, omit_defaults=True):
    uri: str
    blob: str  # base64
    mimeType: str | None = None
    meta: dict[str, Any] | None = msgspec.field(default=None, name="_meta")


ResourceContents = TextResourceContents | BlobResourceContents


class EmbeddedResource(msgspec.Struct, tag_field="type", tag="resource", omit_defaults=True):
    resource: TextResourceContents | BlobResourceContents
    annotations: Annotations | None = None
    meta: dict[str, Any] | None = msgspec.field(default=None, name="_meta")


class ResourceLink(msgspec.Struct, tag_field="type", tag="resource_link", omit_defaults=True):
    uri: str
    name: str
    title: str | None = None
    description: str | None = None
    mimeType: str | None = None
    size: int | None = None
    annotations: Annotations | None = None
    meta: dict[str, Any] | None = msgspec.field(default=None, name="_meta")


Content = TextContent | ImageContent | AudioContent | EmbeddedResource | ResourceLink
CONTENT_TYPES = (TextContent, ImageContent, AudioContent, EmbeddedResource, ResourceLink)


class PromptMessage(msgspec.Struct):
    role: str  # "user" | "assistant"
    content: Content


def image(data: bytes, mime_type: str = "image/png") -> ImageContent:
    return ImageContent(base64.b64encode(data).decode("ascii"), mime_type)


def audio(data: bytes, mime_type: str = "audio/wav") -> AudioContent:
    return AudioContent(base64.b64encode(data).decode("ascii"), mime_type)


def text_resource(uri: str, text: str, mime_type: str | None = None) -> EmbeddedResource:
    return EmbeddedResource(TextResourceContents(uri, text, mime_type))


def blob_resource(uri: str, data: bytes, mime_type: str | None = None) -> EmbeddedResource:
    return EmbeddedResource(BlobResourceContents(uri, base64.b64encode(data).decode("ascii"), mime_type))
