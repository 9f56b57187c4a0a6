"""Readers for BEIR-style multimodal benchmark files (queries.jsonl, qrels TSV)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BenchmarkQuery:
    """One query: id, task, text (or None) and an absolute image path (or None)."""

    id: str
    task: str
    text: str | None
    image: Path | None


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
                )
            )
    return out


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
