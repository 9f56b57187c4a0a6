"""The funnel's ranked lists, each a :class:`query.retriever.Retriever`, and their registry.

| name | kind | what it ranks |
|---|---|---|
| ``bm25`` | lexical | the search text against title, type, colour and description (BM25) |
| ``text`` | vector | the search text's vector against the products' text vectors |
| ``aligned`` | vector | the search text through the alignment heads (``mars train align``) against the products' aligned image vectors: text → image |
| ``image`` | vector | the room photo's regions against the products' image vectors, each product by its best region |
| ``prior`` | prior | the products most often staged in the query's room type (``mars train prior``) |

:data:`RETRIEVERS` lists them in the order the funnel runs them (fusion sums in that order);
:func:`build_retrievers` builds them over one :class:`RetrieverContext`. Adding a list is a
class here and a line in :data:`RETRIEVERS` (``docs/architecture.md``, "Adding a retriever").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from catalog.rules import products_within
from indexing.lexical_index import LexicalHit, LexicalIndex
from indexing.staging_prior import StagedHit, room_type_key
from indexing.vector_store import VectorHit, VectorPoint, VectorStore
from indexing.whitening import Whitening
from query.query_vectors import QueryVectors
from query.regions import grid_cell_count
from query.retriever import RetrievalQuery, Retriever
from query.search_cache import SearchCache


@dataclass(frozen=True)
class RetrieverContext:
    """What the retrievers search: the BM25 index, the vector store (a callable: None while
    nothing is indexed), the query encodings, the caches and the catalog."""

    lexical: LexicalIndex
    vectors: Callable[[], VectorStore | None]
    query_vectors: QueryVectors
    cache: SearchCache
    sessions: sessionmaker[Session]


def image_vectors(stored: dict[str, VectorPoint], whitening: Whitening | None) -> dict[str, np.ndarray]:
    """The ``image`` vectors of ``stored`` points (product id -> point), whitened in one batch
    when a ``whitening`` is given: float32 (D,) each, or (whitening dim,); points without an
    image vector are left out."""
    ids = [i for i, p in stored.items() if "image" in p.vectors]
    if not ids:
        return {}
    raw = np.stack([stored[i].vectors["image"] for i in ids])
    return dict(zip(ids, whitening.apply(raw) if whitening is not None else raw))


def max_over_regions(per_region: Sequence[Sequence[VectorHit]], limit: int) -> list[VectorHit]:
    """Combine per-region hit lists: each product keeps its best region's score; best first, ties by id."""
    best: dict[str, float] = {}
    for hits in per_region:
        for h in hits:
            if h.score > best.get(h.id, -np.inf):
                best[h.id] = h.score
    return sorted((VectorHit(i, s) for i, s in best.items()), key=lambda h: (-h.score, h.id))[:limit]


def _has_vector(ctx: RetrieverContext, name: str) -> bool:
    store = ctx.vectors()
    return store is not None and name in store.dims


class BM25Retriever:
    """BM25 over the search text (tantivy or OpenSearch, :mod:`indexing.lexical_index`); hits
    carry BM25 scores."""

    name, label, kind, needs = "bm25", "Keywords", "lexical", "text"

    def __init__(self, ctx: RetrieverContext) -> None:
        self.ctx = ctx

    def applies(self, query: RetrievalQuery) -> bool:
        return query.text is not None

    def cache_key(self, query: RetrievalQuery) -> str:
        return query.text or ""

    def run(self, query: RetrievalQuery, lock: Sequence[str] | None, depth: int) -> list[LexicalHit]:
        return self.ctx.lexical.search(query.text or "", depth, lock)


class TextRetriever:
    """The search text's vector against the products' ``text`` vectors; cosine similarities."""

    name, label, kind, needs = "text", "Text meaning", "vector", "text"

    def __init__(self, ctx: RetrieverContext) -> None:
        self.ctx = ctx

    def applies(self, query: RetrievalQuery) -> bool:
        return query.text is not None and _has_vector(self.ctx, "text")

    def cache_key(self, query: RetrievalQuery) -> str:
        return query.text or ""

    def run(self, query: RetrievalQuery, lock: Sequence[str] | None, depth: int) -> list[VectorHit]:
        store = self.ctx.vectors()
        return store.search_many("text", self.ctx.query_vectors.text_vector(query.text), depth, lock)[0]  # type: ignore[union-attr, arg-type]


class AlignedRetriever:
    """Text → image: the search text's vector through the alignment heads
    (:class:`indexing.aligned.AlignHeads`) against the products' ``aligned`` image vectors."""

    name, label, kind, needs = "aligned", "Text to photo", "vector", "text"

    def __init__(self, ctx: RetrieverContext) -> None:
        self.ctx = ctx

    def applies(self, query: RetrievalQuery) -> bool:
        return query.text is not None and query.trained.aligned is not None and _has_vector(self.ctx, "aligned")

    def cache_key(self, query: RetrievalQuery) -> str:
        return f"{query.text}@{query.trained.aligned.digest}"  # type: ignore[union-attr]

    def run(self, query: RetrievalQuery, lock: Sequence[str] | None, depth: int) -> list[VectorHit]:
        store, heads = self.ctx.vectors(), query.trained.aligned
        return store.search_many("aligned", heads.text(self.ctx.query_vectors.text_vector(query.text)), depth, lock)[0]  # type: ignore[union-attr, arg-type]


class ImageRegionsRetriever:
    """The room photo's regions against the products' ``image`` vectors, each product scored by
    its best region (cosine similarity; of whitened vectors once ``mars train whitening`` ran).

    The grid cells (the first :func:`query.regions.grid_cell_count` rows of the region
    vectors) are searched in the index. When there are more regions (dense windows) or a
    whitening, the candidates' stored image vectors are fetched (cached by
    :meth:`SearchCache.product_vectors`) and re-scored exactly: the max over every region of the
    cosine similarity, of whitened vectors when a whitening is given (:mod:`indexing.whitening`).
    Within a lock of at most ``depth`` products that is the exact max over all regions.
    """

    name, label, kind, needs = "image", "Room photo", "vector", "image"

    def __init__(self, ctx: RetrieverContext) -> None:
        self.ctx = ctx

    def applies(self, query: RetrievalQuery) -> bool:
        return query.image is not None and _has_vector(self.ctx, "image")

    def cache_key(self, query: RetrievalQuery) -> str:
        white = query.trained.whitening
        return f"{query.image_key}" + (f"@{white.digest}" if white is not None else "")

    def product_image_vectors(self, store: VectorStore, ids: Sequence[str], whitening: Whitening | None) -> dict[str, np.ndarray]:
        """Stored image vectors of ``ids`` (float32 (D,) each; whitened, (dim,), with a
        ``whitening``) for the products that have one, through the product-vector cache."""
        tag = f"white:{whitening.digest}" if whitening is not None else "raw"
        return self.ctx.cache.product_vectors(tag, ids, lambda missing: image_vectors(store.fetch(missing), whitening))

    def run(self, query: RetrievalQuery, lock: Sequence[str] | None, depth: int) -> list[VectorHit]:
        store, whitening, qv = self.ctx.vectors(), query.trained.whitening, self.ctx.query_vectors
        regions = qv.region_vectors(query.image)  # type: ignore[arg-type]
        cells = grid_cell_count(qv.grids)
        candidates = max_over_regions(store.search_many("image", regions[:cells], depth, lock), depth)  # type: ignore[union-attr]
        if (len(regions) <= cells and whitening is None) or not candidates:
            return candidates
        vectors = self.product_image_vectors(store, [h.id for h in candidates], whitening)  # type: ignore[arg-type]
        ids = [h.id for h in candidates if h.id in vectors]
        if not ids:
            return candidates
        if whitening is not None:
            regions = qv.whitened_regions(query.image, whitening)  # type: ignore[arg-type]
        best = (regions @ np.stack([vectors[i] for i in ids]).T).max(axis=0)
        return sorted((VectorHit(i, float(s)) for i, s in zip(ids, best)), key=lambda h: (-h.score, h.id))


class StagingPriorRetriever:
    """The products most often staged in the query's room type (:class:`indexing.staging_prior.StagingPrior`),
    kept to those still in the catalog and within the lock."""

    name, label, kind, needs = "prior", "Often in this room", "prior", "room"

    def __init__(self, ctx: RetrieverContext) -> None:
        self.ctx = ctx

    def applies(self, query: RetrievalQuery) -> bool:
        return bool(query.room) and query.trained.prior is not None

    def cache_key(self, query: RetrievalQuery) -> str:
        return f"{room_type_key(query.room or '')}@{query.trained.prior.digest}"  # type: ignore[union-attr]

    def run(self, query: RetrievalQuery, lock: Sequence[str] | None, depth: int) -> list[StagedHit]:
        ranked = query.trained.prior.ranked(query.room or "")  # type: ignore[union-attr]
        with self.ctx.sessions() as session:
            keep = products_within(session, [h.id for h in ranked], lock[0] if lock else None)
        return [h for h in ranked if h.id in keep][:depth]


#: The retrievers by name, in the order the funnel runs and fuses them.
RETRIEVERS: dict[str, type] = {
    "bm25": BM25Retriever,
    "text": TextRetriever,
    "aligned": AlignedRetriever,
    "image": ImageRegionsRetriever,
    "prior": StagingPriorRetriever,
}

#: Their names, in that order (what ``mars tune`` tunes and the ablation reports).
RETRIEVER_NAMES: tuple[str, ...] = tuple(RETRIEVERS)


def build_retrievers(ctx: RetrieverContext, names: Sequence[str] | None = None) -> list[Retriever]:
    """The retrievers ``names`` (every registered one when None), in registry order, over ``ctx``.

    Raises:
        ValueError: a name not in :data:`RETRIEVERS`.
    """
    names = list(RETRIEVERS) if names is None else names
    unknown = [n for n in names if n not in RETRIEVERS]
    if unknown:
        raise ValueError(f"unknown retriever(s) {', '.join(unknown)}; available: {', '.join(RETRIEVERS)}")
    return [cls(ctx) for name, cls in RETRIEVERS.items() if name in names]
