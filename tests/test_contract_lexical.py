"""The lexical contract (tests/contract_stores.py) for tantivy; OpenSearch runs it against a
live cluster in tests/test_opensearch_backend.py when OPENSEARCH_URL is set."""

from __future__ import annotations

from contract_stores import LexicalIndexContract
from indexing.tantivy_index import TantivyIndex


class TestTantivyIndex(LexicalIndexContract):
    def make_index(self, tmp_path, name, boosts):  # noqa: ANN001, ANN201
        return TantivyIndex(tmp_path / name, boosts)
