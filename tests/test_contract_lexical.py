"""Contract suite for every LexicalIndex implementation (tantivy here; OpenSearch joins later)."""

from __future__ import annotations

import pytest

from indexing.lexical_index import LexicalDoc, LexicalIndex
from indexing.tantivy_index import TantivyIndex

DOCS = [
    LexicalDoc("1", "STRANDMON", "Armchair", "Yellow", "A classic wing chair.", ["armchair", "armchair/armchair"]),
    LexicalDoc("2", "POANG", "Armchair", "Birch", "Layer-glued bent birch frame.", ["armchair", "armchair/armchair"]),
    LexicalDoc("3", "HEKTAR", "Pendant lamp", "Dark grey", "Gives a directed light.", ["lamp", "lamp/pendant-lamp"]),
    LexicalDoc("4", "LOHALS", "Rug, flatwoven", "Natural", "Handwoven jute rug.", ["rug", "rug/rug-flatwoven"]),
    LexicalDoc("5", "STOCKHOLM", "Rug, flatwoven", "Yellow", "Wool rug, handwoven.", ["rug", "rug/rug-flatwoven"]),
]


@pytest.fixture(params=["tantivy"])
def index(request, tmp_path) -> LexicalIndex:
    impl = TantivyIndex(tmp_path / "bm25", {"title": 2.0, "type": 3.0, "colour": 1.5, "text": 1.0})
    impl.upsert(DOCS)
    yield impl
    impl.close()


def test_protocol_and_count(index):
    assert isinstance(index, LexicalIndex)
    assert index.count() == 5


def test_bm25_ranks_matching_docs(index):
    hits = index.search("yellow armchair", 10)
    assert hits[0].id == "1"  # matches type and colour
    assert {h.id for h in hits} >= {"1", "2", "5"}
    assert all(a.score >= b.score for a, b in zip(hits, hits[1:]))


def test_category_filter(index):
    hits = index.search("yellow", 10, ["rug"])
    assert [h.id for h in hits] == ["5"]
    assert index.search("yellow", 10, ["rug/rug-flatwoven", "armchair"])  # any of the keys
    assert index.search("yellow", 10, ["no-such-category"]) == []


def test_field_boosts_matter(tmp_path):
    docs = [LexicalDoc("t", "lamp", "Vase", "", ""), LexicalDoc("y", "vase", "Lamp", "", "")]
    by_type = TantivyIndex(tmp_path / "a", {"title": 1.0, "type": 5.0, "colour": 1.0, "text": 1.0})
    by_title = TantivyIndex(tmp_path / "b", {"title": 5.0, "type": 1.0, "colour": 1.0, "text": 1.0})
    for ix in (by_type, by_title):
        ix.upsert(docs)
    assert by_type.search("lamp", 2)[0].id == "y"
    assert by_title.search("lamp", 2)[0].id == "t"
    by_type.close()
    by_title.close()


def test_upsert_replaces_and_delete_removes(index):
    index.upsert([LexicalDoc("1", "STRANDMON", "Armchair", "Green", "", ["armchair"])])
    assert index.count() == 5
    assert index.search("yellow", 10, ["armchair"]) == []
    index.delete(["1", "unknown"])
    assert index.count() == 4
    assert all(h.id != "1" for h in index.search("strandmon armchair", 10))


def test_query_syntax_is_inert(index):
    for text in ['armchair AND (', 'rug:"', "+-&&||!(){}[]^~*?:\\/", "", "   "]:
        index.search(text, 5)  # never raises
    assert index.search("", 5) == []
