"""Held-out retrieval metrics of the encoder trainers (:mod:`training.dual_encoder`,
:mod:`training.text_embedder`): Recall@K and MRR of ranking documents by a similarity matrix,
with queries de-duplicated by text (products of identical text are all relevant to it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

#: Cut-offs of the held-out recall.
RECALL_KS: tuple[int, ...] = (1, 5, 10)


def group_relevant(query_keys: Sequence[str], doc_keys: Sequence[set[str] | str]) -> tuple[list[str], list[set[int]]]:
    """De-duplicate queries and find their relevant documents.

    Args:
        query_keys: query texts, one per item (duplicates allowed).
        doc_keys: per document, the query text (or set of texts) it answers.

    Returns:
        ``(queries, relevant)``: the distinct query texts in first-seen order and, for each,
        the indices of the documents that answer it.
    """
    by_key: dict[str, set[int]] = defaultdict(set)
    for j, keys in enumerate(doc_keys):
        for key in ([keys] if isinstance(keys, str) else keys):
            by_key[key].add(j)
    queries = list(dict.fromkeys(query_keys))
    return queries, [by_key.get(q, set()) for q in queries]


def retrieval_metrics(sim: np.ndarray, relevant: Sequence[set[int]], ks: Sequence[int] = RECALL_KS) -> dict[str, float | int]:
    """Recall@K and MRR of ranking documents by ``sim``.

    Args:
        sim: float ``(q, d)`` similarities of each query to each document (higher is better).
        relevant: per query, the indices of its relevant documents (a query with several
            products of the identical text has several).
        ks: cut-offs.

    Returns:
        ``{"queries": q, "documents": d, "R@k": ..., "MRR": ...}``. ``R@k`` is the share of
        queries with at least one relevant document among the ``k`` highest (ties broken by
        document index); ``MRR`` the mean of ``1 / rank`` of the first relevant document (0 when
        none). Queries without a relevant document count as misses. All 0.0 for no queries.
    """
    sim = np.asarray(sim, dtype=np.float64)
    q, d = sim.shape if sim.ndim == 2 else (0, 0)
    out: dict[str, float | int] = {"queries": int(q), "documents": int(d)}
    if q == 0:
        out.update({f"R@{k}": 0.0 for k in ks})
        out["MRR"] = 0.0
        return out
    order = np.argsort(-sim, axis=1, kind="stable")
    first = np.full(q, np.inf)
    for i, rel in enumerate(relevant):
        if rel:
            hits = np.flatnonzero(np.isin(order[i], list(rel)))
            first[i] = hits[0] + 1 if len(hits) else np.inf
    for k in ks:
        out[f"R@{k}"] = float(np.mean(first <= k))
    out["MRR"] = float(np.mean(np.where(np.isfinite(first), 1.0 / first, 0.0)))
    return out


__all__ = ["RECALL_KS", "group_relevant", "retrieval_metrics"]
