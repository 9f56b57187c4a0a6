"""The engine on its other vector backend: Qdrant via qdrant-client (local mode here; the same
class talks to a server when MARS_QDRANT_URL is http(s)), and the rule that decides who owns
the stores."""

from __future__ import annotations

import pytest

from ingestion.readers import open_source
from mars.settings import Settings
from query.funnel import SearchQuery


def test_qdrant_client_backend_answers_like_qdrant_edge(make_engine, ikea_slice, tmp_path):
    edge = make_engine(tmp_path / "edge")
    client = make_engine(tmp_path / "client", vector_backend="qdrant", qdrant_url=str(tmp_path / "qdrant-local"))
    for engine in (edge, client):
        report = engine.ingest(open_source(ikea_slice["corpus"]), "slice")
        assert report.ingested == len(ikea_slice["records"]) and report.rejected == 0
    assert type(client.vector_store()).__name__ == "QdrantServerStore"
    assert client.vector_store().count() == edge.vector_store().count() == len(ikea_slice["records"])
    room = ikea_slice["room"]
    from PIL import Image

    for query in (SearchQuery(text="a lamp for this bedroom", mode="vector"),
                  SearchQuery(text="a lamp for this bedroom", image=Image.open(room).convert("RGB"), mode="hybrid")):
        a, b = edge.search(query), client.search(query)
        assert [i.id for i in a.items] == [i.id for i in b.items]
        assert [round(i.score, 5) for i in a.items] == [round(i.score, 5) for i in b.items]
    assert client.delete_items([a.items[0].id]) == [a.items[0].id]
    assert client.vector_store().count() == len(ikea_slice["records"]) - 1


def test_who_owns_the_stores():
    assert Settings().embedded_stores
    assert Settings(vector_backend="qdrant", qdrant_url=":memory:", lexical_backend="opensearch").embedded_stores
    assert Settings(vector_backend="qdrant", qdrant_url="http://qdrant:6333").embedded_stores  # tantivy is local
    assert not Settings(
        vector_backend="qdrant", qdrant_url="http://qdrant:6333", lexical_backend="opensearch",
        opensearch_url="http://opensearch:9200",
    ).embedded_stores


def test_server_backends_need_their_urls(tmp_path):
    from mars.engine import Engine

    with pytest.raises(ValueError, match="MARS_QDRANT_URL"):
        Engine(Settings(home=tmp_path, vector_backend="qdrant"))
    with pytest.raises(ValueError, match="MARS_OPENSEARCH_URL"):
        Engine(Settings(home=tmp_path, lexical_backend="opensearch"))
