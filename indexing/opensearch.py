"""Server-mode BM25: an OpenSearch index behind the :class:`~indexing.lexical_index.LexicalIndex` protocol.

:class:`OpenSearchIndex` stores the same fields as the embedded tantivy index
(:class:`indexing.tantivy_index.TantivyIndex`) and queries them the same way:

* Scoring: Okapi BM25 (Robertson & Zaragoza, "The Probabilistic Relevance Framework:
  BM25 and Beyond", 2009) through a named similarity ``mars_bm25`` with configurable
  ``k1`` (default 1.2) and ``b`` (default 0.75) — the defaults of tantivy and of
  OpenSearch (docs: "Similarity" / index settings ``index.similarity``). Lucene's BM25
  leaves out the constant ``(k1 + 1)`` factor of the numerator, so scores differ from
  tantivy's by that factor; rankings do not, and the funnel fuses ranks, not scores.
* Analysis: the custom analyzer ``mars_english`` = standard tokenizer → English possessive
  stemmer → lowercase → English stop words → English (Porter) stemmer, the chain of
  OpenSearch's built-in ``english`` analyzer (docs: "Language analyzers" → English).
  tantivy's ``en_stem`` has no stop-word filter, so a query made only of stop words
  matches nothing here and may match there.
* Query: ``multi_match`` over ``title``, ``type``, ``colour``, ``text`` with
  ``field^boost`` (the tantivy boosts), type ``best_fields`` with ``tie_breaker: 1.0`` —
  a dis_max whose score is the sum of the per-field scores (docs: "Multi-match query"),
  as tantivy sums boosted per-field BM25 scores; any term may match (``operator: or``).
  The category lock is a ``terms`` filter on the keyword field ``category_ids`` in a
  ``bool`` query (filters do not score). Results sort by ``_score`` desc, then the keyword
  ``id`` asc, so ties break by id as in every backend.
* Writes: ``opensearchpy.helpers.streaming_bulk`` (the generator behind ``helpers.bulk``;
  docs: "Bulk" API — items with ``status`` and ``error``, a top-level ``errors`` flag);
  failed items raise ``BulkIndexError``. A bulk load (more documents than one bulk
  request holds, and every reindex) runs with ``refresh_interval: -1`` and restores it
  afterwards; every write ends with an explicit ``_refresh``, so documents are
  searchable when :meth:`~OpenSearchIndex.upsert` returns.
* Live name and versions: ``name`` is an index alias over ``<name>_v<N>``;
  :meth:`~OpenSearchIndex.reindex` fills ``<name>_v<N+1>`` and moves the alias in one
  ``POST _aliases`` request (remove + add, applied atomically: docs "Index aliases" /
  "Manage aliases"); a failed build or swap deletes the new index and leaves the live one
  untouched. The previous index is deleted after the swap unless ``keep_old=True``.
  Writes made through the alias during a reindex go to the old index; reindex from the
  catalog with ingestion paused, or replay them.
* Retries: a client made from ``url`` retries connection errors, timeouts and HTTP
  502/503/504 (opensearch-py ``Transport``: ``max_retries``, ``retry_on_timeout``,
  ``retry_on_status``); bulk items rejected with 429 are retried by the bulk helper
  (``max_retries``, ``initial_backoff``; only with ``raise_on_error=False``, so this module
  collects failed items itself). Other errors propagate unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opensearchpy import OpenSearch, helpers

from indexing.lexical_index import TEXT_FIELDS, LexicalDoc, LexicalHit
from indexing.versions import next_version, versions_of

#: Query text is reduced to these word characters, as for tantivy; multi_match has no
#: query syntax, so this only keeps both backends' inputs identical.
_QUERY_CHARS = re.compile(r"[^0-9A-Za-z]+")

#: Name of the BM25 similarity and of the analyzer declared in the index settings.
SIMILARITY = "mars_bm25"
ANALYZER = "mars_english"


class OpenSearchIndex:
    """A :class:`~indexing.lexical_index.LexicalIndex` on an OpenSearch cluster.

    Exactly one of ``url`` and ``client`` is given.

    Args:
        boosts: field -> boost for ``title``, ``type``, ``colour``, ``text`` (missing: 1.0),
            the same values the tantivy index takes (settings ``boost_*``).
        url: cluster address, e.g. ``"https://search:9200"``.
        client: an existing ``opensearchpy.OpenSearch`` (not closed by :meth:`close`).
        name: the live alias; indexes are ``<name>_v<N>``.
        k1: BM25 term-frequency saturation (>= 0; 1.2 as in Robertson & Zaragoza 2009).
        b: BM25 length normalisation in [0, 1] (0.75, same source).
        shards: primary shards of a new index.
        replicas: replicas of a new index (OpenSearch's default 1; 0 on a one-node cluster).
        refresh_interval: the index's refresh interval outside bulk loads (OpenSearch's
            default ``"1s"``).
        chunk_size: documents per bulk request; an upsert of more runs as a bulk load.
        max_retries: retries of a request (client from ``url``) and of 429-rejected bulk items.
        bulk_backoff_s: first wait in seconds before re-sending 429-rejected items (doubles).
        timeout_s: request timeout in seconds (client from ``url``).
        client_options: further keyword arguments of ``OpenSearch(...)`` for ``url``
            (``http_auth``, ``verify_certs``, ``ca_certs``, ``connection_class``, ...).

    Raises:
        ValueError: bad arguments, or ``name`` is a concrete index rather than an alias.
        opensearchpy.TransportError: the cluster refused a request.
    """

    def __init__(
        self,
        boosts: dict[str, float],
        *,
        url: str | None = None,
        client: OpenSearch | None = None,
        name: str = "mars_products",
        k1: float = 1.2,
        b: float = 0.75,
        shards: int = 1,
        replicas: int = 1,
        refresh_interval: str = "1s",
        chunk_size: int = 500,
        max_retries: int = 3,
        bulk_backoff_s: int = 2,
        timeout_s: float = 30.0,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        if (url is None) == (client is None):
            raise ValueError("give exactly one of url= and client=")
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        if chunk_size <= 0 or max_retries < 0 or bulk_backoff_s < 0 or shards <= 0 or replicas < 0:
            raise ValueError("chunk_size and shards must be > 0; max_retries, bulk_backoff_s, replicas >= 0")
        if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", name):
            raise ValueError(f"name must be lower-case letters, digits, '_' or '-', got {name!r}")
        unknown = set(boosts) - set(TEXT_FIELDS)
        if unknown or any(v < 0 for v in boosts.values()):
            raise ValueError(f"boosts are >= 0 for the fields {TEXT_FIELDS}, got {boosts!r}")
        self.boosts = {field: float(boosts.get(field, 1.0)) for field in TEXT_FIELDS}
        self.name = name
        self.k1, self.b = float(k1), float(b)
        self.shards, self.replicas = shards, replicas
        self.refresh_interval = refresh_interval
        self.chunk_size = chunk_size
        self.max_retries = max_retries
        self.bulk_backoff_s = bulk_backoff_s
        self._owns_client = client is None
        if client is not None:
            self.client = client
        else:
            options = {"max_retries": max_retries, "retry_on_timeout": True, "timeout": timeout_s}
            options.update(client_options or {})
            self.client = OpenSearch(hosts=[url], **options)
        try:
            self._open()
        except BaseException:
            if self._owns_client:
                self.client.close()
            raise

    # ------------------------------------------------------------------ request bodies

    def index_body(self, *, refresh_interval: str | None = None, alias: bool = False) -> dict[str, Any]:
        """Settings and mappings of a new ``<name>_v<N>`` index (the ``PUT /<index>`` body).

        Args:
            refresh_interval: overrides ``refresh_interval`` (``"-1"`` for a bulk build).
            alias: also attach the live alias (first index of a new store).
        """
        text_field = {"type": "text", "analyzer": ANALYZER, "similarity": SIMILARITY}
        body: dict[str, Any] = {
            "settings": {
                "index": {
                    "number_of_shards": self.shards,
                    "number_of_replicas": self.replicas,
                    "refresh_interval": refresh_interval or self.refresh_interval,
                    "similarity": {SIMILARITY: {"type": "BM25", "k1": self.k1, "b": self.b}},
                },
                "analysis": {
                    "filter": {
                        "mars_english_possessive": {"type": "stemmer", "language": "possessive_english"},
                        "mars_english_stop": {"type": "stop", "stopwords": "_english_"},
                        "mars_english_stemmer": {"type": "stemmer", "language": "english"},
                    },
                    "analyzer": {
                        ANALYZER: {
                            "type": "custom",
                            "tokenizer": "standard",
                            "filter": [
                                "mars_english_possessive",
                                "lowercase",
                                "mars_english_stop",
                                "mars_english_stemmer",
                            ],
                        }
                    },
                },
            },
            "mappings": {
                "dynamic": "strict",
                "properties": {
                    "id": {"type": "keyword"},
                    **{field: dict(text_field) for field in TEXT_FIELDS},
                    "category_ids": {"type": "keyword"},
                },
            },
        }
        if alias:
            body["aliases"] = {self.name: {}}
        return body

    def query_body(self, text: str, limit: int, category_ids: Sequence[str] | None = None) -> dict[str, Any] | None:
        """The ``_search`` body for ``text``, or None when the text has no words or ``limit <= 0``.

        The text is reduced to lower-case words (``[0-9A-Za-z]+``) as for tantivy.
        """
        words = _QUERY_CHARS.sub(" ", text).strip().lower()
        if not words or limit <= 0:
            return None
        query: dict[str, Any] = {
            "must": [
                {
                    "multi_match": {
                        "query": words,
                        "fields": [f"{field}^{self.boosts[field]}" for field in TEXT_FIELDS],
                        "type": "best_fields",
                        "tie_breaker": 1.0,
                        "operator": "or",
                    }
                }
            ]
        }
        if category_ids:
            query["filter"] = [{"terms": {"category_ids": list(category_ids)}}]
        return {
            "size": int(limit),
            "query": {"bool": query},
            "sort": [{"_score": {"order": "desc"}}, {"id": {"order": "asc"}}],
            "track_scores": True,
            "track_total_hits": False,
            "_source": False,
        }

    # -------------------------------------------------------------- index / alias admin

    def _open(self) -> None:
        """Use the index behind the alias, or create ``<name>_v1`` with the alias attached."""
        if self.client.indices.exists_alias(name=self.name):
            self.live_index()  # checks it points to exactly one index
            return
        if self.client.indices.exists(index=self.name):
            raise ValueError(
                f"{self.name!r} is an index, not an alias; OpenSearchIndex keeps its documents in "
                f"'{self.name}_v<N>' indexes behind the alias {self.name!r}: pick another name"
            )
        self.client.indices.create(index=self._next_version_name(), body=self.index_body(alias=True))

    def versions(self) -> list[str]:
        """This store's versioned indexes ``<name>_v<N>``, oldest first."""
        return versions_of(self.name, self.client.indices.get(index=f"{self.name}_v*"))

    def _next_version_name(self) -> str:
        return next_version(self.name, self.versions())

    def live_index(self) -> str | None:
        """The index the alias points to, or None when the alias does not exist.

        Raises:
            RuntimeError: the alias points to several indexes (changed by hand).
        """
        if not self.client.indices.exists_alias(name=self.name):
            return None
        indices = sorted(self.client.indices.get_alias(name=self.name))
        if len(indices) != 1:
            raise RuntimeError(f"alias {self.name!r} points to {indices}; exactly one index expected")
        return indices[0]

    def reindex(self, docs: Iterable[LexicalDoc], *, keep_old: bool = False) -> None:
        """Build ``<name>_v<N+1>`` from ``docs`` and move the alias onto it in one ``_aliases`` call
        (:meth:`live_index` then names it), as the vector stores' ``reindex`` does.

        The new index is created with refresh disabled, bulk-loaded (``docs`` consumed once,
        ``chunk_size`` per request), given back ``refresh_interval``, refreshed, then swapped in.

        Args:
            docs: every document of the new index (a generator is fine).
            keep_old: keep the previous index instead of deleting it.

        Raises:
            RuntimeError: the alias is missing. Whatever the iterable or the cluster raised
            while building or swapping; the new index has then been deleted and the alias
            still points to the old one.
        """
        old = self.live_index()
        if old is None:
            raise RuntimeError(f"alias {self.name!r} does not exist; cannot reindex a dropped index")
        new = self._next_version_name()
        self.client.indices.create(index=new, body=self.index_body(refresh_interval="-1"))
        try:
            self._bulk(self._index_action(new, doc) for doc in docs)
            self.client.indices.put_settings(index=new, body={"index": {"refresh_interval": self.refresh_interval}})
            self.client.indices.refresh(index=new)
            self.client.indices.update_aliases(
                body={
                    "actions": [
                        {"remove": {"index": old, "alias": self.name}},
                        {"add": {"index": new, "alias": self.name}},
                    ]
                }
            )
        except BaseException:
            self.client.indices.delete(index=new)
            raise
        if not keep_old:
            self.client.indices.delete(index=old)

    def drop(self) -> None:
        """Delete every versioned index of this store (the alias goes with them)."""
        for index in self.versions():
            self.client.indices.delete(index=index)

    # --------------------------------------------------------------------- documents

    @staticmethod
    def _index_action(index: str, doc: LexicalDoc) -> dict[str, Any]:
        return {
            "_op_type": "index",
            "_index": index,
            "_id": doc.id,
            "_source": {
                "id": doc.id,
                "title": doc.title,
                "type": doc.type,
                "colour": doc.colour,
                "text": doc.text,
                "category_ids": list(doc.category_ids),
            },
        }

    def _bulk(self, actions: Iterable[dict[str, Any]], ignore_status: tuple[int, ...] = ()) -> int:
        """Send ``actions`` through ``helpers.streaming_bulk``; returns the number of successful items.

        Items rejected with 429 are re-sent up to ``max_retries`` times (back-off
        ``bulk_backoff_s``, doubling). The helper only retries them when it does not raise
        per item (``raise_on_error=False``; opensearch-py issue #964), so failures are
        collected here and raised together once the input is consumed.

        Raises:
            opensearchpy.helpers.BulkIndexError: items failed with a status outside
                ``ignore_status``; ``errors`` holds the documented ``{op: {"_id", "status",
                "error"}}`` items.
        """
        done, failed = 0, []
        for ok, item in helpers.streaming_bulk(
            self.client,
            actions,
            chunk_size=self.chunk_size,
            max_retries=self.max_retries,
            initial_backoff=self.bulk_backoff_s,
            raise_on_error=False,
        ):
            if ok:
                done += 1
            elif next(iter(item.values())).get("status") not in ignore_status:
                failed.append(item)
        if failed:
            raise helpers.BulkIndexError(f"{len(failed)} document(s) failed in a bulk request", failed)
        return done

    @contextmanager
    def _refresh_paused(self, index: str) -> Iterator[None]:
        """Disable refresh on ``index`` for a bulk load; restore ``refresh_interval`` afterwards."""
        self.client.indices.put_settings(index=index, body={"index": {"refresh_interval": "-1"}})
        try:
            yield
        finally:
            self.client.indices.put_settings(index=index, body={"index": {"refresh_interval": self.refresh_interval}})

    def upsert(self, docs: Sequence[LexicalDoc]) -> None:
        """Index (insert or replace by id) ``docs``; searchable when this returns.

        More than ``chunk_size`` documents run as a bulk load with refresh paused.

        Raises:
            opensearchpy.helpers.BulkIndexError: some documents were rejected (the others
            are indexed; refresh is restored and the index refreshed all the same).
        """
        if not docs:
            return
        actions = (self._index_action(self.name, doc) for doc in docs)
        try:
            if len(docs) > self.chunk_size:
                with self._refresh_paused(self.name):
                    self._bulk(actions)
            else:
                self._bulk(actions)
        finally:
            self.client.indices.refresh(index=self.name)

    def delete(self, ids: Sequence[str]) -> None:
        """Delete documents by id (unknown ids, reported as 404 items, are ignored)."""
        if not ids:
            return
        try:
            self._bulk(({"_op_type": "delete", "_index": self.name, "_id": i} for i in ids), ignore_status=(404,))
        finally:
            self.client.indices.refresh(index=self.name)

    def search(self, text: str, limit: int, category_ids: Sequence[str] | None = None) -> list[LexicalHit]:
        """BM25 top ``limit`` for ``text`` within ``category_ids`` (any of them), best first,
        ties by id; empty text (after reduction to words) gives no hits and sends no request."""
        body = self.query_body(text, limit, category_ids)
        if body is None:
            return []
        response = self.client.search(index=self.name, body=body)
        hits = [LexicalHit(str(h["_id"]), float(h["_score"])) for h in response["hits"]["hits"]]
        return sorted(hits, key=lambda h: (-h.score, h.id))

    def count(self) -> int:
        """Number of documents in the live index (as of the last refresh)."""
        return int(self.client.count(index=self.name)["count"])

    def close(self) -> None:
        """Close the client when this index created it (an injected client stays open)."""
        if self._owns_client:
            self.client.close()
