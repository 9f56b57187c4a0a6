"""``python -m evaluation.room_cv``: the pieces MARS fits on judged rooms, evaluated on rooms
they were not fitted on (mode ``hybrid``; the learned critic has its own cross-validation in
``mars train critic``).

The learned whitening stage (``mars train whitening --queries --qrels``) and the staging
prior (``mars train prior``) learn from the judged rooms of the dev split. ``mars eval`` on
those same rooms is then in-sample. This benchmark splits the rooms into ``folds`` groups
(:func:`training.room_folds.out_of_fold`); for each group it refits both on the other groups'
judged rooms and evaluates the group's room queries, so that every room query is scored by
models that never saw its room (a room they were never fitted on runs with them as they
are). The PCA stage is unsupervised (room photos, no judgments) and stays as installed. The
files in place before the run are restored afterwards.

Needs the stores (stop ``mars serve`` first) and at least one of the two installed.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from evaluation.beir import BenchmarkQuery, load_qrels, load_queries
from evaluation.runner import format_table, run_eval
from query.funnel import Funnel
from training.room_folds import learned_from_rooms, out_of_fold

#: Metrics reported per task.
REPORTED = ("nDCG@10", "Success@10")


def room_cv(engine: Any, queries_path: Path, qrels_path: Path, *, folds: int = 2,
            progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Cross-validate the learned whitening stage and the staging prior by room (module doc).

    Args:
        engine: a :class:`mars.engine.Engine` over an ingested index; what it has installed
            that was fitted on judged rooms is refitted per fold
            (:func:`training.room_folds.out_of_fold`).
        queries_path, qrels_path: BEIR-style queries and qrels; only queries with a ``room_id``
            are evaluated.
        folds: room groups (>= 2).
        progress: called with a line before each fold is refitted.

    Returns:
        ``{"folds", "tasks": {task: {"queries": n, metric: mean}}, "per_query": {id: metrics}}``.

    Raises:
        ValueError: ``folds`` < 2, or a fold leaves no judged room to fit on.
        RuntimeError: nothing fitted on judged rooms is installed (the folds would all score
            the same models), or a fold gives fewer than 2 pairs.
        FileNotFoundError: a file is missing.
    """
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    if not learned_from_rooms(engine):
        raise RuntimeError("nothing fitted on judged rooms is installed: run `mars train whitening --queries --qrels` "
                           "and/or `mars train prior` first")
    queries, qrels = load_queries(queries_path), load_qrels(qrels_path)

    def evaluate(funnel: Funnel, group: Sequence[BenchmarkQuery]) -> list[tuple[str, dict[str, float]]]:
        ids = {q.id for q in group}
        report = run_eval(engine, queries_path, qrels_path, mode="hybrid", where=lambda q: q.id in ids, progress=False,
                          funnel=funnel)
        return list(report["per_query"].items())

    per_query = dict(out_of_fold(engine, [q for q in queries if q.room_id], qrels, evaluate, folds=folds, progress=progress))
    task_of = {q.id: q.task for q in queries}
    by_task: dict[str, list[dict[str, float]]] = defaultdict(list)
    for qid, metrics in per_query.items():
        by_task[task_of[qid]].append(metrics)
    return {
        "folds": folds,
        "tasks": {task: {"queries": len(rows), **{m: round(float(np.mean([r[m] for r in rows])), 4) for m in rows[0]}}
                  for task, rows in sorted(by_task.items())},
        "per_query": per_query,
    }


def main(argv: list[str] | None = None) -> None:
    """Command line: print the cross-validated metrics per room task; with ``--check FILE``
    compare them with an expected-results file of kind ``room_cv`` (:mod:`evaluation.expected`)
    and exit 1 when a figure drifts, 2 when the file is unusable; ``--update`` records them."""
    import time

    from evaluation.expected import ExpectedFileError, data_folder, finish_check, load_expected
    from mars.engine import Engine
    from mars.settings import get_settings

    parser = argparse.ArgumentParser(prog="python -m evaluation.room_cv", description=__doc__.split("\n\n")[0])
    parser.add_argument("--queries", type=Path, help="BEIR-style queries.jsonl (room queries carry room_id); "
                        "required unless --check.")
    parser.add_argument("--qrels", type=Path, help="Relevance judgments (TSV); required unless --check.")
    parser.add_argument("--folds", type=int, default=None, help="Room groups (default 2; --check: the file's).")
    parser.add_argument("--check", type=Path, metavar="FILE", help="Expected-results file of kind room_cv "
                        "(evaluation/expected/*.yaml): run what it describes, exit 1 when a figure is off by more "
                        "than its tolerance.")
    parser.add_argument("--update", action="store_true", help="With --check: rewrite the file's figures from this run.")
    parser.add_argument("--data", type=Path, help="With --check: the folder the file's queries and qrels are relative "
                        "to (default $MARS_IKEA_DIR, else ../shared/data/ikea).")
    args = parser.parse_args(argv)
    console, err = Console(), Console(stderr=True)
    expected = None
    if args.check is not None:
        if args.queries or args.qrels or args.folds:
            parser.error("--check takes the queries, qrels and folds from its file")
        try:
            expected = load_expected(args.check)
        except ExpectedFileError as exc:
            err.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
            raise SystemExit(2) from exc
        if expected.kind != "room_cv":
            err.print(f"[red]error:[/red] {args.check}: kind {expected.kind!r}; this command checks kind room_cv "
                      f"(`mars eval --check {args.check}` runs it)", soft_wrap=True, highlight=False)
            raise SystemExit(2)
        queries, qrels = expected.paths(data_folder(args.data))
        folds = expected.folds or 2
    else:
        if args.update or args.data:
            parser.error("--update and --data need --check FILE")
        if args.queries is None or args.qrels is None:
            parser.error("--queries and --qrels are required (or --check FILE)")
        queries, qrels, folds = args.queries, args.qrels, args.folds or 2
    started = time.perf_counter()
    try:
        with Engine(get_settings()) as engine:
            report = room_cv(engine, queries, qrels, folds=folds,
                             progress=lambda line: console.print(line, style="dim"))
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        err.print(f"[red]error:[/red] {exc}", soft_wrap=True, highlight=False)
        raise SystemExit(2) from exc
    if expected is not None:
        raise SystemExit(finish_check(expected, report, seconds=time.perf_counter() - started, update=args.update,
                                      out=console, err=err))
    console.print(format_table(report, REPORTED, f"hybrid, {folds}-fold by room: whitening and prior fitted on the "
                                                 "other folds' rooms"))


if __name__ == "__main__":
    main()
