"""``mars setup DATA``: ingest a dataset folder and train every stage of the funnel on it
(:mod:`training.setup`), resumable, each stage skipped when its inputs did not change."""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from mars.cli.common import console, fail, open_engine
from mars.cli.progress import Meter, meter

app = typer.Typer()

#: What each stage's progress counts.
UNITS = {"ingest": "items", "align": "epochs", "whitening": "photos", "critic": "queries"}


@app.command("setup")
def setup(
    path: Annotated[Path, typer.Argument(help="A dataset folder: corpus.jsonl (+ photos), and for the trained stages "
                                              "rooms/, queries.jsonl and qrels/*.tsv (judged rooms).")],
    qrels: Annotated[Optional[Path], typer.Option("--qrels", help="Judgments file to train on; default qrels/dev.tsv "
                                                                  "(or the folder's only qrels/*.tsv).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the stages' results as JSON.")] = False,
) -> None:
    """Set MARS up on a dataset folder in one run: ingest the catalog, then fit the cross-modal
    alignment, the whitening (with its learned stage on judged rooms), the staging prior and the
    critic. A stage whose inputs did not change since it last ran is skipped, so running it
    again fits nothing, and a run that stopped resumes at the stage it was in. Without judged
    rooms the prior and the critic are left out (searches say so). Needs the stores: stop
    `mars serve` first."""
    from ingestion.images import InvalidImage
    from training.setup import DataFolder, SetupError, run_setup

    try:
        data = DataFolder.open(path, qrels)
    except SetupError as exc:
        raise fail(exc) from exc
    engine = open_engine()
    meters = ExitStack()
    current: dict[str, Meter] = {}

    def progress(stage: str, done: int, total: int | None, note: str) -> None:
        if stage not in current:
            meters.close()
            current.clear()
            current[stage] = meters.enter_context(meter(stage, total, unit=UNITS.get(stage, "items"), quiet=as_json))
        current[stage].update(done, note=note or None)

    try:
        with meters:
            results = run_setup(engine, data, progress=progress)
    except (FileNotFoundError, InvalidImage, RuntimeError, ValueError) as exc:
        raise fail(f"setup stopped: {exc} (the stages done are kept; run it again to resume)") from exc
    finally:
        engine.close()
    if as_json:
        console.print_json(json.dumps([asdict(r) for r in results]))
        return
    table = Table(title=f"mars setup {path}")
    for col in ("stage", "status", "on", "seconds", "result"):
        table.add_column(col, justify="right" if col == "seconds" else "left")
    for r in results:
        table.add_row(r.stage, r.status, r.on, f"{r.seconds:.1f}" if r.status in ("fitted", "ingested") else "-", r.detail)
    console.print(table)
    total = sum(r.seconds for r in results)
    mode = "full" if results[-1].status != "absent" else "hybrid"
    console.print(f"set-up done in {total:.0f} s; search with `mars search \"...\" --image ROOM.jpg --mode {mode}`")
