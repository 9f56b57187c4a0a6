"""The search path's caches: the funnel's per-retriever result cache, catalog-row cache and
product-vector cache (dropped on every write, bounded) and the API's memo of decoded base64 photos."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.exc import InvalidRequestError

from ingestion.readers import RawRecord, apply_mapping
from query.app import create_app
from query.bodies import Base64Photos
from query.funnel import SearchQuery
from query.retrievers import image_vectors
from query.search_cache import SearchCache

RUGS = [
    {"id": "rug-1", "title": "Jute rug", "type": "Rug, flatwoven", "colour": "natural", "text": "A flatwoven jute rug."},
    {"id": "rug-2", "title": "Wool runner", "type": "Rug, low pile", "colour": "grey", "text": "A long wool runner."},
    {"id": "lamp-1", "title": "Reading lamp", "type": "Floor lamp", "colour": "black", "text": "A lamp for reading."},
]
NEW_RUG = {"id": "rug-new", "title": "Jute rug jute", "type": "Rug, flatwoven", "colour": "natural",
           "text": "Jute, jute rug."}
QUERY = SearchQuery(text="a jute rug", mode="hybrid")


def raw(records: list[dict]) -> list[RawRecord]:
    """``records`` as a JSON-lines reader hands them over."""
    return [RawRecord("test", i + 1, apply_mapping(r, {}, Path.cwd()), raw=r) for i, r in enumerate(records)]


@pytest.fixture
def engine(make_engine):
    eng = make_engine(api_auth="open", rate_limit="")
    eng.ingest(raw(RUGS), "test")
    return eng


@pytest.fixture
def bm25_calls(engine, monkeypatch) -> list[str]:
    """The texts BM25 was really searched with (cache misses)."""
    calls: list[str] = []
    search = engine.lexical.search

    def counted(text, limit, category_ids=None):  # noqa: ANN001, ANN202
        calls.append(text)
        return search(text, limit, category_ids)

    monkeypatch.setattr(engine.lexical, "search", counted)
    return calls


def ids(response) -> list[str]:  # noqa: ANN001
    return [item.id for item in response.items]


def test_embedded_engine_caches_stage_results_and_rows(engine):
    assert engine.settings.embedded_stores
    cache = engine.funnel.cache
    assert cache.result_hits > 0 and cache.rows_enabled and cache.vectors_enabled


def test_stage_results_are_reused_until_an_ingest_or_a_delete(engine, bm25_calls):
    first = engine.search(QUERY)
    assert ids(first) and "rug-1" in ids(first) and len(bm25_calls) == 1
    again = engine.search(QUERY)
    assert len(bm25_calls) == 1, "the second identical query must reuse the cached BM25 list"
    assert [(i.id, i.score, i.provenance) for i in again.items] == [(i.id, i.score, i.provenance) for i in first.items]

    engine.ingest(raw([NEW_RUG]), "test")  # a write: every cached list is dropped
    after_ingest = engine.search(QUERY)
    assert len(bm25_calls) == 2 and "rug-new" in ids(after_ingest)
    assert "rug-new" in [h.id for h in engine.funnel.retrieve(QUERY).lists["bm25"]]

    engine.delete_items(["rug-new"])
    assert "rug-new" not in [h.id for h in engine.funnel.retrieve(QUERY).lists["bm25"]]
    assert "rug-new" not in ids(engine.search(QUERY)) and len(bm25_calls) == 3


def test_cached_rows_show_an_updated_product(engine):
    assert engine.search(QUERY).items[0].title == "Jute rug"
    engine.ingest(raw([{**RUGS[0], "title": "Jute rug, new edition"}]), "test")
    titles = {item.id: item.title for item in engine.search(QUERY).items}
    assert titles["rug-1"] == "Jute rug, new edition"


def test_each_ingest_batch_drops_the_cached_results(engine):
    engine.search(QUERY)
    sizes = engine.funnel.cache.sizes()
    assert sizes["results"] and sizes["rows"]
    seen: list[tuple[int, int]] = []
    engine.ingest(raw([NEW_RUG]), "test",
                  on_progress=lambda n: seen.append(tuple(engine.funnel.cache.sizes()[k] for k in ("results", "rows"))))
    assert seen == [(0, 0)], "the caches must be empty once a batch's writes are done"


def test_rule_changes_are_not_hidden_by_the_cache(engine):
    from catalog.rules import create_rule

    assert "lamp-1" not in [h.id for h in engine.funnel.retrieve(SearchQuery(text="carpet")).lists.get("bm25", [])]
    with engine.sessions() as session:
        create_rule(session, {"kind": "synonym", "term": "carpet", "replacement": "lamp"})
    engine.refresh_rules()
    hits = engine.funnel.retrieve(SearchQuery(text="carpet")).lists["bm25"]
    assert "lamp-1" in [h.id for h in hits], "a synonym rewrites the text, which keys the cached lists"


def test_a_list_computed_across_an_invalidation_is_not_kept():
    cache = SearchCache(result_hits=1000)
    calls = []

    def compute_while_a_write_lands() -> list[str]:
        calls.append(1)
        cache.invalidate()  # e.g. an ingest batch finished while this list was computed
        return ["stale"]

    assert cache.hits("bm25", "q", None, 10, compute_while_a_write_lands) == ["stale"]
    assert cache.hits("bm25", "q", None, 10, lambda: ["fresh"]) == ["fresh"]
    assert cache.hits("bm25", "q", None, 10, lambda: ["recomputed"]) == ["fresh"]


def test_product_vectors_fetched_across_an_invalidation_are_not_kept():
    import numpy as np

    from indexing.vector_store import VectorPoint

    cache = SearchCache(product_vectors=10)
    fetched: list[list[str]] = []

    class Store:
        write_lands = True

        def fetch(self, ids):  # noqa: ANN001, ANN202
            fetched.append(list(ids))
            if self.write_lands:
                cache.invalidate()  # e.g. an ingest batch replaced the photo meanwhile
            return {i: VectorPoint(i, {"image": np.ones(4, np.float32)}) for i in ids if i != "no-photo"}

    store = Store()

    def vectors(ids):  # noqa: ANN001, ANN202 - as the image list asks for them
        return cache.product_vectors("raw", ids, lambda missing: image_vectors(store.fetch(missing), None))

    assert set(vectors(["a", "no-photo"])) == {"a"}
    store.write_lands = False
    vectors(["a"])
    vectors(["a"])
    assert fetched == [["a", "no-photo"], ["a"]], "kept only when no write landed during the fetch"


def test_the_result_cache_is_bounded_and_keyed_by_list_lock_and_depth():
    cache = SearchCache(result_hits=25)
    hits = [str(i) for i in range(10)]  # each list costs 11 of the 25
    for key in ("a", "b", "c"):
        cache.hits("text", key, None, 10, lambda: hits)
    assert [k[1] for k in cache._results] == ["b", "c"] and cache.sizes()["results"] == 22
    assert cache.hits("text", "b", ["rug"], 10, lambda: ["locked"]) == ["locked"]
    assert cache.hits("text", "b", None, 20, lambda: ["deeper"]) == ["deeper"]
    assert cache.hits("image", "b", None, 10, lambda: ["image"]) == ["image"]
    assert cache.sizes()["results"] <= 25
    off = SearchCache()
    assert off.hits("text", "a", None, 10, lambda: ["x"]) == ["x"] and not off.sizes()["results"]


def test_rows_for_the_response_skip_the_categories(engine):
    light = engine.funnel.products(["rug-1"], categories=False)["rug-1"]
    assert light.title == "Jute rug"
    with pytest.raises(InvalidRequestError):
        light.categories  # noqa: B018 - reading them must fail loudly, not come back empty
    full = engine.funnel.products(["rug-1"])["rug-1"]
    assert [c.key for c in full.categories]


def test_base64_photos_are_decoded_once_and_bounded():
    photos = Base64Photos(max_bytes=10)
    first = photos.decode(base64.b64encode(b"hello").decode())
    assert first[0] == b"hello" and first[1].startswith("sha256:")
    assert photos.decode(base64.b64encode(b"hello").decode()) is first
    photos.decode(base64.b64encode(b"world!!").decode())  # 5 + 7 > 10: "hello" goes
    assert photos._photos.currsize == 7 and len(photos._photos) == 1
    for bad in ("abc", "ab cd", "é"):
        with pytest.raises(ValueError):
            photos.decode(bad)


def test_api_search_with_the_same_photo_twice(engine, monkeypatch):
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (180, 120, 60)).save(buf, "JPEG")
    photo = base64.b64encode(buf.getvalue()).decode()
    decoded: list[int] = []
    b64decode = base64.b64decode

    def counted(text: str, validate: bool = False) -> bytes:
        decoded.append(1)
        return b64decode(text, validate=validate)

    monkeypatch.setattr("query.bodies.base64.b64decode", counted)
    with TestClient(create_app(engine=engine)) as client:
        answers = [client.post("/v1/search", json={"text": "a jute rug", "image_base64": photo}) for _ in range(2)]
        assert all(r.status_code == 200 for r in answers), answers[0].text
        assert answers[0].json()["items"] == answers[1].json()["items"] and answers[0].json()["has_image"]
        assert decoded == [1], "the second request reuses the decoded photo"
        bad = client.post("/v1/search", json={"text": "a jute rug", "image_base64": "not base64!"})
        assert bad.status_code == 422 and "base64" in bad.text
