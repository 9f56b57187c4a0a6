"""``mars eval --ablation``: what each part of the funnel is worth, per task, in one table.

Every selected benchmark query is asked once per configuration, on the same engine, with the
runner's query conventions (:func:`evaluation.runner.eval_query`: the room type as room
context, no automatic lock for whole-room tasks); each cell is the mean nDCG@10 and
Success@10 (:mod:`evaluation.metrics`) of the task's queries. Configurations:

* **BM25 only** — ``--mode bm25``: tantivy BM25 within the category lock.
* **image vectors alone** — ``--mode vector`` with the other vector lists' RRF weights set to
  0: the room photo's grid regions against the product photos, each product scored by its
  best region, within the lock.
* **text vectors alone** — the same for the MiniLM query-text vector against the
  product-text vectors, within the lock.
* **aligned image vectors alone** — the same for the query text through the alignment heads
  against the products' aligned image vectors (text → image, ``mars train align``), within
  the lock; "n/a" until the heads are trained.
* **hybrid** — ``--mode hybrid``: the three lists fused by weighted Reciprocal Rank Fusion,
  ``score = Σ w_i / (k + rank_i)`` (Cormack, Clarke & Büttcher, "Reciprocal Rank Fusion
  outperforms Condorcet and individual rank learning methods", SIGIR 2009), with the
  configured weights.
* **hybrid + critic** — ``--mode full``: the critic the settings configure re-orders the fused
  top N; when none is configured the row says so instead of repeating the hybrid numbers.
* **seed-style baseline** — :class:`evaluation.baseline.NaiveIndex` over the engine's own
  catalog and stored vectors: rank_bm25 + brute-force cosine + unweighted RRF, no lock. It gets
  the same inputs as the funnel's lists (the text they search with, the same query vectors),
  so the difference is the retrieval design, not the query.

A single-list configuration is not applicable to a task whose queries lack its input (BM25
and text vectors need query text, image vectors a room photo): its cell says so. In the IKEA
benchmark room-scene queries have only a photo and room-title / text-to-image queries only
text; the hybrid and baseline rows of room-scene still search the room type as text (the
room context).

For the single-list configurations the results are kept to those the isolated list returned
(``provenance``), so a zero-weighted list never fills the tail.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress
from rich.table import Table

from evaluation.baseline import NaiveIndex
from evaluation.beir import BenchmarkQuery, QueryImages
from evaluation.metrics import score_queries
from evaluation.runner import eval_query, select_queries
from query.funnel import Funnel, search_text
from query.retrievers import RETRIEVERS
from training.room_folds import out_of_fold

#: The metrics of the ablation table, in cell order.
ABLATION_METRICS: tuple[str, ...] = ("nDCG@10", "Recall@10", "Success@10")

#: The funnel's vector lists, from the retriever registry (an isolated one runs with the others weighted 0).
VECTOR_LISTS: tuple[str, ...] = tuple(name for name, cls in RETRIEVERS.items() if cls.kind == "vector")


def _alone(name: str) -> dict[str, float]:
    """RRF weights that leave only the vector list ``name`` scoring."""
    return {other: 0.0 for other in VECTOR_LISTS if other != name}

#: Results asked per search: the metrics read the top 10.
ABLATION_DEPTH = 10

#: The cell text of the critic row when no critic is configured.
NO_CRITIC = "no critic configured"


@dataclass(frozen=True)
class Config:
    """One row of the ablation: ``mode`` None is the seed-style baseline; ``weights``
    overrides RRF weights; ``only`` keeps the results of that one list; ``needs`` is the query
    input ("text" or "image") without which the row does not apply."""

    key: str
    label: str
    mode: str | None
    weights: Mapping[str, float] = field(default_factory=dict)
    only: str | None = None
    needs: str | None = None


CONFIGS: tuple[Config, ...] = (
    Config("bm25", "BM25 only", "bm25", needs="text"),
    *(Config(name, f"{RETRIEVERS[name].label} list alone ({name})", "vector", _alone(name), only=name,
             needs=RETRIEVERS[name].needs) for name in VECTOR_LISTS),
    Config("hybrid", "hybrid (weighted RRF)", "hybrid"),
    Config("full", "hybrid + critic (mode full)", "full"),
    Config("baseline", "seed-style baseline", None),
)


def _missing_input(config: Config, q: BenchmarkQuery) -> str | None:
    """Why ``config`` cannot run ``q`` (None when it can)."""
    if config.needs == "text" and not (q.text or "").strip():
        return "n/a (no query text)"
    if config.needs == "image" and q.image is None:
        return "n/a (no room photo)"
    return None


def _missing_list(config: Config, engine: Any) -> str | None:
    """Why ``config`` has no list to isolate on ``engine`` (None when it has)."""
    store = engine.search_store()
    if config.only == "aligned" and (store is None or "aligned" not in store.dims or engine.artifacts.aligned() is None):
        return "n/a (no aligned vector: run mars train align)"
    return None


def run_ablation(
    engine: Any,
    queries_path: Path,
    qrels_path: Path,
    *,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    progress: bool = True,
    baseline: NaiveIndex | None = None,
) -> dict[str, Any]:
    """Run every :data:`CONFIGS` row over the selected queries of a :class:`mars.engine.Engine`,
    out of fold by room when pieces fitted on judged rooms are installed
    (:func:`training.room_folds.out_of_fold`); the critic is used as installed.

    Args:
        engine: the engine (its ``search``, ``settings``, ``funnel`` query-vector caches and,
            unless ``baseline`` is given, its catalog and vector store for the baseline).
        queries_path, qrels_path: BEIR-style queries.jsonl and qrels TSV.
        tasks: only these tasks (all when None); limit: at most this many queries per task.
        baseline: a prebuilt baseline index (default: :meth:`NaiveIndex.from_engine`).

    Returns:
        A JSON-ready dict: ``configs`` ([{key, label}]), ``critic`` (backend, status counts,
        detail), ``limit``, ``seconds`` and ``tasks``: task -> {"queries": n, "rows": config
        key -> {"queries": n, "nDCG@10": x, "Success@10": y} or {"note": why no numbers}}.

    Raises:
        FileNotFoundError: a queries/qrels file or a query image is missing.
    """
    t0 = time.perf_counter()
    queries, qrels = select_queries(queries_path, qrels_path, tasks=tasks, limit=limit)
    images = QueryImages(engine.settings.max_image_bytes, engine.settings.max_image_pixels)
    naive = baseline if baseline is not None else NaiveIndex.from_engine(engine)
    runs: dict[str, dict[str, list[str]]] = defaultdict(dict)  # config key -> query id -> ranked ids
    notes: dict[tuple[str, str], str] = {}  # (task, config key) -> why a query could not run
    by_task: dict[str, list[str]] = defaultdict(list)
    critic_status: Counter[str] = Counter()
    critic_backend, critic_detail, critic_ready = "none", "", True
    with Progress(disable=not progress, transient=True) as bar:
        task_id = bar.add_task("ablation", total=len(queries))
        lacking = {config.key: _missing_list(config, engine) for config in CONFIGS}  # the same for every query

        def run_group(funnel: Funnel, group: Sequence[BenchmarkQuery]) -> list[None]:
            nonlocal critic_backend, critic_detail, critic_ready
            for q in group:
                by_task[q.task].append(q.id)
                image = images(q)
                for config in CONFIGS:
                    missing = _missing_input(config, q) or lacking[config.key]
                    if missing is not None:
                        notes[(q.task, config.key)] = missing
                    elif config.mode is None:
                        runs[config.key][q.id] = _baseline_search(funnel, naive, eval_query(q, image))
                    elif config.mode == "full" and not critic_ready:
                        continue
                    else:
                        search = eval_query(q, image, mode=config.mode, top_k=ABLATION_DEPTH, weights=config.weights)
                        response = funnel.search(search)
                        if config.mode == "full":
                            critic_backend, critic_detail = response.critic.backend, response.critic.detail
                            critic_status[response.critic.status] += 1
                            if response.critic.status == "not configured":
                                critic_ready = False
                                continue
                        items = response.items
                        if config.only is not None:
                            items = [i for i in items if config.only in i.provenance.retrievers]
                        runs[config.key][q.id] = [i.id for i in items]
                bar.advance(task_id)
            return []

        out_of_fold(engine, queries, qrels, run_group)

    report: dict[str, Any] = {
        "configs": [{"key": c.key, "label": c.label} for c in CONFIGS],
        "critic": {"backend": critic_backend, "configured": critic_ready, "statuses": dict(critic_status),
                   "detail": critic_detail},
        "limit": limit,
        "tasks": {},
    }
    for task, ids in sorted(by_task.items()):
        rows: dict[str, dict[str, Any]] = {}
        for config in CONFIGS:
            run = {i: runs[config.key][i] for i in ids if i in runs[config.key]}
            if config.key == "full" and not critic_ready:
                rows[config.key] = {"note": NO_CRITIC}
            elif not run:
                rows[config.key] = {"note": notes.get((task, config.key), "n/a")}
            else:
                means, per_query = score_queries(run, qrels)
                rows[config.key] = {"queries": len(per_query), **{m: round(means[m], 4) for m in ABLATION_METRICS}}
        report["tasks"][task] = {"queries": len(ids), "rows": rows}
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def _baseline_search(funnel: Funnel, naive: NaiveIndex, query: Any) -> list[str]:
    """The baseline's top :data:`ABLATION_DEPTH` for a runner query: the text the funnel's lists
    search with (query text + room context) and the funnel's cached query vectors."""
    text = search_text(query)
    qv = funnel.query_vectors
    text_vec = qv.text_vector(text)[0] if text else None
    regions = qv.region_vectors(query.image) if query.image is not None else None
    return naive.search(text, text_vec, regions)[:ABLATION_DEPTH]


def _cells(report: Mapping[str, Any]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Column headers and (row label, cells) of the ablation table; a cell is
    ``"nDCG@10 / Recall@10 / Success@10"`` or the note that replaces the numbers."""
    tasks = report["tasks"]
    headers = ["configuration", *(f"{task} ({row['queries']})" for task, row in tasks.items())]
    rows = []
    for config in report["configs"]:
        cells = []
        for task in tasks.values():
            cell = task["rows"][config["key"]]
            cells.append(cell["note"] if "note" in cell else " / ".join(f"{cell[m]:.4f}" for m in ABLATION_METRICS))
        rows.append((config["label"], cells))
    return headers, rows


def format_ablation(report: Mapping[str, Any]) -> Table:
    """The ablation table for the terminal."""
    headers, rows = _cells(report)
    table = Table(title="ablation: " + " / ".join(ABLATION_METRICS) + " per task (queries)")
    table.add_column(headers[0])
    for header in headers[1:]:
        table.add_column(header, justify="right")
    for label, cells in rows:
        table.add_row(label, *cells)
    return table


def markdown_ablation(report: Mapping[str, Any]) -> str:
    """The ablation table as Markdown, with a line on what the cells are and which critic ran."""
    headers, rows = _cells(report)
    critic = report["critic"]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|---|" + "---:|" * (len(headers) - 1),
        *("| " + " | ".join([label, *cells]) + " |" for label, cells in rows),
        "",
        f"Cells: {' / '.join(ABLATION_METRICS)}; column headers give the queries per task"
        + (f" (at most {report['limit']} per task)" if report.get("limit") else "") + ". "
        + (f"Critic: {critic['backend']} ({critic['detail']})." if critic["configured"] else f"Critic: {NO_CRITIC} ({critic['detail']}).")
        + f" Run time {report['seconds']} s.",
    ]
    return "\n".join(lines) + "\n"


def plot_ablation(report: Mapping[str, Any], path: Path) -> None:
    """A grouped bar chart (one panel per metric, one group per task, one bar per
    configuration) as PNG; a configuration without numbers for a task is marked "n/a", and
    the critic row's legend entry says when no critic is configured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(report["tasks"])
    configs = report["configs"]
    width = 0.8 / len(configs)
    fig, axes = plt.subplots(len(ABLATION_METRICS), 1, figsize=(max(8.0, 2.2 * len(tasks)), 4.2 * len(ABLATION_METRICS)),
                             squeeze=False)
    colours = plt.get_cmap("tab10").colors
    for ax, metric in zip(axes[:, 0], ABLATION_METRICS):
        for j, config in enumerate(configs):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(tasks))]
            cells = [report["tasks"][t]["rows"][config["key"]] for t in tasks]
            label = config["label"] + (f" — {NO_CRITIC}" if config["key"] == "full" and not report["critic"]["configured"] else "")
            values = [cell.get(metric, 0.0) for cell in cells]
            bars = ax.bar(xs, values, width, label=label, color=colours[j % len(colours)])
            for x, bar, cell in zip(xs, bars, cells):
                if "note" in cell:
                    mark = "no critic" if cell["note"] == NO_CRITIC else "n/a"
                    ax.text(x, 0.01, mark, ha="center", va="bottom", fontsize=6, rotation=90, color="grey")
                else:
                    ax.text(x, bar.get_height() + 0.01, f"{cell[metric]:.2f}", ha="center", va="bottom", fontsize=6, rotation=90)
        ax.set_xticks(range(len(tasks)), [f"{t}\n({report['tasks'][t]['queries']} queries)" for t in tasks])
        ax.set_ylim(0, 1.12)
        ax.set_ylabel(metric)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("MARS ablation per task")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, 0.965))
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_ablation(report: Mapping[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write ``ablation.md`` and ``ablation.png`` into ``out_dir`` (created if needed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, png = out_dir / "ablation.md", out_dir / "ablation.png"
    md.write_text(markdown_ablation(report), encoding="utf-8")
    plot_ablation(report, png)
    return md, png
