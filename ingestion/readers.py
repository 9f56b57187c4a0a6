"""Readers: the BEIR-style multimodal corpus layout and generic JSONL/CSV with a field mapping,
and :func:`open_source`, which picks the reader for a path (these, or ABO listings via
:mod:`ingestion.abo`).

Each reader yields :class:`~ingestion.raw_records.RawRecord` objects (defined in
:mod:`ingestion.raw_records`, which the ABO reader shares; importable from here too) — the
record as read plus where it came from — and never validates: validation happens in the
pipeline so a bad line is reported with its position instead of stopping the run.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ingestion.abo import is_abo_source, read_abo
from ingestion.raw_records import RawRecord, json_objects
from ingestion.records import CORE_FIELDS
from ingestion.remote import is_remote

__all__ = [
    "BEIR_MAPPING",
    "RawRecord",
    "apply_mapping",
    "open_source",
    "parse_mapping",
    "read_csv",
    "read_jsonl",
    "read_jsonl_lines",
]

#: Field mapping of the BEIR-style corpus in ``../shared/data/ikea`` (MARS field -> source field).
BEIR_MAPPING: dict[str, str] = {"id": "_id", "colour": "color"}


def parse_mapping(pairs: list[str]) -> dict[str, str]:
    """Parse ``["id=_id", "colour=color"]`` into ``{"id": "_id", "colour": "color"}``.

    Raises:
        ValueError: if a pair has no ``=`` or names an unknown MARS field.
    """
    mapping: dict[str, str] = {}
    for pair in pairs:
        target, sep, source = pair.partition("=")
        if not sep or not target.strip() or not source.strip():
            raise ValueError(f"field mapping {pair!r} must look like MARS_FIELD=SOURCE_FIELD")
        if target.strip() not in CORE_FIELDS:
            raise ValueError(f"unknown MARS field {target.strip()!r}; known: {', '.join(CORE_FIELDS)}")
        mapping[target.strip()] = source.strip()
    return mapping


def apply_mapping(row: Mapping[str, Any], mapping: Mapping[str, str], base_dir: Path) -> dict[str, Any]:
    """Rename source fields to MARS fields, move unknown fields to ``attributes`` and make a
    relative image path absolute against ``base_dir`` (URLs are kept as they are)."""
    renamed = {source: target for target, source in mapping.items()}
    out: dict[str, Any] = {}
    attributes: dict[str, Any] = {}
    for key, value in row.items():
        target = renamed.get(key, key)
        if target in CORE_FIELDS:
            out[target] = value
        elif target == "attributes" and isinstance(value, dict):
            attributes.update(value)
        else:
            attributes[key] = value
    if attributes:
        out["attributes"] = attributes
    image = out.get("image")
    if isinstance(image, str) and image and not is_remote(image):
        out["image"] = str((base_dir / image).resolve())
    elif image == "":
        out["image"] = None
    return out


def read_jsonl(path: Path, mapping: Mapping[str, str] | None = None) -> Iterator[RawRecord]:
    """Records of a JSON-lines file (a lazy iterator); image paths are relative to the file's
    folder. A line that is not UTF-8 JSON or not an object becomes a record with ``error`` set.

    Raises:
        FileNotFoundError: if ``path`` does not exist (when iteration starts).
    """
    with path.open("rb") as fh:
        yield from read_jsonl_lines(str(path), fh, mapping, path.parent)


def read_jsonl_lines(
    source: str, lines: Iterable[bytes], mapping: Mapping[str, str] | None, base_dir: Path
) -> Iterator[RawRecord]:
    """Records of JSON-lines ``lines`` (raw bytes, e.g. an API request body split into lines)
    named ``source`` in reports; relative image paths resolve against ``base_dir``."""
    for item in json_objects(Path(source), lines):
        if isinstance(item, RawRecord):
            yield item
            continue
        number, row = item
        yield RawRecord(source, number, apply_mapping(row, mapping or {}, base_dir), raw=row)


def read_csv(path: Path, mapping: Mapping[str, str] | None = None) -> Iterator[RawRecord]:
    """Records of a UTF-8 CSV file with a header row (a lazy iterator); empty cells count as
    missing, ``position`` is the row number after the header.

    Raises:
        FileNotFoundError: if ``path`` does not exist (when iteration starts).
        UnicodeDecodeError: if the file is not UTF-8 (while iterating).
    """
    mapping = mapping or {}
    with path.open(encoding="utf-8", newline="") as fh:
        for number, row in enumerate(csv.DictReader(fh), start=1):
            cleaned = {k: v for k, v in row.items() if k is not None and v not in (None, "")}
            yield RawRecord(str(path), number, apply_mapping(cleaned, mapping, path.parent), raw=row)


def open_source(path: Path, mapping: Mapping[str, str] | None = None) -> Iterator[RawRecord]:
    """Pick the reader for ``path``: ABO listings (:func:`ingestion.abo.is_abo_source`), a folder
    with ``corpus.jsonl`` (BEIR layout), ``*.jsonl``/``*.ndjson`` or ``*.csv``.

    Args:
        path: the catalog file or folder.
        mapping: MARS field -> source field (:func:`parse_mapping`, the CLI's ``--map``); for a
            BEIR corpus it overrides :data:`BEIR_MAPPING` field by field. An empty or None
            mapping means none. ABO listings take none (their fields are read by name).

    Returns:
        An iterator of :class:`RawRecord`, read lazily (ABO's ``images.csv`` is read now).

    Raises:
        FileNotFoundError: if ``path`` does not exist or a folder has no ``corpus.jsonl``
            (nor ABO listings).
        ValueError: if a non-empty ``mapping`` is given for ABO listings, or the file type is
            not supported.
    """
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if is_abo_source(path):
        if mapping:
            raise ValueError(
                f"--map does not apply to ABO listings: their fields are read by name; "
                f"drop the field mapping for {path} (got {', '.join(f'{k}={v}' for k, v in mapping.items())})"
            )
        return read_abo(path)
    if path.is_dir():
        corpus = path / "corpus.jsonl"
        if not corpus.exists():
            raise FileNotFoundError(f"{path} is a folder without corpus.jsonl (BEIR-style layout expected)")
        return read_jsonl(corpus, {**BEIR_MAPPING, **(mapping or {})})
    if path.name == "corpus.jsonl":
        return read_jsonl(path, {**BEIR_MAPPING, **(mapping or {})})
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return read_jsonl(path, mapping)
    if suffix == ".csv":
        return read_csv(path, mapping)
    raise ValueError(f"unsupported catalog file {path.name!r}: use a BEIR folder, .jsonl or .csv")
