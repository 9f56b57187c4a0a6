"""The vector-store seam: :class:`VectorStore`, its :class:`VectorPoint` and :class:`VectorHit`.

Light on purpose (standard library and numpy only): the funnel, ingestion and training import
it without loading any engine. Implementations, each in its own module and chosen by name in
:mod:`mars.registry`:

* :class:`indexing.qdrant_edge.QdrantEdgeStore` — the embedded default (Qdrant Edge in-process);
* :class:`indexing.faiss_flat.FaissFlatStore` — the exact FAISS ``IndexFlatIP`` reference;
* :class:`indexing.qdrant_server.QdrantServerStore` — a Qdrant server or cluster (qdrant-client).

Vectors are float32 and L2-normalised by the encoders; scores are cosine similarities. The
contract every backend passes is ``tests/contract_stores.py: VectorStoreContract``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np


@dataclass
class VectorPoint:
    """A product's vectors by name (each float32 (dim,), unit norm) and its payload.

    A product without a photo simply has no ``image`` entry.
    """

    product_id: str
    vectors: dict[str, np.ndarray]
    category_ids: list[str] = field(default_factory=list)
    type: str = ""
    colour: str = ""


class VectorHit(NamedTuple):
    """One nearest neighbour: product id and cosine similarity (a named tuple: immutable and
    several times cheaper to create than a frozen dataclass, and a search makes thousands)."""

    id: str
    score: float


@runtime_checkable
class VectorStore(Protocol):
    """What the funnel and ingestion need from a vector backend.

    ``dims`` maps each named vector to its dimension, e.g. ``{"image": 1280, "text": 384}``.
    """

    dims: dict[str, int]

    def upsert(self, points: Sequence[VectorPoint]) -> None:
        """Insert or replace points by product id.

        Raises:
            KeyError: a vector name not in ``dims``. ValueError: a vector of the wrong size.
        """

    def delete(self, product_ids: Sequence[str]) -> None:
        """Remove points by product id (unknown ids are ignored)."""

    def search_many(
        self, name: str, queries: np.ndarray, limit: int, category_ids: Sequence[str] | None = None
    ) -> list[list[VectorHit]]:
        """For each row of ``queries`` (float32 (m, dims[name])), the ``limit`` nearest points
        on vector ``name`` carrying any of ``category_ids`` (all points when None), best first,
        ties by product id.

        Raises:
            KeyError: unknown vector name. ValueError: wrong query dimension.
        """

    def present(self, product_ids: Sequence[str]) -> set[str]:
        """The subset of ``product_ids`` that has a point."""

    def fetch(self, product_ids: Sequence[str]) -> dict[str, VectorPoint]:
        """The stored points of ``product_ids`` by product id (ids without a point are absent)."""

    def count(self) -> int:
        """Number of points."""

    def scan(self) -> Iterator[VectorPoint]:
        """Every point with its vectors and payload (used to build the exact reference)."""

    def reindex(self, points: Iterable[VectorPoint], *, dims: dict[str, int] | None = None) -> None:
        """Replace every point by ``points`` (vectors ``dims``, default the current ones): build
        the new index beside the live one and swap it in, so a failed build changes nothing
        (used to add or replace a named vector, e.g. ``aligned``). ``points`` may be a
        generator over this store's own :meth:`scan`.

        Raises:
            Whatever reading ``points`` or the engine raised; the live index is then unchanged.
        """

    def close(self) -> None:
        """Flush and release the store."""


def check_queries(dims: dict[str, int], name: str, queries: np.ndarray) -> np.ndarray:
    """``queries`` as float32 (m, dims[name]) for a search on vector ``name``.

    Raises:
        KeyError: ``name`` is not in ``dims``. ValueError: the rows have another dimension.
    """
    if name not in dims:
        raise KeyError(f"unknown vector {name!r}; this store has {sorted(dims)}")
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dims[name]:
        raise ValueError(f"queries for {name!r} must have shape (m, {dims[name]}), got {q.shape}")
    return q


def check_point(point: VectorPoint, dims: dict[str, int]) -> dict[str, list[float]]:
    """The named vectors of ``point`` as float lists (what Qdrant's APIs take), checked against
    ``dims``.

    Raises:
        KeyError: a vector name not in ``dims``. ValueError: a vector of another size.
    """
    vectors = {}
    for name, v in point.vectors.items():
        if name not in dims:
            raise KeyError(f"product {point.product_id!r}: unknown vector {name!r}; this store has {sorted(dims)}")
        arr = np.asarray(v, dtype=np.float32)
        if arr.shape != (dims[name],):
            raise ValueError(f"product {point.product_id!r}: vector {name!r} must have shape ({dims[name]},), got {arr.shape}")
        vectors[name] = arr.tolist()
    return vectors


def sorted_hits(hits: list[VectorHit]) -> list[VectorHit]:
    """``hits`` best first, ties by product id (every backend orders the same way)."""
    return sorted(hits, key=lambda h: (-h.score, h.id))


def batches(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of at most ``size`` (the last one shorter), read lazily."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
