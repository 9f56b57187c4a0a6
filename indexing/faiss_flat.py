"""The exact reference: FAISS ``IndexFlatIP`` per named vector, in memory.

On the same L2-normalised vectors as the stores, inner product is cosine similarity, so its
results are the exact nearest neighbours the approximate stores are measured against
(``MARS_VECTOR_BACKEND=faiss`` serves queries from it, :mod:`mars.registry`). The lock becomes
an ``IDSelectorBatch`` over the allowed ids (FAISS wiki, "Setting search parameters for one query").
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import faiss
import numpy as np

from indexing.vector_store import VectorHit, VectorPoint, VectorStore, batches, check_queries, sorted_hits


class FaissFlatStore:
    """Exact inner-product search (FAISS ``IndexFlatIP`` in an ``IndexIDMap2``), in memory.

    Args:
        dims: vector name -> dimension.
    """

    def __init__(self, dims: dict[str, int]) -> None:
        self.dims = dict(dims)
        self._indexes = {name: faiss.IndexIDMap2(faiss.IndexFlatIP(dim)) for name, dim in dims.items()}
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._points: dict[str, VectorPoint] = {}
        self._by_category: dict[str, set[int]] = {}

    @classmethod
    def from_store(cls, store: VectorStore) -> "FaissFlatStore":
        """Build the exact reference from every point of another store."""
        ref = cls(store.dims)
        for batch in batches(store.scan(), 1024):
            ref.upsert(batch)
        return ref

    def _internal(self, product_id: str) -> int:
        if product_id not in self._ids:
            n = len(self._ids) + 1
            while n in self._names:
                n += 1
            self._ids[product_id] = n
            self._names[n] = product_id
        return self._ids[product_id]

    def upsert(self, points: Sequence[VectorPoint]) -> None:
        """Insert or replace points."""
        if not points:
            return
        self.delete([p.product_id for p in points if p.product_id in self._points])
        for name, index in self._indexes.items():
            rows = [(self._internal(p.product_id), p.vectors[name]) for p in points if name in p.vectors]
            if rows:
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                index.add_with_ids(np.stack([np.asarray(r[1], np.float32) for r in rows]), ids)
        for p in points:
            internal = self._internal(p.product_id)
            self._points[p.product_id] = p
            for cat in p.category_ids:
                self._by_category.setdefault(cat, set()).add(internal)

    def delete(self, product_ids: Sequence[str]) -> None:
        """Delete points by product id."""
        gone = [pid for pid in product_ids if pid in self._points]
        if not gone:
            return
        ids = np.array([self._ids[pid] for pid in gone], dtype=np.int64)
        for index in self._indexes.values():
            index.remove_ids(faiss.IDSelectorBatch(ids))
        for pid in gone:
            internal = self._ids[pid]
            for cat in self._points.pop(pid).category_ids:
                self._by_category.get(cat, set()).discard(internal)

    def search_many(
        self, name: str, queries: np.ndarray, limit: int, category_ids: Sequence[str] | None = None
    ) -> list[list[VectorHit]]:
        """Exact search; the lock becomes an ``IDSelectorBatch`` over the allowed ids."""
        q = check_queries(self.dims, name, queries)
        index = self._indexes[name]
        if len(q) == 0 or limit <= 0 or index.ntotal == 0:
            return [[] for _ in range(len(q))]
        params = None
        if category_ids:
            allowed = set().union(*(self._by_category.get(c, set()) for c in category_ids))
            if not allowed:
                return [[] for _ in range(len(q))]
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.array(sorted(allowed), dtype=np.int64)))
        scores, ids = index.search(q, min(limit, index.ntotal), params=params)
        return [
            sorted_hits([VectorHit(self._names[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0])
            for srow, irow in zip(scores, ids)
        ]

    def reindex(self, points: Iterable[VectorPoint], *, dims: dict[str, int] | None = None) -> None:
        """Replace every point by ``points`` (read in full first, so a generator over :meth:`scan`
        is fine), with vectors ``dims`` (default the current ones). If reading ``points`` raises,
        the store is unchanged."""
        new_points = list(points)
        fresh = FaissFlatStore(dims or self.dims)
        fresh.upsert(new_points)
        self.__dict__.update(fresh.__dict__)

    def present(self, product_ids: Sequence[str]) -> set[str]:
        """Product ids among ``product_ids`` that have a point."""
        return {pid for pid in product_ids if pid in self._points}

    def fetch(self, product_ids: Sequence[str]) -> dict[str, VectorPoint]:
        """Stored points of ``product_ids``."""
        return {pid: self._points[pid] for pid in product_ids if pid in self._points}

    def count(self) -> int:
        """Number of points."""
        return len(self._points)

    def scan(self) -> Iterator[VectorPoint]:
        """Every stored point."""
        yield from list(self._points.values())

    def close(self) -> None:
        """Nothing to release (in memory)."""
