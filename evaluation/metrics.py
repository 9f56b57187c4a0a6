"""Ranking metrics as pure functions over a ranked id list and a set of relevant ids.

Binary relevance (the IKEA qrels are binary). Definitions follow BEIR / pytrec_eval
(Thakur et al., NeurIPS 2021 Datasets track; Järvelin & Kekäläinen 2002 for nDCG):

* nDCG@k = DCG@k / IDCG@k with DCG@k = Σ_{i≤k} rel_i / log2(i + 1);
* Recall@k = |relevant ∩ top k| / |relevant|;
* MRR@k = 1 / rank of the first relevant item within the top k, else 0;
* Success@k = 1 if any relevant item is in the top k, else 0.

A query with no relevant items scores 0 on every metric (callers skip such queries).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence


def ndcg_at_k(ranked: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """nDCG@k for binary relevance; 0.0 when ``relevant`` is empty."""
    if not relevant:
        return 0.0
    dcg = sum(1.0 / math.log2(i + 2) for i, doc in enumerate(ranked[:k]) if doc in relevant)
    idcg = sum(1.0 / math.log2(i + 2) for i in range(min(len(relevant), k)))
    return dcg / idcg


def recall_at_k(ranked: Sequence[str], relevant: Collection[str], k: int) -> float:
    """Share of the relevant items found in the top ``k``; 0.0 when ``relevant`` is empty."""
    if not relevant:
        return 0.0
    return len(set(ranked[:k]) & set(relevant)) / len(relevant)


def mrr_at_k(ranked: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """Reciprocal rank of the first relevant item within the top ``k``, else 0.0."""
    for i, doc in enumerate(ranked[:k]):
        if doc in relevant:
            return 1.0 / (i + 1)
    return 0.0


def success_at_k(ranked: Sequence[str], relevant: Collection[str], k: int = 10) -> float:
    """1.0 if any relevant item is in the top ``k``, else 0.0."""
    return 1.0 if any(doc in relevant for doc in ranked[:k]) else 0.0


#: The metrics ``mars eval`` reports, by name.
METRICS = {
    "nDCG@10": lambda r, rel: ndcg_at_k(r, rel, 10),
    "Recall@10": lambda r, rel: recall_at_k(r, rel, 10),
    "Recall@50": lambda r, rel: recall_at_k(r, rel, 50),
    "MRR@10": lambda r, rel: mrr_at_k(r, rel, 10),
    "Success@10": lambda r, rel: success_at_k(r, rel, 10),
}


def score_queries(
    runs: Mapping[str, Sequence[str]], qrels: Mapping[str, Collection[str]]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Every metric for every query in ``runs`` that has judgments.

    Returns:
        (mean per metric, per-query metric values). Queries without relevant items are skipped.
    """
    per_query = {
        qid: {name: fn(ranked, qrels[qid]) for name, fn in METRICS.items()}
        for qid, ranked in runs.items()
        if qrels.get(qid)
    }
    n = len(per_query)
    means = {name: (sum(q[name] for q in per_query.values()) / n if n else 0.0) for name in METRICS}
    return means, per_query
