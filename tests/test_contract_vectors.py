"""The vector-store contract (tests/contract_stores.py) for every backend: Qdrant Edge, the exact
FAISS reference and the Qdrant server store (qdrant-client local mode; a live server when
QDRANT_URL is set) must agree; plus what only the embedded backends do."""

from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from contract_stores import DIMS, VectorStoreContract, contract_points, unit
from indexing.faiss_flat import FaissFlatStore
from indexing.qdrant_edge import QdrantEdgeStore
from indexing.qdrant_server import QdrantServerStore


class TestQdrantEdgeStore(VectorStoreContract):
    def make_store(self, tmp_path, dims):  # noqa: ANN001, ANN201
        return QdrantEdgeStore(tmp_path / "q", dims)


class TestFaissFlatStore(VectorStoreContract):
    def make_store(self, tmp_path, dims):  # noqa: ANN001, ANN201
        return FaissFlatStore(dims)


class TestQdrantServerStoreLocalMode(VectorStoreContract):
    """qdrant-client local mode: the server's API in pure Python."""

    def make_store(self, tmp_path, dims):  # noqa: ANN001, ANN201
        return QdrantServerStore(dims, path=":memory:", name="contract")


class TestQdrantServerStoreLive(VectorStoreContract):
    def make_store(self, tmp_path, dims):  # noqa: ANN001, ANN201
        if not os.environ.get("QDRANT_URL"):
            pytest.skip("QDRANT_URL not set (live Qdrant server)")
        return QdrantServerStore(dims, url=os.environ["QDRANT_URL"], name=f"mars_contract_{uuid.uuid4().hex[:8]}", exact=True)

    def drop_store(self, store):  # noqa: ANN001, ANN201
        store.drop()
        store.close()


def test_faiss_reference_built_from_qdrant(tmp_path):
    q = QdrantEdgeStore(tmp_path / "q", DIMS)
    q.upsert(contract_points())
    ref = FaissFlatStore.from_store(q)
    assert ref.count() == q.count() == 300
    query = unit(np.random.default_rng(4), 2, DIMS["text"])
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
