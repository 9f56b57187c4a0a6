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
   in-sample. The fused order is recomputed in numpy (:mod:`evaluation.fusion_grid`) with the
   same float operations as :func:`query.fusion.weighted_rrf` (ties by id), so a grid point
   scores exactly what ``mars eval`` would report with that setting (merchandising rules aside).
3. Per shape it picks the weights that maximise the macro mean nDCG@10 over that shape's
   tasks, with k chosen jointly (``rrf_k`` is global): for each k the best weights per shape,
   then the k with the best macro mean over all tasks. A task none of whose queries has two
   lists to fuse (room-scene: the photo only) cannot be changed by fusion and does not
   constrain the choice.
4. A 2-fold cross-validation by room (queries grouped by ``room_id``, by query id when they
   have none, e.g. text-to-image; folds by CRC-32 of the group, :func:`evaluation.folds.cv_fold`)
   tunes on one half and scores the other: the held-out gain is the part of the in-sample gain
   that survives on unseen rooms.

:func:`~evaluation.dotenv_file.update_dotenv` writes the chosen setting into a dotenv file that
:class:`mars.settings.Settings` reads (environment variables still override it);
:mod:`evaluation.tune_report` prints the report. The lists are kept as
:class:`~evaluation.query_lists.QueryLists`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from rich.progress import Progress

from evaluation.beir import BenchmarkQuery, QueryImages
from evaluation.dotenv_file import settings_env, update_dotenv
from evaluation.folds import cv_fold
from evaluation.fusion_grid import (
    METRIC_NAMES, NDCG_COLUMN, PreparedQuery, ShapeGrid, baseline_objective, choose, list_names, metric_means,
    queries_by_task, score_query,
)
from evaluation.query_lists import SHAPES, QueryLists, load_lists, save_lists
from evaluation.runner import EVAL_DEPTH, eval_query
from evaluation.tune_report import format_tables, markdown_summary
from query.funnel import Funnel, query_shape
from query.retrievers import RETRIEVER_NAMES

#: RRF constants tried (k = 60 is Cormack et al.'s value).
K_GRID: tuple[float, ...] = (10.0, 20.0, 40.0, 60.0, 100.0)
#: Weights tried for each list but the anchor (fixed at 1.0).
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.1, 0.25, 0.5, 1.0, 2.0)
#: The anchor (weight fixed at 1.0) of a shape is the first of these among its lists (else the
#: list in most of its queries): the photo list for photo queries, the text-vector list for
#: text-only ones — the lists the shipped weights are scaled to — then the others in registry order.
ANCHOR_PREFERENCE: tuple[str, ...] = ("image", "text", *(n for n in RETRIEVER_NAMES if n not in ("image", "text")))


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
    every_list = {name: 1.0 for name in engine.funnel.retriever_names()}
    with Progress(disable=not progress, transient=True, console=console) as bar:
        task_id = bar.add_task("retrieving lists", total=len(judged))

        def retrieve(funnel: Funnel, group: Sequence[BenchmarkQuery]) -> list[QueryLists]:
            out = []
            for q in group:
                # every list weighted 1.0: the funnel skips a list weighted 0, and the tuner must see
                # every list whatever the settings in effect say (weights do not change the lists)
                search = eval_query(q, images(q), mode="hybrid", top_k=EVAL_DEPTH, weights=every_list)
                retrieval = funnel.retrieve(search)
                out.append(QueryLists(
                    id=q.id, task=q.task, shape=query_shape(search), group=q.room_id or q.id,
                    lists={name: [h.id for h in hits[:depth]] for name, hits in retrieval.lists.items()},
                    relevant=sorted(qrels[q.id]),
                ))
                bar.advance(task_id)
            return out

        return out_of_fold(engine, judged, qrels, retrieve)


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


def _fmt_k(k: float) -> int | float:
    """``k`` as an int when it is whole (the JSON and dotenv form), else as a float."""
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
    shapes: list[ShapeGrid] = []
    for shape in sorted({r.shape for r in runs}):
        queries = [r for r in runs if r.shape == shape]
        names = list_names(queries)
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
        shapes.append(ShapeGrid(shape, names, anchor, configs, queries, [PreparedQuery(q, names) for q in queries]))

    with Progress(disable=not progress, transient=True, console=console) as bar:
        task_id = bar.add_task("scoring the grid", total=sum(len(s.queries) for s in shapes))
        for s in shapes:
            s.metrics = np.zeros((len(s.queries), len(k_grid), len(s.configs), len(METRIC_NAMES)))
            base = np.asarray([[float(baseline_weights.get(s.name, {}).get(n, 1.0)) for n in s.names]])
            s.baseline = np.zeros((len(s.queries), len(METRIC_NAMES)))
            for qi, p in enumerate(s.prepared):
                for ki, k in enumerate(k_grid):
                    s.metrics[qi, ki] = score_query(p, s.configs, k)
                s.baseline[qi] = score_query(p, base, baseline_k)[0]
                bar.advance(task_id)

    ki, rows, objective = choose(shapes, k_grid)
    base_objective = baseline_objective(shapes)
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
        tasks = queries_by_task(s.queries)
        report["shapes"][s.name] = {
            "lists": s.names, "anchor": s.anchor, "configurations": len(s.configs) * len(k_grid), "queries": len(s.queries),
            "tasks": list(tasks),
            "constraining_tasks": [t for t, ix in tasks.items() if any(s.prepared[i].fusable for i in ix)],
        }
        for task, ix in tasks.items():
            entry: dict[str, Any] = {
                "queries": len(ix), "shape": s.name, "fusable": any(s.prepared[i].fusable for i in ix),
                "lists": sorted({n for i in ix for n, ids in s.queries[i].lists.items() if ids}),
                "baseline": metric_means(s.baseline[ix]),
            }
            if ki is not None and rows[s.name] is not None:
                entry["tuned"] = metric_means(s.metrics[ix, ki, rows[s.name]])
            else:
                entry["tuned"] = entry["baseline"]
            means = s.metrics[ix, :, :, NDCG_COLUMN].mean(axis=0)  # (k, configurations)
            bk, bc = np.unravel_index(int(means.argmax()), means.shape)
            entry["best"] = {"k": _fmt_k(k_grid[bk]), "weights": s.weights(int(bc)), "nDCG@10": round(float(means[bk, bc]), 4)}
            key = task if task not in report["tasks"] else f"{task} ({s.name})"
            report["tasks"][key] = entry

    if folds >= 2:
        report["cross_validation"] = _cross_validate(shapes, k_grid, folds, baseline_weights, float(baseline_k), ki, rows)
    return report


def _cross_validate(shapes: Sequence[ShapeGrid], k_grid: Sequence[float], folds: int,
                    baseline_weights: Mapping[str, Mapping[str, float]], baseline_k: float,
                    ki_all: int | None, rows_all: Mapping[str, int | None]) -> dict[str, Any]:
    """Tune on all folds but one, score the held-out one; every query is held out once."""
    held = {s.name: np.zeros((len(s.queries), len(METRIC_NAMES))) for s in shapes}
    fold_reports = []
    for f in range(folds):
        ki, rows, objective = choose(shapes, k_grid, mask=lambda q, f=f: cv_fold(q.group, folds) != f)
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
        for task, ix in queries_by_task(s.queries).items():
            tuned = s.metrics[ix, ki_all, rows_all[s.name]] if ki_all is not None and rows_all[s.name] is not None else s.baseline[ix]
            key = task if task not in tasks else f"{task} ({s.name})"
            tasks[key] = {
                "queries": len(ix),
                "baseline": round(float(s.baseline[ix, NDCG_COLUMN].mean()), 4),
                "tuned_in_sample": round(float(tuned[:, NDCG_COLUMN].mean()), 4),
                "held_out": round(float(held[s.name][ix, NDCG_COLUMN].mean()), 4),
                "held_out_all": metric_means(held[s.name][ix]),
            }
    constraining = [(s, ix) for s in shapes for ix in queries_by_task(s.queries).values() if any(s.prepared[i].fusable for i in ix)]
    macro = {
        "baseline": round(float(np.mean([s.baseline[ix, NDCG_COLUMN].mean() for s, ix in constraining])), 4) if constraining else None,
        "held_out": round(float(np.mean([held[s.name][ix, NDCG_COLUMN].mean() for s, ix in constraining])), 4) if constraining else None,
    }
    return {"folds": fold_reports, "tasks": tasks, "metric": "nDCG@10", "macro": macro}


#: Re-exported for ``mars tune`` (and the room-fold tests), which import them from here:
#: ``cv_fold``, ``format_tables``, ``load_lists``, ``markdown_summary``, ``save_lists``,
#: ``settings_env``, ``update_dotenv``.
__all__ = ["ANCHOR_PREFERENCE", "K_GRID", "WEIGHT_GRID", "collect_lists", "cv_fold", "format_tables",
           "load_lists", "markdown_summary", "pick_anchor", "save_lists", "settings_env", "tune", "update_dotenv",
           "weight_grid"]
