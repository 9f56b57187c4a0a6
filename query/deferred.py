"""Critic re-rankings that land after the answer: ``POST /v1/search`` with ``"critic_wait":
false`` answers at once with the fused order (critic status ``pending``) and runs the full
query (the same retrieval, encodings cached, then the critic) in the background; the client
fetches the re-ranked list from ``result_url`` (``GET /v1/search/results/{id}``).

Results live in this process's memory for ``ttl_s`` seconds (a cachetools ``TTLCache`` of at
most ``max_results``, least recently used dropped first); a server restart forgets them, and the client then gets 404 and can
search again.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from cachetools import TTLCache

from query.schemas import SearchResponse


class DeferredResults:
    """Runs deferred full searches on a small thread pool and keeps their futures by id.

    Args:
        workers: threads running deferred searches (each waits mostly on the critic).
        ttl_s: seconds a result stays fetchable after it was submitted.
        max_results: most results kept; past it the least recently submitted or fetched goes.
    """

    def __init__(self, workers: int = 2, ttl_s: float = 600.0, max_results: int = 1000) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mars-critic")
        self.ttl_s = ttl_s
        self._results: TTLCache[str, Future] = TTLCache(maxsize=max_results, ttl=ttl_s)  # cachetools
        self._lock = threading.Lock()

    def submit(self, search: Callable[[], SearchResponse]) -> str:
        """Start ``search`` in the background; returns the id to fetch its result with."""
        result_id = uuid.uuid4().hex
        future = self._pool.submit(search)
        with self._lock:
            self._results[result_id] = future
        return result_id

    def get(self, result_id: str) -> Future | None:
        """The future of ``result_id``, or None when unknown or expired."""
        with self._lock:
            return self._results.get(result_id)

    def close(self) -> None:
        """Stop taking work; running searches finish, queued ones are cancelled."""
        self._pool.shutdown(wait=True, cancel_futures=True)
