"""Vector stores behind the :class:`VectorStore` protocol.

* :class:`QdrantEdgeStore` — the embedded default: Qdrant Edge (``qdrant-edge-py``, the
  Qdrant engine in-process), one shard with named vectors ``image`` and ``text`` and a
  payload (``product_id``, ``category_ids``, ``type``, ``colour``) with a keyword index on
  ``category_ids`` for the category lock.
* :class:`FaissFlatStore` — the exact reference: FAISS ``IndexFlatIP`` per named vector on
  the same L2-normalised vectors (inner product = cosine), filtered with an ``IDSelectorBatch``.

Vectors are float32 and L2-normalised by the encoders; scores are cosine similarities.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

import faiss
import numpy as np
import qdrant_edge as qe

#: Namespace for point ids: uuid5(namespace, product id) keeps ids stable across runs.
POINT_NAMESPACE = uuid.UUID("6f1d7c3e-4a55-4d0b-9a51-2b8f0d6f3c11")


def point_id(product_id: str) -> str:
    """Deterministic Qdrant point id (UUID string) of a product id."""
    return str(uuid.uuid5(POINT_NAMESPACE, product_id))


@dataclass
class VectorPoint:
    """A product's vectors by name (each float32 (dim,), unit norm) and its payload.

    A product without a photo simply has no ``image`` entry.
    """

    product_id: str
    vectors: dict[str, np.ndarray]
    category_ids: list[str] = field(default_factory=list)
    type: str = ""
    colour: str = ""


class VectorHit(NamedTuple):
    """One nearest neighbour: product id and cosine similarity (a named tuple: immutable and
    several times cheaper to create than a frozen dataclass, and a search makes thousands)."""

    id: str
    score: float


@runtime_checkable
class VectorStore(Protocol):
    """What the funnel and ingestion need from a vector backend."""

    dims: dict[str, int]

    def upsert(self, points: Sequence[VectorPoint]) -> None:
        """Insert or replace points by product id."""

    def delete(self, product_ids: Sequence[str]) -> None:
        """Remove points by product id (unknown ids are ignored)."""

    def search_many(
        self, name: str, queries: np.ndarray, limit: int, category_ids: Sequence[str] | None = None
    ) -> list[list[VectorHit]]:
        """For each row of ``queries`` (float32 (m, dims[name])), the ``limit`` nearest points
        on vector ``name`` carrying any of ``category_ids`` (all points when None), best first.

        Raises:
            KeyError: unknown vector name. ValueError: wrong query dimension.
        """

    def present(self, product_ids: Sequence[str]) -> set[str]:
        """The subset of ``product_ids`` that has a point."""

    def fetch(self, product_ids: Sequence[str]) -> dict[str, VectorPoint]:
        """The stored points of ``product_ids`` by product id (ids without a point are absent)."""

    def count(self) -> int:
        """Number of points."""

    def scan(self) -> Iterator[VectorPoint]:
        """Every point with its vectors and payload (used to build the exact reference)."""

    def reindex(self, points: Iterable[VectorPoint], *, dims: dict[str, int] | None = None) -> object:
        """Replace every point by ``points`` (vectors ``dims``, default the current ones): build
        the new index beside the live one and swap it in, so a failed build changes nothing
        (used to add or replace a named vector, e.g. ``aligned``)."""

    def close(self) -> None:
        """Flush and release the store."""


def _check_queries(dims: dict[str, int], name: str, queries: np.ndarray) -> np.ndarray:
    if name not in dims:
        raise KeyError(f"unknown vector {name!r}; this store has {sorted(dims)}")
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim != 2 or q.shape[1] != dims[name]:
        raise ValueError(f"queries for {name!r} must have shape (m, {dims[name]}), got {q.shape}")
    return q


def _sorted_hits(hits: list[VectorHit]) -> list[VectorHit]:
    return sorted(hits, key=lambda h: (-h.score, h.id))


class QdrantEdgeStore:
    """Qdrant Edge shard in ``path``; only one process may open it (the WAL is locked).

    Args:
        path: shard directory; created with ``dims`` when empty, loaded otherwise.
        dims: vector name -> dimension, e.g. ``{"image": 1280, "text": 384}``.

    Raises:
        ValueError: if an existing shard's vectors differ from ``dims``.
    """

    def __init__(self, path: Path, dims: dict[str, int]) -> None:
        self.path = Path(path)
        self.dims = dict(dims)
        self._ids: dict[uuid.UUID, str] | None = None
        self.config = config = _edge_config(dims)
        if (path / "wal").exists() or (path / "segments").exists():
            try:
                self.shard = qe.EdgeShard.load(str(path), config)
            except Exception as exc:  # the engine reports incompatibility and locking as runtime errors
                raise ValueError(f"cannot open the vector store at {path} with vectors {self.dims}: {exc}") from exc
        else:
            path.mkdir(parents=True, exist_ok=True)
            self.shard = qe.EdgeShard.create(str(path), config)
            self.shard.update(qe.UpdateOperation.create_field_index("category_ids", qe.PayloadSchemaType.Keyword))

    def _product_ids(self) -> dict[uuid.UUID, str]:
        """Point id -> product id of every point, read once (a scroll of the ``product_id``
        payloads) and kept in step by :meth:`upsert` and :meth:`delete`: searches then ask
        Qdrant for no payload at all, which was most of a filtered query's time (4.7 -> 0.9 ms
        for 14 region queries at depth 200 within a lock on the IKEA catalog)."""
        if self._ids is None:
            ids: dict[uuid.UUID, str] = {}
            offset = None
            while True:
                records, offset = self.shard.scroll(
                    qe.ScrollRequest(offset=offset, limit=1024, with_payload=["product_id"], with_vector=False)
                )
                ids.update((r.id, r.payload["product_id"]) for r in records)  # r.id: a uuid.UUID
                if offset is None:
                    break
            self._ids = ids
        return self._ids

    def upsert(self, points: Sequence[VectorPoint]) -> None:
        """Upsert points (vectors as float lists, payload with the lock fields)."""
        if points:
            self.shard.update(_upsert_operation(points))
            if self._ids is not None:
                self._ids.update((uuid.UUID(point_id(p.product_id)), p.product_id) for p in points)

    def delete(self, product_ids: Sequence[str]) -> None:
        """Delete points by product id."""
        if product_ids:
            self.shard.update(qe.UpdateOperation.delete_points([point_id(pid) for pid in product_ids]))
            if self._ids is not None:
                for pid in product_ids:
                    self._ids.pop(uuid.UUID(point_id(pid)), None)

    def search_many(
        self, name: str, queries: np.ndarray, limit: int, category_ids: Sequence[str] | None = None
    ) -> list[list[VectorHit]]:
        """Batched filtered nearest-neighbour search (one ``query_batch`` call)."""
        q = _check_queries(self.dims, name, queries)
        if len(q) == 0 or limit <= 0:
            return [[] for _ in range(len(q))]
        flt = (
            qe.Filter(must=[qe.FieldCondition(key="category_ids", match=qe.MatchAny(any=list(category_ids)))])
            if category_ids
            else None
        )
        requests = [
            qe.QueryRequest(limit=limit, query=qe.Query.Nearest(row.tolist(), using=name), filter=flt, with_payload=False)
            for row in q
        ]
        results = self.shard.query_batch(qe.QueryBatchRequest(requests))
        names = self._product_ids()
        return [_sorted_hits([VectorHit(names[p.id], float(p.score)) for p in res]) for res in results]

    def present(self, product_ids: Sequence[str]) -> set[str]:
        """Product ids among ``product_ids`` that have a point."""
        if not product_ids:
            return set()
        records = self.shard.retrieve([point_id(pid) for pid in product_ids], ["product_id"], False)
        return {r.payload["product_id"] for r in records}

    def fetch(self, product_ids: Sequence[str]) -> dict[str, VectorPoint]:
        """Points of ``product_ids`` with vectors and payload (one ``retrieve`` call)."""
        if not product_ids:
            return {}
        records = self.shard.retrieve([point_id(pid) for pid in product_ids], True, True)
        points = (_to_point(r) for r in records)
        return {p.product_id: p for p in points}

    def count(self) -> int:
        """Exact number of points."""
        return int(self.shard.count(qe.CountRequest(exact=True)))

    def scan(self) -> Iterator[VectorPoint]:
        """Scroll every point with vectors and payload, 256 at a time."""
        offset = None
        while True:
            records, offset = self.shard.scroll(
                qe.ScrollRequest(offset=offset, limit=256, with_payload=True, with_vector=True)
            )
            yield from (_to_point(r) for r in records)
            if offset is None:
                return

    def reindex(self, points: Iterable[VectorPoint], *, dims: dict[str, int] | None = None) -> None:
        """Rebuild the shard from ``points`` (with vectors ``dims``, default the current ones) and
        swap it in: the new shard is built in ``<path>.next`` while this one stays open, then the
        directories are renamed. If building fails, ``<path>.next`` is removed and this shard is
        untouched. ``points`` may be a generator over this store's own :meth:`scan`.

        Raises:
            Whatever the iterable or the engine raised while building (the old shard stands).
        """
        new_dims = {k: int(v) for k, v in (dims or self.dims).items()}
        config = _edge_config(new_dims)
        staging = self.path.with_name(self.path.name + ".next")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shard = qe.EdgeShard.create(str(staging), config)
        try:
            shard.update(qe.UpdateOperation.create_field_index("category_ids", qe.PayloadSchemaType.Keyword))
            batch: list[VectorPoint] = []
            for point in points:
                batch.append(point)
                if len(batch) >= 256:
                    shard.update(_upsert_operation(batch))
                    batch = []
            if batch:
                shard.update(_upsert_operation(batch))
            shard.flush()
        except BaseException:
            shard.close()
            shutil.rmtree(staging, ignore_errors=True)
            raise
        shard.close()
        self.close()
        retired = self.path.with_name(self.path.name + ".old")
        shutil.rmtree(retired, ignore_errors=True)
        self.path.rename(retired)
        staging.rename(self.path)
        shutil.rmtree(retired)
        self.dims, self.config, self._ids = new_dims, config, None
        self.shard = qe.EdgeShard.load(str(self.path), config)

    def optimize(self) -> None:
        """Run Qdrant's segment optimizers (builds HNSW once a segment is large enough)."""
        self.shard.optimize()

    def close(self) -> None:
        """Flush and close the shard (releases its lock)."""
        self.shard.flush()
        self.shard.close()


def _edge_config(dims: dict[str, int]):  # noqa: ANN202 - qdrant_edge.EdgeConfig
    """A Qdrant Edge shard config with one cosine named vector per entry of ``dims``."""
    return qe.EdgeConfig(vectors={name: qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine) for name, dim in dims.items()})


def _upsert_operation(points: Sequence[VectorPoint]):  # noqa: ANN202 - qdrant_edge.UpdateOperation
    """One Qdrant Edge upsert of ``points``: named vectors as float lists, payload with the lock fields."""
    return qe.UpdateOperation.upsert_points(
        [
            qe.Point(
                id=point_id(p.product_id),
                vector={name: np.asarray(v, dtype=np.float32).tolist() for name, v in p.vectors.items()},
                payload={"product_id": p.product_id, "category_ids": list(p.category_ids), "type": p.type, "colour": p.colour},
            )
            for p in points
        ]
    )


def _to_point(record) -> VectorPoint:
    """A Qdrant Edge record (payload + named vectors) as a :class:`VectorPoint`."""
    vectors = record.vector if isinstance(record.vector, dict) else {}
    return VectorPoint(
        product_id=record.payload["product_id"],
        vectors={k: np.asarray(v, dtype=np.float32) for k, v in vectors.items()},
        category_ids=list(record.payload.get("category_ids", [])),
        type=record.payload.get("type", ""),
        colour=record.payload.get("colour", ""),
    )


class FaissFlatStore:
    """Exact inner-product search (FAISS ``IndexFlatIP`` in an ``IndexIDMap2``), in memory.

    Args:
        dims: vector name -> dimension.
    """

    def __init__(self, dims: dict[str, int]) -> None:
        self.dims = dict(dims)
        self._indexes = {name: faiss.IndexIDMap2(faiss.IndexFlatIP(dim)) for name, dim in dims.items()}
        self._ids: dict[str, int] = {}
        self._names: dict[int, str] = {}
        self._points: dict[str, VectorPoint] = {}
        self._by_category: dict[str, set[int]] = {}

    @classmethod
    def from_store(cls, store: VectorStore) -> "FaissFlatStore":
        """Build the exact reference from every point of another store."""
        ref = cls(store.dims)
        batch: list[VectorPoint] = []
        for point in store.scan():
            batch.append(point)
            if len(batch) >= 1024:
                ref.upsert(batch)
                batch = []
        ref.upsert(batch)
        return ref

    def _internal(self, product_id: str) -> int:
        if product_id not in self._ids:
            n = len(self._ids) + 1
            while n in self._names:
                n += 1
            self._ids[product_id] = n
            self._names[n] = product_id
        return self._ids[product_id]

    def upsert(self, points: Sequence[VectorPoint]) -> None:
        """Insert or replace points."""
        if not points:
            return
        self.delete([p.product_id for p in points if p.product_id in self._points])
        for name, index in self._indexes.items():
            rows = [(self._internal(p.product_id), p.vectors[name]) for p in points if name in p.vectors]
            if rows:
                ids = np.array([r[0] for r in rows], dtype=np.int64)
                index.add_with_ids(np.stack([np.asarray(r[1], np.float32) for r in rows]), ids)
        for p in points:
            internal = self._internal(p.product_id)
            self._points[p.product_id] = p
            for cat in p.category_ids:
                self._by_category.setdefault(cat, set()).add(internal)

    def delete(self, product_ids: Sequence[str]) -> None:
        """Delete points by product id."""
        gone = [pid for pid in product_ids if pid in self._points]
        if not gone:
            return
        ids = np.array([self._ids[pid] for pid in gone], dtype=np.int64)
        for index in self._indexes.values():
            index.remove_ids(faiss.IDSelectorBatch(ids))
        for pid in gone:
            internal = self._ids[pid]
            for cat in self._points.pop(pid).category_ids:
                self._by_category.get(cat, set()).discard(internal)

    def search_many(
        self, name: str, queries: np.ndarray, limit: int, category_ids: Sequence[str] | None = None
    ) -> list[list[VectorHit]]:
        """Exact search; the lock becomes an ``IDSelectorBatch`` over the allowed ids."""
        q = _check_queries(self.dims, name, queries)
        index = self._indexes[name]
        if len(q) == 0 or limit <= 0 or index.ntotal == 0:
            return [[] for _ in range(len(q))]
        params = None
        if category_ids:
            allowed = set().union(*(self._by_category.get(c, set()) for c in category_ids))
            if not allowed:
                return [[] for _ in range(len(q))]
            params = faiss.SearchParameters(sel=faiss.IDSelectorBatch(np.array(sorted(allowed), dtype=np.int64)))
        scores, ids = index.search(q, min(limit, index.ntotal), params=params)
        return [
            _sorted_hits([VectorHit(self._names[int(i)], float(s)) for s, i in zip(srow, irow) if i >= 0])
            for srow, irow in zip(scores, ids)
        ]

    def reindex(self, points: Iterable[VectorPoint], *, dims: dict[str, int] | None = None) -> None:
        """Replace every point by ``points`` (read in full first, so a generator over :meth:`scan`
        is fine), with vectors ``dims`` (default the current ones). If reading ``points`` raises,
        the store is unchanged."""
        new_points = list(points)
        fresh = FaissFlatStore(dims or self.dims)
        fresh.upsert(new_points)
        self.__dict__.update(fresh.__dict__)

    def present(self, product_ids: Sequence[str]) -> set[str]:
        """Product ids among ``product_ids`` that have a point."""
        return {pid for pid in product_ids if pid in self._points}

    def fetch(self, product_ids: Sequence[str]) -> dict[str, VectorPoint]:
        """Stored points of ``product_ids``."""
        return {pid: self._points[pid] for pid in product_ids if pid in self._points}

    def count(self) -> int:
        """Number of points."""
        return len(self._points)

    def scan(self) -> Iterator[VectorPoint]:
        """Every stored point."""
        yield from list(self._points.values())

    def close(self) -> None:
        """Nothing to release (in memory)."""
