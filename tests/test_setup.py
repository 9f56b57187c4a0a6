"""``mars setup``: the whole set-up of a dataset folder (training/setup.py) on a small real IKEA
folder of three judged rooms: every stage fitted, a second run fits nothing, a changed input
refits what depends on it, a failed stage resumes, a folder without judged rooms leaves the
prior and the critic out."""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import pytest

from training import setup as setup_lib
from training.setup import DataFolder, SetupError, run_setup

ROOMS = ("a-bed-that-folds-away-to-be-a-sofa-by-day__1364309472525-s4",)


@pytest.fixture(scope="module")
def dataset(ikea: Path, tmp_path_factory) -> Path:
    """A dataset folder: three judged rooms (their photos, queries and qrels), every product they
    show plus 40 others (image paths into the real data)."""
    queries = [json.loads(line) for line in (ikea / "queries.jsonl").open()]
    lines = (ikea / "qrels" / "dev.tsv").read_text().splitlines()
    qrels: dict[str, set[str]] = {}
    for line in lines[1:]:
        qid, pid, _ = line.split("\t")
        qrels.setdefault(qid, set()).add(pid)
    room_ids = sorted({q["room_id"] for q in queries if q.get("room_id")})
    rooms = list(ROOMS) + random.Random(3).sample([r for r in room_ids if r not in ROOMS], 2)
    room_queries = [q for q in queries if q.get("room_id") in rooms]
    shown = {pid for q in room_queries for pid in qrels.get(q["_id"], ())}
    corpus = [json.loads(line) for line in (ikea / "corpus.jsonl").open()]
    chosen = [c for c in corpus if c["_id"] in shown] + random.Random(5).sample([c for c in corpus if c["_id"] not in shown], 40)
    out = tmp_path_factory.mktemp("dataset")
    (out / "rooms").mkdir()
    (out / "qrels").mkdir()
    with (out / "corpus.jsonl").open("w") as fh:
        for c in chosen:
            fh.write(json.dumps({**c, "image": str(ikea / c["image"]) if c["image"] else c["image"]}) + "\n")
    for room in rooms:
        shutil.copy2(ikea / "rooms" / f"{room}.jpg", out / "rooms" / f"{room}.jpg")
    with (out / "queries.jsonl").open("w") as fh:
        for q in room_queries:
            fh.write(json.dumps(q) + "\n")
    ids = {q["_id"] for q in room_queries}
    (out / "qrels" / "dev.tsv").write_text("\n".join([lines[0]] + [ln for ln in lines[1:] if ln.split("\t")[0] in ids]) + "\n")
    return out


def statuses(results) -> dict[str, str]:
    return {r.stage: r.status for r in results}


def test_setup_fits_every_stage_then_nothing_then_what_changed(dataset, make_engine, tmp_path):
    data = DataFolder.open(dataset)
    assert data.judged and data.qrels == dataset / "qrels" / "dev.tsv"
    engine = make_engine()
    seen: list[tuple[str, int]] = []
    first = run_setup(engine, data, progress=lambda stage, done, total, note: seen.append((stage, done)))
    assert statuses(first) == {"ingest": "ingested", **{s: "fitted" for s in setup_lib.STAGES[1:]}}
    assert {s for s, _ in seen} == {"ingest", "align", "whitening", "critic"}  # the prior is one step
    assert [d for s, d in seen if s == "ingest"][-1] == sum(1 for _ in (dataset / "corpus.jsonl").open())
    trained = engine.artifacts.current()
    assert trained.aligned is not None and trained.prior is not None and "learned" in trained.whitening.meta
    assert Path(engine.settings.critic_path).exists()
    stamps = json.loads((engine.home / "setup.json").read_text())
    assert set(stamps) == {"align", "whitening", "prior", "critic"} and all(v["inputs"] for v in stamps.values())

    second = run_setup(engine, data)
    assert statuses(second) == {s: "unchanged" for s in setup_lib.STAGES}
    assert json.loads((engine.home / "setup.json").read_text()) == stamps  # nothing re-stamped

    # new judgments: the whitening's learned stage, the prior and the critic refit; alignment and ingest do not
    qrels = dataset / "qrels" / "dev.tsv"
    original = qrels.read_text()
    try:
        qrels.write_text("\n".join(original.splitlines()[:-5]) + "\n")
        third = run_setup(engine, DataFolder.open(dataset))
    finally:
        qrels.write_text(original)
    assert statuses(third) == {"ingest": "unchanged", "align": "unchanged", "whitening": "fitted", "prior": "fitted",
                               "critic": "fitted"}


def test_a_failed_stage_resumes_there(dataset, make_engine, monkeypatch):
    engine = make_engine()
    data = DataFolder.open(dataset)

    def broken(*args, **kwargs):
        raise RuntimeError("the critic broke")

    monkeypatch.setattr(setup_lib, "_critic", broken)
    with pytest.raises(RuntimeError, match="the critic broke"):
        run_setup(engine, data)
    assert set(json.loads((engine.home / "setup.json").read_text())) == {"align", "whitening", "prior"}
    monkeypatch.undo()
    resumed = run_setup(engine, data)
    assert statuses(resumed) == {"ingest": "unchanged", "align": "unchanged", "whitening": "unchanged",
                                 "prior": "unchanged", "critic": "fitted"}


def test_without_judged_rooms_the_prior_and_the_critic_are_absent(dataset, make_engine, tmp_path):
    plain = tmp_path / "catalog-only"
    plain.mkdir()
    shutil.copy2(dataset / "corpus.jsonl", plain / "corpus.jsonl")
    shutil.copytree(dataset / "rooms", plain / "rooms")
    results = run_setup(make_engine(), DataFolder.open(plain))
    assert statuses(results) == {"ingest": "ingested", "align": "fitted", "whitening": "fitted", "prior": "absent",
                                 "critic": "absent"}
    assert "no judged rooms" in results[-1].detail and "learned" not in results[2].detail


def test_a_folder_that_is_not_a_dataset_is_refused_in_one_line(tmp_path):
    with pytest.raises(SetupError, match="has no corpus.jsonl"):
        DataFolder.open(tmp_path)
    (tmp_path / "corpus.jsonl").write_text("")
    (tmp_path / "qrels").mkdir()
    for name in ("a.tsv", "b.tsv"):
        (tmp_path / "qrels" / name).write_text("query-id\tcorpus-id\tscore\n")
    with pytest.raises(SetupError, match="name one with --qrels"):
        DataFolder.open(tmp_path)
    assert DataFolder.open(tmp_path, tmp_path / "qrels" / "b.tsv").qrels == tmp_path / "qrels" / "b.tsv"
    assert os.path.basename(str(DataFolder.open(tmp_path, tmp_path / "qrels" / "a.tsv").qrels)) == "a.tsv"
