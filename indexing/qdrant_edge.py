"""The embedded vector store: Qdrant Edge (``qdrant-edge-py``, the Qdrant engine in-process).

One shard with the named vectors of ``dims`` (cosine distance) and the payload of
:mod:`indexing.qdrant_points`, with a keyword index on ``category_ids`` for the category lock.
Only one process may open a shard (its WAL is locked): in embedded mode one process owns
``MARS_HOME`` (:mod:`mars.stores`).
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from indexing.qdrant_points import CATEGORY_FIELD, payload_of, point_from, point_id
from indexing.vector_store import VectorHit, VectorPoint, batches, check_point, check_queries, sorted_hits


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
            self.shard.update(qe.UpdateOperation.create_field_index(CATEGORY_FIELD, qe.PayloadSchemaType.Keyword))

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
            self.shard.update(_upsert_operation(points, self.dims))
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
        q = check_queries(self.dims, name, queries)
        if len(q) == 0 or limit <= 0:
            return [[] for _ in range(len(q))]
        flt = (
            qe.Filter(must=[qe.FieldCondition(key=CATEGORY_FIELD, match=qe.MatchAny(any=list(category_ids)))])
            if category_ids
            else None
        )
        requests = [
            qe.QueryRequest(limit=limit, query=qe.Query.Nearest(row.tolist(), using=name), filter=flt, with_payload=False)
            for row in q
        ]
        results = self.shard.query_batch(qe.QueryBatchRequest(requests))
        names = self._product_ids()
        return [sorted_hits([VectorHit(names[p.id], float(p.score)) for p in res]) for res in results]

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
            shard.update(qe.UpdateOperation.create_field_index(CATEGORY_FIELD, qe.PayloadSchemaType.Keyword))
            for batch in batches(points, 256):
                shard.update(_upsert_operation(batch, new_dims))
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


def _upsert_operation(points: Sequence[VectorPoint], dims: dict[str, int]):  # noqa: ANN202 - qdrant_edge.UpdateOperation
    """One Qdrant Edge upsert of ``points`` (:mod:`indexing.qdrant_points` payloads).

    Raises:
        KeyError, ValueError: a vector not in ``dims`` or of another size (:func:`check_point`).
    """
    return qe.UpdateOperation.upsert_points(
        [qe.Point(id=point_id(p.product_id), vector=check_point(p, dims), payload=payload_of(p)) for p in points]
    )


def _to_point(record) -> VectorPoint:  # noqa: ANN001 - a qdrant_edge record
    """A Qdrant Edge record (payload + named vectors) as a :class:`VectorPoint`."""
    return point_from(record.payload, record.vector)
