"""The staging prior (`mars train prior`): counts per room type, its order, its file, and the
funnel's `prior` list for queries with a room type."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from indexing.staging_prior import StagingPrior, StagingPriorError, StagingPriorFile, room_type_key, staging_prior_path
from query.funnel import SearchQuery

STAGED = [
    ("r1", "Living Room", ["sofa", "lamp", "rug"]),
    ("r1", "Living Room", ["sofa"]),  # a second judged query of the same room: counts once
    ("r2", "living  room", ["sofa", "table"]),
    ("r3", "Kitchen", ["table", "lamp", "stool"]),
    ("r4", "Kitchen", ["stool"]),
]


def test_fit_counts_rooms_per_room_type_once_each():
    prior = StagingPrior.fit(STAGED)
    assert prior.rooms == {"living room": 2, "kitchen": 2}
    assert prior.counts["sofa"] == {"living room": 2}
    assert prior.counts["lamp"] == {"living room": 1, "kitchen": 1}
    assert prior.counts["stool"] == {"kitchen": 2}


def test_ranked_orders_by_room_type_then_all_rooms_then_id():
    prior = StagingPrior.fit(STAGED)
    assert [h.id for h in prior.ranked("Living Room")] == ["sofa", "lamp", "table", "rug", "stool"]
    assert [h.score for h in prior.ranked("Living Room")] == [2.0, 1.0, 1.0, 1.0, 0.0]
    assert [h.id for h in prior.ranked("KITCHEN")] == ["stool", "lamp", "table", "sofa", "rug"]
    # an unseen room type: overall popularity
    assert [h.id for h in prior.ranked("Garage")] == ["lamp", "sofa", "stool", "table", "rug"]
    assert room_type_key("  Baby  Children Room ") == "baby children room"


def test_fit_rejects_rooms_without_type_or_with_two_types():
    with pytest.raises(ValueError, match="room type"):
        StagingPrior.fit([("r1", "", ["a"])])
    with pytest.raises(ValueError, match="both"):
        StagingPrior.fit([("r1", "Kitchen", ["a"]), ("r1", "Bedroom", ["b"])])


def test_file_round_trip_digest_and_errors(tmp_path):
    path = tmp_path / "index" / "staging_prior.json"
    prior = StagingPrior.fit(STAGED)
    prior.save(path)
    loaded = StagingPrior.load(path)
    assert loaded.rooms == prior.rooms and loaded.counts == prior.counts and len(loaded.digest) == 12
    assert [h.id for h in loaded.ranked("kitchen")] == [h.id for h in prior.ranked("kitchen")]
    watched = StagingPriorFile(path)
    assert watched().digest == loaded.digest
    StagingPrior.fit(STAGED[:1]).save(path)  # re-fitted while serving: the watcher re-reads it
    assert watched().rooms == {"living room": 1}
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(StagingPriorError, match="not a staging prior"):
        StagingPrior.load(tmp_path / "other.json")
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(StagingPriorError, match="not a usable"):
        StagingPrior.load(tmp_path / "broken.json")
    assert StagingPriorFile(tmp_path / "broken.json")() is None
    assert StagingPriorFile(tmp_path / "missing.json")() is None


def test_funnel_fuses_the_prior_list_for_queries_with_a_room_type(make_engine, ikea_slice, slice_home, tmp_path):
    home = shutil.copytree(slice_home, tmp_path / "mars")
    engine = make_engine(home)
    room_products = sorted(ikea_slice["room_products"])
    other = next(r for r in ikea_slice["records"] if r["_id"] not in room_products and r["type"])
    # the bedroom shows the slice's room products; a kitchen shows one other product
    prior = StagingPrior.fit([("bedroom-1", "Bedroom", room_products),
                              ("kitchen-1", "Kitchen", [other["_id"], "not-in-catalog"])])
    query = SearchQuery(text="a cosy corner to read", room="Bedroom", top_k=100)
    before = engine.search(query)
    assert all(item.provenance.retrievers.get("prior") is None for item in before.items)  # no prior fitted yet

    engine.install_prior(prior)
    assert staging_prior_path(home).exists()
    after = engine.search(query)  # the cached lists are dropped by the install
    assert after.fusion["prior"] == 2.0
    staged = {item.id: item.provenance.retrievers.get("prior") for item in after.items if item.provenance.retrievers.get("prior") is not None}
    assert set(room_products) <= set(staged) and all(staged[i].score == 1.0 for i in room_products)
    assert "not-in-catalog" not in {item.id for item in after.items}
    lists = engine.funnel.retrieve(query).lists
    assert [h.id for h in lists["prior"]][: len(room_products)] == room_products  # ties by id
    assert [h.id for h in lists["prior"]][len(room_products)] == other["_id"]

    # within a lock the list keeps the lock's products only
    locked = engine.funnel.retrieve(SearchQuery(text="anything", category=other["type"], room="Kitchen"))
    assert locked.lock.applied and [h.id for h in locked.lists["prior"]][0] == other["_id"]
    products = engine.funnel.products([h.id for h in locked.lists["prior"]])
    assert {p.type for p in products.values()} == {other["type"]}

    # no room type, or a photo query (shipped weight 0): no prior list
    assert "prior" not in engine.funnel.retrieve(SearchQuery(text="a cosy corner to read")).lists
    photo = SearchQuery(text="a rug for this bedroom", room="Bedroom", image=_room(ikea_slice))
    assert "prior" not in engine.funnel.retrieve(photo).lists


def test_cli_trains_the_prior_from_judged_room_queries(ikea_slice, slice_home, tmp_path, monkeypatch):
    from mars.cli import app
    from mars.settings import get_settings

    home = shutil.copytree(slice_home, tmp_path / "mars")
    queries = tmp_path / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in ikea_slice["queries"]))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"{q['_id']}\t{p}\t1\n" for q in ikea_slice["queries"] for p in sorted(ikea_slice["qrels"].get(q["_id"], ()))))
    monkeypatch.setenv("MARS_HOME", str(home))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["train", "prior", "--queries", str(queries), "--qrels", str(qrels)])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "1 rooms (bedroom 1)" in result.output
    prior = StagingPrior.load(staging_prior_path(home))
    assert set(prior.counts) == set(ikea_slice["room_products"]) and prior.rooms == {"bedroom": 1}

    empty = tmp_path / "empty.tsv"
    empty.write_text("query-id\tcorpus-id\tscore\n")
    result = CliRunner().invoke(app, ["train", "prior", "--queries", str(queries), "--qrels", str(empty)])
    assert result.exit_code == 2 and "no query" in result.output


def _room(ikea_slice):
    from ingestion.images import decode_image, read_image_bytes

    return decode_image(read_image_bytes(ikea_slice["room"], max_bytes=10**8), max_pixels=10**8)
