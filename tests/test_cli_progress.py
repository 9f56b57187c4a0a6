"""Progress of the long commands (mars.cli.progress): plain lines every MARS_PROGRESS_INTERVAL
seconds with counts, rate and ETA when standard error is not a terminal (a pipe, a log, CI:
CliRunner's stderr is one), a rich bar on a terminal, nothing with --json; and the real
`mars ingest`, `mars eval` and `mars train align` printing lines whose counts move per batch,
query and epoch."""

from __future__ import annotations

import io
import json
import re
import shutil

import pytest
from rich.console import Console
from typer.testing import CliRunner

from mars.cli.progress import duration, meter

LINE = re.compile(r"^(?P<label>[^:]+): (?P<done>\d+)/(?P<total>\d+) \((?P<pct>\d+)%\)(?P<rest>.*)$")
ETA = re.compile(r" · [\d.]+ \w+/(s|min) · about (\d+(\.\d)? s|\d+ min \d\d s) left")


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _plain() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=False, width=60, color_system=None), out


def test_plain_lines_come_every_interval_with_counts_rate_and_eta(monkeypatch):
    monkeypatch.setenv("MARS_PROGRESS_INTERVAL", "10")
    clock, (console, out) = Clock(), _plain()
    with meter("ingest", 1000, console=console, clock=clock) as progress:
        clock.t += 4  # a slow first batch (the models load): the rate is measured from its end on
        progress.advance(100)
        for _ in range(9):
            clock.t += 2
            progress.advance(100)
    assert out.getvalue().splitlines() == [  # one line at the start, one per 10 s at most, the last
        "ingest: 0/1000 (0%)",
        "ingest: 400/1000 (40%) · 50.0 items/s · about 12 s left",  # t=10: 300 items in the 6 s after the first batch
        "ingest: 900/1000 (90%) · 50.0 items/s · about 2.0 s left",  # t=20
        "ingest: 1000/1000 (100%) · 45.5 items/s · done in 22 s",  # the whole run: 1000 in 22 s
    ]


def test_a_slow_start_shows_time_elapsed_notes_slow_rates_and_a_failure(monkeypatch):
    monkeypatch.setenv("MARS_PROGRESS_INTERVAL", "0")  # a line per update
    clock, (console, out) = Clock(), _plain()
    with pytest.raises(RuntimeError), meter("align", 10, unit="epochs", console=console, clock=clock) as progress:
        clock.t += 30
        progress.update(note="validation fit")  # nothing counted yet: no rate, the time so far
        clock.t += 30
        progress.advance(note="validation fit · loss 0.693")  # one epoch a minute
        clock.t += 150
        progress.update(note="validation fit · loss 0.690")  # polled between two epochs: the rate stays
        raise RuntimeError("out of memory")
    assert out.getvalue().splitlines() == [
        "align: 0/10 (0%)",
        "align: 0/10 (0%) · 30 s elapsed · validation fit",
        "align: 1/10 (10%) · 1 epochs/min · about 9 min 00 s left · validation fit · loss 0.693",
        "align: 1/10 (10%) · 1 epochs/min · about 9 min 00 s left · validation fit · loss 0.690",
        "align: 1/10 (10%) · 0.29 epochs/min · validation fit · loss 0.690 · stopped after 3 min 30 s",
    ]


def test_quiet_writes_nothing_and_a_terminal_gets_the_rich_bar(monkeypatch):
    monkeypatch.setenv("MARS_PROGRESS_INTERVAL", "0")
    clock, (console, out) = Clock(), _plain()
    with meter("ingest", 10, console=console, clock=clock, quiet=True) as progress:
        clock.t += 1
        progress.advance(5)
    assert out.getvalue() == "" and progress.done == 5 and progress.rate() == 5.0

    screen = io.StringIO()
    terminal = Console(file=screen, force_terminal=True, width=120, color_system=None)
    with meter("ingest", 10, console=terminal, clock=clock) as progress:
        clock.t += 1
        progress.advance(4)
    drawn = screen.getvalue()
    assert "4/10" in drawn and "4.0 items/s · about 1.5 s left" in drawn and "ingest: " not in drawn


def test_a_stage_without_counts_says_when_it_started_and_how_long_it_took(monkeypatch):
    monkeypatch.setenv("MARS_PROGRESS_INTERVAL", "10")
    clock, (console, out) = Clock(), _plain()
    with meter("critic: 5-fold cross-validation and fit", console=console, clock=clock):
        clock.t += 42
    assert out.getvalue().splitlines() == ["critic: 5-fold cross-validation and fit · started",
                                           "critic: 5-fold cross-validation and fit · done in 42 s"]


def test_durations_read_like_speech():
    assert [duration(s) for s in (0.44, 9.9, 35.2, 125, 4020)] == ["0.4 s", "9.9 s", "35 s", "2 min 05 s", "1 h 07 min"]


def _run(args, home, monkeypatch, encoders):
    """`mars <args>` on MARS_HOME ``home`` with the session's encoders and a line per update."""
    import mars.engine
    from mars.cli import app
    from mars.settings import get_settings

    monkeypatch.setattr(mars.engine, "encoders_for", lambda *a, **k: encoders)
    monkeypatch.setenv("MARS_HOME", str(home))
    monkeypatch.setenv("MARS_PROGRESS_INTERVAL", "0")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    return result


def _lines(stderr: str, label: str) -> list[re.Match]:
    return [m for m in map(LINE.match, stderr.splitlines()) if m and m["label"] == label]


def test_ingest_progress_moves_per_batch_with_an_eta(ikea, encoders, tmp_path, monkeypatch):
    catalog = tmp_path / "catalog.jsonl"
    with (ikea / "corpus.jsonl").open() as src, catalog.open("w") as out:
        for _, line in zip(range(300), src):  # real products, by text (no photo): three batches of 128
            out.write(json.dumps({k: v for k, v in json.loads(line).items() if k != "image"}) + "\n")
    result = _run(["ingest", catalog], tmp_path / "mars", monkeypatch, encoders)
    lines = _lines(result.stderr, "ingest")
    assert [int(m["done"]) for m in lines] == [0, 128, 256, 300, 300]  # start, each batch, the last line
    assert all(m["total"] == "300" for m in lines)
    assert ETA.match(lines[1]["rest"]) and ETA.match(lines[2]["rest"]), result.stderr
    assert re.fullmatch(r" · [\d.]+ items/s · done in [\d.]+ s", lines[-1]["rest"]), lines[-1]["rest"]
    assert "ingest job" in result.stdout and "ingest:" not in result.stdout  # progress on stderr only

    again = _run(["ingest", catalog, "--json"], tmp_path / "mars", monkeypatch, encoders)
    assert json.loads(again.stdout)["total"] == 300 and "ingest:" not in again.stderr  # --json: no progress


def _room_queries(ikea_slice, tmp_path):
    path = tmp_path / "queries.jsonl"
    with path.open("w") as fh:
        for q in ikea_slice["queries"]:
            fh.write(json.dumps({**q, "image": str(ikea_slice["room"])} if q.get("image") else q) + "\n")
    return path


def test_eval_and_train_align_print_their_progress(ikea, ikea_slice, slice_home, encoders, tmp_path, monkeypatch):
    home = shutil.copytree(slice_home, tmp_path / "mars")
    monkeypatch.setenv("MARS_CRITIC", "none")
    result = _run(["eval", "--queries", _room_queries(ikea_slice, tmp_path), "--qrels", ikea / "qrels" / "dev.tsv",
                   "--limit", "2"], home, monkeypatch, encoders)
    lines = _lines(result.stderr, "eval (hybrid)")
    n = int(lines[0]["total"])
    assert n >= 3 and [int(m["done"]) for m in lines] == [*range(n + 1), n]  # a line per query here
    assert any(ETA.match(m["rest"]) for m in lines[1:-1]), result.stderr
    assert "mode: hybrid" in result.stdout

    result = _run(["train", "align", "--epochs", "2", "--dim", "8", "--hidden", "16", "--batch-size", "16",
                   "--holdout", "0.2"], home, monkeypatch, encoders)
    lines = _lines(result.stderr, "align")
    assert [int(m["done"]) for m in lines] == [0, 1, 2, 3, 4, 4]  # two fits of two epochs
    assert " epochs/" in lines[1]["rest"] and "validation fit · loss " in lines[1]["rest"]
    assert "about" in lines[3]["rest"] and lines[3]["rest"].split(" · ")[-2] == "final fit"
    assert lines[4]["rest"].endswith("· rewriting the vectors") and "done in" in lines[5]["rest"]
