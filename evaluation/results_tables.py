"""``python -m evaluation.results_tables``: the README's and the docs' result tables, generated
from the expected-results files (:mod:`evaluation.expected`), never typed.

A Markdown file asks for a table with a pair of markers; everything between them is replaced
by the table of ``evaluation/expected/NAME.yaml`` (rows: tasks; columns: queries, nDCG@10,
Recall@10, MRR@10, Success@10; then a caption line with the command, the date and commit the
figures were recorded at, and the command that checks them)::

    <!-- results:ikea-dev-hybrid -->
    (generated)
    <!-- /results:ikea-dev-hybrid -->

Text outside the markers is never touched. ``--check`` writes nothing and exits 1 when a
table is out of date (2 for a marker naming no file, an unclosed marker or an unusable file).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from evaluation.expected import EXPECTED_DIR, REPO, Expected, ExpectedFileError, load_expected

#: The columns of every table, after ``task`` and ``queries``.
COLUMNS = ("nDCG@10", "Recall@10", "MRR@10", "Success@10")

#: A marked block: the opening marker, the generated body, the closing marker of the same name.
BLOCK = re.compile(r"(?P<open><!-- results:(?P<name>[A-Za-z0-9_.-]+) -->)(?P<body>.*?)"
                   r"(?P<close><!-- /results:(?P=name) -->)", re.S)
OPENING = re.compile(r"<!-- results:(?P<name>[A-Za-z0-9_.-]+) -->")


def default_targets(repo: Path = REPO) -> list[Path]:
    """The Markdown files refreshed when none are named: the README and ``docs/*.md``."""
    return [p for p in [repo / "README.md", *sorted((repo / "docs").glob("*.md"))] if p.is_file()]


def _shown(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return path.name


def render_table(expected: Expected) -> str:
    """The Markdown table of ``expected``'s figures with its caption line (no markers, no
    surrounding blank lines). A figure the file does not pin shows as ``—``."""
    lines = ["| task | queries | " + " | ".join(COLUMNS) + " |", "|---|---:|" + "---:|" * len(COLUMNS)]
    for task, row in expected.metrics.items():
        cells = [f"{row[m]:.4f}" if m in row else "—" for m in COLUMNS]
        lines.append(f"| {task} | {row.get('queries', '—')} | " + " | ".join(cells) + " |")
    if not expected.metrics:
        lines.append("| (no figures recorded yet) | | " + " | ".join("" for _ in COLUMNS) + " |")
    rec = expected.recorded
    how = f"out of fold, {expected.folds} folds by room; " if expected.kind == "room_cv" else ""
    when = f"recorded {rec.get('date', '?')} at {rec.get('commit', '?')}" if rec else "not recorded yet"
    if rec.get("seconds") is not None:
        when += f", {rec['seconds']} s"
    caption = (f"_`{expected.command}` ({how}{when}); `{expected.check_command()}` fails when a figure moves by "
               f"more than ±{expected.tolerance:g}._")
    return "\n".join(lines) + "\n\n" + caption


class MarkerError(ValueError):
    """A marker that names no expected-results file, or an opening marker with no closing one."""


def refresh(text: str, expected_dir: Path = EXPECTED_DIR, *, where: str = "<text>") -> tuple[str, list[str]]:
    """``text`` with every marked block's body replaced by its file's table.

    Returns:
        (new text, the names of the blocks whose body changed).

    Raises:
        MarkerError: an opening marker without its closing marker, or a name with no
            ``expected_dir/NAME.yaml``.
        ExpectedFileError: a named file is unusable.
    """
    closed = {m.start("open") for m in BLOCK.finditer(text)}
    for m in OPENING.finditer(text):
        if m.start() not in closed:
            line = text.count("\n", 0, m.start()) + 1
            raise MarkerError(f"{where}:{line}: <!-- results:{m['name']} --> has no <!-- /results:{m['name']} -->")
    changed: list[str] = []

    def table(m: re.Match[str]) -> str:
        path = expected_dir / f"{m['name']}.yaml"
        if not path.is_file():
            line = text.count("\n", 0, m.start()) + 1
            raise MarkerError(f"{where}:{line}: <!-- results:{m['name']} --> names no {_shown(path)}")
        body = "\n" + render_table(load_expected(path)) + "\n"
        if body != m["body"]:
            changed.append(m["name"])
        return m["open"] + body + m["close"]

    return BLOCK.sub(table, text), changed


def main(argv: list[str] | None = None) -> int:
    """Command line: refresh the marked tables of the named Markdown files (default: the README
    and docs/*.md); ``--check`` writes nothing and returns 1 when one is stale.

    Returns:
        The exit status: 0 (up to date or refreshed), 1 (``--check``: stale), 2 (a marker or file error).
    """
    parser = argparse.ArgumentParser(prog="python -m evaluation.results_tables", description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md and docs/*.md).")
    parser.add_argument("--expected", type=Path, default=EXPECTED_DIR,
                        help="Folder of the expected-results files (default evaluation/expected).")
    parser.add_argument("--check", action="store_true", help="Write nothing; exit 1 when a table is out of date.")
    args = parser.parse_args(argv)
    stale: list[str] = []
    for path in args.files or default_targets():
        try:
            text = path.read_text(encoding="utf-8")
            new, changed = refresh(text, args.expected, where=str(path))
        except (OSError, MarkerError, ExpectedFileError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for name in changed:
            stale.append(f"{path}: results:{name}")
        if changed and not args.check:
            path.write_text(new, encoding="utf-8")
            print(f"{path}: refreshed {', '.join(changed)}")
    if args.check and stale:
        for line in stale:
            print(f"out of date: {line} (run `python -m evaluation.results_tables`)", file=sys.stderr)
        return 1
    if not stale:
        print("every results table is up to date")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
