"""The query side's encodings, cached: the query text's vector and the room photo's region vectors.

Shared by the retrievers (:mod:`query.retrievers`) and the critic stage
(:mod:`query.critic_stage`), so a search encodes each input once. Least-recently-used caches
(cachetools) under one lock: texts by count, region vectors by bytes.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from cachetools import LRUCache

from query.regions import embed_regions

if TYPE_CHECKING:
    from PIL import Image

    from indexing.encoders import ImageEncoder, TextEncoder
    from indexing.whitening import Whitening

#: Query texts whose vectors are kept (least recently used dropped first).
TEXT_CACHE_SIZE = 512
#: Bytes of room-photo region vectors kept (raw and whitened; ~3.4 MB a photo with the dense
#: windows of a CNN encoder, so 512 MiB holds ~150 photos).
REGION_CACHE_BYTES = 512 * 2**20


class QueryVectors:
    """Encodes query texts and room photos with the engine's encoders, caching both.

    Args:
        encoders: returns the (image, text) encoders, loaded on first use.
        grids: grid sizes of a room photo's cells (1 = whole photo, 2 = 2x2, ...).
        text_cache_size: query texts kept.
        region_cache_bytes: bytes of region vectors kept.
    """

    def __init__(self, encoders: Callable[[], tuple[ImageEncoder, TextEncoder]], grids: Sequence[int],
                 text_cache_size: int = TEXT_CACHE_SIZE, region_cache_bytes: int = REGION_CACHE_BYTES) -> None:
        self.encoders, self.grids = encoders, tuple(grids)
        self._regions: LRUCache[str, np.ndarray] = LRUCache(region_cache_bytes, getsizeof=lambda a: a.nbytes)
        self._texts: LRUCache[str, np.ndarray] = LRUCache(text_cache_size)
        self._lock = threading.Lock()

    def _cached(self, cache: LRUCache, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            value = cache.get(key)
        if value is None:
            value = compute()
            with self._lock:
                cache[key] = value
        return value

    @staticmethod
    def region_key(image: Image.Image) -> str:
        """The region-cache key of a photo: ``image.info["mars_digest"]`` when the caller set
        one (the API sets the SHA-256 of the uploaded bytes), else the SHA-256 of the pixels,
        then remembered there (a search asks for it several times)."""
        key = image.info.get("mars_digest")
        if key is None:
            key = image.info["mars_digest"] = hashlib.sha256(image.tobytes()).hexdigest() + repr(image.size)
        return key

    def has_region_vectors(self, key: str) -> bool:
        """Whether the region vectors of the photo with :meth:`region_key` ``key`` are cached."""
        with self._lock:
            return key in self._regions

    def region_vectors(self, image: Image.Image) -> np.ndarray:
        """Unit embeddings of the photo's regions, float32 (regions, dim), cached by
        :meth:`region_key`: the grid cells first (row 0 the whole photo), then the dense
        windows when the image encoder has a feature map (:func:`query.regions.embed_regions`)."""
        return self._cached(self._regions, self.region_key(image),
                            lambda: embed_regions(self.encoders()[0], image, self.grids))

    def whitened_regions(self, image: Image.Image, whitening: Whitening) -> np.ndarray:
        """:meth:`region_vectors` of the photo whitened by ``whitening``, float32 (regions,
        whitening dim), unit rows; cached by :meth:`region_key` and the whitening's digest."""
        key = f"{self.region_key(image)}@{whitening.digest}"
        return self._cached(self._regions, key, lambda: whitening.apply(self.region_vectors(image)))

    def text_vector(self, text: str) -> np.ndarray:
        """Embedding of a query text, float32 (1, dim), cached by text."""
        return self._cached(self._texts, text, lambda: self.encoders()[1].encode_query(text))
