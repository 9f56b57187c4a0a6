"""The lexical (BM25) seam: :class:`LexicalIndex`, its :class:`LexicalDoc` and :class:`LexicalHit`.

Standard library only. Implementations, chosen by name in :mod:`mars.registry`:
:class:`indexing.tantivy_index.TantivyIndex` (embedded default) and
:class:`indexing.opensearch.OpenSearchIndex` (server mode). Both score with Okapi BM25
(Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond", 2009)
summed over :data:`TEXT_FIELDS`, each field's score multiplied by its boost. The contract every
backend passes is ``tests/contract_stores.py: LexicalIndexContract``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

#: The text fields every backend indexes and searches, each with its own BM25 boost.
TEXT_FIELDS = ("title", "type", "colour", "text")


@dataclass
class LexicalDoc:
    """A product as the BM25 index stores it; ``category_ids`` are category keys (class and type)."""

    id: str
    title: str = ""
    type: str = ""
    colour: str = ""
    text: str = ""
    category_ids: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LexicalHit:
    """One BM25 result: product id and its BM25 score (higher is better)."""

    id: str
    score: float


@runtime_checkable
class LexicalIndex(Protocol):
    """What the funnel needs from a BM25 backend (tantivy here; OpenSearch in server mode)."""

    def upsert(self, docs: Sequence[LexicalDoc]) -> None:
        """Insert or replace documents by id; visible to search when this returns."""

    def delete(self, ids: Sequence[str]) -> None:
        """Remove documents by id (unknown ids are ignored)."""

    def search(self, text: str, limit: int, category_ids: Sequence[str] | None = None) -> list[LexicalHit]:
        """Top ``limit`` documents for ``text``, restricted to documents carrying any of
        ``category_ids`` when given; ties broken by id."""

    def count(self) -> int:
        """Number of documents."""

    def close(self) -> None:
        """Release the writer and its lock."""
