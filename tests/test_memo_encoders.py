"""The session's memoizing encoder wrappers (tests/memo_encoders.py) answer exactly like the real
encoders, keep the encoder protocols, hand out copies and refuse writes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from indexing.encoders import FeatureMapEncoder, ImageEncoder, TextEncoder
from memo_encoders import MemoFeatureMapEncoder, MemoImageEncoder, memoized

pytestmark = pytest.mark.slow  # the real encoders


def _photos(ikea, ikea_slice, n: int) -> list[Image.Image]:
    paths = [r["image"] for r in ikea_slice["records"] if r["image"]][:n]
    return [Image.open(ikea / p).convert("RGB") for p in paths]


def test_wrappers_keep_the_protocols_and_the_attributes(encoders, real_encoders):
    image, text = encoders
    assert isinstance(image, FeatureMapEncoder) and isinstance(image, ImageEncoder) and isinstance(text, TextEncoder)
    for name in ("name", "dim", "image_size", "region_side", "pooling_power", "batch_size"):
        assert getattr(image, name) == getattr(real_encoders[0], name), name
    assert (text.name, text.dim) == (real_encoders[1].name, real_encoders[1].dim)
    with pytest.raises(AttributeError, match="read-only"):
        image.pooling_power = 1.0

    class CropsOnly:  # no feature map: the wrapper must not grow one
        name, dim = "crops", 3

        def encode_images(self, images):
            return np.ones((len(images), 3), dtype=np.float32)

    crops, _ = memoized((CropsOnly(), text))
    assert type(crops) is MemoImageEncoder and not isinstance(crops, FeatureMapEncoder)
    assert type(image) is MemoFeatureMapEncoder


def test_memoized_outputs_equal_the_real_encoders_and_are_copies(real_encoders, ikea, ikea_slice):
    image, text = memoized(real_encoders)  # fresh caches: the session's have seen these photos already
    photos = _photos(ikea, ikea_slice, 3)
    first = image.encode_images(photos[:2])
    hits = image.hits
    again = image.encode_images([photos[1], photos[0], photos[2]])
    assert (image.hits, image.misses) == (hits + 2, 3)  # the two photos seen before come from the cache
    np.testing.assert_array_equal(again, real_encoders[0].encode_images([photos[1], photos[0], photos[2]]))
    again[:] = 0  # a caller writing into its result does not change the cache
    np.testing.assert_array_equal(image.encode_images(photos[:2]), first)
    assert image.encode_images([]).shape == (0, image.dim)

    fmap = image.feature_map(photos[0], 64)
    np.testing.assert_array_equal(fmap, real_encoders[0].feature_map(photos[0], 64))
    fmap[:] = -1
    assert image.feature_map(photos[0], 64).min() > -1  # still the real map
    assert image.feature_map(photos[0], 96).shape[1:] == (3, 3)  # another size is another entry

    texts = ["a lamp for the bedroom", "grey sofa bed"]
    vecs = text.encode_texts(texts)
    np.testing.assert_allclose(vecs, real_encoders[1].encode_texts(texts), atol=1e-6)
    np.testing.assert_array_equal(text.encode_texts(texts[::-1]), vecs[::-1])
