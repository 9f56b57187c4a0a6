"""Contract test classes for the store seams (in the style of Haystack's ``testing`` package):
every :class:`~indexing.vector_store.VectorStore` and :class:`~indexing.lexical_index.LexicalIndex`
must pass the same cases. A backend's test module subclasses the contract once, as
``class TestMyStore(VectorStoreContract)``, and says how to open an empty store; pytest then
collects every case for it. (This module's name does not start with ``test_``, so the
contracts themselves are not collected.)"""

from __future__ import annotations

import numpy as np
import pytest

from indexing.lexical_index import LexicalDoc, LexicalIndex
from indexing.vector_store import VectorPoint, VectorStore

DIMS = {"image": 16, "text": 8}


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """``n`` random unit rows of dimension ``d``, float32."""
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def contract_points() -> list[VectorPoint]:
    """300 points in 3 classes and 6 types; every tenth product has no photo."""
    rng = np.random.default_rng(0)
    img, txt = unit(rng, 300, DIMS["image"]), unit(rng, 300, DIMS["text"])
    out = []
    for i in range(300):
        vectors = {"text": txt[i]}
        if i % 10:
            vectors["image"] = img[i]
        cls = f"c{i % 3}"
        out.append(VectorPoint(f"p{i:03d}", vectors, [cls, f"{cls}/t{i % 6}"], f"t{i % 6}", "white"))
    return out


def brute_force(points, name, q, k, cats=None):  # noqa: ANN001, ANN201
    """The exact top ``k`` of ``points`` on vector ``name`` for query ``q`` within ``cats``: (id, cosine)."""
    rows = [(p.product_id, float(p.vectors[name] @ q)) for p in points
            if name in p.vectors and (cats is None or set(cats) & set(p.category_ids))]
    return sorted(rows, key=lambda r: (-r[1], r[0]))[:k]


class VectorStoreContract:
    """What every vector store must do. Subclasses implement :meth:`make_store` (an empty store
    with vectors ``dims``) and may override :meth:`drop_store`."""

    def make_store(self, tmp_path, dims: dict[str, int]) -> VectorStore:  # noqa: ANN001
        raise NotImplementedError

    def drop_store(self, store: VectorStore) -> None:
        store.close()

    @pytest.fixture(scope="class")
    def points(self) -> list[VectorPoint]:
        return contract_points()

    @pytest.fixture
    def store(self, tmp_path, points):  # noqa: ANN001, ANN201
        s = self.make_store(tmp_path, DIMS)
        s.upsert(points)
        yield s
        self.drop_store(s)

    def test_protocol_count_present(self, store, points):
        assert isinstance(store, VectorStore)
        assert store.count() == 300
        assert store.present(["p001", "p002", "nope"]) == {"p001", "p002"}

    def test_fetch_returns_stored_vectors_and_payload(self, store, points):
        got = store.fetch(["p010", "p011", "nope"])
        assert set(got) == {"p010", "p011"}
        assert "image" not in got["p010"].vectors  # stored without a photo
        np.testing.assert_allclose(got["p011"].vectors["image"], points[11].vectors["image"], atol=1e-6)
        np.testing.assert_allclose(got["p011"].vectors["text"], points[11].vectors["text"], atol=1e-6)
        assert set(got["p011"].category_ids) == set(points[11].category_ids) and got["p011"].type == "t5"

    @pytest.mark.parametrize("name", ["image", "text"])
    def test_search_equals_brute_force(self, store, points, name):
        q = unit(np.random.default_rng(1), 3, DIMS[name])
        for row, hits in zip(q, store.search_many(name, q, 10)):
            expected = brute_force(points, name, row, 10)
            assert [h.id for h in hits] == [e[0] for e in expected]
            assert [h.score for h in hits] == pytest.approx([e[1] for e in expected], abs=1e-5)

    def test_filtered_search(self, store, points):
        q = unit(np.random.default_rng(2), 1, DIMS["image"])
        hits = store.search_many("image", q, 20, ["c1/t1"])[0]
        assert hits and [h.id for h in hits] == [e[0] for e in brute_force(points, "image", q[0], 20, ["c1/t1"])]
        assert store.search_many("image", q, 5, ["missing"])[0] == []

    def test_products_without_image_only_match_text(self, store):
        q = unit(np.random.default_rng(3), 1, DIMS["image"])
        ids = {h.id for h in store.search_many("image", q, 300)[0]}
        assert "p000" not in ids and len(ids) == 270

    def test_upsert_replaces_delete_removes(self, store, points):
        p = points[5]
        moved = VectorPoint(p.product_id, {"text": -p.vectors["text"]}, ["c9"], p.type, p.colour)
        store.upsert([moved])
        assert store.count() == 300
        hit = store.search_many("text", -p.vectors["text"][None], 1, ["c9"])[0]
        assert hit[0].id == p.product_id and hit[0].score == pytest.approx(1.0, abs=1e-5)
        store.delete([p.product_id, "nope"])
        assert store.count() == 299 and store.present([p.product_id]) == set()

    def test_bad_queries(self, store):
        with pytest.raises(KeyError):
            store.search_many("audio", np.zeros((1, 4), np.float32), 3)
        with pytest.raises(ValueError):
            store.search_many("text", np.zeros((1, 3), np.float32), 3)

    def test_reindex_adds_a_named_vector_and_keeps_every_point(self, store, points):
        """Adding a named vector (as `mars train align` does with ``aligned``) rewrites every point
        from the store's own scan; search on the new vector works and the old vectors are intact."""
        rng = np.random.default_rng(1)
        extra = {p.product_id: unit(rng, 1, 4)[0] for p in points if "image" in p.vectors}
        rebuilt = (
            VectorPoint(p.product_id, {**p.vectors, **({"aligned": extra[p.product_id]} if p.product_id in extra else {})},
                        p.category_ids, p.type, p.colour)
            for p in store.scan()
        )
        assert store.reindex(rebuilt, dims={**DIMS, "aligned": 4}) is None
        assert store.dims == {**DIMS, "aligned": 4}
        assert store.count() == 300
        q = extra["p001"]
        assert [h.id for h in store.search_many("aligned", q[None, :], 5)[0]] == [r[0] for r in brute_force(
            [VectorPoint(pid, {"aligned": v}, []) for pid, v in extra.items()], "aligned", q, 5)]
        got = store.fetch(["p001", "p010"])
        np.testing.assert_allclose(got["p001"].vectors["text"], points[1].vectors["text"], atol=1e-5)
        assert "aligned" not in got["p010"].vectors  # no photo, no aligned vector
        assert store.search_many("text", points[2].vectors["text"][None, :], 1, ["c2"])[0][0].id == "p002"

    def test_failed_reindex_leaves_the_store_unchanged(self, store, points):
        def broken():  # noqa: ANN202
            yield from list(store.scan())[:10]
            raise RuntimeError("encoder crashed")

        with pytest.raises(RuntimeError, match="encoder crashed"):
            store.reindex(broken(), dims={**DIMS, "aligned": 4})
        assert store.count() == 300 and "aligned" not in store.dims
        assert store.search_many("image", points[1].vectors["image"][None, :], 1)[0][0].id == "p001"

    def test_points_written_after_a_search_are_found_under_their_product_ids(self, store, points):
        """Writes after the first search show (Qdrant Edge answers searches without payload and
        maps point ids back to product ids from a table it keeps in step with writes)."""
        q = points[5].vectors["text"]
        assert store.search_many("text", q[None, :], 1)[0][0].id == "p005"
        store.upsert([VectorPoint("new-1", {"text": q}, ["c9"], "t9", "red")])
        assert {h.id for h in store.search_many("text", q[None, :], 2)[0]} == {"p005", "new-1"}
        assert [h.id for h in store.search_many("text", q[None, :], 5, ["c9"])[0]] == ["new-1"]
        store.delete(["new-1", "p005"])
        assert {h.id for h in store.search_many("text", q[None, :], 3)[0]}.isdisjoint({"p005", "new-1"})


#: The lexical contract's documents: class and type keys as the catalog writes them.
DOCS = [
    LexicalDoc("1", "STRANDMON", "Armchair", "Yellow", "A classic wing chair.", ["armchair", "armchair/armchair"]),
    LexicalDoc("2", "POANG", "Armchair", "Birch", "Layer-glued bent birch frame.", ["armchair", "armchair/armchair"]),
    LexicalDoc("3", "HEKTAR", "Pendant lamp", "Dark grey", "Gives a directed light.", ["lamp", "lamp/pendant-lamp"]),
    LexicalDoc("4", "LOHALS", "Rug, flatwoven", "Natural", "Handwoven jute rug.", ["rug", "rug/rug-flatwoven"]),
    LexicalDoc("5", "STOCKHOLM", "Rug, flatwoven", "Yellow", "Wool rug, handwoven.", ["rug", "rug/rug-flatwoven"]),
]
BOOSTS = {"title": 2.0, "type": 3.0, "colour": 1.5, "text": 1.0}


class LexicalIndexContract:
    """What every BM25 index must do. Subclasses implement :meth:`make_index` (an empty index
    with the field ``boosts``; ``name`` tells two indexes of one test apart) and may override
    :meth:`drop_index`."""

    def make_index(self, tmp_path, name: str, boosts: dict[str, float]) -> LexicalIndex:  # noqa: ANN001
        raise NotImplementedError

    def drop_index(self, index: LexicalIndex) -> None:
        index.close()

    @pytest.fixture
    def index(self, tmp_path):  # noqa: ANN001, ANN201
        ix = self.make_index(tmp_path, "contract", BOOSTS)
        ix.upsert(DOCS)
        yield ix
        self.drop_index(ix)

    def test_protocol_and_count(self, index):
        assert isinstance(index, LexicalIndex)
        assert index.count() == 5

    def test_bm25_ranks_matching_docs(self, index):
        hits = index.search("yellow armchair", 10)
        assert hits[0].id == "1"  # matches type and colour
        assert {h.id for h in hits} >= {"1", "2", "5"}
        assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))

    def test_category_filter(self, index):
        hits = index.search("yellow", 10, ["rug"])
        assert [h.id for h in hits] == ["5"]
        assert index.search("yellow", 10, ["rug/rug-flatwoven", "armchair"])  # any of the keys
        assert index.search("yellow", 10, ["no-such-category"]) == []

    def test_field_boosts_matter(self, tmp_path):
        docs = [LexicalDoc("t", "lamp", "Vase", "", ""), LexicalDoc("y", "vase", "Lamp", "", "")]
        by_type = self.make_index(tmp_path, "type", {"title": 1.0, "type": 5.0, "colour": 1.0, "text": 1.0})
        by_title = self.make_index(tmp_path, "title", {"title": 5.0, "type": 1.0, "colour": 1.0, "text": 1.0})
        try:
            for ix in (by_type, by_title):
                ix.upsert(docs)
            assert by_type.search("lamp", 2)[0].id == "y"
            assert by_title.search("lamp", 2)[0].id == "t"
        finally:
            self.drop_index(by_type)
            self.drop_index(by_title)

    def test_upsert_replaces_and_delete_removes(self, index):
        index.upsert([LexicalDoc("1", "STRANDMON", "Armchair", "Green", "", ["armchair"])])
        assert index.count() == 5
        assert index.search("yellow", 10, ["armchair"]) == []
        index.delete(["1", "unknown"])
        assert index.count() == 4
        assert all(h.id != "1" for h in index.search("strandmon armchair", 10))

    def test_query_syntax_is_inert(self, index):
        for text in ['armchair AND (', 'rug:"', "+-&&||!(){}[]^~*?:\\/", "", "   "]:
            index.search(text, 5)  # never raises
        assert index.search("", 5) == []
