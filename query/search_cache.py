"""The funnel's result caches: per-retriever lists, catalog rows and product image vectors.

Like Solr's queryResultCache and documentCache: least-recently-used (cachetools), bounded,
and only safe where this process sees every write to the catalog and the indexes (embedded
stores), because :meth:`SearchCache.invalidate` must run after each one. A value computed
while an invalidation happened is returned but not kept (a generation counter), so nothing
cached can predate a write. Sizes of 0 turn a cache off.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from cachetools import LRUCache


class SearchCache:
    """The three caches and their invalidation.

    Args:
        result_hits: hits the per-retriever list cache may hold in all (a list counts its
            hits + 1; about 200 bytes a hit); 0 = off.
        rows: catalog rows kept for responses (a few KB each); 0 = off.
        product_vectors: product image vectors kept for the image list's re-scoring (2-5 KB
            each); 0 = off.
    """

    def __init__(self, result_hits: int = 0, rows: int = 0, product_vectors: int = 0) -> None:
        self.result_hits, self.rows_enabled, self.vectors_enabled = result_hits, rows > 0, product_vectors > 0
        # cachetools wants maxsize >= 1 even for a cache that is off
        self._results: LRUCache[tuple, tuple] = LRUCache(max(result_hits, 1), getsizeof=lambda hits: len(hits) + 1)
        self._rows: LRUCache[tuple[str, str], Any] = LRUCache(max(rows, 1))
        self._vectors: LRUCache[tuple[str, str], Any] = LRUCache(max(product_vectors, 1))
        self._lock = threading.Lock()
        self._generation = 0

    def hits(self, name: str, key: str, lock: Sequence[str] | None, depth: int, compute: Callable[[], list]) -> list:
        """One retriever's list for the query input ``key`` within ``lock`` at ``depth``: cached,
        else ``compute()`` (kept when under the budget and no invalidation ran meanwhile). Each
        call returns a fresh list of the (immutable) hits."""
        if self.result_hits <= 0:
            return compute()
        cache_key = (name, key, tuple(lock) if lock else None, depth)
        with self._lock:
            hits = self._results.get(cache_key)
            if hits is not None:
                return list(hits)
            generation = self._generation
        hits = compute()
        with self._lock:
            if generation == self._generation and len(hits) < self.result_hits:
                self._results[cache_key] = tuple(hits)
        return hits

    def _by_id(self, cache: LRUCache, enabled: bool, tag: str, ids: Sequence[str],
               fetch: Callable[[list[str]], dict[str, Any]]) -> dict[str, Any]:
        found: dict[str, Any] = {}
        with self._lock:
            for i in ids if enabled else ():
                value = cache.get((tag, i))
                if value is not None:
                    found[i] = value
            generation = self._generation
        missing = [i for i in ids if i not in found]
        if missing:
            fetched = fetch(missing)
            found.update(fetched)
            if enabled:
                with self._lock:
                    if generation == self._generation:
                        cache.update(((tag, i), v) for i, v in fetched.items())
        return found

    def rows(self, ids: Sequence[str], fetch: Callable[[list[str]], dict[str, Any]]) -> dict[str, Any]:
        """Catalog rows of ``ids`` by id: cached ones, the misses from ``fetch(missing)`` in one
        call (ids it does not return stay absent)."""
        return self._by_id(self._rows, self.rows_enabled, "row", ids, fetch)

    def product_vectors(self, tag: str, ids: Sequence[str], fetch: Callable[[list[str]], dict[str, Any]]) -> dict[str, Any]:
        """Product image vectors of ``ids`` in the space ``tag`` names (raw, or a whitening's
        digest): cached ones, the misses from ``fetch(missing)`` in one call."""
        return self._by_id(self._vectors, self.vectors_enabled, tag, ids, fetch)

    def invalidate(self) -> None:
        """Drop every cached list, row and vector (call after each write to the catalog or the indexes)."""
        with self._lock:
            self._results.clear()
            self._rows.clear()
            self._vectors.clear()
            self._generation += 1

    def sizes(self) -> dict[str, int]:
        """How much each cache holds: ``results`` (hits + 1 per list), ``rows``, ``vectors``."""
        with self._lock:
            return {"results": int(self._results.currsize), "rows": len(self._rows), "vectors": len(self._vectors)}
