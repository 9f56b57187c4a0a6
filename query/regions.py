"""Regions of a room photo.

Room photos hold many objects; one global vector blurs them together. Like the object
crops of Tautkute et al. (FedCSIS 2017), MARS embeds regions of the photo and scores each
product by its best-matching region (max over regions of the cosine similarity). With no
detector available offline, the regions are

* the cells of ``n x n`` grids (grid 1 is the whole photo, grid 2 its quarters, ...): the
  vectors searched in the index;
* for a CNN image encoder, also dense square windows at several scales, pooled from one
  feature map of the photo at the encoder's ``region_side`` pixels with the encoder's own
  global pooling (GeM or average, so a window that holds just the product is pooled like
  the product photo) (regional pooling of
  convolutional activations, as in R-MAC: Tolias, Sicre & Jégou, "Particular object
  retrieval with integral max-pooling of CNN activations", ICLR 2016). They re-score the
  grid cells' candidates exactly; small objects (a lamp, a vase) fill a small window and
  are lost in a 3x3 cell.

Encoders without a feature map (transformers SigLIP/CLIP) embed the grid cells as crops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

#: Side of the dense square windows as a fraction of the feature map's short side; windows
#: step by half their side, and the last one in each row and column touches the border.
WINDOW_SCALES: tuple[float, ...] = (1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6)


def grid_regions(width: int, height: int, grids: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """Boxes ``(left, top, right, bottom)`` in pixels of every cell of every ``n x n`` grid.

    Raises:
        ValueError: if a grid size is < 1 or the image is empty.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot crop an empty image ({width}x{height})")
    boxes: list[tuple[int, int, int, int]] = []
    for n in grids:
        if n < 1:
            raise ValueError(f"grid sizes must be ≥ 1, got {n}")
        for row in range(n):
            for col in range(n):
                boxes.append(
                    (col * width // n, row * height // n, (col + 1) * width // n, (row + 1) * height // n)
                )
    return boxes


def crop_regions(image: Image.Image, grids: Sequence[int]) -> list[Image.Image]:
    """The grid cells of ``image`` as separate images, whole photo first when grid 1 is asked."""
    return [image.crop(box) for box in grid_regions(image.width, image.height, grids)]


Box = tuple[int, int, int, int]


def window_boxes(width: int, height: int, scales: Sequence[float]) -> list[Box]:
    """Dense square windows ``(left, top, right, bottom)`` over a ``width x height`` grid of
    cells: for each scale a side of ``round(scale * min(width, height))`` cells (at least 1),
    stepping by half the side, the last window of each row and column flush with the border.

    Raises:
        ValueError: if the grid is empty or a scale is not in (0, 1].
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"cannot place windows on an empty map ({width}x{height})")
    boxes: list[Box] = []
    for scale in scales:
        if not 0 < scale <= 1:
            raise ValueError(f"window scales must be in (0, 1], got {scale}")
        side = max(1, round(scale * min(width, height)))
        step = max(1, side // 2)
        xs = sorted({*range(0, width - side + 1, step), width - side})
        ys = sorted({*range(0, height - side + 1, step), height - side})
        boxes += [(x, y, x + side, y + side) for y in ys for x in xs]
    return boxes


def pool_boxes(feature_map: np.ndarray, boxes: Sequence[Box], power: float = 1.0) -> np.ndarray:
    """Generalized mean (``power`` 1: average) of ``feature_map`` (float32 (C, H, W), non-
    negative activations when ``power`` > 1) over each box (in cells, right/bottom exclusive)
    through an integral image of ``x ** power``; returns float32 (len(boxes), C), not
    normalised. An empty box (a grid finer than the map) is widened to one cell.
    """
    if power != 1.0:
        pooled = pool_boxes(np.maximum(feature_map, 1e-6) ** power, boxes)
        return np.maximum(pooled, 0.0) ** (1.0 / power)
    c, h, w = feature_map.shape
    integral = np.zeros((c, h + 1, w + 1), dtype=np.float64)
    integral[:, 1:, 1:] = feature_map.cumsum(1).cumsum(2)
    b = np.array(boxes, dtype=np.int64).reshape(-1, 4)
    x0, y0 = np.clip(b[:, 0], 0, w - 1), np.clip(b[:, 1], 0, h - 1)
    x1, y1 = np.maximum(np.minimum(b[:, 2], w), x0 + 1), np.maximum(np.minimum(b[:, 3], h), y0 + 1)
    sums = integral[:, y1, x1] - integral[:, y0, x1] - integral[:, y1, x0] + integral[:, y0, x0]  # (C, n)
    return (sums / ((x1 - x0) * (y1 - y0))).T.astype(np.float32)


def grid_cell_count(grids: Sequence[int]) -> int:
    """Number of grid cells :func:`grid_regions` gives for ``grids`` (sum of n^2)."""
    return sum(n * n for n in grids)


def embed_regions(encoder: object, image: Image.Image, grids: Sequence[int]) -> np.ndarray:
    """Unit region vectors of a room photo, float32 (R, dim): first the
    :func:`grid_cell_count` grid cells in :func:`grid_regions` order (row 0 is the whole photo
    when grid 1 is asked), then, when ``encoder`` has a ``feature_map(image, short_side)``
    method (a CNN), the :func:`window_boxes` windows at :data:`WINDOW_SCALES`, all pooled from
    one feature map of the photo at the encoder's ``region_side`` pixels on its short side
    (:data:`indexing.efficientnet.GEM_REGION_SIDE`; an encoder with a feature map must have it),
    with the encoder's ``pooling_power`` (GeM exponent, 1 when absent); otherwise the grid
    cells are cropped and embedded with
    ``encoder.encode_images``.

    Raises:
        ValueError: a grid size < 1 or an empty photo.
    """
    rgb = image.convert("RGB")
    feature_map = getattr(encoder, "feature_map", None)
    if feature_map is None:
        return encoder.encode_images(crop_regions(rgb, grids))  # type: ignore[attr-defined]
    fmap = feature_map(rgb, encoder.region_side)  # type: ignore[attr-defined]
    _, h, w = fmap.shape
    boxes = grid_regions(w, h, grids) + window_boxes(w, h, WINDOW_SCALES)
    pooled = pool_boxes(fmap, boxes, getattr(encoder, "pooling_power", 1.0))
    return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
