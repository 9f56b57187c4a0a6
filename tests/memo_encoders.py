"""Memoizing wrappers around the real encoders, so a test session encodes each photo, room
feature map and text once, however many engines it builds.

:class:`MemoImageEncoder` and :class:`MemoTextEncoder` give the wrapped encoder's outputs
(computed by it on the first request) and hand out copies, so no caller can change a cached
array. Keys: a BLAKE2b digest of an image's mode, size and pixels (with the requested short
side for a feature map); the text itself for texts. Encoding is per row, so a row does not
depend on the batch it was first computed in: EfficientNet-Lite0 in eval mode gave identical
rows for 16 IKEA photos encoded together, one by one and in threes; all-MiniLM-L6-v2 (padded
batches, attention masks) differed by at most 1.6e-7 (``tests/test_memo_encoders.py`` checks
the wrappers against the real encoders). Every other attribute (``name``, ``dim``, ``image_size``,
``region_side``, ``pooling_power``, ``batch_size``, ``model``) is the wrapped encoder's, so
the wrappers satisfy :class:`indexing.encoders.ImageEncoder`, :class:`~indexing.encoders.FeatureMapEncoder`
and :class:`~indexing.encoders.TextEncoder` exactly when the wrapped encoder does.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image


def image_digest(image: Image.Image) -> bytes:
    """A 16-byte BLAKE2b digest of an image's mode, size, palette (if any) and pixel bytes."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{image.mode}:{image.size[0]}x{image.size[1]}:".encode())
    palette = image.getpalette() if image.mode in ("P", "PA") else None
    h.update(bytes(palette or []))
    h.update(image.tobytes())
    return h.digest()


class _Memo:
    """Shared plumbing: the wrapped encoder, a lock, ``hits`` / ``misses`` (rows answered from
    the memo / computed by the wrapped encoder) and attribute passthrough."""

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "hits", 0)
        object.__setattr__(self, "misses", 0)
        object.__setattr__(self, "_lock", threading.Lock())

    def __getattr__(self, name: str) -> Any:  # only called for names not found on the wrapper
        if name == "inner":  # not initialised (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"the session's encoders are shared read-only: not setting {name!r}; patch a copy or "
            "load your own encoders (mars.registry.load_encoders)"
        )

    def _rows(self, cache: dict, keys: list, items: Sequence, encode) -> np.ndarray:  # noqa: ANN001
        """Rows for ``keys`` from ``cache``; the misses are encoded together by ``encode``."""
        with self._lock:
            missing: dict = {}
            for key, item in zip(keys, items):
                if key not in cache and key not in missing:
                    missing[key] = item
            if missing:
                fresh = np.asarray(encode(list(missing.values())))
                for i, key in enumerate(missing):
                    cache[key] = fresh[i].copy()
            object.__setattr__(self, "misses", self.misses + len(missing))
            object.__setattr__(self, "hits", self.hits + len(keys) - len(missing))
            if not keys:
                return np.zeros((0, self.inner.dim), dtype=np.float32)
            return np.stack([cache[k] for k in keys])  # a new array: the cache stays untouched


class MemoImageEncoder(_Memo):
    """An image encoder (and feature-map encoder when the wrapped one is) with memoized outputs."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        object.__setattr__(self, "_vectors", {})
        object.__setattr__(self, "_maps", {})

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The wrapped ``encode_images``: float32 (n, dim), one cached row per distinct image."""
        return self._rows(self._vectors, [image_digest(im) for im in images], images, self.inner.encode_images)


class MemoFeatureMapEncoder(MemoImageEncoder):
    """A feature-map encoder (a CNN: room regions pooled from one map) with memoized outputs;
    ``map_hits`` / ``map_misses`` count the feature maps (``hits`` / ``misses`` the vectors)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        object.__setattr__(self, "map_hits", 0)
        object.__setattr__(self, "map_misses", 0)

    def feature_map(self, image: Image.Image, short_side: int) -> np.ndarray:
        """The wrapped ``feature_map``: float32 (C, H, W), cached per (pixels, short side)."""
        key = (image_digest(image), int(short_side))
        with self._lock:
            cached = self._maps.get(key)
            if cached is None:
                cached = np.asarray(self.inner.feature_map(image, short_side))
                self._maps[key] = cached
                object.__setattr__(self, "map_misses", self.map_misses + 1)
            else:
                object.__setattr__(self, "map_hits", self.map_hits + 1)
            return cached.copy()


class MemoTextEncoder(_Memo):
    """A text encoder with memoized outputs (one cached row per distinct text)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        object.__setattr__(self, "_vectors", {})

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """The wrapped ``encode_texts``: float32 (n, dim)."""
        return self._rows(self._vectors, list(texts), texts, self.inner.encode_texts)

    def encode_query(self, text: str) -> np.ndarray:
        """The wrapped ``encode_query``: float32 (1, dim), memoized apart from ``encode_texts``."""
        return self._rows(self._vectors, [("query", text)], [text], lambda one: self.inner.encode_query(one[0]))


def memoized(encoders: tuple[Any, Any]) -> tuple[MemoImageEncoder, MemoTextEncoder]:
    """Wrap an ``(image, text)`` pair: the image side as a :class:`MemoFeatureMapEncoder` when
    the wrapped encoder has ``feature_map`` (else a :class:`MemoImageEncoder`, so
    :func:`query.regions.embed_regions` crops as it would with the real one)."""
    image, text = encoders
    wrap = MemoFeatureMapEncoder if callable(getattr(image, "feature_map", None)) else MemoImageEncoder
    return wrap(image), MemoTextEncoder(text)
