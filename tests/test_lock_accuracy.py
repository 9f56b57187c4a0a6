"""Category-lock accuracy on a real slice: the slice room's room-class and room-type queries
lock to what they ask for; a query whose text asks for something else is listed as a miss."""

from __future__ import annotations

import json
import shutil

from typer.testing import CliRunner

from evaluation.beir import BenchmarkQuery, load_queries
from evaluation.lock_accuracy import lock_accuracy
from mars.cli import app


def test_lock_accuracy_on_the_slice_room(ikea, ikea_slice, slice_home, make_engine, tmp_path, monkeypatch):
    engine = make_engine(shutil.copytree(slice_home, tmp_path / "mars"))  # the session's ingested slice
    room = ikea_slice["room"].stem
    queries = [q for q in load_queries(ikea / "queries.jsonl") if q.room_id == room]
    wrong = BenchmarkQuery(f"{room}::class::sofa", "room-class", "a lamp for this bedroom", None, room, "Bedroom")
    report = lock_accuracy(engine.taxonomy(), queries + [wrong])
    assert set(report) == {"room-class", "room-type"}
    cls, typ = report["room-class"], report["room-type"]
    assert typ["queries"] == sum(q.task == "room-type" for q in queries) > 0 and typ["accuracy"] == 1.0
    assert cls["queries"] == sum(q.task == "room-class" for q in queries) + 1 and cls["exact"] == cls["queries"] - 1
    assert cls["misses"] == [{"id": wrong.id, "text": wrong.text, "asked": "sofa", "locked": "lamp",
                              "reason": cls["misses"][0]["reason"]}] and cls["misses"][0]["reason"]

    engine.close()
    monkeypatch.setenv("MARS_HOME", str(tmp_path / "mars"))
    from mars.settings import get_settings

    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["lock-accuracy", "--queries", str(ikea / "queries.jsonl"), "--json"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    full = json.loads(result.output)
    assert full["room-class"]["queries"] == 929 and full["room-type"]["queries"] == 1519  # the whole dev query file
