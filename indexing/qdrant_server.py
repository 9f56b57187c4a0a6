"""Server-mode vector store: a Qdrant server or cluster through ``qdrant-client``.

:class:`QdrantServerStore` implements :class:`indexing.vector_store.VectorStore` with the same
semantics as the embedded :class:`indexing.qdrant_edge.QdrantEdgeStore`: one collection with
the named vectors of ``dims`` (cosine distance), a payload ``{"product_id": str,
"category_ids": list[str], "type": str, "colour": str}`` with a keyword payload index on
``category_ids`` for the category lock, and point ids ``uuid5(POINT_NAMESPACE, product
id)`` (:func:`indexing.qdrant_points.point_id`), so a re-upsert replaces a point instead of
adding a second one.

Live name and versions. The store's ``name`` is a Qdrant *collection alias* that points
to a versioned collection ``<name>_v<N>`` (Qdrant docs, "Collections" → "Collection
aliases"). Every read and write goes through the alias. :meth:`QdrantServerStore.reindex`
builds ``<name>_v<N+1>`` from an iterable of points, then moves the alias with one
``update_collection_aliases`` request (delete alias + create alias, which the server
applies together: API reference "Update collection aliases"). If the build or the swap
fails, the new collection is deleted and the live one is untouched. Policy for the
previous collection: deleted after a successful swap, unless ``keep_old=True`` (kept for
a rollback with :meth:`QdrantServerStore.point_alias_to`; :meth:`QdrantServerStore.prune`
removes versions the alias does not point to).

Writes sent through the alias while a reindex runs land in the *old* collection and are
not in the new one: run a reindex from the source of truth (the catalog) while ingestion
is paused, or replay the writes made since the reindex began.

Retries. Each idempotent data request (upsert and delete batches, retrieve, count, scroll,
query) is retried up to ``retries`` times with exponential back-off, and only for
transient errors as ``qdrant-client`` reports them: a transport failure wrapped in
``ResponseHandlingException`` (httpx connect/read/write errors, timeouts, a dropped
connection), ``UnexpectedResponse`` with status 5xx or 429, ``ResourceExhaustedResponse``
(429 with ``Retry-After``, honoured), and with gRPC the codes UNAVAILABLE,
DEADLINE_EXCEEDED and RESOURCE_EXHAUSTED. Anything else (a 4xx such as a wrong vector
size, a response that fails validation) is raised at once. Collection and alias changes
are not retried: a retried create after a lost reply would fail with "already exists".

qdrant-client's local mode (``path="…"`` or ``path=":memory:"``) speaks the same API in
pure Python (exact search, about 1 s per query on 50k points): good for tests, not for
serving. It supports aliases; its payload indexes are accepted but have no effect, and
``get_collection(...).payload_schema`` stays empty there.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from indexing.qdrant_points import CATEGORY_FIELD, payload_of, point_from, point_id
from indexing.vector_store import VectorHit, VectorPoint, batches, check_point, check_queries, sorted_hits
from indexing.versions import next_version, versions_of

try:  # gRPC is an optional transport of qdrant-client (prefer_grpc=True)
    import grpc
except ImportError:  # pragma: no cover - grpcio ships with qdrant-client's dependencies
    grpc = None

T = TypeVar("T")

_TRANSIENT_HTTPX = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


def is_transient(exc: BaseException) -> bool:
    """Whether a qdrant-client error is worth retrying (see the module docstring for the list)."""
    if isinstance(exc, ResourceExhaustedResponse):
        return True
    if isinstance(exc, UnexpectedResponse):
        return exc.status_code is not None and (exc.status_code >= 500 or exc.status_code == 429)
    if isinstance(exc, ResponseHandlingException):
        return isinstance(exc.source, _TRANSIENT_HTTPX)
    if grpc is not None and isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code() in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        )
    return False


class QdrantServerStore:
    """A :class:`~indexing.vector_store.VectorStore` on a Qdrant server, cluster or local-mode client.

    Exactly one of ``url``, ``path`` and ``client`` is given.

    Args:
        dims: vector name -> dimension, e.g. ``{"image": 1280, "text": 384}``; every vector
            is float32, L2-normalised by the encoders, compared by cosine similarity.
        url: server address, e.g. ``"http://qdrant:6333"`` (REST; ``prefer_grpc`` for gRPC).
        path: local mode for tests: a directory, or ``":memory:"``.
        client: an existing ``QdrantClient`` (not closed by :meth:`close`).
        name: the live alias; collections are ``<name>_v<N>``.
        api_key: Qdrant API key for ``url``.
        timeout_s: request timeout in seconds for ``url`` (qdrant-client's ``timeout``).
        prefer_grpc: talk gRPC (port 6334) instead of REST for ``url``.
        batch_size: points per upsert/delete request.
        retries: retries of a request after a transient error (0 disables them).
        backoff_s: first back-off in seconds, doubled on each further retry.
        exact: ask the server for exact (full-scan) search instead of HNSW
            (``SearchParams(exact=True)``); local mode is always exact.

    Raises:
        ValueError: bad arguments; ``name`` is a collection, not an alias; the live
            collection's vectors differ from ``dims`` or are not cosine.
    """

    def __init__(
        self,
        dims: dict[str, int],
        *,
        url: str | None = None,
        path: str | Path | None = None,
        client: QdrantClient | None = None,
        name: str = "mars_products",
        api_key: str | None = None,
        timeout_s: int = 30,
        prefer_grpc: bool = False,
        batch_size: int = 256,
        retries: int = 3,
        backoff_s: float = 0.5,
        exact: bool = False,
    ) -> None:
        if sum(x is not None for x in (url, path, client)) != 1:
            raise ValueError("give exactly one of url=, path= (a directory or ':memory:') and client=")
        if not dims or any(int(d) <= 0 for d in dims.values()):
            raise ValueError(f"dims must map vector names to positive sizes, got {dims!r}")
        if batch_size <= 0 or retries < 0 or backoff_s < 0:
            raise ValueError("batch_size must be > 0, retries and backoff_s >= 0")
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"name must be letters, digits, '_' or '-', got {name!r}")
        self.dims = {k: int(v) for k, v in dims.items()}
        self.name = name
        self.batch_size = batch_size
        self.retries = retries
        self.backoff_s = backoff_s
        self.exact = exact
        self._owns_client = client is None
        if client is not None:
            self.client = client
        elif url is not None:
            self.client = QdrantClient(url=url, api_key=api_key, timeout=timeout_s, prefer_grpc=prefer_grpc)
        elif str(path) == ":memory:":
            self.client = QdrantClient(location=":memory:")
        else:
            self.client = QdrantClient(path=str(path))
        try:
            self._open()
        except BaseException:
            if self._owns_client:  # release the connection (or local mode's directory lock)
                self.client.close()
            raise

    # ----------------------------------------------------------------- collections / alias

    def _open(self) -> None:
        """Use the collection the alias points to, or create ``<name>_v1`` and the alias."""
        live = self.live_collection()
        if live is not None:
            self._check_dims(live)
            return
        if self.name in self._collection_names():
            raise ValueError(
                f"{self.name!r} is a collection, not an alias; QdrantServerStore keeps its data in "
                f"'{self.name}_v<N>' collections behind the alias {self.name!r}: pick another name "
                "or move the data with reindex from a store on that collection"
            )
        first = self._next_version_name()
        self._create_collection(first, self.dims)
        try:
            self.client.update_collection_aliases(
                change_aliases_operations=[
                    models.CreateAliasOperation(
                        create_alias=models.CreateAlias(collection_name=first, alias_name=self.name)
                    )
                ]
            )
        except BaseException:
            self.client.delete_collection(first)
            raise

    def _check_dims(self, collection: str) -> None:
        vectors = self.client.get_collection(collection).config.params.vectors
        if not isinstance(vectors, dict):
            raise ValueError(f"collection {collection!r} has one unnamed vector; named vectors {self.dims} expected")
        found = {k: int(v.size) for k, v in vectors.items()}
        if found != self.dims:
            raise ValueError(
                f"collection {collection!r} (alias {self.name!r}) has vectors {found}, not {self.dims}; "
                "reindex with the new dims or use another name"
            )
        not_cosine = sorted(k for k, v in vectors.items() if v.distance != models.Distance.COSINE)
        if not_cosine:
            raise ValueError(f"collection {collection!r}: vectors {not_cosine} do not use cosine distance")

    def _collection_names(self) -> list[str]:
        return [c.name for c in self.client.get_collections().collections]

    def versions(self) -> list[str]:
        """Names of this store's versioned collections ``<name>_v<N>``, oldest first."""
        return versions_of(self.name, self._collection_names())

    def _next_version_name(self) -> str:
        return next_version(self.name, self.versions())

    def live_collection(self) -> str | None:
        """The collection the alias ``name`` points to, or None when there is no such alias."""
        for alias in self.client.get_aliases().aliases:
            if alias.alias_name == self.name:
                return alias.collection_name
        return None

    def _create_collection(self, collection: str, dims: dict[str, int]) -> None:
        """Create ``collection`` with cosine named vectors and the keyword index on the lock field."""
        self.client.create_collection(
            collection_name=collection,
            vectors_config={
                name: models.VectorParams(size=dim, distance=models.Distance.COSINE) for name, dim in dims.items()
            },
        )
        try:
            self.client.create_payload_index(
                collection_name=collection,
                field_name=CATEGORY_FIELD,
                field_schema=models.PayloadSchemaType.KEYWORD,
                wait=True,
            )
        except BaseException:
            self.client.delete_collection(collection)
            raise

    def reindex(
        self, points: Iterable[VectorPoint], *, keep_old: bool = False, dims: dict[str, int] | None = None
    ) -> None:
        """Build a new versioned collection from ``points`` and swap the alias onto it
        (:meth:`live_collection` then names it: ``<name>_v<N+1>``).

        ``points`` is consumed once, in batches of ``batch_size`` (a generator is fine).
        The alias moves in one ``update_collection_aliases`` request (delete + create).

        Args:
            points: every point of the new index.
            keep_old: keep the previous collection (for rollback) instead of deleting it.
            dims: vector sizes of the new collection (a new encoder); defaults to ``dims``.

        Raises:
            RuntimeError: the alias is missing (the store was dropped).
            Whatever the iterable or the client raised while building or swapping; the new
            collection has then been deleted and the alias still points to the old one.
        """
        old = self.live_collection()
        if old is None:
            raise RuntimeError(f"alias {self.name!r} does not exist; cannot reindex a dropped store")
        new_dims = {k: int(v) for k, v in (dims or self.dims).items()}
        new = self._next_version_name()
        self._create_collection(new, new_dims)
        try:
            for batch in batches(points, self.batch_size):
                self._upsert_into(new, new_dims, batch)
            self.client.update_collection_aliases(
                change_aliases_operations=[
                    models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.name)),
                    models.CreateAliasOperation(
                        create_alias=models.CreateAlias(collection_name=new, alias_name=self.name)
                    ),
                ]
            )
        except BaseException:
            self.client.delete_collection(new)
            raise
        self.dims = new_dims
        if not keep_old:
            self.client.delete_collection(old)

    def point_alias_to(self, collection: str) -> None:
        """Move the alias to an existing versioned ``collection`` (rollback after ``keep_old``).

        Raises:
            ValueError: ``collection`` is not one of :meth:`versions`, or its vectors differ
                from ``dims``.
        """
        if collection not in self.versions():
            raise ValueError(f"{collection!r} is not a version of {self.name!r}: {self.versions()}")
        self._check_dims(collection)
        self.client.update_collection_aliases(
            change_aliases_operations=[
                models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.name)),
                models.CreateAliasOperation(
                    create_alias=models.CreateAlias(collection_name=collection, alias_name=self.name)
                ),
            ]
        )

    def prune(self) -> list[str]:
        """Delete versioned collections the alias does not point to (kept or left by a crash).

        Returns:
            The deleted collection names.
        """
        live = self.live_collection()
        gone = [c for c in self.versions() if c != live]
        for collection in gone:
            self.client.delete_collection(collection)
        return gone

    def drop(self) -> None:
        """Delete the alias and every versioned collection (all data of this store)."""
        if self.live_collection() is not None:
            self.client.update_collection_aliases(
                change_aliases_operations=[
                    models.DeleteAliasOperation(delete_alias=models.DeleteAlias(alias_name=self.name))
                ]
            )
        for collection in self.versions():
            self.client.delete_collection(collection)

    # ------------------------------------------------------------------------- requests

    def _call(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """Run one idempotent request, retrying transient errors with exponential back-off."""
        for attempt in range(self.retries + 1):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if attempt == self.retries or not is_transient(exc):
                    raise
                delay = self.backoff_s * 2**attempt
                if isinstance(exc, ResourceExhaustedResponse):
                    delay = max(delay, float(exc.retry_after_s))
                time.sleep(delay)
        raise AssertionError("unreachable")  # the loop returns or raises

    def _upsert_into(self, collection: str, dims: dict[str, int], points: Sequence[VectorPoint]) -> None:
        structs = [
            models.PointStruct(id=point_id(p.product_id), vector=check_point(p, dims), payload=payload_of(p))
            for p in points
        ]
        self._call(self.client.upsert, collection_name=collection, points=structs, wait=True)

    def upsert(self, points: Sequence[VectorPoint]) -> None:
        """Insert or replace points by product id, ``batch_size`` per request, each acknowledged
        (``wait=True``) so they are searchable when this returns.

        Raises:
            KeyError: a vector name not in ``dims``. ValueError: a vector of the wrong size.
        """
        for batch in batches(points, self.batch_size):
            self._upsert_into(self.name, self.dims, batch)

    def delete(self, product_ids: Sequence[str]) -> None:
        """Delete points by product id (unknown ids are ignored by Qdrant)."""
        for batch in batches(product_ids, self.batch_size):
            self._call(
                self.client.delete,
                collection_name=self.name,
                points_selector=models.PointIdsList(points=[point_id(pid) for pid in batch]),
                wait=True,
            )

    def search_many(
        self, name: str, queries: np.ndarray, limit: int, category_ids: Sequence[str] | None = None
    ) -> list[list[VectorHit]]:
        """Batched filtered nearest-neighbour search (one ``query_batch_points`` request).

        Args:
            name: vector name in ``dims``.
            queries: float32 (m, dims[name]).
            limit: hits per query.
            category_ids: lock; a point matches when it carries any of them
                (``FieldCondition(key="category_ids", match=MatchAny(any=...))``).

        Returns:
            m lists of :class:`VectorHit` (cosine similarity), best first, ties by id.

        Raises:
            KeyError: unknown vector name. ValueError: wrong query dimension.
        """
        q = check_queries(self.dims, name, queries)
        if len(q) == 0 or limit <= 0:
            return [[] for _ in range(len(q))]
        flt = None
        if category_ids:
            lock = models.FieldCondition(key=CATEGORY_FIELD, match=models.MatchAny(any=list(category_ids)))
            flt = models.Filter(must=[lock])
        params = models.SearchParams(exact=True) if self.exact else None
        requests = [
            models.QueryRequest(
                query=row.tolist(), using=name, limit=limit, filter=flt, params=params, with_payload=["product_id"]
            )
            for row in q
        ]
        responses = self._call(self.client.query_batch_points, collection_name=self.name, requests=requests)
        return [
            sorted_hits([VectorHit(p.payload["product_id"], float(p.score)) for p in res.points])
            for res in responses
        ]

    def present(self, product_ids: Sequence[str]) -> set[str]:
        """The subset of ``product_ids`` that has a point (one ``retrieve``, no vectors)."""
        if not product_ids:
            return set()
        records = self._call(
            self.client.retrieve,
            collection_name=self.name,
            ids=[point_id(pid) for pid in product_ids],
            with_payload=["product_id"],
            with_vectors=False,
        )
        return {r.payload["product_id"] for r in records}

    def fetch(self, product_ids: Sequence[str]) -> dict[str, VectorPoint]:
        """Stored points of ``product_ids`` (float32 vectors by name + payload); absent ids are left out."""
        if not product_ids:
            return {}
        records = self._call(
            self.client.retrieve,
            collection_name=self.name,
            ids=[point_id(pid) for pid in product_ids],
            with_payload=True,
            with_vectors=True,
        )
        points = (_to_point(r) for r in records)
        return {p.product_id: p for p in points}

    def count(self) -> int:
        """Exact number of points in the live collection."""
        return int(self._call(self.client.count, collection_name=self.name, exact=True).count)

    def scan(self) -> Iterator[VectorPoint]:
        """Scroll every point with vectors and payload, ``batch_size`` per request."""
        offset = None
        while True:
            records, offset = self._call(
                self.client.scroll,
                collection_name=self.name,
                limit=self.batch_size,
                offset=offset,
                with_payload=True,
                with_vectors=True,
            )
            yield from (_to_point(r) for r in records)
            if offset is None:
                return

    def close(self) -> None:
        """Close the client when this store created it (an injected client stays open)."""
        if self._owns_client:
            self.client.close()


def _to_point(record: models.Record) -> VectorPoint:
    """A qdrant-client record (payload + named vectors as float lists) as a :class:`VectorPoint`."""
    return point_from(record.payload, record.vector)
