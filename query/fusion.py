"""Weighted Reciprocal Rank Fusion.

score(d) = Σ_i w_i / (k + rank_i(d)), ranks 1-based, summed over the lists that contain d
(Cormack, Clarke & Büttcher, "Reciprocal Rank Fusion outperforms Condorcet and individual
rank learning methods", SIGIR 2009; weights as in Qdrant's and Elasticsearch's weighted RRF).
Ties are broken by id so the order is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field


@dataclass
class Fused:
    """One fused result: RRF score, 1-based fused rank and the 1-based rank in each input list."""

    id: str
    score: float
    rank: int = 0
    ranks: dict[str, int] = field(default_factory=dict)


def weighted_rrf(
    rankings: Mapping[str, Sequence[str]], weights: Mapping[str, float] | None = None, k: float = 60.0
) -> list[Fused]:
    """Fuse ranked id lists (best first) into one list, best first.

    Args:
        rankings: list name -> ids, best first; a repeated id keeps its first (best) rank.
        weights: list name -> weight ≥ 0 (missing names weigh 1.0).
        k: the RRF constant (> 0).

    Raises:
        ValueError: if ``k`` ≤ 0 or a weight is negative or not finite.
    """
    if not k > 0:
        raise ValueError(f"RRF k must be > 0, got {k}")
    weights = dict(weights or {})
    if not all(0 <= w < math.inf for w in weights.values()):
        raise ValueError(f"RRF weights must be finite and ≥ 0, got {weights}")
    fused: dict[str, Fused] = {}
    for name, ids in rankings.items():
        w = float(weights.get(name, 1.0))
        for rank, doc_id in enumerate(ids, start=1):
            item = fused.setdefault(doc_id, Fused(doc_id, 0.0))
            if name in item.ranks:
                continue
            item.ranks[name] = rank
            item.score += w / (k + rank)
    ordered = sorted(fused.values(), key=lambda f: (-f.score, f.id))
    for rank, item in enumerate(ordered, start=1):
        item.rank = rank
    return ordered
