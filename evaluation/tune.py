"""``mars tune``: search the RRF constant k and the per-list RRF weights on the dev qrels.

The funnel fuses its ranked lists by weighted Reciprocal Rank Fusion,
``score(d) = Σ_i w_i / (k + rank_i(d))`` (Cormack, Clarke & Büttcher, "Reciprocal Rank Fusion
outperforms Condorcet and individual rank learning methods", SIGIR 2009), with one weight
set per query shape (:func:`query.funnel.query_shape`: ``weights_photo`` for queries with a
room photo, ``weights_text`` for text-only ones) and one global ``rrf_k``.

How it tunes:

1. :func:`collect_lists` asks every benchmark query once through
   :meth:`query.funnel.Funnel.retrieve` — the search ``mars eval`` asks
   (:func:`evaluation.runner.eval_query`, mode ``hybrid``), with every list weighted 1.0 so
   that none is skipped — and keeps only the ranked id lists (``settings.retrieval_depth``
   deep). The lists do not depend on the weights.
2. :func:`tune` scores a coarse grid offline: every k of ``k_grid`` × every weight vector of
   :func:`weight_grid` (one list per shape — the anchor — fixed at 1.0, which removes RRF's
   scale redundancy: multiplying all weights by c > 0 keeps the order), plus the setting in
   effect (its k, its weights scaled to the anchor) so the choice never scores below it
   in-sample. The fused order is
   recomputed in numpy with the same float operations as :func:`query.fusion.weighted_rrf`
   (ties by id), so a grid point scores exactly what ``mars eval`` would report with that
   setting (merchandising rules aside).
3. Per shape it picks the weights that maximise the macro mean nDCG@10 over that shape's
   tasks, with k chosen jointly (``rrf_k`` is global): for each k the best weights per shape,
   then the k with the best macro mean over all tasks. A task none of whose queries has two
   lists to fuse (room-scene: the photo only) cannot be changed by fusion and does not
   constrain the choice.
4. A 2-fold cross-validation by room (queries grouped by ``room_id``, by query id when they
   have none, e.g. text-to-image; folds by CRC-32 of the group) tunes on one half and scores
   the other: the held-out gain is the part of the in-sample gain that survives on unseen
   rooms.

:func:`update_dotenv` writes the chosen setting into a dotenv file that
:class:`mars.settings.Settings` reads (environment variables still override it).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from evaluation.beir import BenchmarkQuery, QueryImages
from evaluation.metrics import METRICS
from evaluation.runner import EVAL_DEPTH, eval_query
from query.funnel import query_shape

#: RRF constants tried (k = 60 is Cormack et al.'s value).
K_GRID: tuple[float, ...] = (10.0, 20.0, 40.0, 60.0, 100.0)
#: Weights tried for each list but the anchor (fixed at 1.0).
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
#: The funnel's lists (``aligned`` once ``mars train align`` has run, ``prior`` once ``mars train
#: prior`` has, for queries with a room type); a list of another name is tuned too.
LIST_NAMES: tuple[str, ...] = ("bm25", "text", "image", "aligned", "prior")
#: Query shapes and the settings field holding their weights.
SHAPES: dict[str, str] = {"photo": "weights_photo", "text": "weights_text"}
#: The anchor (weight fixed at 1.0) of a shape is the first of these among its lists (else the
#: list in most of its queries): the photo list for photo queries, the text-vector list for
#: text-only ones — the lists the shipped weights are scaled to.
ANCHOR_PREFERENCE: tuple[str, ...] = ("image", "text", "bm25", "aligned", "prior")
#: Dotenv keys of the tuned settings.
ENV_K, ENV_WEIGHTS = "MARS_RRF_K", {"photo": "MARS_WEIGHTS_PHOTO", "text": "MARS_WEIGHTS_TEXT"}

METRIC_NAMES: tuple[str, ...] = tuple(METRICS)  # nDCG@10, Recall@10, Recall@50, MRR@10, Success@10
_NDCG = METRIC_NAMES.index("nDCG@10")
_DISCOUNT = 1.0 / np.log2(np.arange(2, 12))  # ranks 1..10


@dataclass
class QueryLists:
    """One benchmark query's retrieved lists, without weights applied.

    Attributes:
        id, task: the query's id and task.
        shape: ``"photo"`` or ``"text"`` (:func:`query.funnel.query_shape`): which weights it uses.
        group: the cross-validation group (the room id; the query id when it has no room).
        lists: list name -> product ids, best first, in the funnel's order of lists.
        relevant: the judged relevant product ids.
    """

    id: str
    task: str
    shape: str
    group: str
    lists: dict[str, list[str]]
    relevant: list[str]


def collect_lists(
    engine: Any,
    queries: Sequence[BenchmarkQuery],
    qrels: Mapping[str, Iterable[str]],
    *,
    depth: int | None = None,
    progress: bool = True,
    console: Any = None,
) -> list[QueryLists]:
    """Retrieve every query once (mode ``hybrid``, as ``mars eval`` asks it) and keep its id lists;
    out of fold (:func:`training.room_folds.out_of_fold`) when the whitening has a learned
    stage, so that the weights are tuned on the lists a new room would get.

    Args:
        engine: anything with ``funnel`` (a :class:`query.funnel.Funnel`) and ``settings``.
        queries: the benchmark queries (those without judgments are skipped).
        qrels: query id -> relevant product ids.
        depth: ids kept per list; default ``settings.retrieval_depth``.
        progress: show a rich progress bar (on ``console`` when given).

    Raises:
        FileNotFoundError / ingestion.images.InvalidImage: a query photo is missing or unreadable.
    """
    from training.room_folds import out_of_fold

    settings = engine.settings
    depth = depth or settings.retrieval_depth
    images = QueryImages(settings.max_image_bytes, settings.max_image_pixels)
    judged = [q for q in queries if qrels.get(q.id)]
    every_list = _every_list(engine.funnel)
    with Progress(disable=not progress, transient=True, console=console) as bar:
        task_id = bar.add_task("retrieving lists", total=len(judged))

        def retrieve(group: Sequence[BenchmarkQuery]) -> list[QueryLists]:
            out = []
            for q in group:
                search = eval_query(q, images(q), mode="hybrid", top_k=EVAL_DEPTH, weights=every_list)
                retrieval = engine.funnel.retrieve(search)
                out.append(QueryLists(
                    id=q.id, task=q.task, shape=query_shape(search), group=q.room_id or q.id,
                    lists={name: [h.id for h in hits[:depth]] for name, hits in retrieval.lists.items()},
                    relevant=sorted(qrels[q.id]),
                ))
                bar.advance(task_id)
            return out

        return out_of_fold(engine, judged, qrels, retrieve)


def _every_list(funnel: Any) -> dict[str, float]:
    """Weight 1.0 for every list the funnel may compute (:data:`LIST_NAMES` and any list its
    configured weights name), as per-query overrides: the funnel skips a list weighted 0, and
    the tuner must see every list whatever the settings in effect say. Weights do not change
    the lists themselves."""
    names = set(LIST_NAMES).union(*funnel.config.weights.values())
    return {name: 1.0 for name in sorted(names)}


def save_lists(path: Path, runs: Sequence[QueryLists]) -> None:
    """Write retrieved lists as JSON lines (one :class:`QueryLists` per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for run in runs:
            fh.write(json.dumps(asdict(run)) + "\n")


def load_lists(path: Path) -> list[QueryLists]:
    """Read lists written by :func:`save_lists`."""
    with path.open(encoding="utf-8") as fh:
        return [QueryLists(**json.loads(line)) for line in fh if line.strip()]


def cv_fold(group: str, folds: int = 2) -> int:
    """The fold of a cross-validation group: CRC-32 of its UTF-8 bytes modulo ``folds`` (stable across runs)."""
    return zlib.crc32(group.encode("utf-8")) % folds


def pick_anchor(names: Sequence[str], counts: Mapping[str, int]) -> str:
    """The list whose weight stays 1.0: the first of :data:`ANCHOR_PREFERENCE` in ``names``,
    else the one in most queries (``counts``), ties alphabetical."""
    for name in ANCHOR_PREFERENCE:
        if name in names:
            return name
    return min(names, key=lambda n: (-counts.get(n, 0), n))


def weight_grid(names: Sequence[str], anchor: str, grid: Sequence[float] = WEIGHT_GRID) -> np.ndarray:
    """Every weight vector over ``names`` with ``anchor`` at 1.0 and each other list from ``grid``.

    Returns:
        array (configurations, len(names)), columns in the order of ``names``.
    """
    others = [n for n in names if n != anchor]
    rows = []
    for combo in itertools.product(sorted(set(grid)), repeat=len(others)):
        values = dict(zip(others, combo))
        rows.append([1.0 if n == anchor else values[n] for n in names])
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(names))


class _Prepared:
    """One query's lists as a rank matrix: candidates sorted by id (so a stable sort breaks
    score ties by id, as :func:`query.fusion.weighted_rrf` does), one column per list in the
    query's own list order (so scores are summed in the same order), ``inf`` where absent."""

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


def _score(p: _Prepared, weights: np.ndarray, k: float) -> np.ndarray:
    """Metrics (configurations, len(METRIC_NAMES)) of one query for each weight row at constant ``k``."""
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
class _Shape:
    """The grid results of one query shape."""

    name: str
    names: list[str]
    anchor: str
    configs: np.ndarray  # (configurations, lists)
    queries: list[QueryLists]
    prepared: list[_Prepared]
    metrics: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (queries, k, configurations, metrics)
    baseline: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (queries, metrics)

    def weights(self, row: int) -> dict[str, float]:
        return {n: float(w) for n, w in zip(self.names, self.configs[row])}


def _list_names(runs: Sequence[QueryLists]) -> list[str]:
    seen: dict[str, None] = {}
    for run in runs:
        for name in run.lists:
            seen.setdefault(name, None)
    return list(seen)


def evaluate_weights(runs: Sequence[QueryLists], weights: Mapping[str, float], k: float) -> np.ndarray:
    """Per-query metrics (queries, len(METRIC_NAMES)) of one RRF setting (a list not in
    ``weights`` weighs 1.0, as in the funnel)."""
    names = _list_names(runs)
    row = np.asarray([[float(weights.get(n, 1.0)) for n in names]], dtype=np.float64).reshape(1, len(names))
    return np.asarray([_score(_Prepared(r, names), row, k)[0] for r in runs]).reshape(len(runs), len(METRIC_NAMES))


def _by_task(queries: Sequence[QueryLists]) -> dict[str, np.ndarray]:
    tasks: dict[str, list[int]] = defaultdict(list)
    for i, q in enumerate(queries):
        tasks[q.task].append(i)
    return {t: np.asarray(ix, dtype=np.int64) for t, ix in sorted(tasks.items())}


def _choose(shapes: Sequence[_Shape], k_grid: Sequence[float], mask: Callable[[QueryLists], bool] | None = None
            ) -> tuple[int | None, dict[str, int | None], float | None]:
    """(k index, best configuration row per shape, objective) maximising the macro mean nDCG@10
    over the constraining tasks of the queries ``mask`` keeps; None where nothing constrains."""
    per_shape: dict[str, np.ndarray] = {}  # shape -> (tasks, k, configurations) task means
    for s in shapes:
        rows = []
        for task, ix in _by_task(s.queries).items():
            ix = np.asarray([i for i in ix if mask is None or mask(s.queries[i])], dtype=np.int64)
            if len(ix) and any(s.prepared[i].fusable for i in ix):
                rows.append(s.metrics[ix, :, :, _NDCG].mean(axis=0))
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


def _baseline_objective(shapes: Sequence[_Shape]) -> float | None:
    """The macro mean nDCG@10 of the setting in effect over the constraining tasks (as :func:`_choose` counts them)."""
    means = [float(s.baseline[ix, _NDCG].mean()) for s in shapes for ix in _by_task(s.queries).values()
             if any(s.prepared[i].fusable for i in ix)]
    return float(np.mean(means)) if means else None


def _means(metrics: np.ndarray) -> dict[str, float]:
    return {name: round(float(metrics[:, i].mean()), 4) if len(metrics) else 0.0 for i, name in enumerate(METRIC_NAMES)}


def _fmt_k(k: float) -> int | float:
    return int(k) if float(k).is_integer() else float(k)


def tune(
    runs: Sequence[QueryLists],
    *,
    baseline_k: float,
    baseline_weights: Mapping[str, Mapping[str, float]],
    k_grid: Sequence[float] = K_GRID,
    grid: Sequence[float] = WEIGHT_GRID,
    folds: int = 2,
    progress: bool = False,
    console: Any = None,
) -> dict[str, Any]:
    """Grid-search k and the weights per shape on ``runs`` (from :func:`collect_lists`).

    Args:
        runs: the queries' lists and judgments.
        baseline_k, baseline_weights: the setting to compare with (shape -> list -> weight;
            a list not named weighs 1.0), e.g. the current ``rrf_k``, ``weights_photo`` and
            ``weights_text``.
        k_grid: RRF constants tried; grid: weights tried for every list but each shape's anchor.
        folds: cross-validation folds by room (0 or 1 skips the cross-validation).

    Returns:
        a JSON-ready report: ``queries``, ``k_grid``, ``weight_grid``, ``shapes`` (per shape:
        lists, anchor, tasks, configurations), ``baseline``, ``chosen`` (``rrf_k``, per-shape
        ``weights``, ``objective``, the ``settings`` values to write), ``tasks`` (per task:
        queries, shape, fusable, ``baseline`` and ``tuned`` metric means, ``best`` — the task's
        own best k and weights), ``cross_validation`` (per fold: the setting tuned on the
        other folds; per task: baseline, in-sample tuned and held-out means of nDCG@10).
    """
    k_grid = sorted({float(k) for k in k_grid} | {float(baseline_k)})  # the k in effect is always tried
    shapes: list[_Shape] = []
    for shape in sorted({r.shape for r in runs}):
        queries = [r for r in runs if r.shape == shape]
        names = _list_names(queries)
        counts = {n: sum(1 for q in queries if q.lists.get(n)) for n in names}
        if not names:
            continue
        anchor = pick_anchor(names, counts)
        configs = weight_grid(names, anchor, grid)
        # the setting in effect, scaled to anchor 1.0, is always a candidate: the tuned choice never
        # scores below it in-sample
        base = np.asarray([float(baseline_weights.get(shape, {}).get(n, 1.0)) for n in names])
        if base[names.index(anchor)] > 0:
            base = base / base[names.index(anchor)]
        if not np.isclose(configs, base).all(axis=1).any():
            configs = np.vstack([configs, base])
        shapes.append(_Shape(shape, names, anchor, configs, queries, [_Prepared(q, names) for q in queries]))

    with Progress(disable=not progress, transient=True, console=console) as bar:
        task_id = bar.add_task("scoring the grid", total=sum(len(s.queries) for s in shapes))
        for s in shapes:
            s.metrics = np.zeros((len(s.queries), len(k_grid), len(s.configs), len(METRIC_NAMES)))
            base = np.asarray([[float(baseline_weights.get(s.name, {}).get(n, 1.0)) for n in s.names]])
            s.baseline = np.zeros((len(s.queries), len(METRIC_NAMES)))
            for qi, p in enumerate(s.prepared):
                for ki, k in enumerate(k_grid):
                    s.metrics[qi, ki] = _score(p, s.configs, k)
                s.baseline[qi] = _score(p, base, baseline_k)[0]
                bar.advance(task_id)

    ki, rows, objective = _choose(shapes, k_grid)
    base_objective = _baseline_objective(shapes)
    chosen_k = k_grid[ki] if ki is not None else float(baseline_k)
    chosen_weights: dict[str, dict[str, float]] = {}
    for s in shapes:
        if rows[s.name] is not None:
            chosen_weights[s.name] = s.weights(rows[s.name])
    settings_values: dict[str, Any] = {"rrf_k": _fmt_k(chosen_k)}
    for shape, field_name in SHAPES.items():
        settings_values[field_name] = {**dict(baseline_weights.get(shape, {})), **chosen_weights.get(shape, {})}

    report: dict[str, Any] = {
        "queries": len(runs),
        "k_grid": [_fmt_k(k) for k in k_grid],
        "weight_grid": sorted(set(float(w) for w in grid)),
        "shapes": {},
        "baseline": {"rrf_k": _fmt_k(baseline_k), "weights": {k: dict(v) for k, v in baseline_weights.items()},
                     "objective": None if base_objective is None else round(base_objective, 4)},
        "chosen": {"rrf_k": _fmt_k(chosen_k), "weights": chosen_weights, "objective": None if objective is None else round(objective, 4),
                   "settings": settings_values},
        "tasks": {},
    }
    for s in shapes:
        tasks = _by_task(s.queries)
        report["shapes"][s.name] = {
            "lists": s.names, "anchor": s.anchor, "configurations": len(s.configs) * len(k_grid), "queries": len(s.queries),
            "tasks": list(tasks),
            "constraining_tasks": [t for t, ix in tasks.items() if any(s.prepared[i].fusable for i in ix)],
        }
        for task, ix in tasks.items():
            entry: dict[str, Any] = {
                "queries": len(ix), "shape": s.name, "fusable": any(s.prepared[i].fusable for i in ix),
                "lists": sorted({n for i in ix for n, ids in s.queries[i].lists.items() if ids}),
                "baseline": _means(s.baseline[ix]),
            }
            if ki is not None and rows[s.name] is not None:
                entry["tuned"] = _means(s.metrics[ix, ki, rows[s.name]])
            else:
                entry["tuned"] = entry["baseline"]
            means = s.metrics[ix, :, :, _NDCG].mean(axis=0)  # (k, configurations)
            bk, bc = np.unravel_index(int(means.argmax()), means.shape)
            entry["best"] = {"k": _fmt_k(k_grid[bk]), "weights": s.weights(int(bc)), "nDCG@10": round(float(means[bk, bc]), 4)}
            key = task if task not in report["tasks"] else f"{task} ({s.name})"
            report["tasks"][key] = entry

    if folds >= 2:
        report["cross_validation"] = _cross_validate(shapes, k_grid, folds, baseline_weights, float(baseline_k), ki, rows)
    return report


def _cross_validate(shapes: Sequence[_Shape], k_grid: Sequence[float], folds: int,
                    baseline_weights: Mapping[str, Mapping[str, float]], baseline_k: float,
                    ki_all: int | None, rows_all: Mapping[str, int | None]) -> dict[str, Any]:
    """Tune on all folds but one, score the held-out one; every query is held out once."""
    held = {s.name: np.zeros((len(s.queries), len(METRIC_NAMES))) for s in shapes}
    fold_reports = []
    for f in range(folds):
        ki, rows, objective = _choose(shapes, k_grid, mask=lambda q, f=f: cv_fold(q.group, folds) != f)
        fold_reports.append({
            "fold": f,
            "train_queries": sum(1 for s in shapes for q in s.queries if cv_fold(q.group, folds) != f),
            "test_queries": sum(1 for s in shapes for q in s.queries if cv_fold(q.group, folds) == f),
            "rrf_k": _fmt_k(k_grid[ki]) if ki is not None else _fmt_k(baseline_k),
            "weights": {s.name: s.weights(rows[s.name]) for s in shapes if rows[s.name] is not None},
            "train_objective": None if objective is None else round(objective, 4),
        })
        for s in shapes:
            for qi, q in enumerate(s.queries):
                if cv_fold(q.group, folds) == f:
                    held[s.name][qi] = s.baseline[qi] if ki is None or rows[s.name] is None else s.metrics[qi, ki, rows[s.name]]
    tasks: dict[str, Any] = {}
    for s in shapes:
        for task, ix in _by_task(s.queries).items():
            tuned = s.metrics[ix, ki_all, rows_all[s.name]] if ki_all is not None and rows_all[s.name] is not None else s.baseline[ix]
            key = task if task not in tasks else f"{task} ({s.name})"
            tasks[key] = {
                "queries": len(ix),
                "baseline": round(float(s.baseline[ix, _NDCG].mean()), 4),
                "tuned_in_sample": round(float(tuned[:, _NDCG].mean()), 4),
                "held_out": round(float(held[s.name][ix, _NDCG].mean()), 4),
                "held_out_all": _means(held[s.name][ix]),
            }
    constraining = [(s, ix) for s in shapes for ix in _by_task(s.queries).values() if any(s.prepared[i].fusable for i in ix)]
    macro = {
        "baseline": round(float(np.mean([s.baseline[ix, _NDCG].mean() for s, ix in constraining])), 4) if constraining else None,
        "held_out": round(float(np.mean([held[s.name][ix, _NDCG].mean() for s, ix in constraining])), 4) if constraining else None,
    }
    return {"folds": fold_reports, "tasks": tasks, "metric": "nDCG@10", "macro": macro}


# --- dotenv ---------------------------------------------------------------------------------


def settings_env(chosen_settings: Mapping[str, Any]) -> dict[str, str]:
    """The dotenv values of a report's ``chosen.settings``: ``MARS_RRF_K`` and the two weight
    fields as JSON (the form ``Settings`` parses)."""
    values = {ENV_K: str(chosen_settings["rrf_k"])}
    for shape, field_name in SHAPES.items():
        values[ENV_WEIGHTS[shape]] = json.dumps(dict(chosen_settings[field_name]))
    return values


def _quote(value: str) -> str:
    """A dotenv value: bare when it is plain, else single-quoted (python-dotenv reads single-quoted
    values literally, bar ``\\\\`` and ``\\'``)."""
    if value and all(c.isalnum() or c in "._-+:/" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _line_key(line: str) -> str | None:
    stripped = line.strip()
    if not stripped or stripped.startswith("#"):
        return None
    if stripped.startswith("export "):
        stripped = stripped[len("export "):].lstrip()
    key, sep, _ = stripped.partition("=")
    return key.strip() if sep else None


def update_dotenv(path: Path, values: Mapping[str, str]) -> None:
    """Set ``values`` (key -> unquoted value) in the dotenv file ``path``, keeping every other line.

    A key already in the file is replaced where it first appears (later duplicates, which would
    override it, are dropped); a new key is appended. The file is created when missing and
    replaced atomically.
    """
    lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
    out: list[str] = []
    done: set[str] = set()
    for line in lines:
        key = _line_key(line)
        if key in values:
            if key not in done:
                out.append(f"{key}={_quote(values[key])}")
                done.add(key)
            continue
        out.append(line)
    out.extend(f"{key}={_quote(value)}" for key, value in values.items() if key not in done)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".env.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(out) + "\n")
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- tables ---------------------------------------------------------------------------------


def _weights_text(weights: Mapping[str, float]) -> str:
    return " ".join(f"{n}={w:g}" for n, w in weights.items()) or "—"


def format_tables(report: Mapping[str, Any]) -> list[Table]:
    """Rich tables of a :func:`tune` report: the best setting per task, the chosen setting vs
    the baseline per task, and the cross-validation (cells are plain text, never markup)."""
    base_k = report["baseline"]["rrf_k"]
    best = Table(title="best setting per task (nDCG@10, each task on its own)")
    for col in ("task", "shape", "queries", "lists fused", f"baseline (k {base_k})", "best k", "best weights", "best", "gain"):
        best.add_column(col, justify="left" if col in ("task", "shape", "lists fused", "best weights") else "right")
    for task, row in report["tasks"].items():
        b = row["baseline"]["nDCG@10"]
        if row["fusable"]:
            best.add_row(Text(task), row["shape"], str(row["queries"]), " ".join(row["lists"]), f"{b:.4f}", str(row["best"]["k"]),
                         Text(_weights_text(row["best"]["weights"])), f"{row['best']['nDCG@10']:.4f}",
                         f"{row['best']['nDCG@10'] - b:+.4f}")
        else:
            best.add_row(Text(task), row["shape"], str(row["queries"]), " ".join(row["lists"]), f"{b:.4f}", "—",
                         "nothing to fuse", f"{b:.4f}", "+0.0000")

    chosen = report["chosen"]
    title = f"chosen: k {chosen['rrf_k']}; " + "; ".join(f"{s}: {_weights_text(w)}" for s, w in chosen["weights"].items())
    if chosen.get("objective") is not None and report["baseline"].get("objective") is not None:
        title += f" — macro nDCG@10 {chosen['objective']:.4f} vs baseline {report['baseline']['objective']:.4f}"
    tuned = Table(title=Text(f"{title} (baseline k {base_k})"))
    tuned.add_column("task")
    tuned.add_column("queries", justify="right")
    tuned.add_column("nDCG@10 base", justify="right")
    tuned.add_column("nDCG@10 tuned", justify="right")
    tuned.add_column("gain", justify="right")
    others = [m for m in METRIC_NAMES if m != "nDCG@10"]
    for name in others:
        tuned.add_column(f"{name} tuned (gain)", justify="right")
    for task, row in report["tasks"].items():
        b, t = row["baseline"], row["tuned"]
        tuned.add_row(Text(task), str(row["queries"]), f"{b['nDCG@10']:.4f}", f"{t['nDCG@10']:.4f}", f"{t['nDCG@10'] - b['nDCG@10']:+.4f}",
                      *(f"{t[m]:.4f} ({t[m] - b[m]:+.4f})" for m in others))
    tables = [best, tuned]

    cv = report.get("cross_validation")
    if cv:
        folds = "; ".join(f"fold {f['fold']} (tuned on the rest): k {f['rrf_k']}, "
                          + ", ".join(f"{s}: {_weights_text(w)}" for s, w in f["weights"].items()) for f in cv["folds"])
        macro = cv.get("macro") or {}
        summary = (f"; macro held-out {macro['held_out']:.4f} vs baseline {macro['baseline']:.4f}"
                   if macro.get("held_out") is not None else "")
        t = Table(title=Text(f"nDCG@10, {len(cv['folds'])}-fold cross-validation by room — {folds}{summary}"))
        for col in ("task", "queries", "baseline", "tuned (in-sample)", "held-out", "gain in-sample", "gain held-out"):
            t.add_column(col, justify="left" if col == "task" else "right")
        for task, row in cv["tasks"].items():
            t.add_row(Text(task), str(row["queries"]), f"{row['baseline']:.4f}", f"{row['tuned_in_sample']:.4f}", f"{row['held_out']:.4f}",
                      f"{row['tuned_in_sample'] - row['baseline']:+.4f}", f"{row['held_out'] - row['baseline']:+.4f}")
        tables.append(t)
    return tables


def markdown_summary(report: Mapping[str, Any]) -> str:
    """The chosen setting vs the baseline and the cross-validation, as Markdown (for the README)."""
    cv = (report.get("cross_validation") or {}).get("tasks", {})
    base_k, k = report["baseline"]["rrf_k"], report["chosen"]["rrf_k"]
    head = f"| task | queries | nDCG@10 baseline (k {base_k}) | nDCG@10 tuned (k {k}) | held-out (2-fold CV by room) | Success@10 baseline → tuned |"
    lines = [head, "|---|---:|---:|---:|---:|---:|"]
    for task, row in report["tasks"].items():
        held = f"{cv[task]['held_out']:.4f}" if task in cv else "—"
        lines.append(f"| {task} | {row['queries']} | {row['baseline']['nDCG@10']:.4f} | {row['tuned']['nDCG@10']:.4f} | {held} | "
                     f"{row['baseline']['Success@10']:.4f} → {row['tuned']['Success@10']:.4f} |")
    return "\n".join(lines)
