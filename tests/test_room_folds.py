"""Cross-fitting by room on the real slice: the learned whitening stage and the staging prior
refitted in memory without a group of rooms (the files under MARS_HOME never touched), and the
two users of it (the room cross-validation benchmark and the critic's pair mining)."""

from __future__ import annotations

import json
import shutil

import pytest
from PIL import Image

from evaluation.beir import load_qrels, load_queries
from evaluation.room_cv import room_cv
from evaluation.folds import cv_fold
from indexing.staging_prior import StagingPrior, staging_prior_path
from indexing.whitening import whitening_path
from query.funnel import SearchQuery
from training.critic import ROOM_TASKS, mine_out_of_fold
from training.room_folds import funnel_without, out_of_fold, room_fold
from training.whitening import fit_whitening, judged_photos


@pytest.fixture(scope="module")
def two_rooms(ikea_slice, slice_home, encoders, tmp_path_factory):
    """A copy of the session's ingested slice with a PCA + learned whitening, and a benchmark of
    two rooms in different folds: the slice's room, and a copy of its photo as a second room
    that shows half of its products."""
    from mars.engine import Engine
    from mars.settings import Settings

    base = tmp_path_factory.mktemp("folds")
    room_a = ikea_slice["queries"][0]["room_id"]
    room_b = next(f"copy-{i}" for i in range(100) if cv_fold(f"copy-{i}", 2) != cv_fold(room_a, 2))
    photo_b = base / "room-b.jpg"
    shutil.copy(ikea_slice["room"], photo_b)
    half = sorted(ikea_slice["room_products"])[::2]
    queries, qrels = [], []
    for q in ikea_slice["queries"]:
        if q["task"] not in ROOM_TASKS + ("room-title",) or not ikea_slice["qrels"].get(q["_id"]):
            continue
        queries.append({**q, "image": str(ikea_slice["room"]) if q["image"] else None})
        qrels += [(q["_id"], p) for p in sorted(ikea_slice["qrels"][q["_id"]])]
        if q["task"] in ("room-scene", "room-title"):
            copy_id = q["_id"].replace(room_a, room_b)
            queries.append({**q, "_id": copy_id, "room_id": room_b, "image": str(photo_b) if q["image"] else None})
            qrels += [(copy_id, p) for p in half]
    (base / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    (base / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{p}\t1\n" for q, p in qrels))

    home = shutil.copytree(slice_home, base / "mars")
    engine = Engine(Settings(home=home), encoders=encoders)
    bench = load_queries(base / "queries.jsonl")
    white = fit_whitening(engine, [ikea_slice["room"], photo_b], judged=judged_photos(bench, load_qrels(base / "qrels.tsv")),
                          dim=48, learned_dim=16, region_step=3)
    engine.install_whitening(white)
    engine.install_prior(StagingPrior.from_judgments(bench, load_qrels(base / "qrels.tsv")))
    engine.close()
    return {"home": home, "queries": base / "queries.jsonl", "qrels": base / "qrels.tsv", "room_a": room_a, "room_b": room_b}


def test_funnel_without_refits_on_the_other_rooms_in_memory(make_engine, two_rooms, tmp_path):
    engine = make_engine(shutil.copytree(two_rooms["home"], tmp_path / "mars"))
    queries, qrels = load_queries(two_rooms["queries"]), load_qrels(two_rooms["qrels"])
    before = whitening_path(engine.home).read_bytes(), staging_prior_path(engine.home).read_bytes()
    assert engine.artifacts.whitening().meta["learned"]["judged_photos"] == 2 and engine.artifacts.prior().rooms == {"bedroom": 2}
    fold_of = room_fold(2)
    held_out = lambda q: fold_of(q) == fold_of(queries[0])  # noqa: E731 - room A's fold
    funnel = funnel_without(engine, queries, qrels, held_out)
    inside = funnel.artifacts.whitening()
    assert inside.meta["learned"]["judged_photos"] == 1 and inside.learned_projection.shape[1] == 16
    assert funnel.artifacts.prior().rooms == {"bedroom": 1}  # room B only
    assert set(funnel.artifacts.prior().counts) == set(sorted(qrels[queries[0].id])[::2])  # room A's scene query first
    # in memory, with the digests of the files they would be: cached lists of the two never mix
    assert inside.digest and inside.digest != engine.artifacts.whitening().digest
    assert funnel.artifacts.prior().digest != engine.artifacts.prior().digest
    photo = SearchQuery(text="a lamp for this bedroom", image=Image.open(queries[0].image).convert("RGB"), room="Bedroom")
    refitted, installed = funnel.retrieve(photo).lists["image"], engine.funnel.retrieve(photo).lists["image"]
    assert [(h.id, h.score) for h in refitted] != [(h.id, h.score) for h in installed]
    assert (whitening_path(engine.home).read_bytes(), staging_prior_path(engine.home).read_bytes()) == before
    assert engine.artifacts.whitening().meta["learned"]["judged_photos"] == 2 and engine.artifacts.prior().rooms == {"bedroom": 2}

    engine.artifacts.whitening.path.unlink()
    engine.artifacts.prior.path.unlink()  # nothing fitted on rooms left: the engine's funnel as it is
    assert funnel_without(engine, queries, qrels, held_out) is engine.funnel
    assert engine.artifacts.whitening() is None and engine.artifacts.prior() is None
    with pytest.raises(RuntimeError, match="nothing fitted on judged rooms"):
        room_cv(engine, two_rooms["queries"], two_rooms["qrels"])


def test_room_cv_scores_every_room_query_out_of_fold_and_mining_follows(make_engine, two_rooms, tmp_path):
    engine = make_engine(shutil.copytree(two_rooms["home"], tmp_path / "mars"))
    queries, qrels = load_queries(two_rooms["queries"]), load_qrels(two_rooms["qrels"])
    before = whitening_path(engine.home).read_bytes()
    lines = []
    report = room_cv(engine, two_rooms["queries"], two_rooms["qrels"], folds=2, progress=lines.append)
    assert set(report["per_query"]) == {q.id for q in queries}
    assert report["tasks"]["room-scene"]["queries"] == 2 and 0.0 <= report["tasks"]["room-scene"]["nDCG@10"] <= 1.0
    assert len(lines) == 2 and all("fitting on 1 rooms" in line for line in lines)
    assert whitening_path(engine.home).read_bytes() == before
    with pytest.raises(ValueError, match="folds"):
        room_cv(engine, two_rooms["queries"], two_rooms["qrels"], folds=1)

    room_queries = [q for q in queries if q.task in ROOM_TASKS]
    mined = mine_out_of_fold(engine, room_queries, qrels, depth=5, controls=1)
    assert sorted(m.query.id for m in mined) == sorted(q.id for q in room_queries)
    assert all(m.pairs and len(m.labels) == len(m.pairs) for m in mined)
    assert whitening_path(engine.home).read_bytes() == before


def test_out_of_fold_refits_for_seen_rooms_only(make_engine, two_rooms, ikea_slice, tmp_path):
    from dataclasses import replace

    engine = make_engine(shutil.copytree(two_rooms["home"], tmp_path / "mars"))
    queries, qrels = load_queries(two_rooms["queries"]), load_qrels(two_rooms["qrels"])
    assert set(engine.artifacts.whitening().meta["learned"]["photos"]) == {ikea_slice["room"].name, "room-b.jpg"}
    assert engine.artifacts.prior().room_ids == {two_rooms["room_a"], two_rooms["room_b"]}
    photo_c = tmp_path / "room-c.jpg"
    shutil.copy(ikea_slice["room"], photo_c)
    unseen = replace(queries[0], id="held-out::scene", room_id="held-out", image=photo_c)  # e.g. a held-out split's room
    calls = []

    def run(funnel, group):
        trained = funnel.artifacts.current()
        calls.append(([q.id for q in group], trained.whitening.meta["learned"]["judged_photos"], sorted(trained.prior.room_ids)))
        return [q.id for q in group]

    out = out_of_fold(engine, [*queries, unseen], {**qrels, unseen.id: qrels[queries[0].id]}, run)
    assert sorted(out) == sorted(q.id for q in [*queries, unseen])
    assert len(calls) == 3
    for ids, photos, rooms in calls[:2]:  # each seen room's group: fitted on the other seen room only
        assert photos == 1 and len(rooms) == 1 and not any(i.startswith(rooms[0]) for i in ids)
    assert calls[2] == (["held-out::scene"], 2, sorted([two_rooms["room_a"], two_rooms["room_b"]]))  # as installed
