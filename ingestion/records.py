"""The validated product record and its content hash."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: Record fields MARS knows; anything else a reader finds goes into ``attributes``.
CORE_FIELDS = ("id", "title", "text", "type", "colour", "size", "image")


class ProductRecord(BaseModel):
    """One product after validation (pydantic, strict types: a number where text belongs is an error).

    ``image`` is an absolute local path, an http(s) URL, or None for a product without a photo.
    """

    model_config = ConfigDict(strict=True, extra="forbid", str_strip_whitespace=True)

    id: str = Field(min_length=1, max_length=128)
    title: str = Field("", max_length=512)
    text: str = ""
    type: str = Field("", max_length=256)
    colour: str = Field("", max_length=256)
    size: str = Field("", max_length=128)
    image: str | None = Field(None, max_length=2048)
    attributes: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id")
    @classmethod
    def _id_has_no_control_chars(cls, value: str) -> str:
        if any(ch in value for ch in "\r\n\t/\\"):
            raise ValueError("id must not contain tabs, newlines or slashes")
        return value

    @field_validator("title", "text", "type", "colour", "size", "image")
    @classmethod
    def _no_nul(cls, value: str | None) -> str | None:
        if value is not None and "\x00" in value:
            raise ValueError("text must not contain NUL characters")
        return value

    def embedding_text(self) -> str:
        """The text the text encoder embeds (:func:`embedding_text` of the record's fields)."""
        return embedding_text(self.type, self.colour, self.title, self.text)


def embedding_text(type_: str, colour: str, title: str, text: str) -> str:
    """The text the text encoder embeds for a product: ``"<type>, <colour>. <title>.
    <description>"`` with empty parts dropped."""
    head = ", ".join(part for part in (type_, colour) if part)
    return ". ".join(part for part in (head, title, text) if part)


def content_hash(record: ProductRecord, image_bytes: bytes | None) -> str:
    """sha256 hex of the record's fields (canonical JSON) and of its image file's bytes.

    An unchanged hash means nothing needs re-embedding (idempotent upserts).
    """
    h = hashlib.sha256()
    h.update(json.dumps(record.model_dump(), sort_keys=True, ensure_ascii=True).encode())
    h.update(b"\0")
    if image_bytes is not None:
        h.update(hashlib.sha256(image_bytes).digest())
    return h.hexdigest()
