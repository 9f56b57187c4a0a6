"""Region crops of a room photo.

Room photos hold many objects; one global vector blurs them together. Like the object
crops of Tautkute et al. (FedCSIS 2017), MARS embeds regions of the photo and scores each
product by its best-matching region (max over regions of the cosine similarity). With no
detector available offline, the regions are the cells of square grids: grid 1 is the
whole photo, grid 2 its 2x2 quarters, grid 3 its 3x3 ninths.
"""

from __future__ import annotations

from collections.abc import Sequence

from PIL import Image


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
