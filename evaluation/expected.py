"""Expected results as files: the figures a benchmark run must reproduce, and the check.

An expected-results file (``evaluation/expected/NAME.yaml``) pins one run the way pyserini's
reproduction matrix pins its BEIR figures: what to run, each task's metrics and a tolerance.
``mars eval --check FILE`` (and ``python -m evaluation.room_cv --check FILE`` for the out-of-fold
kind) runs what the file describes on the current ``MARS_HOME``, prints expected, measured and
difference per task and metric, and exits 1 when a figure is off by more than the tolerance (2
for a file it cannot use). ``--update`` rewrites the file's figures from the run, so figures are
recorded by a command, never typed; ``python -m evaluation.results_tables`` renders them into
the README's and the docs' tables.

The schema (YAML mapping)::

    name: ikea-dev-hybrid          # the file's stem; the docs' marker is <!-- results:NAME -->
    description: what home the figures are for (free text)
    command: mars eval --queries queries.jsonl --qrels qrels/dev.tsv --mode hybrid  # for the docs
    kind: eval                     # eval: `mars eval`, in-sample; room_cv: python -m evaluation.room_cv
    queries: queries.jsonl         # relative to the data folder (--data, $MARS_IKEA_DIR, ../shared/data/ikea)
    qrels: qrels/dev.tsv
    mode: hybrid                   # eval only: bm25 | vector | hybrid | full (room_cv is hybrid)
    tasks: [room-class]            # optional, eval only: only these tasks
    rooms: [some-room-id]          # optional, eval only: only these rooms' queries
    limit: 50                      # optional, eval only: at most this many queries per task
    folds: 5                       # room_cv only: room groups (>= 2)
    tolerance: 0.005               # absolute, on every metric
    metrics:                       # recorded by --update
      room-class: {queries: 929, nDCG@10: 0.877, Recall@10: 0.9887, MRR@10: 0.8467, Success@10: 0.9903}
    recorded: {date: '2025-12-03', commit: ecf8ddc, seconds: 812}

A task's ``queries`` (how many judged queries it scored) must match exactly; every other figure
within the tolerance. A task measured but not in the file, or in the file but not measured,
fails the check.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from rich.table import Table

from evaluation.metrics import METRICS

if TYPE_CHECKING:
    from evaluation.beir import BenchmarkQuery

REPO = Path(__file__).resolve().parent.parent

#: The folder that holds the committed expected-results files.
EXPECTED_DIR = REPO / "evaluation" / "expected"

#: The data folder when neither ``--data`` nor ``$MARS_IKEA_DIR`` names one (relative to the
#: working directory, as ``mars tune --ikea``'s default).
DEFAULT_DATA = Path("../shared/data/ikea")

#: The figures ``--update`` records when the file names none yet, in this order.
RECORDED = ("nDCG@10", "Recall@10", "MRR@10", "Success@10")

KINDS = ("eval", "room_cv")
MODES = ("bm25", "vector", "hybrid", "full")

#: The mapping keys a file may have.
FIELDS = ("name", "description", "command", "kind", "queries", "qrels", "mode", "tasks", "rooms", "limit", "folds",
          "tolerance", "metrics", "recorded")

HEADER = ("# Expected results: {command_hint}\n"
          "# Figures recorded by `{update}` on the home the description names; never typed by hand\n"
          "# (evaluation/expected.py has the schema).\n")


class ExpectedFileError(ValueError):
    """An expected-results file that cannot be used; the message is one line naming the file and field."""


@dataclass(frozen=True)
class Expected:
    """One expected-results file, validated (module doc for the fields).

    ``metrics`` maps task -> {"queries": count, metric name: value}; it is empty before the
    first ``--update``.
    """

    path: Path
    name: str
    description: str
    command: str
    kind: str
    queries: str
    qrels: str
    mode: str
    tolerance: float
    metrics: dict[str, dict[str, float]]
    tasks: tuple[str, ...] | None = None
    rooms: tuple[str, ...] | None = None
    limit: int | None = None
    folds: int | None = None
    recorded: dict[str, Any] = field(default_factory=dict)

    def paths(self, data: Path) -> tuple[Path, Path]:
        """``(queries, qrels)`` resolved against the data folder ``data`` (absolute paths in the file stay)."""
        return data / self.queries, data / self.qrels

    def where(self) -> Callable[[BenchmarkQuery], bool] | None:
        """The query filter of ``rooms`` (None: every query), for :func:`evaluation.runner.run_eval`."""
        if not self.rooms:
            return None
        rooms = set(self.rooms)
        return lambda q: q.room_id in rooms

    def metric_names(self) -> list[str]:
        """The metrics the file pins (in :data:`evaluation.metrics.METRICS` order), or :data:`RECORDED` when none."""
        named = {m for row in self.metrics.values() for m in row if m != "queries"}
        return [m for m in METRICS if m in named] or list(RECORDED)

    def check_command(self) -> str:
        """The command that checks this file (``--update`` appended records it)."""
        shown = _shown(self.path)
        return (f"python -m evaluation.room_cv --check {shown}" if self.kind == "room_cv"
                else f"mars eval --check {shown}")


def _shown(path: Path) -> str:
    """``path`` relative to the repository when it lies inside it, else as given."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def data_folder(explicit: Path | None = None) -> Path:
    """The folder a file's ``queries`` and ``qrels`` are relative to: ``explicit``, else
    ``$MARS_IKEA_DIR``, else :data:`DEFAULT_DATA`."""
    if explicit is not None:
        return explicit
    env = os.environ.get("MARS_IKEA_DIR")
    return Path(env) if env else DEFAULT_DATA


def _names(raw: Any, where: str) -> tuple[str, ...] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not raw or not all(isinstance(x, str) and x for x in raw):
        raise ExpectedFileError(f"{where}: a non-empty list of names expected, got {raw!r}")
    return tuple(raw)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load_expected(path: Path) -> Expected:
    """Read and validate the expected-results file ``path``.

    Raises:
        ExpectedFileError: the file is missing, is not YAML, or a field is missing, unknown or of
            the wrong type or value; the message names the file and the field.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ExpectedFileError(f"{path}: cannot read it ({exc.strerror or exc})") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ExpectedFileError(f"{path}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from exc
    if not isinstance(raw, dict):
        raise ExpectedFileError(f"{path}: a mapping of fields expected, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - set(FIELDS))
    if unknown:
        raise ExpectedFileError(f"{path}: unknown field {unknown[0]!r} (fields: {', '.join(FIELDS)})")
    for key in ("name", "command", "kind", "queries", "qrels", "tolerance"):
        if raw.get(key) is None:
            raise ExpectedFileError(f"{path}: field {key!r} is missing")
    for key in ("name", "description", "command", "kind", "queries", "qrels", "mode"):
        if key in raw and raw[key] is not None and not isinstance(raw[key], str):
            raise ExpectedFileError(f"{path}: {key}: a string expected, got {raw[key]!r}")
    if raw["name"] != path.stem:
        raise ExpectedFileError(f"{path}: name {raw['name']!r} is not the file's stem {path.stem!r}")
    kind = raw["kind"]
    if kind not in KINDS:
        raise ExpectedFileError(f"{path}: kind {kind!r} is not one of {', '.join(KINDS)}")
    mode = raw.get("mode") or "hybrid"
    if mode not in MODES:
        raise ExpectedFileError(f"{path}: mode {mode!r} is not one of {', '.join(MODES)}")
    tolerance = raw["tolerance"]
    if not _number(tolerance) or tolerance < 0:
        raise ExpectedFileError(f"{path}: tolerance: a number >= 0 expected, got {tolerance!r}")
    for key in ("limit", "folds"):
        if raw.get(key) is not None and (not isinstance(raw[key], int) or isinstance(raw[key], bool) or raw[key] < 1):
            raise ExpectedFileError(f"{path}: {key}: a positive integer expected, got {raw[key]!r}")
    tasks, rooms = _names(raw.get("tasks"), f"{path}: tasks"), _names(raw.get("rooms"), f"{path}: rooms")
    if kind == "room_cv":
        if raw.get("folds") is None or raw["folds"] < 2:
            raise ExpectedFileError(f"{path}: kind room_cv needs folds >= 2, got {raw.get('folds')!r}")
        if mode != "hybrid":
            raise ExpectedFileError(f"{path}: kind room_cv runs mode hybrid only, got mode {mode!r}")
        for key in ("tasks", "rooms", "limit"):
            if raw.get(key) is not None:
                raise ExpectedFileError(f"{path}: {key} is not supported with kind room_cv "
                                        "(it scores every room query)")
    elif raw.get("folds") is not None:
        raise ExpectedFileError(f"{path}: folds is only for kind room_cv")
    recorded = raw.get("recorded") or {}
    if not isinstance(recorded, dict):
        raise ExpectedFileError(f"{path}: recorded: a mapping expected, got {recorded!r}")
    return Expected(path=path, name=raw["name"], description=(raw.get("description") or "").strip(),
                    command=raw["command"].strip(), kind=kind, queries=raw["queries"], qrels=raw["qrels"], mode=mode,
                    tolerance=float(tolerance), metrics=_metrics(raw.get("metrics"), path), tasks=tasks, rooms=rooms,
                    limit=raw.get("limit"), folds=raw.get("folds"), recorded=dict(recorded))


def _metrics(raw: Any, path: Path) -> dict[str, dict[str, float]]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ExpectedFileError(f"{path}: metrics: a mapping of task -> figures expected, got {raw!r}")
    out: dict[str, dict[str, float]] = {}
    for task, row in raw.items():
        if not isinstance(row, dict) or not row:
            raise ExpectedFileError(f"{path}: metrics.{task}: a mapping of metric -> value expected, got {row!r}")
        for name, value in row.items():
            if name == "queries":
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise ExpectedFileError(f"{path}: metrics.{task}.queries: a count expected, got {value!r}")
            elif name not in METRICS:
                raise ExpectedFileError(f"{path}: metrics.{task}: unknown metric {name!r} "
                                        f"(known: queries, {', '.join(METRICS)})")
            elif not _number(value):
                raise ExpectedFileError(f"{path}: metrics.{task}.{name}: a number expected, got {value!r}")
        out[str(task)] = dict(row)
    return out


@dataclass(frozen=True)
class Figure:
    """One pinned figure against the run: ``expected`` or ``measured`` is None when the task is
    missing on that side; ``ok`` when within the tolerance (``queries``: equal)."""

    task: str
    metric: str
    expected: float | None
    measured: float | None
    ok: bool

    @property
    def diff(self) -> float | None:
        """measured - expected, or None when either is missing."""
        if self.expected is None or self.measured is None:
            return None
        return self.measured - self.expected


def compare(expected: Expected, report: Mapping[str, Any]) -> list[Figure]:
    """Every figure of ``expected`` against ``report`` (a :func:`evaluation.runner.run_eval` or
    :func:`evaluation.room_cv.room_cv` report: ``tasks``: task -> {"queries", metric...}), task
    by task in the file's order, then tasks measured but not in the file.

    Returns:
        One :class:`Figure` per task and figure; a task measured but not pinned is one failing
        ``queries`` figure with no expected value.
    """
    measured: Mapping[str, Mapping[str, float]] = report.get("tasks", {})
    figures: list[Figure] = []
    for task, row in expected.metrics.items():
        got = measured.get(task)
        for name, want in row.items():
            value = None if got is None else got.get(name)
            if value is None:
                ok = False
            elif name == "queries":
                ok = int(value) == int(want)
            else:
                ok = abs(float(value) - float(want)) <= expected.tolerance + 1e-9
            figures.append(Figure(task, name, want, value, ok))
    for task in sorted(set(measured) - set(expected.metrics)):
        figures.append(Figure(task, "queries", None, measured[task].get("queries"), False))
    return figures


def _value(value: float | None, metric: str) -> str:
    if value is None:
        return "—"
    return str(int(value)) if metric == "queries" else f"{value:.4f}"


def format_check(expected: Expected, figures: list[Figure]) -> Table:
    """The comparison as a rich table: task, figure, expected, measured, difference and ✓/✗."""
    table = Table(title=f"{expected.name}: expected vs measured (tolerance ±{expected.tolerance:g})")
    for column in ("task", "figure", "expected", "measured", "diff", ""):
        table.add_column(column, justify="left" if column in ("task", "figure") else "right")
    for f in figures:
        diff = "—" if f.diff is None else (f"{int(f.diff):+d}" if f.metric == "queries" else f"{f.diff:+.4f}")
        table.add_row(f.task, f.metric, _value(f.expected, f.metric), _value(f.measured, f.metric), diff,
                      "[green]✓[/green]" if f.ok else "[red]✗[/red]")
    return table


def failure_lines(expected: Expected, figures: list[Figure]) -> list[str]:
    """One plain line per figure off by more than the tolerance (empty when the check passes),
    e.g. ``✗ room-scene nDCG@10: expected 0.4431, measured 0.3431 (-0.1000; tolerance ±0.005)``."""
    lines = []
    for f in figures:
        if f.ok:
            continue
        if f.expected is None:
            lines.append(f"✗ {f.task}: measured ({_value(f.measured, 'queries')} queries) but not in {expected.path}")
        elif f.measured is None:
            lines.append(f"✗ {f.task} {f.metric}: expected {_value(f.expected, f.metric)}, not measured")
        elif f.metric == "queries":
            lines.append(f"✗ {f.task} queries: expected {int(f.expected)}, measured {int(f.measured)}")
        else:
            lines.append(f"✗ {f.task} {f.metric}: expected {f.expected:.4f}, measured {f.measured:.4f} "
                         f"({f.diff:+.4f}; tolerance ±{expected.tolerance:g})")
    return lines


def git_commit(repo: Path = REPO) -> str:
    """The repository's short commit, with ``-dirty`` when tracked files differ from it; "unknown" without git."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], cwd=repo, capture_output=True,
                             text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def updated_text(expected: Expected, report: Mapping[str, Any], *, seconds: float, commit: str | None = None,
                 date: dt.date | None = None) -> str:
    """The file's text with its figures replaced by the run's: every measured task's
    ``queries`` and the metrics the file pins (:meth:`Expected.metric_names`), rounded to 4
    places, and ``recorded`` (date, commit, seconds). Other fields are kept; comments are not.
    """
    names = expected.metric_names()
    metrics = {task: {"queries": int(row["queries"]), **{m: round(float(row[m]), 4) for m in names}}
               for task, row in sorted(report["tasks"].items())}
    fields: dict[str, Any] = {
        "name": expected.name, "description": expected.description or None, "command": expected.command,
        "kind": expected.kind, "queries": expected.queries, "qrels": expected.qrels,
        "mode": expected.mode if expected.kind == "eval" else None,
        "tasks": list(expected.tasks) if expected.tasks else None,
        "rooms": list(expected.rooms) if expected.rooms else None, "limit": expected.limit, "folds": expected.folds,
        "tolerance": expected.tolerance, "metrics": metrics,
        "recorded": {"date": (date or dt.datetime.now(dt.timezone.utc).date()).isoformat(),
                     "commit": commit or git_commit(), "seconds": round(seconds)},
    }
    body = yaml.dump({k: v for k, v in fields.items() if v is not None}, Dumper=_Dumper, sort_keys=False,
                     allow_unicode=True, width=110)
    check = expected.check_command()
    return HEADER.format(command_hint=f"`{check}` fails when one drifts", update=f"{check} --update") + body


class _Dumper(yaml.SafeDumper):
    """Safe YAML with long strings (a description) folded over lines, not quoted."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style=">" if len(text) > 100 and "\n" not in text else None))


def finish_check(expected: Expected, report: Mapping[str, Any], *, seconds: float, update: bool,
                 out: Any, err: Any) -> int:
    """Print the comparison on ``out`` (a rich console), then either rewrite the file's figures
    (``update``) or print each drifted figure on ``err``.

    Returns:
        The exit status: 0 (within the tolerance, or updated), 1 (a figure drifted).
    """
    figures = compare(expected, report)
    out.print(format_check(expected, figures))
    if update:
        expected.path.write_text(updated_text(expected, report, seconds=seconds), encoding="utf-8")
        out.print(f"wrote {len(report['tasks'])} tasks' figures to {expected.path} ({seconds:.0f} s)", highlight=False)
        return 0
    bad = failure_lines(expected, figures)
    for line in bad:
        err.print(line, style="red", highlight=False, soft_wrap=True)
    if bad:
        err.print(f"{len(bad)} of {len(figures)} figures of {expected.path} off (tolerance ±{expected.tolerance:g})",
                  highlight=False, soft_wrap=True)
        return 1
    out.print(f"all {len(figures)} figures of {expected.path} within ±{expected.tolerance:g} ({seconds:.0f} s)",
              highlight=False, soft_wrap=True)
    return 0


def check_json(expected: Expected, report: Mapping[str, Any]) -> dict[str, Any]:
    """The comparison as a JSON-ready dict: ``file``, ``tolerance``, ``passed`` and ``figures``
    (task, metric, expected, measured, diff, ok), plus the run's ``tasks``."""
    figures = compare(expected, report)
    return {"file": str(expected.path), "tolerance": expected.tolerance, "passed": all(f.ok for f in figures),
            "figures": [{"task": f.task, "metric": f.metric, "expected": f.expected, "measured": f.measured,
                         "diff": None if f.diff is None else round(f.diff, 6), "ok": f.ok} for f in figures],
            "tasks": report.get("tasks", {})}
