"""The record as read, shared by every reader: :class:`RawRecord` and JSON-lines decoding.

Both the generic readers (:mod:`ingestion.readers`) and the ABO reader (:mod:`ingestion.abo`)
build on this module; it imports neither of them, so the reader dispatch
(:func:`ingestion.readers.open_source`) can import both without a cycle.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class RawRecord:
    """A record as read, before validation.

    Attributes:
        source: where it came from (a file path, or a name such as ``"api:item"``).
        position: 1-based line (JSON lines) or row (CSV, header excluded) number in ``source``.
        data: the record with MARS field names (:data:`ingestion.records.CORE_FIELDS`, the rest
            under ``attributes``), or None when the line could not be parsed.
        raw: the input as read (the decoded object, the CSV row, or up to 2,000 characters of an
            unparsable line), stored with a rejection.
        error: why the line could not be parsed (bad UTF-8, bad JSON, not an object, wrong
            shape); None for a parsed record. The pipeline rejects a record with ``error`` set.
    """

    source: str
    position: int
    data: dict[str, Any] | None
    raw: Any = None
    error: str | None = None


def raw_to_json(raw: RawRecord) -> dict[str, Any]:
    """``raw`` as a JSON-able dict (its fields by name), e.g. for a Celery task's arguments;
    ``RawRecord(**d)`` reads it back."""
    return {"source": raw.source, "position": raw.position, "data": raw.data, "raw": raw.raw, "error": raw.error}


def json_objects(path: Path, lines: Iterable[bytes]) -> Iterator[tuple[int, dict[str, Any]] | RawRecord]:
    """Decode JSON-lines ``lines`` (raw bytes, as read from ``path``).

    Yields:
        ``(line number, object)`` for each JSON object (line numbers 1-based), or a
        :class:`RawRecord` with ``error`` set (and ``data`` None) for a line that is not UTF-8,
        not JSON or not an object, so the pipeline rejects it and reading goes on. Blank lines
        are skipped (their numbers still count). Nothing is raised for a bad line.
    """
    for number, raw_line in enumerate(lines, start=1):
        if not raw_line.strip():
            continue
        try:
            line = raw_line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as exc:
            yield RawRecord(str(path), number, None, raw=raw_line[:2000].decode("utf-8", "replace"), error=f"invalid UTF-8: {exc.reason}")
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            yield RawRecord(str(path), number, None, raw=line[:2000], error=f"invalid JSON: {exc.msg}")
            continue
        if not isinstance(row, dict):
            yield RawRecord(str(path), number, None, raw=row, error="a record must be a JSON object")
            continue
        yield number, row
