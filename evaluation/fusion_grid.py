"""Offline scoring of weighted RRF settings for ``mars tune`` (:mod:`evaluation.tune`).

A query's ranked lists (:class:`~evaluation.query_lists.QueryLists`) become a rank matrix
(:class:`PreparedQuery`); :func:`score_query` fuses it for many weight vectors at once,
``score(d) = Σ_i w_i / (k + rank_i(d))`` (Cormack, Clarke & Büttcher, SIGIR 2009), in numpy with
the same float operations and the same tie order (by id) as :func:`query.fusion.weighted_rrf`,
so a grid point scores exactly what ``mars eval`` reports with that setting, and computes the
metrics of :mod:`evaluation.metrics` (:data:`METRIC_NAMES`) on the fused order cut at 50.
:class:`ShapeGrid` holds one query shape's grid results; :func:`choose` picks k and the weights
per shape that maximise the macro mean nDCG@10 over the tasks fusion can change.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from evaluation.metrics import METRICS
from evaluation.query_lists import QueryLists

#: The metrics scored, in the column order of every metrics array (:data:`evaluation.metrics.METRICS`).
METRIC_NAMES: tuple[str, ...] = tuple(METRICS)  # nDCG@10, Recall@10, Recall@50, MRR@10, Success@10
#: The nDCG@10 column of the metrics arrays.
NDCG_COLUMN = METRIC_NAMES.index("nDCG@10")
_DISCOUNT = 1.0 / np.log2(np.arange(2, 12))  # ranks 1..10


class PreparedQuery:
    """One query's lists as a rank matrix: candidates sorted by id (so a stable sort breaks
    score ties by id, as :func:`query.fusion.weighted_rrf` does), one column per list in the
    query's own list order (so scores are summed in the same order), ``inf`` where absent.

    Args:
        run: the query's lists and judgments.
        names: every list name of the grid; ``cols`` maps the query's lists to their index
            in it (the column of a weight matrix).
    """

    __slots__ = ("cols", "ranks", "rel", "n_rel", "fusable")

    def __init__(self, run: QueryLists, names: Sequence[str]) -> None:
        index = {n: i for i, n in enumerate(names)}
        firsts: list[dict[str, int]] = []
        for ids in run.lists.values():
            first: dict[str, int] = {}
            for rank, doc in enumerate(ids, start=1):
                first.setdefault(doc, rank)
            firsts.append(first)
        candidates = sorted(set().union(*firsts)) if firsts else []
        self.cols = np.asarray([index[n] for n in run.lists], dtype=np.int64)
        self.ranks = np.full((len(candidates), len(firsts)), np.inf)
        for j, first in enumerate(firsts):
            for i, doc in enumerate(candidates):
                if doc in first:
                    self.ranks[i, j] = first[doc]
        relevant = set(run.relevant)
        self.rel = np.asarray([doc in relevant for doc in candidates], dtype=bool)
        self.n_rel = len(relevant)
        self.fusable = sum(1 for ids in run.lists.values() if ids) >= 2


def score_query(p: PreparedQuery, weights: np.ndarray, k: float) -> np.ndarray:
    """Metrics float64 (configurations, len(METRIC_NAMES)) of one query for each row of
    ``weights`` (float (configurations, len(names))) at constant ``k``: nDCG@10, Recall@10,
    Recall@50, MRR@10 and Success@10 of the fused order (as :mod:`evaluation.metrics` defines
    them); all 0 for a query without relevant products or candidates."""
    n_cfg = weights.shape[0]
    out = np.zeros((n_cfg, len(METRIC_NAMES)))
    if p.n_rel == 0 or p.ranks.shape[0] == 0:
        return out
    scores = np.zeros((n_cfg, p.ranks.shape[0]))
    for j, col in enumerate(p.cols):  # score += w / (k + rank), list by list, as weighted_rrf adds
        scores += weights[:, col, None] / (k + p.ranks[None, :, j])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :50]
    hits = p.rel[order]  # (configurations, ≤ 50)
    top10 = hits[:, :10]
    dcg = top10 @ _DISCOUNT[: top10.shape[1]]
    idcg = _DISCOUNT[: min(p.n_rel, 10)].sum()
    found = top10.any(axis=1)
    first = np.argmax(top10, axis=1)
    out[:, 0] = dcg / idcg
    out[:, 1] = top10.sum(axis=1) / p.n_rel
    out[:, 2] = hits.sum(axis=1) / p.n_rel
    out[:, 3] = np.where(found, 1.0 / (first + 1), 0.0)
    out[:, 4] = found
    return out


@dataclass
class ShapeGrid:
    """The grid results of one query shape.

    Attributes:
        name: the shape (``"photo"`` or ``"text"``).
        names: its lists, in first-seen order (the columns of ``configs``).
        anchor: the list whose weight is fixed at 1.0.
        configs: float64 ``(configurations, lists)``: the weight vectors scored.
        queries: the shape's queries; prepared: the same as :class:`PreparedQuery`.
        metrics: float64 ``(queries, k, configurations, metrics)``: each query's metrics
            (:data:`METRIC_NAMES` order) at each k of the grid and each configuration.
        baseline: float64 ``(queries, metrics)``: each query's metrics at the setting in effect.
    """

    name: str
    names: list[str]
    anchor: str
    configs: np.ndarray  # (configurations, lists)
    queries: list[QueryLists]
    prepared: list[PreparedQuery]
    metrics: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (queries, k, configurations, metrics)
    baseline: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (queries, metrics)

    def weights(self, row: int) -> dict[str, float]:
        """Configuration ``row`` as list name -> weight."""
        return {n: float(w) for n, w in zip(self.names, self.configs[row])}


def list_names(runs: Sequence[QueryLists]) -> list[str]:
    """Every list name of ``runs``, in first-seen order (query by query, list by list)."""
    seen: dict[str, None] = {}
    for run in runs:
        for name in run.lists:
            seen.setdefault(name, None)
    return list(seen)


def evaluate_weights(runs: Sequence[QueryLists], weights: Mapping[str, float], k: float) -> np.ndarray:
    """Per-query metrics (queries, len(METRIC_NAMES)) of one RRF setting (a list not in
    ``weights`` weighs 1.0, as in the funnel)."""
    names = list_names(runs)
    row = np.asarray([[float(weights.get(n, 1.0)) for n in names]], dtype=np.float64).reshape(1, len(names))
    return np.asarray([score_query(PreparedQuery(r, names), row, k)[0] for r in runs]).reshape(len(runs), len(METRIC_NAMES))


def queries_by_task(queries: Sequence[QueryLists]) -> dict[str, np.ndarray]:
    """Task -> int64 indices of its queries in ``queries`` (input order); tasks sorted by name."""
    tasks: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(queries):
        tasks[q.task].append(i)
    return {t: np.asarray(ix, dtype=np.int64) for t, ix in sorted(tasks.items())}


def choose(shapes: Sequence[ShapeGrid], k_grid: Sequence[float], mask: Callable[[QueryLists], bool] | None = None
           ) -> tuple[int | None, dict[str, int | None], float | None]:
    """(k index, best configuration row per shape, objective) maximising the macro mean nDCG@10
    over the constraining tasks of the queries ``mask`` keeps; None where nothing constrains."""
    per_shape: dict[str, np.ndarray] = {}  # shape -> (tasks, k, configurations) task means
    for s in shapes:
        rows = []
        for task, ix in queries_by_task(s.queries).items():
            ix = np.asarray([i for i in ix if mask is None or mask(s.queries[i])], dtype=np.int64)
            if len(ix) and any(s.prepared[i].fusable for i in ix):
                rows.append(s.metrics[ix, :, :, NDCG_COLUMN].mean(axis=0))
        if rows:
            per_shape[s.name] = np.stack(rows)
    if not per_shape:
        return None, {s.name: None for s in shapes}, None
    n_tasks = sum(m.shape[0] for m in per_shape.values())
    total = np.zeros(len(k_grid))
    best_rows: dict[str, np.ndarray] = {}
    for name, m in per_shape.items():
        objective = m.mean(axis=0)  # (k, configurations)
        best_rows[name] = objective.argmax(axis=1)
        total += objective.max(axis=1) * m.shape[0]
    ki = int(total.argmax())
    rows = {s.name: (int(best_rows[s.name][ki]) if s.name in best_rows else None) for s in shapes}
    return ki, rows, float(total[ki] / n_tasks)


def baseline_objective(shapes: Sequence[ShapeGrid]) -> float | None:
    """The macro mean nDCG@10 of the setting in effect over the constraining tasks (as :func:`choose` counts them)."""
    means = [float(s.baseline[ix, NDCG_COLUMN].mean()) for s in shapes for ix in queries_by_task(s.queries).values()
             if any(s.prepared[i].fusable for i in ix)]
    return float(np.mean(means)) if means else None


def metric_means(metrics: np.ndarray) -> dict[str, float]:
    """Metric name -> mean over the rows of ``metrics`` (float ``(queries, len(METRIC_NAMES))``),
    rounded to 4 decimals; 0.0 for no rows."""
    return {name: round(float(metrics[:, i].mean()), 4) if len(metrics) else 0.0 for i, name in enumerate(METRIC_NAMES)}


__all__ = ["METRIC_NAMES", "NDCG_COLUMN", "PreparedQuery", "ShapeGrid", "baseline_objective", "choose", "evaluate_weights",
           "list_names", "metric_means", "queries_by_task", "score_query"]
