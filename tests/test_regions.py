"""Room-photo regions: grid cells, dense windows pooled from one CNN feature map, and the
image list's exact re-scoring of the grid cells' candidates."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from indexing.efficientnet import GEM_REGION_SIDE
from query.regions import (
    WINDOW_SCALES,
    embed_regions,
    grid_cell_count,
    grid_regions,
    pool_boxes,
    window_boxes,
)


def test_window_boxes_are_square_in_bounds_and_reach_the_border():
    boxes = window_boxes(32, 24, (1 / 2, 1 / 6))
    sides = {b[2] - b[0] for b in boxes}
    assert sides == {12, 4}
    assert all(b[2] - b[0] == b[3] - b[1] for b in boxes)
    assert all(0 <= b[0] and 0 <= b[1] and b[2] <= 32 and b[3] <= 24 for b in boxes)
    for side in sides:
        same = [b for b in boxes if b[2] - b[0] == side]
        assert max(b[2] for b in same) == 32 and max(b[3] for b in same) == 24
        assert min(b[0] for b in same) == 0 and min(b[1] for b in same) == 0
    # side 12 steps by 6: x in 0, 6, 12, 18 and 20 (flush) -> 5 columns; y in 0, 6, 12 -> 3 rows
    assert len([b for b in boxes if b[2] - b[0] == 12]) == 15
    with pytest.raises(ValueError, match="scales"):
        window_boxes(32, 24, (1.5,))
    with pytest.raises(ValueError, match="empty"):
        window_boxes(0, 24, (0.5,))


def test_pool_boxes_is_the_mean_over_each_box():
    rng = np.random.default_rng(0)
    fmap = rng.normal(size=(5, 6, 7)).astype(np.float32)
    boxes = [(0, 0, 7, 6), (2, 1, 5, 4), (6, 5, 7, 6), (3, 3, 3, 3)]  # the last one is empty
    pooled = pool_boxes(fmap, boxes)
    assert pooled.shape == (4, 5) and pooled.dtype == np.float32
    np.testing.assert_allclose(pooled[0], fmap.mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(pooled[1], fmap[:, 1:4, 2:5].mean(axis=(1, 2)), atol=1e-5)
    np.testing.assert_allclose(pooled[2], fmap[:, 5, 6], atol=1e-5)
    np.testing.assert_allclose(pooled[3], fmap[:, 3, 3], atol=1e-5)  # widened to one cell


def test_pool_boxes_with_a_power_is_the_generalized_mean():
    rng = np.random.default_rng(1)
    fmap = rng.uniform(0.0, 6.0, size=(4, 5, 6)).astype(np.float32)  # non-negative, like ReLU6 activations
    pooled = pool_boxes(fmap, [(0, 0, 6, 5), (1, 2, 4, 5)], power=3.0)
    np.testing.assert_allclose(pooled[0], np.cbrt((fmap**3).mean(axis=(1, 2))), rtol=1e-4)
    np.testing.assert_allclose(pooled[1], np.cbrt((fmap[:, 2:5, 1:4] ** 3).mean(axis=(1, 2))), rtol=1e-4)
    # GeM lies between the mean and the max
    assert np.all(pooled[0] >= fmap.mean(axis=(1, 2)) - 1e-4) and np.all(pooled[0] <= fmap.max(axis=(1, 2)) + 1e-4)


def test_gem_encoder_pools_product_photos_and_room_regions_alike(encoders, ikea, ikea_slice):
    from indexing.efficientnet import GEM_POWER

    def gem(fmap):  # by hand: the p-th root of the mean p-th power over the map
        return (np.maximum(fmap, 1e-6) ** GEM_POWER).mean(axis=(1, 2)) ** (1 / GEM_POWER)

    image_encoder = encoders[0]
    assert image_encoder.name == "efficientnet-lite0-gem" and image_encoder.pooling_power == GEM_POWER
    photo = Image.open(ikea / next(r["image"] for r in ikea_slice["records"] if r["image"])).convert("RGB")
    fmap = image_encoder.feature_map(photo, image_encoder.image_size)  # a 500x500 photo: the same square input
    assert fmap.shape[1:] == (10, 10)  # product photos are seen at 320 px (stride 32), not the native 224
    expected = gem(fmap)
    np.testing.assert_allclose(image_encoder.encode_images([photo])[0], expected / np.linalg.norm(expected), atol=1e-4)
    # the whole-photo region of a room is pooled the same way
    room = Image.open(ikea_slice["room"])
    room_map = image_encoder.feature_map(room.convert("RGB"), image_encoder.region_side)
    whole = gem(room_map)
    np.testing.assert_allclose(embed_regions(image_encoder, room, (1,))[0], whole / np.linalg.norm(whole), atol=1e-4)


def test_cnn_regions_are_grid_cells_then_windows_from_one_feature_map(encoders, ikea_slice):
    image_encoder = encoders[0]
    room = Image.open(ikea_slice["room"])
    regions = embed_regions(image_encoder, room, (1, 2, 3))
    assert image_encoder.region_side == GEM_REGION_SIDE
    fmap = image_encoder.feature_map(room.convert("RGB"), GEM_REGION_SIDE)
    _, h, w = fmap.shape
    assert min(h, w) == GEM_REGION_SIDE // 32  # the room photo is seen at 1408 px on its short side
    assert regions.shape == (grid_cell_count((1, 2, 3)) + len(window_boxes(w, h, WINDOW_SCALES)), 1280)
    np.testing.assert_allclose(np.linalg.norm(regions, axis=1), 1.0, atol=1e-5)
    p = image_encoder.pooling_power
    assert p == 3.0
    whole = np.cbrt((np.maximum(fmap, 1e-6) ** p).mean(axis=(1, 2)))
    np.testing.assert_allclose(regions[0], whole / np.linalg.norm(whole), atol=1e-4)
    # the grid-2 cells come next in row order: the top-left quarter of the map
    quarter = np.cbrt((np.maximum(fmap[:, : h // 2, : w // 2], 1e-6) ** p).mean(axis=(1, 2)))
    np.testing.assert_allclose(regions[1], quarter / np.linalg.norm(quarter), atol=1e-4)
    assert grid_regions(w, h, (2,))[0] == (0, 0, w // 2, h // 2)


def test_encoders_without_a_feature_map_embed_grid_crops(encoders, ikea_slice):
    class CropsOnly:  # an encoder like the transformers SigLIP/CLIP one: encode_images only
        def encode_images(self, images):
            return encoders[0].encode_images(images)

    room = Image.open(ikea_slice["room"])
    regions = embed_regions(CropsOnly(), room, (1, 2))
    assert regions.shape == (5, 1280)
    np.testing.assert_allclose(regions[0], encoders[0].encode_images([room.convert("RGB")])[0], atol=1e-5)
