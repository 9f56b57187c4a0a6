"""End to end on a real slice of the IKEA catalog with the real offline encoders."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
from sqlalchemy import func, select

from catalog.models import Product, RejectionRow
from ingestion.images import decode_image, read_image_bytes
from ingestion.readers import open_source
from mars.engine import Engine, IndexMismatchError, StoreBusyError
from mars.settings import Settings
from mars.wiring import CRITIC_NOT_SET_UP
from query.artifacts import Trained
from query.funnel import QueryError, SearchQuery
from query.retriever import RetrievalQuery


@pytest.fixture(scope="module")
def slice_engine(slice_ingest, encoders, tmp_path_factory):
    """An engine on a copy of the session's ingested slice, with the report of that ingest."""
    home, report = slice_ingest
    engine = Engine(Settings(home=shutil.copytree(home, tmp_path_factory.mktemp("e2e") / "mars")), encoders=encoders)
    yield engine, report
    engine.close()


@pytest.fixture(scope="module")
def room(ikea_slice):
    return decode_image(read_image_bytes(ikea_slice["room"], max_bytes=10**8), max_pixels=10**8)


def test_first_ingest_counts(slice_engine, ikea_slice):
    engine, report = slice_engine
    n = len(ikea_slice["records"])
    no_photo = sum(1 for r in ikea_slice["records"] if not r["image"])
    assert (report.total, report.ingested, report.rejected, report.unchanged) == (n, n, 0, 0)
    assert report.without_image == no_photo
    assert engine.lexical.count() == engine.vector_store().count() == n
    with engine.sessions() as s:
        assert s.execute(select(func.count()).select_from(Product)).scalar_one() == n


def test_known_room_class_query_finds_the_product(slice_engine, ikea_slice, room):
    engine, _ = slice_engine
    in_slice = {r["_id"] for r in ikea_slice["records"]}
    query = next(q for q in ikea_slice["queries"] if q["task"] == "room-class" and ikea_slice["qrels"][q["_id"]] & in_slice)
    response = engine.search(SearchQuery(text=query["text"], image=room, top_k=10))
    assert response.lock.applied and response.lock.key == query["_id"].split("::")[2]
    top = [i.id for i in response.items]
    assert set(top) & ikea_slice["qrels"][query["_id"]], (query, top)
    first = response.items[0]
    assert first.provenance.fused.rank == 1 and (first.provenance.retrievers.get("image") or first.provenance.retrievers.get("bm25"))


def test_room_photo_alone_finds_products_of_the_room(slice_engine, ikea_slice, room):
    engine, _ = slice_engine
    response = engine.search(SearchQuery(image=room, top_k=10))
    assert not response.lock.applied
    assert set(i.id for i in response.items) & ikea_slice["room_products"]
    assert all(i.provenance.retrievers.get("image") is not None and i.provenance.retrievers.get("bm25") is None for i in response.items)


def test_text_query_finds_product_by_colour_and_type(slice_engine, ikea_slice):
    engine, _ = slice_engine
    target = next(r for r in ikea_slice["records"] if r["color"] and r["type"] and r["image"])
    response = engine.search(SearchQuery(text=f"{target['color']} {target['type']}", top_k=10))
    assert target["_id"] in [i.id for i in response.items]


def test_modes_and_critic_status(slice_engine, room):
    engine, _ = slice_engine
    bm25 = engine.search(SearchQuery(text="lamp", mode="bm25"))
    assert bm25.items and all(i.provenance.retrievers.get("image") is None and i.provenance.retrievers.get("text") is None for i in bm25.items)
    vector = engine.search(SearchQuery(text="lamp", image=room, mode="vector"))
    assert all(i.provenance.retrievers.get("bm25") is None for i in vector.items)
    full = engine.search(SearchQuery(text="a lamp for this bedroom", image=room, mode="full"))
    assert full.critic.status == "not configured" and full.critic.backend == "none"
    assert full.critic.detail == CRITIC_NOT_SET_UP  # learned is the default; no checkpoint trained here
    assert str(engine.home) not in full.critic.detail and full.stages.critic == "absent"
    assert bm25.critic.status == vector.critic.status == "skipped" and bm25.critic.detail == vector.critic.detail == ""
    assert [i.id for i in full.items] == [i.id for i in engine.search(SearchQuery(text="a lamp for this bedroom", image=room)).items]
    with pytest.raises(QueryError, match="bm25 needs query text"):
        engine.search(SearchQuery(image=room, mode="bm25"))
    with pytest.raises(QueryError):
        engine.search(SearchQuery())
    with pytest.raises(QueryError, match="no list named 'colour' to weigh; the lists are bm25, text, aligned, image, prior"):
        engine.search(SearchQuery(text="a lamp", weights={"colour": 1.0}))
    for bad in (float("nan"), float("inf"), -0.5):
        with pytest.raises(QueryError, match="finite numbers ≥ 0"):
            engine.search(SearchQuery(text="a lamp", weights={"bm25": bad}))
    unknown = engine.search(SearchQuery(text="a lamp", category="spaceship"))
    assert not unknown.lock.applied and unknown.items  # unknown category: no lock, not empty


def test_faiss_reference_agrees_with_qdrant(slice_engine, slice_home, make_engine, room, tmp_path):
    engine, _ = slice_engine
    q = SearchQuery(text="a rug for this bedroom", image=room, mode="vector", top_k=20)
    qdrant = [i.id for i in engine.search(q).items]
    exact = make_engine(shutil.copytree(slice_home, tmp_path / "mars"), vector_backend="faiss")
    assert type(exact.search_store()).__name__ == "FaissFlatStore" and exact.search_store().count() == engine.vector_store().count()
    assert [i.id for i in exact.search(q).items] == qdrant


def test_image_list_is_the_exact_best_region_score(slice_engine, room):
    """The grid cells find candidates in the index; every region (grid cells + dense windows)
    re-scores them, so within a catalog smaller than the depth the list is the brute-force
    max over regions of the cosine with each stored image vector."""
    engine, _ = slice_engine
    funnel = engine.funnel
    store = engine.search_store()
    regions = funnel.query_vectors.region_vectors(room)
    assert len(regions) > 14  # dense windows beyond the 1 + 4 + 9 grid cells
    image = next(r for r in funnel.retrievers if r.name == "image")
    query = RetrievalQuery(text=None, image=room, image_key=funnel.query_vectors.region_key(room), room=None, trained=Trained())
    assert image.applies(query)
    hits = image.run(query, None, 200)
    expected = {p.product_id: float((regions @ p.vectors["image"]).max()) for p in store.scan() if "image" in p.vectors}
    assert {h.id for h in hits} == set(expected)
    np.testing.assert_allclose([h.score for h in hits], [expected[h.id] for h in hits], atol=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    # the candidates' image vectors are kept for the next photo (embedded mode) until a write
    fetched: list[list[str]] = []

    class CountingStore:
        def __getattr__(self, name):  # noqa: ANN001, ANN204
            return getattr(store, name)

        def fetch(self, product_ids):  # noqa: ANN001, ANN202
            fetched.append(list(product_ids))
            return store.fetch(product_ids)

    counting = type(image)(replace(image.ctx, vectors=CountingStore))  # the same caches, a store that counts fetches
    assert funnel.cache.vectors_enabled
    again = counting.run(query, None, 200)
    assert fetched == [] and [(h.id, h.score) for h in again] == [(h.id, h.score) for h in hits]
    funnel.invalidate_results()
    counting.run(query, None, 200)
    assert len(fetched) == 1 and set(fetched[0]) == set(expected)


def test_one_process_owns_the_stores(slice_engine, encoders):
    engine, _ = slice_engine
    with pytest.raises(StoreBusyError, match="owns"):
        Engine(engine.settings, encoders=encoders)


def test_reingest_is_idempotent_and_changes_update(make_engine, ikea_slice, tmp_path):
    engine = make_engine()
    first = engine.ingest(open_source(ikea_slice["corpus"]), "slice")
    again = engine.ingest(open_source(ikea_slice["corpus"]), "slice")
    assert (again.ingested, again.unchanged) == (0, first.ingested)

    records = [dict(r) for r in map(json.loads, ikea_slice["corpus"].read_text().splitlines())]
    records[0]["title"] = "ZYXWOBBLE"
    changed = tmp_path / "corpus.jsonl"
    changed.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    third = engine.ingest(open_source(changed), "changed")
    assert (third.ingested, third.unchanged) == (1, len(records) - 1)
    assert [i.id for i in engine.search(SearchQuery(text="zyxwobble", mode="bm25")).items] == [records[0]["_id"]]
    assert engine.vector_store().count() == len(records)


def test_malformed_records_are_rejected_and_nothing_stored_changes(make_engine, ikea_slice, tmp_path):
    engine = make_engine()
    good = [json.loads(line) for line in ikea_slice["corpus"].read_text().splitlines()][:30]
    (tmp_path / "head").mkdir()
    (tmp_path / "mixed").mkdir()
    head = tmp_path / "head" / "corpus.jsonl"
    head.write_text("\n".join(json.dumps(r) for r in good[:20]) + "\n")
    engine.ingest(open_source(head), "head")
    with engine.sessions() as s:
        before = dict(s.execute(select(Product.id, Product.content_hash)).all())

    (tmp_path / "text.jpg").write_text("not an image")
    bad = [
        {"title": "no id"},
        {"_id": 12345, "title": "numeric id"},
        {"_id": "x1", "title": ["a", "list"]},
        {"_id": "x2", "title": "missing photo", "image": str(tmp_path / "nope.jpg")},
        {"_id": "x3", "title": "text file as photo", "image": str(tmp_path / "text.jpg")},
        {"_id": good[0]["_id"], "title": "duplicate of the first line"},
    ]
    mixed = tmp_path / "mixed" / "corpus.jsonl"
    lines = [json.dumps(r) for r in good[:30]] + [json.dumps(b) for b in bad] + ["{broken json"]
    mixed.write_text("\n".join(lines) + "\n")
    report = engine.ingest(open_source(mixed), "mixed")
    assert report.rejected == 7 and report.unchanged == 20 and report.ingested == 10
    reasons = " | ".join(r.reason for r in report.rejections)
    for phrase in ("id: Field required", "Input should be a valid string", "does not exist", "not a readable image",
                   "duplicate id", "invalid JSON"):
        assert phrase in reasons, reasons
    with engine.sessions() as s:
        after = dict(s.execute(select(Product.id, Product.content_hash)).all())
        assert s.execute(select(func.count()).select_from(RejectionRow)).scalar_one() == 7
    assert {k: after[k] for k in before} == before and len(after) == 30


def test_encoder_setting_is_recorded_with_the_index(make_engine, ikea_slice, tmp_path):
    engine = make_engine(home=tmp_path / "h")
    engine.ingest(open_source(ikea_slice["corpus"]), "slice")
    manifest = json.loads((tmp_path / "h" / "index" / "manifest.json").read_text())
    assert manifest == {"image_encoder": "efficientnet-lite0-gem", "text_encoder": "all-minilm-l6-v2",
                        "dims": {"image": 1280, "text": 384}}
    engine.close()
    with pytest.raises(IndexMismatchError, match="was built with"):
        Engine(Settings(home=tmp_path / "h", text_encoder="st:/elsewhere"))
