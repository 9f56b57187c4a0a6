"""Critic re-rankings that land after the answer: ``POST /v1/search`` with ``"critic_wait":
false`` answers at once with the fused order (critic status ``pending``) and runs the full
query (the same retrieval, encodings cached, then the critic) in the background; the client
fetches the re-ranked list from ``result_url`` (``GET /v1/search/results/{id}``).

Results live in this process's memory for ``ttl_s`` seconds (at most ``max_results``,
oldest dropped first); a server restart forgets them, and the client then gets 404 and can
search again.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from query.schemas import SearchResponse


class DeferredResults:
    """Runs deferred full searches on a small thread pool and keeps their futures by id.

    Args:
        workers: threads running deferred searches (each waits mostly on the critic).
        ttl_s: seconds a result stays fetchable after it was submitted.
        max_results: most results kept; the oldest are dropped first.
    """

    def __init__(self, workers: int = 2, ttl_s: float = 600.0, max_results: int = 1000) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mars-critic")
        self._results: OrderedDict[str, tuple[float, Future]] = OrderedDict()
        self._lock = threading.Lock()
        self.ttl_s, self.max_results = ttl_s, max_results

    def submit(self, search: Callable[[], SearchResponse]) -> str:
        """Start ``search`` in the background; returns the id to fetch its result with."""
        result_id = uuid.uuid4().hex
        future = self._pool.submit(search)
        with self._lock:
            self._evict(time.monotonic())
            self._results[result_id] = (time.monotonic(), future)
        return result_id

    def get(self, result_id: str) -> Future | None:
        """The future of ``result_id``, or None when unknown or expired."""
        with self._lock:
            self._evict(time.monotonic())
            entry = self._results.get(result_id)
        return entry[1] if entry else None

    def _evict(self, now: float) -> None:
        while self._results:
            created, _ = next(iter(self._results.values()))
            if now - created <= self.ttl_s and len(self._results) < self.max_results:
                return
            self._results.popitem(last=False)

    def close(self) -> None:
        """Stop taking work; running searches finish, queued ones are cancelled."""
        self._pool.shutdown(wait=True, cancel_futures=True)
