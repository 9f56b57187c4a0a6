"""OpenSearchIndex without a server: the real opensearch-py client over a fake connection.

``FakeCluster`` stands in for the REST endpoints the adapter calls and answers in the
shapes OpenSearch documents (search: ``hits.hits[]._id/_score/sort``; bulk: ``errors`` +
``items[]`` with ``status``/``error``; count: ``count`` + ``_shards``; errors:
``{"error": {"type", "reason"}, "status"}``). It records every request, so the tests
assert the exact bodies built (index settings, similarity, analyzer, mappings, query with
boosts and filter, bulk lines, alias actions). Search results are canned per test: the
fake does not score. With ``OPENSEARCH_URL`` set, the lexical contract suite and a
reindex run against a real cluster at the end of this file.
"""

from __future__ import annotations

import fnmatch
import json
import os
import uuid
from collections.abc import Iterator

import pytest
from opensearchpy import Connection, OpenSearch
from opensearchpy import ConnectionError as OSConnectionError
from opensearchpy.exceptions import RequestError, TransportError
from opensearchpy.helpers import BulkIndexError

from contract_stores import DOCS, LexicalIndexContract
from indexing.lexical_index import LexicalDoc, LexicalHit, LexicalIndex
from indexing.opensearch import OpenSearchIndex

BOOSTS = {"title": 2.0, "type": 3.0, "colour": 1.5, "text": 1.0}
SHARDS = {"total": 1, "successful": 1, "skipped": 0, "failed": 0}


class FakeCluster:
    """In-memory state (indexes, aliases, documents) behind the endpoints the adapter uses."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict, object]] = []
        self.indices: dict[str, dict] = {}  # name -> {"body": create body, "docs": {id: source}, "settings": [..]}
        self.aliases: dict[str, str] = {}  # alias -> index
        self.search_hits: list[dict] = []
        self.reject_ids: dict[str, int] = {}  # doc id -> item status to answer (once)
        self.failures: dict[tuple[str, str], list] = {}  # (method, path) -> statuses / exceptions, one per call

    # helpers for tests
    def calls(self, method: str | None = None, path: str | None = None) -> list[tuple[str, str, dict, object]]:
        return [r for r in self.requests if (method is None or r[0] == method) and (path is None or r[1] == path)]

    def resolve(self, target: str) -> str:
        return self.aliases.get(target, target)

    @staticmethod
    def error(status: int, type_: str, reason: str) -> tuple[int, dict]:
        cause = {"type": type_, "reason": reason}
        return status, {"error": {"root_cause": [cause], **cause}, "status": status}

    def handle(self, method: str, path: str, params: dict, raw: bytes | None) -> tuple[int, dict | None]:
        text = raw.decode() if raw else ""
        if path == "/_bulk":
            body = [json.loads(line) for line in text.splitlines() if line]
        else:
            body = json.loads(text) if text else None
        self.requests.append((method, path, dict(params), body))
        queued = self.failures.get((method, path))
        if queued:
            failure = queued.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return self.error(failure, "internal_server_error", "injected failure")
        parts = path.strip("/").split("/")
        if method == "HEAD" and parts[0] == "_alias":
            return (200 if parts[1] in self.aliases else 404), None
        if method == "HEAD":
            return (200 if parts[0] in self.indices or parts[0] in self.aliases else 404), None
        if method == "GET" and parts[0] == "_alias":
            if parts[1] not in self.aliases:
                return 404, {"error": f"alias [{parts[1]}] missing", "status": 404}
            return 200, {self.aliases[parts[1]]: {"aliases": {parts[1]: {}}}}
        if method == "POST" and parts == ["_aliases"]:
            return self._aliases(body["actions"])
        if method == "POST" and parts == ["_bulk"]:
            return self._bulk(body)
        if len(parts) == 1 and method == "PUT":
            if parts[0] in self.indices or parts[0] in self.aliases:
                return self.error(400, "resource_already_exists_exception", f"index [{parts[0]}] already exists")
            self.indices[parts[0]] = {"body": body, "docs": {}, "settings": []}
            for alias in (body or {}).get("aliases", {}):
                self.aliases[alias] = parts[0]
            return 200, {"acknowledged": True, "shards_acknowledged": True, "index": parts[0]}
        if len(parts) == 1 and method == "GET":
            names = [n for n in self.indices if fnmatch.fnmatch(n, parts[0])]
            return 200, {n: {"aliases": {a: {} for a, i in self.aliases.items() if i == n}} for n in names}
        if len(parts) == 1 and method == "DELETE":
            if parts[0] not in self.indices:
                return self.error(404, "index_not_found_exception", f"no such index [{parts[0]}]")
            del self.indices[parts[0]]
            self.aliases = {a: i for a, i in self.aliases.items() if i != parts[0]}
            return 200, {"acknowledged": True}
        index = self.resolve(parts[0])
        if index not in self.indices:
            return self.error(404, "index_not_found_exception", f"no such index [{parts[0]}]")
        if parts[1] == "_settings" and method == "PUT":
            self.indices[index]["settings"].append(body)
            return 200, {"acknowledged": True}
        if parts[1] == "_refresh":
            return 200, {"_shards": SHARDS}
        if parts[1] == "_count":
            return 200, {"count": len(self.indices[index]["docs"]), "_shards": SHARDS}
        if parts[1] == "_search":
            return 200, {
                "took": 2,
                "timed_out": False,
                "_shards": SHARDS,
                "hits": {"max_score": None, "hits": self.search_hits},
            }
        raise AssertionError(f"unexpected request {method} {path}")

    def _aliases(self, actions: list[dict]) -> tuple[int, dict]:
        aliases = dict(self.aliases)  # all or nothing, as OpenSearch applies them
        for action in actions:
            (kind, spec), = action.items()
            if kind == "remove":
                if aliases.get(spec["alias"]) != spec["index"]:
                    return self.error(404, "aliases_not_found_exception", f"aliases [{spec['alias']}] missing")
                del aliases[spec["alias"]]
            elif kind == "add":
                if spec["index"] not in self.indices:
                    return self.error(404, "index_not_found_exception", f"no such index [{spec['index']}]")
                aliases[spec["alias"]] = spec["index"]
            else:
                raise AssertionError(f"unexpected alias action {kind}")
        self.aliases = aliases
        return 200, {"acknowledged": True}

    def _bulk(self, lines: list[dict]) -> tuple[int, dict]:
        items, i = [], 0
        while i < len(lines):
            (op, meta), = lines[i].items()
            index = self.resolve(meta["_index"])
            doc_id = meta["_id"]
            docs = self.indices[index]["docs"]
            if doc_id in self.reject_ids:
                status = self.reject_ids.pop(doc_id)
                kind = "es_rejected_execution_exception" if status == 429 else "mapper_parsing_exception"
                items.append({op: {"_index": index, "_id": doc_id, "status": status,
                                   "error": {"type": kind, "reason": "injected"}}})
            elif op == "index":
                created = doc_id not in docs
                docs[doc_id] = lines[i + 1]
                items.append({op: {"_index": index, "_id": doc_id, "_version": 1,
                                   "result": "created" if created else "updated", "_shards": SHARDS,
                                   "status": 201 if created else 200}})
            elif op == "delete":
                found = docs.pop(doc_id, None) is not None
                items.append({op: {"_index": index, "_id": doc_id, "_version": 2,
                                   "result": "deleted" if found else "not_found", "_shards": SHARDS,
                                   "status": 200 if found else 404}})
            i += 2 if op == "index" else 1
        errors = any(not 200 <= next(iter(it.values()))["status"] < 300 for it in items)
        return 200, {"took": 5, "errors": errors, "items": items}


def _connection_class(cluster: FakeCluster):
    class FakeConnection(Connection):
        def perform_request(self, method, url, params=None, body=None, timeout=None, ignore=(), headers=None):
            status, payload = cluster.handle(method, url, params or {}, body)
            raw = json.dumps(payload) if payload is not None else ""
            if not 200 <= status < 300 and status not in ignore:
                self._raise_error(status, raw, "application/json")
            return status, {"content-type": "application/json"}, raw

        def close(self):
            """Nothing to release."""

    return FakeConnection


@pytest.fixture
def cluster() -> FakeCluster:
    return FakeCluster()


@pytest.fixture
def client(cluster) -> Iterator[OpenSearch]:
    c = OpenSearch(hosts=[{"host": "fake", "port": 9200}], connection_class=_connection_class(cluster), max_retries=2)
    yield c
    c.close()


def _docs(n: int, prefix: str = "") -> list[LexicalDoc]:
    return [LexicalDoc(f"{prefix}{i}", f"T{i}", "Rug", "Red", "wool", ["rug", "rug/flat"]) for i in range(n)]


def test_new_store_creates_v1_with_bm25_analyzer_mapping_and_alias(cluster, client):
    ix = OpenSearchIndex(BOOSTS, client=client, name="mars", k1=0.9, b=0.4, replicas=0)
    assert isinstance(ix, LexicalIndex)
    assert [(m, p) for m, p, _, _ in cluster.requests] == [
        ("HEAD", "/_alias/mars"), ("HEAD", "/mars"), ("GET", "/mars_v*"), ("PUT", "/mars_v1")
    ]
    text = {"type": "text", "analyzer": "mars_english", "similarity": "mars_bm25"}
    assert cluster.calls("PUT", "/mars_v1")[0][3] == {
        "settings": {
            "index": {
                "number_of_shards": 1,
                "number_of_replicas": 0,
                "refresh_interval": "1s",
                "similarity": {"mars_bm25": {"type": "BM25", "k1": 0.9, "b": 0.4}},
            },
            "analysis": {
                "filter": {
                    "mars_english_possessive": {"type": "stemmer", "language": "possessive_english"},
                    "mars_english_stop": {"type": "stop", "stopwords": "_english_"},
                    "mars_english_stemmer": {"type": "stemmer", "language": "english"},
                },
                "analyzer": {
                    "mars_english": {
                        "type": "custom",
                        "tokenizer": "standard",
                        "filter": ["mars_english_possessive", "lowercase", "mars_english_stop", "mars_english_stemmer"],
                    }
                },
            },
        },
        "mappings": {
            "dynamic": "strict",
            "properties": {
                "id": {"type": "keyword"},
                "title": text, "type": text, "colour": text, "text": text,
                "category_ids": {"type": "keyword"},
            },
        },
        "aliases": {"mars": {}},
    }
    assert cluster.aliases == {"mars": "mars_v1"} and ix.live_index() == "mars_v1" and ix.versions() == ["mars_v1"]


def test_reopen_uses_existing_alias_and_refuses_plain_index(cluster, client):
    OpenSearchIndex(BOOSTS, client=client, name="mars")
    cluster.requests.clear()
    OpenSearchIndex(BOOSTS, client=client, name="mars")
    assert not cluster.calls("PUT")  # nothing created the second time
    cluster.indices["plain"] = {"body": {}, "docs": {}, "settings": []}
    with pytest.raises(ValueError, match="not an alias"):
        OpenSearchIndex(BOOSTS, client=client, name="plain")
    with pytest.raises(ValueError, match="exactly one"):
        OpenSearchIndex(BOOSTS, client=client, url="http://x:9200")
    with pytest.raises(ValueError, match="BM25"):
        OpenSearchIndex(BOOSTS, client=client, b=1.5)
    with pytest.raises(ValueError, match="boosts"):
        OpenSearchIndex({"brand": 2.0}, client=client)


def test_search_body_with_boosts_filter_and_id_tiebreak(cluster, client):
    ix = OpenSearchIndex(BOOSTS, client=client, name="mars")
    cluster.search_hits = [  # documented hit shape; with a sort, each hit carries its sort values
        {"_index": "mars_v1", "_id": "5", "_score": 3.25, "sort": [3.25, "5"]},
        {"_index": "mars_v1", "_id": "1", "_score": 1.5, "sort": [1.5, "1"]},
        {"_index": "mars_v1", "_id": "4", "_score": 1.5, "sort": [1.5, "4"]},
    ]
    hits = ix.search("Yellow  ARMCHAIR's!", 10, ["rug", "armchair/armchair"])
    assert hits == [LexicalHit("5", 3.25), LexicalHit("1", 1.5), LexicalHit("4", 1.5)]
    (method, path, params, body), = cluster.calls(path="/mars/_search")
    assert method == "POST"
    assert body == {
        "size": 10,
        "query": {
            "bool": {
                "must": [
                    {
                        "multi_match": {
                            "query": "yellow armchair s",
                            "fields": ["title^2.0", "type^3.0", "colour^1.5", "text^1.0"],
                            "type": "best_fields",
                            "tie_breaker": 1.0,
                            "operator": "or",
                        }
                    }
                ],
                "filter": [{"terms": {"category_ids": ["rug", "armchair/armchair"]}}],
            }
        },
        "sort": [{"_score": {"order": "desc"}}, {"id": {"order": "asc"}}],
        "track_scores": True,
        "track_total_hits": False,
        "_source": False,
    }


def test_search_without_lock_and_inert_syntax(cluster, client):
    ix = OpenSearchIndex({"title": 5.0}, client=client, name="mars")
    cluster.search_hits = [
        {"_index": "mars_v1", "_id": "b", "_score": 2.0},
        {"_index": "mars_v1", "_id": "a", "_score": 2.0},
    ]
    assert [h.id for h in ix.search("lamp", 2)] == ["a", "b"]  # equal scores: by id
    body = cluster.calls(path="/mars/_search")[-1][3]
    assert "filter" not in body["query"]["bool"]
    fields = body["query"]["bool"]["must"][0]["multi_match"]["fields"]
    assert fields == ["title^5.0", "type^1.0", "colour^1.0", "text^1.0"]
    cluster.requests.clear()
    for text in ['armchair AND (', "+-&&||!(){}[]^~*?:\\/", "", "   "]:
        ix.search(text, 5)
    assert [b[3]["query"]["bool"]["must"][0]["multi_match"]["query"] for b in cluster.calls(path="/mars/_search")] == [
        "armchair and"
    ]
    assert ix.search("lamp", 0) == []


def test_upsert_bulk_lines_refresh_and_count(cluster, client):
    ix = OpenSearchIndex(BOOSTS, client=client, name="mars")
    cluster.requests.clear()
    ix.upsert([LexicalDoc("1", "STRANDMON", "Armchair", "Yellow", "A wing chair.", ["armchair", "armchair/armchair"])])
    assert [(m, p) for m, p, _, _ in cluster.requests] == [("POST", "/_bulk"), ("POST", "/mars/_refresh")]
    assert cluster.calls(path="/_bulk")[0][3] == [
        {"index": {"_index": "mars", "_id": "1"}},
        {"id": "1", "title": "STRANDMON", "type": "Armchair", "colour": "Yellow", "text": "A wing chair.",
         "category_ids": ["armchair", "armchair/armchair"]},
    ]
    ix.upsert([LexicalDoc("1", "STRANDMON", "Armchair", "Green")])  # same id: replaced
    assert ix.count() == 1 and cluster.indices["mars_v1"]["docs"]["1"]["colour"] == "Green"
    assert cluster.calls("GET", "/mars/_count") or cluster.calls("POST", "/mars/_count")


def test_bulk_load_pauses_refresh_then_restores_and_refreshes(cluster, client):
    ix = OpenSearchIndex(BOOSTS, client=client, name="mars", chunk_size=2, refresh_interval="5s")
    cluster.requests.clear()
    ix.upsert(_docs(5))
    assert [(m, p) for m, p, _, _ in cluster.requests] == [
        ("PUT", "/mars/_settings"), ("POST", "/_bulk"), ("POST", "/_bulk"), ("POST", "/_bulk"),
        ("PUT", "/mars/_settings"), ("POST", "/mars/_refresh"),
    ]
    assert cluster.indices["mars_v1"]["settings"] == [
        {"index": {"refresh_interval": "-1"}}, {"index": {"refresh_interval": "5s"}}
    ]
    assert [len(c[3]) for c in cluster.calls(path="/_bulk")] == [4, 4, 2]  # action + source lines
    assert ix.count() == 5


def test_rejected_item_raises_and_still_restores_refresh(cluster, client):
    ix = OpenSearchIndex(BOOSTS, client=client, name="mars", chunk_size=2)
    cluster.reject_ids["3"] = 400
    with pytest.raises(BulkIndexError) as err:
        ix.upsert(_docs(5))
    (failed,) = err.value.errors
    assert failed["index"]["_id"] == "3" and failed["index"]["error"]["type"] == "mapper_parsing_exception"
    assert cluster.indices["mars_v1"]["settings"][-1] == {"index": {"refresh_interval": "1s"}}
    assert cluster.requests[-1][:2] == ("POST", "/mars/_refresh")


def test_bulk_retries_429_items(cluster, client):
    ix = OpenSearchIndex(BOOSTS, client=client, name="mars", bulk_backoff_s=0)
    cluster.reject_ids["1"] = 429
    ix.upsert(_docs(3))
    bulks = cluster.calls(path="/_bulk")
    assert len(bulks) == 2 and bulks[1][3][0] == {"index": {"_index": "mars", "_id": "1"}}  # only the rejected one
    assert ix.count() == 3


def test_delete_ignores_unknown_ids(cluster, client):
    ix = OpenSearchIndex(BOOSTS, client=client, name="mars")
    ix.upsert(_docs(3))
    cluster.requests.clear()
    ix.delete(["1", "unknown"])
    assert cluster.calls(path="/_bulk")[0][3] == [
        {"delete": {"_index": "mars", "_id": "1"}}, {"delete": {"_index": "mars", "_id": "unknown"}}
    ]
    assert cluster.requests[-1][:2] == ("POST", "/mars/_refresh")
    assert ix.count() == 2
    ix.delete([])
    assert len(cluster.calls(path="/_bulk")) == 1


def test_reindex_builds_new_version_and_swaps_alias_in_one_call(cluster, client):
    ix = OpenSearchIndex(BOOSTS, client=client, name="mars", chunk_size=2)
    ix.upsert(_docs(3, "old"))
    cluster.requests.clear()
    assert ix.reindex(d for d in _docs(3, "new")) is None
    assert [(m, p) for m, p, _, _ in cluster.requests] == [
        ("HEAD", "/_alias/mars"), ("GET", "/_alias/mars"), ("GET", "/mars_v*"),
        ("PUT", "/mars_v2"), ("POST", "/_bulk"), ("POST", "/_bulk"),
        ("PUT", "/mars_v2/_settings"), ("POST", "/mars_v2/_refresh"),
        ("POST", "/_aliases"), ("DELETE", "/mars_v1"),
    ]
    create = cluster.calls("PUT", "/mars_v2")[0][3]
    assert create["settings"]["index"]["refresh_interval"] == "-1" and "aliases" not in create
    assert cluster.calls(path="/_bulk")[0][3][0] == {"index": {"_index": "mars_v2", "_id": "new0"}}
    assert cluster.indices["mars_v2"]["settings"] == [{"index": {"refresh_interval": "1s"}}]
    assert cluster.calls(path="/_aliases")[0][3] == {
        "actions": [{"remove": {"index": "mars_v1", "alias": "mars"}}, {"add": {"index": "mars_v2", "alias": "mars"}}]
    }
    assert cluster.aliases == {"mars": "mars_v2"} and list(cluster.indices) == ["mars_v2"]
    assert ix.count() == 3 and ix.versions() == ["mars_v2"] and ix.live_index() == "mars_v2"


def test_reindex_keep_old(cluster, client):
    ix = OpenSearchIndex(BOOSTS, client=client, name="mars")
    ix.reindex(_docs(2), keep_old=True)
    assert ix.versions() == ["mars_v1", "mars_v2"] and ix.live_index() == "mars_v2"
    ix.reindex(_docs(1))
    assert ix.live_index() == "mars_v3" and ix.versions() == ["mars_v1", "mars_v3"]


def test_failed_build_is_deleted_and_live_untouched(cluster, client):
    ix = OpenSearchIndex(BOOSTS, client=client, name="mars", chunk_size=2)
    ix.upsert(_docs(3, "old"))

    def broken():
        yield from _docs(3, "new")  # one bulk request reaches the new index first
        raise RuntimeError("source broke mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        ix.reindex(broken())
    assert cluster.calls("DELETE", "/mars_v2") and not cluster.calls(path="/_aliases")
    assert cluster.aliases == {"mars": "mars_v1"} and list(cluster.indices) == ["mars_v1"]
    assert ix.count() == 3


def test_failed_swap_is_deleted_and_live_untouched(cluster, client):
    ix = OpenSearchIndex(BOOSTS, client=client, name="mars")
    ix.upsert(_docs(2))
    cluster.failures[("POST", "/_aliases")] = [500]
    with pytest.raises(TransportError) as err:
        ix.reindex(_docs(4))
    assert err.value.status_code == 500
    assert len(cluster.calls(path="/_aliases")) == 1  # 500 is not retried
    assert cluster.aliases == {"mars": "mars_v1"} and list(cluster.indices) == ["mars_v1"] and ix.count() == 2


def test_transport_retries_connection_errors_and_503_not_400(cluster, client):
    ix = OpenSearchIndex(BOOSTS, client=client, name="mars")
    cluster.search_hits = [{"_index": "mars_v1", "_id": "1", "_score": 1.0}]
    cluster.failures[("POST", "/mars/_search")] = [OSConnectionError("N/A", "connection refused", None), 503]
    assert ix.search("rug", 3) == [LexicalHit("1", 1.0)]
    assert len(cluster.calls(path="/mars/_search")) == 3
    cluster.failures[("POST", "/mars/_search")] = [400]
    with pytest.raises(RequestError):
        ix.search("rug", 3)
    assert len(cluster.calls(path="/mars/_search")) == 4


def test_url_constructor_configures_retries(cluster):
    ix = OpenSearchIndex(
        BOOSTS, url="http://fake:9200", name="mars", max_retries=5,
        client_options={"connection_class": _connection_class(cluster)},
    )
    assert ix.client.transport.max_retries == 5 and ix.client.transport.retry_on_timeout is True
    assert cluster.aliases == {"mars": "mars_v1"}
    ix.close()


# ------------------------------------------------------------------ live cluster (OPENSEARCH_URL)

def _live(name: str, boosts: dict[str, float]) -> OpenSearchIndex:
    if not os.environ.get("OPENSEARCH_URL"):
        pytest.skip("OPENSEARCH_URL not set (live OpenSearch cluster)")
    name = f"mars-test-{uuid.uuid4().hex[:8]}-{name}"
    return OpenSearchIndex(boosts, url=os.environ["OPENSEARCH_URL"], name=name, replicas=0)


class TestLiveOpenSearch(LexicalIndexContract):
    """The lexical contract against a live cluster."""

    def make_index(self, tmp_path, name, boosts):  # noqa: ANN001, ANN201
        return _live(name, boosts)

    def drop_index(self, index):  # noqa: ANN001, ANN201
        index.drop()
        index.close()


def test_live_reindex_swaps_alias():
    ix = _live("reindex", BOOSTS)
    try:
        ix.upsert(DOCS)
        ix.reindex(d for d in DOCS[:2])
        new = ix.live_index()
        assert new.startswith(ix.name) and ix.versions() == [new] and ix.count() == 2

        def broken():
            yield DOCS[0]
            raise RuntimeError("mid-way")

        with pytest.raises(RuntimeError):
            ix.reindex(broken())
        assert ix.versions() == [new] and ix.count() == 2
    finally:
        ix.drop()
        ix.close()
