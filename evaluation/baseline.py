"""The seed-style baseline: what the seed projects did, kept as the yardstick for MARS.

"As the seed projects did": the embeddings held in numpy, ``rank_bm25.BM25Okapi`` (Robertson
& Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond", 2009; the
``rank_bm25`` package) over lower-cased whitespace tokens of title, type, colour and text,
brute-force cosine over every item (``matrix @ q`` on unit vectors), each product scored by
its best room-photo region, and unweighted Reciprocal Rank Fusion of the three lists in
Python (Cormack, Clarke & Büttcher, SIGIR 2009, k = 60) — no category lock, no field boosts,
no fusion weights, no critic.

Used by the retrieval speed benchmark (:mod:`evaluation.retrieval_speed`, which embeds the catalog itself) and by
the ablation (:mod:`evaluation.ablation`, which reuses the engine's stored vectors through
:meth:`NaiveIndex.from_engine`, so both sides see the same embeddings).
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from rank_bm25 import BM25Okapi

from query.fusion import weighted_rrf


class _Described(Protocol):
    title: str
    type: str
    colour: str
    text: str


def naive_text(item: _Described) -> str:
    """The text the baseline's BM25 indexes: title, type, colour and description, space-joined
    (works for a :class:`ingestion.records.ProductRecord` and a catalog ``Product`` row)."""
    return " ".join(part for part in (item.title, item.type, item.colour, item.text) if part)


class NaiveIndex:
    """The seed-style baseline: rank_bm25 + numpy brute force + Python RRF.

    Args:
        ids: product ids, in the row order of ``text_vecs``.
        texts: the BM25 text of each product (:func:`naive_text`), same order.
        text_vecs: float32 (n, dim) unit text vectors, same order.
        image_vecs: product id -> float32 (dim,) unit image vector (products without a photo absent).
    """

    def __init__(self, ids: list[str], texts: list[str], text_vecs: np.ndarray, image_vecs: dict[str, np.ndarray]):
        self.ids = ids
        self.bm25 = BM25Okapi([t.lower().split() for t in texts])
        self.text = text_vecs
        self.image_ids = list(image_vecs)
        self.image = np.stack([image_vecs[i] for i in self.image_ids]) if image_vecs else None

    @classmethod
    def from_engine(cls, engine: Any) -> "NaiveIndex":
        """The baseline over an engine's catalog rows and stored vectors (nothing re-embedded).

        Only products with a stored text vector are indexed (every ingested product has one).
        """
        from sqlalchemy import select

        from catalog.models import Product

        store = engine.vector_store()
        points = {p.product_id: p for p in store.scan()} if store is not None else {}
        with engine.sessions() as session:
            rows = [p for p in session.execute(select(Product).order_by(Product.id)).scalars() if p.id in points
                    and "text" in points[p.id].vectors]
        ids = [p.id for p in rows]
        dim = store.dims["text"] if store is not None else 0
        text_vecs = np.stack([points[i].vectors["text"] for i in ids]).astype(np.float32) if ids else np.zeros((0, dim), np.float32)
        images = {i: points[i].vectors["image"].astype(np.float32) for i in ids if "image" in points[i].vectors}
        return cls(ids, [naive_text(p) for p in rows], text_vecs, images)

    def search(self, text: str | None, text_vec: np.ndarray | None, regions: np.ndarray | None, depth: int = 200) -> list[str]:
        """Product ids, best first: RRF of the BM25, text-vector and best-region image lists
        (each cut to ``depth``); a list whose input is None is left out."""
        lists = {}
        if text:
            scores = self.bm25.get_scores(text.lower().split())
            lists["bm25"] = [self.ids[i] for i in np.argsort(-scores)[:depth]]
        if text_vec is not None:
            lists["text"] = [self.ids[i] for i in np.argsort(-(self.text @ text_vec))[:depth]]
        if regions is not None and self.image is not None:
            best = (self.image @ regions.T).max(axis=1)
            lists["image"] = [self.image_ids[i] for i in np.argsort(-best)[:depth]]
        return [f.id for f in weighted_rrf(lists)]
