"""Results as code (evaluation/expected.py, evaluation/results_tables.py): `mars eval --check`
reproduces the slice's committed figures, fails naming a deliberately wrong one, refuses a
malformed file with a one-line error; the table renderer replaces only its marked block and
its --check sees a stale table.

``MARS_UPDATE_EXPECTED=1 pytest tests/test_expected_results.py -k slice`` re-records
evaluation/expected/ikea-slice.yaml (the slice's home exists only inside the test session).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from evaluation.expected import EXPECTED_DIR, ExpectedFileError, compare, load_expected, updated_text
from evaluation.results_tables import main as tables_main
from evaluation.results_tables import render_table

SLICE = EXPECTED_DIR / "ikea-slice.yaml"


def _mars(args, monkeypatch, *, home: Path | None = None, encoders=None):
    """`mars <args>` (a CliRunner result) with MARS_HOME ``home`` and the session's encoders; no
    ./.env and no MARS_ variable of the caller's environment but MARS_IKEA_DIR."""
    import mars.engine
    from mars.cli import app
    from mars.settings import get_settings

    for name in list(os.environ):
        if name.startswith("MARS_") and name != "MARS_IKEA_DIR":
            monkeypatch.delenv(name)
    if encoders is not None:
        monkeypatch.setattr(mars.engine, "encoders_for", lambda *a, **k: encoders)
    if home is not None:
        monkeypatch.setenv("MARS_HOME", str(home))
    monkeypatch.setenv("MARS_CRITIC", "none")
    monkeypatch.setenv("MARS_PROGRESS_INTERVAL", "1000")
    get_settings.cache_clear()
    try:
        return CliRunner().invoke(app, [str(a) for a in args])
    finally:
        get_settings.cache_clear()


def _flat(text: str) -> str:
    """``text`` without whitespace: rich wraps long lines at the runner's 80 columns."""
    return "".join(text.split())


def _write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def test_check_passes_on_the_slice_and_fails_on_a_wrong_figure(ikea, slice_home, encoders, tmp_path, monkeypatch):
    home = shutil.copytree(slice_home, tmp_path / "mars")
    monkeypatch.chdir(tmp_path)  # no ./.env of the checkout
    update = ["--update"] if os.environ.get("MARS_UPDATE_EXPECTED") == "1" else []
    result = _mars(["eval", "--check", SLICE, "--data", ikea, *update], monkeypatch, home=home, encoders=encoders)
    assert result.exit_code == 0, result.output
    expected = load_expected(SLICE)
    n = sum(len(row) for row in expected.metrics.values())
    assert n >= 4 * 5 and "room-scene" in expected.metrics
    if not update:
        assert _flat(f"all {n} figures of {SLICE} within ±0.005") in _flat(result.stdout)

    raw = yaml.safe_load(SLICE.read_text())
    task, metric = "room-class", "nDCG@10"
    raw["metrics"][task][metric] = round(raw["metrics"][task][metric] + 0.1, 4)  # deliberately wrong
    wrong = _write(tmp_path / "ikea-slice.yaml", raw)
    result = _mars(["eval", "--check", wrong, "--data", ikea], monkeypatch, home=home, encoders=encoders)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("✗")]
    assert len(lines) == 1 and lines[0].startswith(f"✗ {task} {metric}: expected {raw['metrics'][task][metric]:.4f}")
    assert "(-0.1000; tolerance ±0.005)" in lines[0]
    assert _flat(f"1 of {n} figures of {wrong} off") in _flat(result.stderr)

    as_json = _mars(["eval", "--check", wrong, "--data", ikea, "--json"], monkeypatch, home=home, encoders=encoders)
    report = json.loads(as_json.stdout)
    assert as_json.exit_code == 1 and report["passed"] is False
    assert [(f["task"], f["metric"]) for f in report["figures"] if not f["ok"]] == [(task, metric)]


BASE = {"name": "x", "command": "mars eval --queries q.jsonl --qrels q.tsv", "kind": "eval", "queries": "q.jsonl",
        "qrels": "q.tsv", "tolerance": 0.005, "metrics": {"room-class": {"queries": 3, "nDCG@10": 0.5}}}


@pytest.mark.parametrize(("change", "message"), [
    ({"tolerance": "small"}, "x.yaml: tolerance: a number >= 0 expected, got 'small'"),
    ({"kind": "evil"}, "x.yaml: kind 'evil' is not one of eval, room_cv"),
    ({"metrics": {"room-class": {"nDCG@11": 0.5}}}, "x.yaml: metrics.room-class: unknown metric 'nDCG@11'"),
    ({"metrics": {"room-class": {"nDCG@10": "high"}}}, "x.yaml: metrics.room-class.nDCG@10: a number expected"),
    ({"qrels": None}, "x.yaml: field 'qrels' is missing"),
    ({"name": "y"}, "x.yaml: name 'y' is not the file's stem 'x'"),
    ({"kind": "room_cv"}, "x.yaml: kind room_cv needs folds >= 2, got None"),
    ({"folds": 5}, "x.yaml: folds is only for kind room_cv"),
    ({"colour": "red"}, "x.yaml: unknown field 'colour'"),
])
def test_a_malformed_file_exits_2_with_a_one_line_error(change, message, tmp_path, monkeypatch):
    path = _write(tmp_path / "x.yaml", {k: v for k, v in {**BASE, **change}.items() if v is not None})
    with pytest.raises(ExpectedFileError, match=message.replace("(", r"\(")):
        load_expected(path)
    result = _mars(["eval", "--check", path], monkeypatch, home=tmp_path / "never-opened")
    assert result.exit_code == 2 and result.stdout == ""
    assert _flat(result.stderr).startswith(_flat(f"error: {tmp_path}/")), result.stderr
    assert _flat(message.split(": ", 1)[1]) in _flat(result.stderr)
    assert not (tmp_path / "never-opened").exists()  # refused before any store was opened


def test_not_yaml_a_missing_file_and_options_the_file_owns_are_refused(tmp_path, monkeypatch):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nmetrics: {room-class: [\n")
    result = _mars(["eval", "--check", broken], monkeypatch)
    assert result.exit_code == 2 and _flat("broken.yaml: not valid YAML at line") in _flat(result.stderr)
    result = _mars(["eval", "--check", tmp_path / "absent.yaml"], monkeypatch)
    assert result.exit_code == 2 and _flat("absent.yaml: cannot read it") in _flat(result.stderr)
    result = _mars(["eval", "--check", SLICE, "--mode", "full"], monkeypatch)
    assert result.exit_code == 2 and _flat("--check takes the mode from its file") in _flat(result.output)
    result = _mars(["eval", "--check", SLICE, "--task", "room-class"], monkeypatch)
    assert result.exit_code == 2 and _flat("takes its queries, qrels, tasks and limit") in _flat(result.output)
    result = _mars(["eval", "--qrels", "q.tsv"], monkeypatch)
    assert result.exit_code == 2 and _flat("required (or --check FILE)") in _flat(result.output)
    result = _mars(["eval", "--check", SLICE, "--data", tmp_path], monkeypatch)  # no queries.jsonl there
    assert result.exit_code == 2 and _flat("queries.jsonl not found") in _flat(result.stderr)


def test_room_cv_check_refuses_another_kind_before_opening_the_stores(tmp_path, capsys):
    from evaluation.room_cv import main

    with pytest.raises(SystemExit) as exit_:
        main(["--check", str(SLICE)])
    assert exit_.value.code == 2 and "kind 'eval'; this command checks kind room_cv" in capsys.readouterr().err


def test_update_rewrites_the_figures_and_nothing_else(tmp_path):
    path = _write(tmp_path / "x.yaml", {**BASE, "description": "a home", "tasks": ["room-class", "room-type"],
                                        "metrics": {"room-class": {"queries": 3, "nDCG@10": 0.5, "MRR@10": 0.4}}})
    before = load_expected(path)
    report = {"tasks": {"room-type": {"queries": 4, "nDCG@10": 0.61234, "Recall@10": 0.7, "MRR@10": 0.3},
                        "room-class": {"queries": 3, "nDCG@10": 0.5031, "Recall@10": 0.9, "MRR@10": 0.45}}}
    assert [(f.task, f.metric, f.ok) for f in compare(before, report)] == [
        ("room-class", "queries", True), ("room-class", "nDCG@10", True), ("room-class", "MRR@10", False),
        ("room-type", "queries", False)]  # measured, not pinned
    text = updated_text(before, report, seconds=12.4, commit="abc1234")
    assert text.startswith("# Expected results: `mars eval --check ")
    path.write_text(text)
    after = load_expected(path)
    assert after.metrics == {"room-class": {"queries": 3, "nDCG@10": 0.5031, "MRR@10": 0.45},  # the file's metrics
                             "room-type": {"queries": 4, "nDCG@10": 0.6123, "MRR@10": 0.3}}
    assert after.recorded["commit"] == "abc1234" and after.recorded["seconds"] == 12
    assert (after.description, after.tasks, after.command) == ("a home", before.tasks, before.command)
    assert all(f.ok for f in compare(after, report))


def test_the_table_renderer_replaces_only_its_block_and_check_sees_a_stale_table(tmp_path, capsys):
    expected_dir = tmp_path / "expected"
    expected_dir.mkdir()
    shutil.copy(SLICE, expected_dir / "ikea-slice.yaml")
    doc = tmp_path / "README.md"
    before, after = "# Results\n\nIn-sample figures:\n\n", "\n\nHand-written text after | with a pipe.\n"
    doc.write_text(before + "<!-- results:ikea-slice -->\nold, typed table\n<!-- /results:ikea-slice -->" + after)
    args = [str(doc), "--expected", str(expected_dir)]

    assert tables_main([*args, "--check"]) == 1
    assert "out of date: " in capsys.readouterr().err and "old, typed" in doc.read_text()  # --check writes nothing
    assert tables_main(args) == 0
    text = doc.read_text()
    table = render_table(load_expected(expected_dir / "ikea-slice.yaml"))
    assert text == before + "<!-- results:ikea-slice -->\n" + table + "\n<!-- /results:ikea-slice -->" + after
    assert "| task | queries | nDCG@10 | Recall@10 | MRR@10 | Success@10 |" in table
    assert table.endswith("ikea-slice.yaml` fails when a figure moves by more than ±0.005._")
    assert "`pytest tests/test_expected_results.py -k slice` (recorded " in table
    assert tables_main([*args, "--check"]) == 0 and tables_main(args) == 0 and doc.read_text() == text

    raw = yaml.safe_load(SLICE.read_text())  # a figure re-recorded: the table is stale again
    raw["metrics"]["room-scene"]["nDCG@10"] = 0.1234
    _write(expected_dir / "ikea-slice.yaml", raw)
    capsys.readouterr()
    assert tables_main([*args, "--check"]) == 1
    assert f"out of date: {doc}: results:ikea-slice" in capsys.readouterr().err

    doc.write_text("<!-- results:nothing -->\n<!-- /results:nothing -->\n")
    assert tables_main(args) == 2 and "names no " in capsys.readouterr().err
    doc.write_text("<!-- results:ikea-slice -->\nno end\n")
    assert tables_main(args) == 2 and "has no <!-- /results:ikea-slice -->" in capsys.readouterr().err


def test_every_committed_expected_file_loads_and_has_figures():
    files = sorted(EXPECTED_DIR.glob("*.yaml"))
    assert SLICE in files
    for path in files:
        expected = load_expected(path)
        assert expected.metrics and expected.recorded.get("commit"), path
        assert render_table(expected).count("\n") == len(expected.metrics) + 3


def test_the_readme_and_docs_tables_are_up_to_date(capsys):
    """Every <!-- results:NAME --> block of README.md and docs/*.md is what
    `python -m evaluation.results_tables` renders from evaluation/expected/NAME.yaml."""
    assert tables_main(["--check"]) == 0, capsys.readouterr().err
