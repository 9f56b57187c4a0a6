"""Contract suite for every VectorStore: Qdrant Edge, the exact FAISS reference and the Qdrant
server store (qdrant-client local mode; a live server when QDRANT_URL is set) must agree."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from indexing.qdrant_server import QdrantServerStore
from indexing.faiss_flat import FaissFlatStore
from indexing.qdrant_edge import QdrantEdgeStore
from indexing.vector_store import VectorPoint, VectorStore

DIMS = {"image": 16, "text": 8}


def _unit(rng, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def points():
    rng = np.random.default_rng(0)
    img, txt = _unit(rng, 300, DIMS["image"]), _unit(rng, 300, DIMS["text"])
    out = []
    for i in range(300):
        vectors = {"text": txt[i]}
        if i % 10:  # every tenth product has no photo
            vectors["image"] = img[i]
        cls = f"c{i % 3}"
        out.append(VectorPoint(f"p{i:03d}", vectors, [cls, f"{cls}/t{i % 6}"], f"t{i % 6}", "white"))
    return out


def _make_store(kind: str, tmp_path) -> VectorStore:
    if kind == "qdrant-edge":
        return QdrantEdgeStore(tmp_path / "q", DIMS)
    if kind == "faiss":
        return FaissFlatStore(DIMS)
    if kind == "qdrant-server-local":  # qdrant-client local mode: the server's API in pure Python
        return QdrantServerStore(DIMS, path=":memory:", name="contract")
    if not os.environ.get("QDRANT_URL"):
        pytest.skip("QDRANT_URL not set (live Qdrant server)")
    name = f"mars_contract_{uuid.uuid4().hex[:8]}"
    return QdrantServerStore(DIMS, url=os.environ["QDRANT_URL"], name=name, exact=True)


@pytest.fixture(params=["qdrant-edge", "faiss", "qdrant-server-local", "qdrant-server-live"])
def store(request, tmp_path, points) -> VectorStore:
    s = _make_store(request.param, tmp_path)
    s.upsert(points)
    yield s
    if request.param == "qdrant-server-live":
        s.drop()
    s.close()


def _brute(points, name, q, k, cats=None):
    rows = [(p.product_id, float(p.vectors[name] @ q)) for p in points
            if name in p.vectors and (cats is None or set(cats) & set(p.category_ids))]
    return sorted(rows, key=lambda r: (-r[1], r[0]))[:k]


def test_protocol_count_present(store, points):
    assert isinstance(store, VectorStore)
    assert store.count() == 300
    assert store.present(["p001", "p002", "nope"]) == {"p001", "p002"}


def test_fetch_returns_stored_vectors_and_payload(store, points):
    got = store.fetch(["p010", "p011", "nope"])
    assert set(got) == {"p010", "p011"}
    assert "image" not in got["p010"].vectors  # stored without a photo
    np.testing.assert_allclose(got["p011"].vectors["image"], points[11].vectors["image"], atol=1e-6)
    np.testing.assert_allclose(got["p011"].vectors["text"], points[11].vectors["text"], atol=1e-6)
    assert set(got["p011"].category_ids) == set(points[11].category_ids) and got["p011"].type == "t5"


@pytest.mark.parametrize("name", ["image", "text"])
def test_search_equals_brute_force(store, points, name):
    q = _unit(np.random.default_rng(1), 3, DIMS[name])
    for row, hits in zip(q, store.search_many(name, q, 10)):
        expected = _brute(points, name, row, 10)
        assert [h.id for h in hits] == [e[0] for e in expected]
        assert [h.score for h in hits] == pytest.approx([e[1] for e in expected], abs=1e-5)


def test_filtered_search(store, points):
    q = _unit(np.random.default_rng(2), 1, DIMS["image"])
    hits = store.search_many("image", q, 20, ["c1/t1"])[0]
    assert hits and [h.id for h in hits] == [e[0] for e in _brute(points, "image", q[0], 20, ["c1/t1"])]
    assert store.search_many("image", q, 5, ["missing"])[0] == []


def test_products_without_image_only_match_text(store):
    q = _unit(np.random.default_rng(3), 1, DIMS["image"])
    ids = {h.id for h in store.search_many("image", q, 300)[0]}
    assert "p000" not in ids and len(ids) == 270


def test_upsert_replaces_delete_removes(store, points):
    p = points[5]
    moved = VectorPoint(p.product_id, {"text": -p.vectors["text"]}, ["c9"], p.type, p.colour)
    store.upsert([moved])
    assert store.count() == 300
    hit = store.search_many("text", -p.vectors["text"][None], 1, ["c9"])[0]
    assert hit[0].id == p.product_id and hit[0].score == pytest.approx(1.0, abs=1e-5)
    store.delete([p.product_id, "nope"])
    assert store.count() == 299 and store.present([p.product_id]) == set()


def test_bad_queries(store):
    with pytest.raises(KeyError):
        store.search_many("audio", np.zeros((1, 4), np.float32), 3)
    with pytest.raises(ValueError):
        store.search_many("text", np.zeros((1, 3), np.float32), 3)


def test_faiss_reference_built_from_qdrant(tmp_path, points):
    q = QdrantEdgeStore(tmp_path / "q", DIMS)
    q.upsert(points)
    ref = FaissFlatStore.from_store(q)
    assert ref.count() == q.count() == 300
    query = _unit(np.random.default_rng(4), 2, DIMS["text"])
    assert [[h.id for h in r] for r in ref.search_many("text", query, 15, ["c2"])] == [
        [h.id for h in r] for r in q.search_many("text", query, 15, ["c2"])
    ]
    q.close()


def test_qdrant_store_is_owned_by_one_opener(tmp_path):
    a = QdrantEdgeStore(tmp_path / "q", DIMS)
    with pytest.raises(ValueError, match="cannot open"):
        QdrantEdgeStore(tmp_path / "q", DIMS)
    a.close()
    with pytest.raises(ValueError, match="cannot open"):
        QdrantEdgeStore(tmp_path / "q", {"image": 4, "text": 8})


def test_reindex_adds_a_named_vector_and_keeps_every_point(store, points):
    """Adding a named vector (as `mars train align` does with ``aligned``) rewrites every point
    from the store's own scan; search on the new vector works and the old vectors are intact."""
    rng = np.random.default_rng(1)
    extra = {p.product_id: _unit(rng, 1, 4)[0] for p in points if "image" in p.vectors}
    rebuilt = (
        VectorPoint(p.product_id, {**p.vectors, **({"aligned": extra[p.product_id]} if p.product_id in extra else {})},
                    p.category_ids, p.type, p.colour)
        for p in store.scan()
    )
    store.reindex(rebuilt, dims={**DIMS, "aligned": 4})
    assert store.dims == {**DIMS, "aligned": 4}
    assert store.count() == 300
    q = extra["p001"]
    assert [h.id for h in store.search_many("aligned", q[None, :], 5)[0]] == [r[0] for r in _brute(
        [VectorPoint(pid, {"aligned": v}, []) for pid, v in extra.items()], "aligned", q, 5)]
    got = store.fetch(["p001", "p010"])
    np.testing.assert_allclose(got["p001"].vectors["text"], points[1].vectors["text"], atol=1e-5)
    assert "aligned" not in got["p010"].vectors  # no photo, no aligned vector
    assert store.search_many("text", points[2].vectors["text"][None, :], 1, ["c2"])[0][0].id == "p002"


def test_failed_reindex_leaves_the_store_unchanged(store, points):
    def broken():
        yield from list(store.scan())[:10]
        raise RuntimeError("encoder crashed")

    with pytest.raises(RuntimeError, match="encoder crashed"):
        store.reindex(broken(), dims={**DIMS, "aligned": 4})
    assert store.count() == 300 and "aligned" not in store.dims
    assert store.search_many("image", points[1].vectors["image"][None, :], 1)[0][0].id == "p001"


def test_points_written_after_a_search_are_found_under_their_product_ids(store, points):
    """Qdrant Edge answers searches without payload and maps point ids back to product ids
    from a table it keeps in step with upserts and deletes: writes after the first search show."""
    q = points[5].vectors["text"]
    assert store.search_many("text", q[None, :], 1)[0][0].id == "p005"
    store.upsert([VectorPoint("new-1", {"text": q}, ["c9"], "t9", "red")])
    assert {h.id for h in store.search_many("text", q[None, :], 2)[0]} == {"p005", "new-1"}
    assert [h.id for h in store.search_many("text", q[None, :], 5, ["c9"])[0]] == ["new-1"]
    store.delete(["new-1", "p005"])
    assert {h.id for h in store.search_many("text", q[None, :], 3)[0]}.isdisjoint({"p005", "new-1"})
