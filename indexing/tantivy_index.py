"""The embedded BM25 index: tantivy in a directory (one process at a time may write to it).

tantivy scores with Okapi BM25 (k1 = 1.2, b = 0.75, Robertson & Zaragoza 2009) summed over
the queried fields, each field's score multiplied by its boost. Text fields use tantivy's
``en_stem`` analyzer (lower-case + Porter stemming); ``category_ids`` holds raw keys for the lock.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import tantivy

from indexing.lexical_index import TEXT_FIELDS, LexicalDoc, LexicalHit

_QUERY_CHARS = re.compile(r"[^0-9A-Za-z]+")


class TantivyIndex:
    """BM25 on a tantivy index in a directory; one process at a time may write to it.

    Args:
        path: index directory (created if missing).
        boosts: field -> boost for ``title``, ``type``, ``colour``, ``text``.
    """

    def __init__(self, path: Path, boosts: dict[str, float]) -> None:
        path.mkdir(parents=True, exist_ok=True)
        builder = tantivy.SchemaBuilder()
        builder.add_text_field("id", stored=True, tokenizer_name="raw")
        for name in TEXT_FIELDS:
            builder.add_text_field(name, tokenizer_name="en_stem")
        builder.add_text_field("category_ids", tokenizer_name="raw")
        self.schema = builder.build()
        self.index = tantivy.Index(self.schema, path=str(path))
        self.boosts = {name: float(boosts.get(name, 1.0)) for name in TEXT_FIELDS}
        self._writer: tantivy.IndexWriter | None = None

    def _get_writer(self) -> tantivy.IndexWriter:
        if self._writer is None:
            self._writer = self.index.writer(heap_size=64_000_000, num_threads=1)
        return self._writer

    def upsert(self, docs: Sequence[LexicalDoc]) -> None:
        """Replace documents by id and commit."""
        if not docs:
            return
        writer = self._get_writer()
        for doc in docs:
            writer.delete_documents_by_term("id", doc.id)
            writer.add_document(
                tantivy.Document(
                    id=doc.id,
                    title=doc.title,
                    type=doc.type,
                    colour=doc.colour,
                    text=doc.text,
                    category_ids=list(doc.category_ids),
                )
            )
        writer.commit()
        self.index.reload()

    def delete(self, ids: Sequence[str]) -> None:
        """Delete documents by id and commit."""
        if not ids:
            return
        writer = self._get_writer()
        for doc_id in ids:
            writer.delete_documents_by_term("id", doc_id)
        writer.commit()
        self.index.reload()

    def search(self, text: str, limit: int, category_ids: Sequence[str] | None = None) -> list[LexicalHit]:
        """BM25 top ``limit`` for ``text`` within ``category_ids``; empty text gives no hits.

        The text is reduced to lower-case words, so no query-language syntax can raise.
        """
        words = _QUERY_CHARS.sub(" ", text).strip().lower()  # lower case: AND/OR/NOT are operators
        if not words or limit <= 0:
            return []
        query = self.index.parse_query(words, list(TEXT_FIELDS), field_boosts=self.boosts)
        if category_ids:
            lock = tantivy.Query.term_set_query(self.schema, "category_ids", list(category_ids))
            query = tantivy.Query.boolean_query(
                [(tantivy.Occur.Must, query), (tantivy.Occur.Must, tantivy.Query.const_score_query(lock, 0.0))]
            )
        searcher = self.index.searcher()
        hits = [
            LexicalHit(searcher.doc(address)["id"][0], float(score))
            for score, address in searcher.search(query, limit).hits
        ]
        return sorted(hits, key=lambda h: (-h.score, h.id))

    def count(self) -> int:
        """Number of live documents."""
        return int(self.index.searcher().num_docs)

    def close(self) -> None:
        """Wait for merges and drop the writer (releases tantivy's lock file)."""
        if self._writer is not None:
            self._writer.wait_merging_threads()
            self._writer = None
