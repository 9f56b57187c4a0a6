"""Readers for BEIR-style multimodal benchmark files (queries.jsonl, qrels TSV)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ingestion.images import decode_image, read_image_bytes


@dataclass(frozen=True)
class BenchmarkQuery:
    """One query: id, task, text (or None), an absolute image path (or None) and, for room
    tasks, the room's id and category (e.g. "Bedroom")."""

    id: str
    task: str
    text: str | None
    image: Path | None
    room_id: str | None = None
    room_category: str | None = None


def load_queries(path: Path) -> list[BenchmarkQuery]:
    """Read queries.jsonl (``_id``, ``task``, ``text``, ``image`` relative to the file's folder).

    Raises:
        FileNotFoundError: missing file. ValueError: a line that is not a query object.
    """
    out = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row, dict) or "_id" not in row:
                raise ValueError(f"{path}:{number}: not a query object with an _id")
            image = row.get("image")
            out.append(
                BenchmarkQuery(
                    id=str(row["_id"]),
                    task=str(row.get("task") or "default"),
                    text=row.get("text") or None,
                    image=(path.parent / image).resolve() if image else None,
                    room_id=row.get("room_id") or None,
                    room_category=row.get("room_category") or None,
                )
            )
    return out


class QueryImages:
    """Decodes query photos once each (with the ingest byte and pixel limits) and caches them.

    Raises (from ``__call__``): FileNotFoundError for a missing file, InvalidImage for one
    that is not an image or is over a limit.
    """

    def __init__(self, max_bytes: int, max_pixels: int) -> None:
        self.max_bytes, self.max_pixels = max_bytes, max_pixels
        self._cache: dict[Path, Image.Image] = {}

    def __call__(self, query: BenchmarkQuery) -> Image.Image | None:
        """The query's photo as a PIL image, or None for a text-only query."""
        if query.image is None:
            return None
        if query.image not in self._cache:
            data = read_image_bytes(query.image, max_bytes=self.max_bytes)
            self._cache[query.image] = decode_image(data, max_pixels=self.max_pixels, what=str(query.image))
        return self._cache[query.image]


def load_qrels(path: Path) -> dict[str, set[str]]:
    """Read a qrels TSV (header ``query-id corpus-id score``); keeps pairs with score > 0."""
    qrels: dict[str, set[str]] = {}
    with path.open(encoding="utf-8", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t")
        for row in reader:
            if not row or row[0] == "query-id":
                continue
            if len(row) < 3:
                raise ValueError(f"{path}: qrels rows need query-id, corpus-id, score; got {row}")
            if float(row[2]) > 0:
                qrels.setdefault(row[0], set()).add(row[1])
    return qrels
