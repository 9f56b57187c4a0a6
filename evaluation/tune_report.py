"""What ``mars tune`` prints: rich tables (:func:`format_tables`) and a Markdown summary for the
README (:func:`markdown_summary`) of a :func:`evaluation.tune.tune` report.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rich.table import Table
from rich.text import Text

from evaluation.fusion_grid import METRIC_NAMES


def _weights_text(weights: Mapping[str, float]) -> str:
    """``"name=w name=w"`` (``%g``), or ``"—"`` for no weights."""
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


__all__ = ["format_tables", "markdown_summary"]
