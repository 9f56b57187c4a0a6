"""``mars eval``: run BEIR-style multimodal queries through the funnel and score them per task."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image
from rich.progress import Progress
from rich.table import Table

from evaluation.beir import BenchmarkQuery, QueryImages, load_qrels, load_queries
from evaluation.metrics import METRICS, score_queries
from query.funnel import Funnel, SearchQuery

T = TypeVar("T")

#: Results fetched per query: enough for Recall@50.
EVAL_DEPTH = 100

#: Tasks whose query describes a whole room and whose relevant set is every product shown in
#: it (the dataset README's task table): they run without a lock resolved from the text, as
#: a merchandiser looking for a room's look would (`--no-lock`). Product-request tasks
#: (room-class, room-type, text-to-image) keep the automatic lock.
ROOM_LEVEL_TASKS = frozenset({"room-scene", "room-title"})


def select_queries(
    queries_path: Path,
    qrels_path: Path,
    *,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    where: Callable[[BenchmarkQuery], bool] | None = None,
) -> tuple[list[BenchmarkQuery], dict[str, set[str]]]:
    """The queries to evaluate and the qrels: those of ``tasks`` (all when None) that have
    judgments and pass ``where`` (all when None), at most ``limit`` per task in file order.

    Raises:
        FileNotFoundError: a queries or qrels file is missing.
    """
    queries = [q for q in load_queries(queries_path) if (not tasks or q.task in tasks) and (where is None or where(q))]
    qrels = load_qrels(qrels_path)
    queries = [q for q in queries if qrels.get(q.id)]
    return limit_per_task(queries, limit), qrels


def limit_per_task(items: Sequence[T], limit: int | None) -> list[T]:
    """The first ``limit`` items of each ``.task`` in input order (all of them when None)."""
    if limit is None:
        return list(items)
    taken: dict[str, int] = defaultdict(int)
    kept = []
    for item in items:
        if taken[item.task] < limit:  # type: ignore[attr-defined]
            taken[item.task] += 1  # type: ignore[attr-defined]
            kept.append(item)
    return kept


def eval_query(
    q: BenchmarkQuery,
    image: Image.Image | None,
    *,
    mode: str = "hybrid",
    top_k: int = EVAL_DEPTH,
    weights: Mapping[str, float] | None = None,
) -> SearchQuery:
    """The search the runner asks for a benchmark query: its text and photo, its room type as
    room context, no automatic lock for :data:`ROOM_LEVEL_TASKS`, and optional RRF weight
    overrides (``weights``)."""
    return SearchQuery(
        text=q.text,
        image=image,
        room=q.room_category,
        auto_lock=q.task not in ROOM_LEVEL_TASKS,
        top_k=top_k,
        mode=mode,  # type: ignore[arg-type]
        weights=dict(weights or {}),
    )


def run_eval(
    engine: Any,
    queries_path: Path,
    qrels_path: Path,
    *,
    mode: str = "hybrid",
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    progress: bool = True,
    where: Callable[[BenchmarkQuery], bool] | None = None,
    funnel: Funnel | None = None,
) -> dict[str, Any]:
    """Evaluate ``engine`` (anything with ``search(SearchQuery)`` and ``settings``), or ``funnel``
    with the engine's settings (e.g. one refitted without the rooms it scores:
    :func:`training.room_folds.out_of_fold`).

    Returns a JSON-ready dict: ``mode``, ``tasks`` (task -> {"queries": n, metric: mean}),
    ``per_query`` (query id -> metric values), ``locks`` (query id -> lock key or None) and
    ``critic`` (query id -> {"status", "detail"} of the critic stage; in mode ``full`` a status
    ``unavailable`` means the fused order was scored for that query).
    Each query passes its room type (``room_category``) as the search's room context;
    :data:`ROOM_LEVEL_TASKS` run without an automatic lock. ``where`` keeps a subset of the
    queries (:func:`select_queries`).

    Raises:
        FileNotFoundError: a queries/qrels file or a query image is missing.
    """
    queries, qrels = select_queries(queries_path, qrels_path, tasks=tasks, limit=limit, where=where)
    settings = engine.settings
    search = (funnel or engine).search
    images = QueryImages(settings.max_image_bytes, settings.max_image_pixels)
    runs: dict[str, list[str]] = {}
    locks: dict[str, str | None] = {}
    critic: dict[str, dict[str, str]] = {}
    by_task: dict[str, list[str]] = defaultdict(list)
    with Progress(disable=not progress, transient=True) as bar:
        task_id = bar.add_task(f"eval ({mode})", total=len(queries))
        for q in queries:
            response = search(eval_query(q, images(q), mode=mode))
            runs[q.id] = [item.id for item in response.items]
            locks[q.id] = response.lock.key if response.lock.applied else None
            critic[q.id] = {"status": response.critic.status, "detail": response.critic.detail}
            by_task[q.task].append(q.id)
            bar.advance(task_id)
    report: dict[str, Any] = {"mode": mode, "tasks": {}, "per_query": {}, "locks": locks, "critic": critic}
    for task, ids in sorted(by_task.items()):
        means, per_query = score_queries({i: runs[i] for i in ids}, qrels)
        report["tasks"][task] = {"queries": len(per_query), **{k: round(v, 4) for k, v in means.items()}}
        report["per_query"].update({qid: {k: round(v, 4) for k, v in m.items()} for qid, m in per_query.items()})
    return report


def format_table(report: dict[str, Any], metrics: Sequence[str] = tuple(METRICS), title: str | None = None) -> Table:
    """The per-task table of ``metrics`` of a :func:`run_eval` report (or any report with
    ``tasks``: task -> {"queries", metric...}); the title names the mode unless given."""
    table = Table(title=title or f"mode: {report['mode']}")
    table.add_column("task")
    table.add_column("queries", justify="right")
    for name in metrics:
        table.add_column(name, justify="right")
    for task, row in report["tasks"].items():
        table.add_row(task, str(row["queries"]), *(f"{row[name]:.4f}" for name in metrics))
    return table

