"""Features of a (room, query, product) pair for the learned critic.

Every feature is computed from what the funnel already has: the room photo's region
vectors and the query text vector (cached by the funnel), the product's stored named
vectors, its class in the taxonomy, and its fused rank. Nothing here is learned; the
learned part (class statistics and the logistic weights) lives in :mod:`critic.learned`.

Feature vector (float32, in :data:`FEATURES` order):

``visual_max``
    best cosine similarity between a region of the room photo and the product photo
    (region crops as in Tautkute et al., FedCSIS 2017, who cropped objects before matching).
``visual_top3``
    mean of the three best region similarities (a product seen in several crops).
``visual_global``
    cosine similarity between the whole photo and the product photo.
``no_visual``
    1.0 when there is no room photo or no product photo (the visual features are 0 then).
``text_sim``
    cosine similarity between the query text vector and the product text vector (0 without text).
``log_rank``
    ln(fused rank) of the candidate in the funnel's weighted RRF list (learning-to-rank
    practice: the first-stage rank is a feature of the re-ranker).
``class_prior`` / ``class_room_fit`` / ``type_prior`` / ``type_room_fit``
    filled in by :class:`critic.learned.ClassStats` (log-odds lifts that a candidate of the
    product's class, or of its type, is staged in a room, overall and in the room type the
    query names; a type is judged against its class, so within a class lock it separates
    products that retrieval alone scores alike).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from critic.protocol import CriticPair

FEATURES: tuple[str, ...] = (
    "visual_max",
    "visual_top3",
    "visual_global",
    "no_visual",
    "text_sim",
    "log_rank",
    "class_prior",
    "class_room_fit",
    "type_prior",
    "type_room_fit",
)
VECTOR_FEATURES = FEATURES[:6]


def vector_features(pair: CriticPair) -> np.ndarray:
    """The six vector features of one pair, float32 (6,) in :data:`VECTOR_FEATURES` order.

    ``pair.room_regions`` is float32 (R, D) with region 0 the whole photo (grid 1), unit
    rows; ``pair.product_vectors`` holds unit vectors by name (``image`` (D,), ``text``).

    Raises:
        ValueError: if the room regions and the product image vector differ in dimension.
    """
    out = np.zeros(len(VECTOR_FEATURES), dtype=np.float32)
    image = pair.product_vectors.get("image")
    if pair.room_regions is not None and len(pair.room_regions) and image is not None:
        regions = np.asarray(pair.room_regions, dtype=np.float32)
        if regions.shape[1] != image.shape[0]:
            raise ValueError(
                f"room regions have dimension {regions.shape[1]} but the product image vector {image.shape[0]}"
            )
        sims = np.sort(regions @ image)[::-1]
        out[0], out[1], out[2] = sims[0], sims[:3].mean(), float(regions[0] @ image)
    else:
        out[3] = 1.0
    text = pair.product_vectors.get("text")
    if pair.query_vector is not None and text is not None:
        out[4] = float(np.asarray(pair.query_vector, dtype=np.float32).reshape(-1) @ text)
    out[5] = np.log(max(pair.fused_rank or 1, 1))
    return out


def vector_feature_matrix(pairs: Sequence[CriticPair]) -> np.ndarray:
    """:func:`vector_features` for every pair, float32 (n, 6)."""
    if not pairs:
        return np.zeros((0, len(VECTOR_FEATURES)), dtype=np.float32)
    return np.stack([vector_features(p) for p in pairs])
