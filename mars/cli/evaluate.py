"""``mars eval``, ``mars lock-accuracy`` and ``mars tune``: measure the search on BEIR-style
judged queries, and tune the fusion constants on them (:mod:`evaluation.runner`,
:mod:`evaluation.ablation`, :mod:`evaluation.lock_accuracy`, :mod:`evaluation.tune`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from mars.cli.common import ModeOpt, catalog_session, console, err, fail, open_engine
from mars.cli.progress import CountedSearches, meter
from mars.settings import get_settings

DEFAULT_IKEA = Path("../shared/data/ikea")
"""``mars tune --ikea`` default: the benchmark folder beside a checkout (queries.jsonl, qrels/dev.tsv)."""

app = typer.Typer()


@app.command("eval")
def eval_(
    ctx: typer.Context,
    queries: Annotated[Optional[Path], typer.Option(
        "--queries", help="BEIR-style queries.jsonl (image paths relative to it); required unless --check.")] = None,
    qrels: Annotated[Optional[Path], typer.Option(
        "--qrels", help="qrels TSV: query-id, corpus-id, score; required unless --check.")] = None,
    mode: ModeOpt = "hybrid",
    task: Annotated[Optional[list[str]], typer.Option("--task", help="Only these tasks (repeatable).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", help="At most this many queries per task.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics and per-query scores as JSON.")] = False,
    ablation: Annotated[bool, typer.Option(
        "--ablation", help="One table per task: BM25 only, image vectors alone, text vectors alone, aligned image "
        "vectors alone (text -> image, after `mars train align`), hybrid, hybrid + critic and the seed-style baseline "
        "(nDCG@10 / Recall@10 / Success@10); --mode is ignored.")] = False,
    out_dir: Annotated[Optional[Path], typer.Option(
        "--out-dir", help="With --ablation: write ablation.md and ablation.png (grouped bar chart) here.")] = None,
    check: Annotated[Optional[Path], typer.Option(
        "--check", help="Run what this expected-results file describes (evaluation/expected/*.yaml: queries, mode, "
        "tasks, tolerance) and compare each task's figures with it: exit 1 when one is off by more than the "
        "tolerance, 2 when the file is unusable.")] = None,
    update: Annotated[bool, typer.Option(
        "--update", help="With --check: rewrite the file's figures (and date, commit, seconds) from this run.")
    ] = False,
    data: Annotated[Optional[Path], typer.Option(
        "--data", help="With --check: the folder the file's queries and qrels are relative to "
        "(default $MARS_IKEA_DIR, else ../shared/data/ikea).")] = None,
) -> None:
    """Evaluate on BEIR-style queries + qrels: nDCG@10, Recall@10, Recall@50, MRR@10, Success@10 per task;
    or, with --check FILE, reproduce the figures an expected-results file pins."""
    from evaluation.ablation import format_ablation, run_ablation, write_ablation
    from evaluation.runner import format_table, run_eval, select_queries

    if check is not None:
        _reject_with_check(ctx, queries=queries, qrels=qrels, task=task, limit=limit, ablation=ablation,
                           out_dir=out_dir)
        raise typer.Exit(_check(check, update=update, data=data, as_json=as_json))
    for flag, given in (("--update", update), ("--data", data is not None)):
        if given:
            raise typer.BadParameter(f"{flag} needs --check FILE", param_hint=flag)
    for flag, given in (("--queries", queries), ("--qrels", qrels)):
        if given is None:
            raise typer.BadParameter("required (or --check FILE)", param_hint=flag)
    assert queries is not None and qrels is not None
    if out_dir is not None and not ablation:
        raise typer.BadParameter("--out-dir needs --ablation", param_hint="--out-dir")
    engine = open_engine()
    try:
        if ablation:  # no per-query hook: the library's bar on a terminal, a first and a last line elsewhere
            with meter("eval --ablation", unit="queries", quiet=as_json or err.is_terminal):
                report = run_ablation(engine, queries, qrels, tasks=task, limit=limit,
                                      progress=not as_json and err.is_terminal)
        else:
            chosen, _ = select_queries(queries, qrels, tasks=task, limit=limit)
            with meter(f"eval ({mode})", len(chosen), unit="queries", quiet=as_json) as progress:
                report = run_eval(CountedSearches(engine, progress.advance), queries, qrels, mode=mode, tasks=task,
                                  limit=limit, progress=False)
    except FileNotFoundError as exc:  # the queries, the qrels or a query's photo
        raise fail(exc) from exc
    finally:
        engine.close()
    if as_json:
        console.print_json(json.dumps(report))
    else:
        console.print(format_ablation(report) if ablation else format_table(report))
    if ablation and out_dir is not None:
        md, png = write_ablation(report, out_dir)
        (err if as_json else console).print(f"wrote {md} and {png}")


def _reject_with_check(ctx: typer.Context, **given: object) -> None:
    """A usage error for an option that --check takes from its file (or that does not apply to it)."""
    source = ctx.get_parameter_source("mode")  # an enum of typer's own click: compared by name
    if source is not None and source.name != "DEFAULT":
        raise typer.BadParameter("--check takes the mode from its file", param_hint="--mode")
    for name, value in given.items():
        if value is not None and value is not False and not (isinstance(value, (list, tuple)) and not value):
            flag = "--" + name.replace("_", "-")
            raise typer.BadParameter("--check takes its queries, qrels, tasks and limit from its file", param_hint=flag)


def _check(path: Path, *, update: bool, data: Optional[Path], as_json: bool) -> int:
    """``mars eval --check``: run what the expected-results file ``path`` describes (kind
    ``eval`` through :func:`evaluation.runner.run_eval`, kind ``room_cv`` through
    :func:`evaluation.room_cv.room_cv`) and compare, or record with ``update``.

    Returns:
        The exit status: 0 within the tolerance (or updated), 1 a figure drifted.

    Raises:
        typer.Exit: status 2 for an unusable file, a missing queries/qrels file or photo, or a
            home the run cannot use (room_cv with nothing fitted on judged rooms).
    """
    import time

    from evaluation.expected import (
        ExpectedFileError, check_json, data_folder, finish_check, load_expected, updated_text,
    )
    from evaluation.runner import run_eval, select_queries

    try:
        expected = load_expected(path)
    except ExpectedFileError as exc:
        raise fail(exc) from exc
    queries, qrels = expected.paths(data_folder(data))
    for what in (queries, qrels):
        if not what.is_file():
            raise fail(f"{path}: {what} not found (the file's paths are relative to --data, $MARS_IKEA_DIR or "
                       "../shared/data/ikea)")
    engine = open_engine()
    started = time.perf_counter()
    try:
        if expected.kind == "room_cv":
            from evaluation.room_cv import room_cv

            with meter(f"room_cv ({expected.folds} folds)", quiet=as_json):
                report = room_cv(engine, queries, qrels, folds=expected.folds or 2,
                                 progress=None if as_json else (lambda line: err.print(line, style="dim")))
        else:
            chosen, _ = select_queries(queries, qrels, tasks=expected.tasks, limit=expected.limit,
                                       where=expected.where())
            with meter(f"eval ({expected.mode})", len(chosen), unit="queries", quiet=as_json) as progress:
                report = run_eval(CountedSearches(engine, progress.advance), queries, qrels, mode=expected.mode,
                                  tasks=expected.tasks, limit=expected.limit, progress=False, where=expected.where())
    except (FileNotFoundError, ValueError, RuntimeError) as exc:  # a photo; room_cv's folds or untrained home
        raise fail(exc) from exc
    finally:
        engine.close()
    seconds = time.perf_counter() - started
    if not report["tasks"]:
        raise fail(f"{path}: no judged query to evaluate (check its queries, qrels, tasks and rooms)")
    if as_json:
        result = check_json(expected, report)
        if update:
            expected.path.write_text(updated_text(expected, report, seconds=seconds), encoding="utf-8")
            result["updated"] = True
        console.print_json(json.dumps(result))
        return 0 if update or result["passed"] else 1
    return finish_check(expected, report, seconds=seconds, update=update, out=console, err=err)


@app.command("lock-accuracy")
def lock_accuracy_(
    queries: Annotated[Path, typer.Option("--queries", help="BEIR-style queries.jsonl with room-class / room-type queries.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report with every miss as JSON.")] = False,
) -> None:
    """Share of room-class and room-type queries whose category lock is exactly the class or
    type they ask for (the last `::` part of the query id), with the misses."""
    from catalog.locking import Taxonomy
    from evaluation.beir import load_queries
    from evaluation.lock_accuracy import lock_accuracy

    try:
        asked = load_queries(queries)
    except (FileNotFoundError, ValueError) as exc:
        raise fail(exc) from exc
    with catalog_session() as session:
        taxonomy = Taxonomy.load(session)
    report = lock_accuracy(taxonomy, asked)
    if as_json:
        console.print_json(json.dumps(report))
        return
    table = Table(title="category-lock accuracy")
    for col in ("task", "queries", "exact", "accuracy"):
        table.add_column(col, justify="left" if col == "task" else "right")
    for task, row in report.items():
        table.add_row(task, str(row["queries"]), str(row["exact"]), f"{row['accuracy']:.4f}")
    console.print(table)
    for task, row in report.items():
        for miss in row["misses"][:50]:
            console.print(f"[yellow]miss[/yellow] {task}: {miss['text']!r} asks {miss['asked']!r}, locked {miss['locked']!r} ({miss['reason']})")


def _floats(text: str, what: str) -> list[float]:
    """The comma-separated numbers of option ``what``; a usage error when there are none or one is not a number."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise typer.BadParameter(f"comma-separated numbers expected, got {text!r}", param_hint=what) from exc
    if not values:
        raise typer.BadParameter("at least one value", param_hint=what)
    return values


@app.command("tune")
def tune_(
    ikea: Annotated[Path, typer.Option("--ikea", help="Benchmark folder with queries.jsonl and qrels/dev.tsv.")] = DEFAULT_IKEA,
    queries: Annotated[Optional[Path], typer.Option("--queries", help="queries.jsonl; default <ikea>/queries.jsonl.")] = None,
    qrels: Annotated[Optional[Path], typer.Option("--qrels", help="qrels TSV; default <ikea>/qrels/dev.tsv.")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", "--tasks", help="Only these tasks (repeatable).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="At most this many queries per task.")] = None,
    k_grid: Annotated[Optional[str], typer.Option(
        "--k-grid", help="RRF constants k tried, comma-separated (default 10,20,40,60,100: evaluation.tune.K_GRID).")] = None,
    weight_grid: Annotated[Optional[str], typer.Option(
        "--weight-grid", help="Weights tried for each list but the shape's anchor (fixed at 1.0), comma-separated "
        "(default 0,0.1,0.25,0.5,1,2: evaluation.tune.WEIGHT_GRID).")] = None,
    folds: Annotated[int, typer.Option("--folds", min=0, help="Cross-validation folds by room (0 skips it).")] = 2,
    write: Annotated[bool, typer.Option(
        "--write", help="Write MARS_RRF_K, MARS_WEIGHTS_PHOTO and MARS_WEIGHTS_TEXT into --env-file (other lines kept). "
        "Without it nothing is written.")] = False,
    env_file: Annotated[Path, typer.Option(
        "--env-file", help="Dotenv file --write updates; the settings read ./.env (environment variables override it).")] = Path(".env"),
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the full report as JSON to this file.")] = None,
    save_lists_to: Annotated[Optional[Path], typer.Option(
        "--save-lists", help="Also write the retrieved lists (JSON lines) here, for --from-lists.")] = None,
    from_lists: Annotated[Optional[Path], typer.Option(
        "--from-lists", help="Tune on lists saved by --save-lists instead of retrieving (no stores opened; "
        "they must come from the same index and settings).")] = None,
) -> None:
    """Tune fusion: retrieve each dev query once (mode hybrid, as `mars eval` asks it), then score a
    grid of RRF k × per-list weights offline (nDCG@10 etc.); pick per query shape (photo / text-only)
    the weights with the best macro-mean nDCG@10 over that shape's tasks, k jointly, and report a
    2-fold cross-validation by room. Weighted RRF: Cormack, Clarke & Büttcher, SIGIR 2009."""
    from evaluation.runner import limit_per_task, select_queries
    from evaluation.tune import (
        K_GRID, WEIGHT_GRID, collect_lists, format_tables, load_lists, markdown_summary, save_lists, settings_env, tune,
        update_dotenv,
    )

    ks = _floats(k_grid, "--k-grid") if k_grid is not None else list(K_GRID)
    ws = _floats(weight_grid, "--weight-grid") if weight_grid is not None else list(WEIGHT_GRID)
    if any(k <= 0 for k in ks):
        raise typer.BadParameter("k must be > 0", param_hint="--k-grid")
    if any(w < 0 for w in ws):
        raise typer.BadParameter("weights must be ≥ 0", param_hint="--weight-grid")
    settings = get_settings()
    if from_lists is not None:
        try:
            runs = load_lists(from_lists)
        except (OSError, ValueError, TypeError) as exc:
            raise fail(exc) from exc
        runs = limit_per_task([r for r in runs if not task or r.task in task], limit)
    else:
        try:
            chosen, judged = select_queries(queries or ikea / "queries.jsonl", qrels or ikea / "qrels" / "dev.tsv",
                                            tasks=task, limit=limit)
        except (OSError, ValueError) as exc:
            raise fail(exc) from exc
        engine = open_engine(settings)
        try:  # the library draws its own bar on a terminal; elsewhere a first and a last line
            with meter("tune: retrieving lists", unit="queries", quiet=err.is_terminal):
                runs = collect_lists(engine, chosen, judged, progress=err.is_terminal, console=err)
        finally:
            engine.close()
        if save_lists_to is not None:
            save_lists(save_lists_to, runs)
            err.print(f"lists written to {save_lists_to}")
    if not runs:
        raise fail(ValueError("no judged queries to tune on (check --queries, --qrels, --task)"))

    baseline = {"photo": dict(settings.weights_photo), "text": dict(settings.weights_text)}
    with meter("tune: scoring the grid", unit="queries", quiet=err.is_terminal):
        report = tune(runs, baseline_k=settings.rrf_k, baseline_weights=baseline, k_grid=ks, grid=ws, folds=folds,
                      progress=err.is_terminal, console=err)
    wide = console if console.is_terminal else Console(width=200)  # piped or captured: keep table rows whole
    for table in format_tables(report):
        wide.print(table)
    values = settings_env(report["chosen"]["settings"])
    console.print("chosen setting (baseline: the settings in effect, "
                  f"k {report['baseline']['rrf_k']}, photo {report['baseline']['weights']['photo']}, "
                  f"text {report['baseline']['weights']['text']}):", highlight=False)
    for key, value in values.items():
        console.print(f"  {key}={value}", highlight=False, soft_wrap=True)
    report["env"] = values
    report["markdown"] = markdown_summary(report)
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        console.print(f"report written to {json_out}")
    if write:
        update_dotenv(env_file, values)
        console.print(f"wrote {', '.join(values)} to {env_file} (environment variables still override it)")
    else:
        console.print("nothing written (use --write to store it in --env-file, default ./.env)")
