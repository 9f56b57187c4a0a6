"""How a :class:`~indexing.vector_store.VectorPoint` is stored as a Qdrant point, shared by the
embedded store (:mod:`indexing.qdrant_edge`) and the server store (:mod:`indexing.qdrant_server`).

A point's id is ``uuid5(POINT_NAMESPACE, product id)`` (stable across runs, so a re-upsert
replaces the point); its payload is ``{"product_id": str, "category_ids": list[str], "type":
str, "colour": str}``, with a keyword payload index on ``category_ids`` for the category lock
(Qdrant docs, "Payload" and "Indexing" → "Payload index"). Standard library and numpy only.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import numpy as np

from indexing.vector_store import VectorPoint

#: Namespace for point ids: uuid5(namespace, product id) keeps ids stable across runs.
POINT_NAMESPACE = uuid.UUID("6f1d7c3e-4a55-4d0b-9a51-2b8f0d6f3c11")

#: Payload field carrying the category keys of the lock (keyword index, ``MatchAny`` filter).
CATEGORY_FIELD = "category_ids"


def point_id(product_id: str) -> str:
    """Deterministic Qdrant point id (UUID string) of a product id."""
    return str(uuid.uuid5(POINT_NAMESPACE, product_id))


def payload_of(point: VectorPoint) -> dict[str, Any]:
    """The Qdrant payload of ``point``: its product id and the lock and display fields."""
    return {"product_id": point.product_id, CATEGORY_FIELD: list(point.category_ids), "type": point.type,
            "colour": point.colour}


def point_from(payload: Mapping[str, Any] | None, vectors: object) -> VectorPoint:
    """A :class:`VectorPoint` from a stored payload and named vectors (a dict of float lists;
    anything else, e.g. None when vectors were not asked for, gives no vectors).

    Raises:
        KeyError: the payload has no ``product_id`` (not a point MARS wrote).
    """
    payload = payload or {}
    named = vectors if isinstance(vectors, dict) else {}
    return VectorPoint(
        product_id=payload["product_id"],
        vectors={k: np.asarray(v, dtype=np.float32) for k, v in named.items()},
        category_ids=list(payload.get(CATEGORY_FIELD, [])),
        type=payload.get("type", ""),
        colour=payload.get("colour", ""),
    )
