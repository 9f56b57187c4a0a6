"""QdrantServerStore beyond the vector contract: alias-swap reindex, deterministic ids, payload
index, retries. Runs on qdrant-client's local mode (``:memory:`` / a temp path); the same
cases run against a live server when ``QDRANT_URL`` is set."""

from __future__ import annotations

import os
import uuid

import httpx
import numpy as np
import pytest
from qdrant_client import QdrantClient, models
from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from indexing.qdrant_server import QdrantServerStore, is_transient
from indexing.qdrant_points import point_id
from indexing.vector_store import VectorPoint, VectorStore

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect in the local Qdrant")

DIMS = {"image": 4, "text": 3}


def _unit(v) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    return v / np.linalg.norm(v)


def _points(prefix: str, n: int, category: str = "c1") -> list[VectorPoint]:
    rng = np.random.default_rng(len(prefix) + n)
    return [
        VectorPoint(
            f"{prefix}{i}",
            {"image": _unit(rng.normal(size=4)), "text": _unit(rng.normal(size=3))},
            [category, f"{category}/t{i % 2}"],
            f"t{i % 2}",
            "white",
        )
        for i in range(n)
    ]


def _http_error(status: int) -> UnexpectedResponse:
    return UnexpectedResponse(status, "error", b'{"status":{"error":"x"}}', httpx.Headers())


@pytest.fixture(params=["local", "live"])
def make_store(request):
    """Factory of stores on one client: local mode in memory, or the server at ``QDRANT_URL``."""
    if request.param == "live":
        if not os.environ.get("QDRANT_URL"):
            pytest.skip("QDRANT_URL not set (live Qdrant server)")
        client = QdrantClient(url=os.environ["QDRANT_URL"])
    else:
        client = QdrantClient(location=":memory:")
    stores: list[QdrantServerStore] = []

    def factory(name: str = "prod", **kwargs) -> QdrantServerStore:
        if request.param == "live":
            name = f"mars_test_{uuid.uuid4().hex[:8]}_{name}"
        store = QdrantServerStore(DIMS, client=client, name=name, backoff_s=0.0, **kwargs)
        stores.append(store)
        return store

    factory.client = client
    factory.live = request.param == "live"
    yield factory
    if request.param == "live":
        for store in stores:
            store.drop()
    client.close()


def test_first_open_creates_v1_behind_alias(make_store):
    store = make_store()
    assert isinstance(store, VectorStore)
    assert store.versions() == [f"{store.name}_v1"]
    assert store.live_collection() == f"{store.name}_v1"
    aliases = {a.alias_name: a.collection_name for a in make_store.client.get_aliases().aliases}
    assert aliases[store.name] == f"{store.name}_v1"
    vectors = make_store.client.get_collection(f"{store.name}_v1").config.params.vectors
    assert {k: v.size for k, v in vectors.items()} == DIMS
    assert all(v.distance == models.Distance.COSINE for v in vectors.values())
    # a second opener with the same dims uses the same collection
    again = QdrantServerStore(DIMS, client=make_store.client, name=store.name)
    assert again.live_collection() == store.live_collection() and again.versions() == store.versions()


def test_payload_index_on_category_field(make_store, monkeypatch):
    calls = []
    real = make_store.client.create_payload_index

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(make_store.client, "create_payload_index", spy)
    store = make_store()
    store.reindex(_points("a", 3))
    assert [(c["collection_name"], c["field_name"], c["field_schema"]) for c in calls] == [
        (f"{store.name}_v1", "category_ids", models.PayloadSchemaType.KEYWORD),
        (f"{store.name}_v2", "category_ids", models.PayloadSchemaType.KEYWORD),
    ]
    if make_store.live:  # local mode accepts payload indexes but does not report them
        schema = make_store.client.get_collection(store.name).payload_schema
        assert schema["category_ids"].data_type == models.PayloadSchemaType.KEYWORD


def test_point_ids_are_uuid5_and_reupsert_replaces(make_store):
    store = make_store()
    pts = _points("p", 5)
    store.upsert(pts)
    moved = [VectorPoint(p.product_id, p.vectors, ["c9"], p.type, "black") for p in pts]
    store.upsert(moved)
    assert store.count() == 5
    records, _ = make_store.client.scroll(store.name, limit=10, with_payload=True)
    assert {str(r.id) for r in records} == {point_id(p.product_id) for p in pts}
    assert point_id("p0") == str(uuid.uuid5(uuid.UUID("6f1d7c3e-4a55-4d0b-9a51-2b8f0d6f3c11"), "p0"))
    got = store.fetch(["p0"])["p0"]
    assert got.category_ids == ["c9"] and got.colour == "black"
    assert store.search_many("text", pts[0].vectors["text"][None], 10, ["c1"]) == [[]]


def test_batches_and_scan(make_store):
    store = make_store(batch_size=2)
    pts = _points("p", 7)
    store.upsert(pts)
    assert store.count() == 7
    assert sorted(p.product_id for p in store.scan()) == sorted(p.product_id for p in pts)
    store.delete(["p0", "p1", "p2", "nope"])
    assert store.count() == 4 and store.present(["p0", "p3"]) == {"p3"}


def test_reindex_swaps_alias_and_deletes_old(make_store):
    store = make_store(batch_size=2)
    store.upsert(_points("old", 4))
    assert store.reindex(p for p in _points("new", 5, "c2")) is None  # a generator is consumed once
    new = store.live_collection()
    assert new == f"{store.name}_v2"
    assert store.live_collection() == new and store.versions() == [new]  # old one deleted
    assert store.count() == 5
    q = _points("new", 5, "c2")[0].vectors["image"][None]
    hits = store.search_many("image", q, 10)[0]
    assert {h.id for h in hits} == {f"new{i}" for i in range(5)}
    assert hits[0].id == "new0" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert store.search_many("image", q, 10, ["c2/t1"])[0] and all(
        h.id in {"new1", "new3"} for h in store.search_many("image", q, 10, ["c2/t1"])[0]
    )


def test_reindex_keep_old_rollback_and_prune(make_store):
    store = make_store()
    store.upsert(_points("old", 4))
    v1 = store.live_collection()
    store.reindex(_points("new", 2), keep_old=True)
    v2 = store.live_collection()
    assert store.versions() == [v1, v2] and store.count() == 2
    store.point_alias_to(v1)
    assert store.live_collection() == v1 and store.count() == 4
    assert store.prune() == [v2] and store.versions() == [v1]
    with pytest.raises(ValueError, match="not a version"):
        store.point_alias_to(v2)


def test_failed_build_is_deleted_and_live_untouched(make_store, monkeypatch):
    store = make_store(batch_size=2)
    store.upsert(_points("old", 4))
    deleted = {}
    real_delete = make_store.client.delete_collection

    def spy_delete(collection_name, **kwargs):
        deleted[collection_name] = make_store.client.count(collection_name).count
        return real_delete(collection_name, **kwargs)

    monkeypatch.setattr(make_store.client, "delete_collection", spy_delete)

    def broken():
        yield from _points("new", 5)  # two full batches reach the new collection first
        raise RuntimeError("source broke mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        store.reindex(broken())
    assert deleted == {f"{store.name}_v2": 4}  # the partly built collection, and only it
    assert store.versions() == [f"{store.name}_v1"] and store.live_collection() == f"{store.name}_v1"
    assert store.count() == 4 and store.present(["old0", "new0"]) == {"old0"}
    # the next reindex still works and takes the next free version
    store.reindex(_points("new", 1))
    assert store.live_collection() == f"{store.name}_v2"


def test_failed_swap_is_deleted_and_live_untouched(make_store, monkeypatch):
    store = make_store()
    store.upsert(_points("old", 3))

    def refuse(**kwargs):
        raise _http_error(500)

    monkeypatch.setattr(make_store.client, "update_collection_aliases", refuse)
    with pytest.raises(UnexpectedResponse):
        store.reindex(_points("new", 2))
    monkeypatch.undo()
    assert store.versions() == [f"{store.name}_v1"] and store.count() == 3


def test_reindex_with_new_dims(make_store):
    store = make_store()
    store.upsert(_points("old", 2))
    wide = {"image": 5, "text": 3}
    pts = [VectorPoint("w0", {"image": _unit([1, 0, 0, 0, 0]), "text": _unit([1, 1, 1])}, ["c1"])]
    store.reindex(pts, dims=wide)
    assert store.dims == wide and store.count() == 1
    assert store.search_many("image", _unit([1, 0, 0, 0, 0])[None], 1)[0][0].id == "w0"
    with pytest.raises(ValueError, match="vectors"):
        QdrantServerStore(DIMS, client=make_store.client, name=store.name)


def test_upsert_validates_vectors(make_store):
    store = make_store()
    with pytest.raises(ValueError, match="shape"):
        store.upsert([VectorPoint("x", {"text": np.ones(4, np.float32)})])
    with pytest.raises(KeyError, match="audio"):
        store.upsert([VectorPoint("x", {"audio": np.ones(3, np.float32)})])
    assert store.count() == 0


def test_retries_transient_errors_only(make_store, monkeypatch):
    store = make_store(retries=2)
    real = make_store.client.upsert
    failures = [ResponseHandlingException(httpx.ConnectError("connection refused")), _http_error(503)]
    calls = []

    def flaky(**kwargs):
        calls.append(1)
        if failures:
            raise failures.pop(0)
        return real(**kwargs)

    monkeypatch.setattr(make_store.client, "upsert", flaky)
    store.upsert(_points("p", 2))
    assert len(calls) == 3 and store.count() == 2

    calls.clear()
    failures[:] = [_http_error(400)]
    with pytest.raises(UnexpectedResponse):
        store.upsert(_points("q", 1))
    assert len(calls) == 1  # a client error is not retried

    calls.clear()
    failures[:] = [_http_error(502)] * 3
    with pytest.raises(UnexpectedResponse):
        store.upsert(_points("q", 1))
    assert len(calls) == 3  # 1 + retries, then the last error propagates


def test_transient_classification():
    assert is_transient(ResponseHandlingException(httpx.ReadTimeout("slow")))
    assert is_transient(ResponseHandlingException(httpx.ConnectError("refused")))
    assert is_transient(_http_error(500)) and is_transient(_http_error(429))
    assert is_transient(ResourceExhaustedResponse("slow down", 0))
    assert not is_transient(_http_error(400)) and not is_transient(_http_error(404))
    assert not is_transient(ResponseHandlingException(ValueError("bad json")))
    assert not is_transient(ValueError("x"))


def test_reopen_from_path_and_guards(tmp_path):
    store = QdrantServerStore(DIMS, path=tmp_path / "q", name="prod")
    store.upsert(_points("p", 3))
    store.close()
    store = QdrantServerStore(DIMS, path=tmp_path / "q", name="prod")
    assert store.count() == 3 and store.live_collection() == "prod_v1"
    store.close()
    with pytest.raises(ValueError, match="has vectors"):
        QdrantServerStore({"image": 8, "text": 3}, path=tmp_path / "q", name="prod")

    client = QdrantClient(location=":memory:")
    client.create_collection("plain", vectors_config={"text": models.VectorParams(size=3, distance="Cosine")})
    with pytest.raises(ValueError, match="not an alias"):
        QdrantServerStore(DIMS, client=client, name="plain")
    with pytest.raises(ValueError, match="exactly one"):
        QdrantServerStore(DIMS, client=client, path=":memory:")
    with pytest.raises(ValueError, match="name"):
        QdrantServerStore(DIMS, client=client, name="bad name")
