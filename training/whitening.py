"""``mars train whitening``: fit the PCA whitening of image vectors (:mod:`indexing.whitening`)
on the catalog's stored product image vectors and the regions of room photos.

Unsupervised: it reads photos, never judgments. The room photos can be any interiors the
catalog is searched with (for the IKEA benchmark, its ``rooms/`` folder of dev rooms; the
held-out rooms are not used). Each photo's regions are the ones the funnel computes at query
time (:meth:`query.funnel.Funnel.region_vectors`), every ``region_step``-th kept so that
room regions do not outnumber the products by too much.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ingestion.images import decode_image, read_image_bytes
from indexing.whitening import DEFAULT_DIM, DEFAULT_EPS, Whitening

#: Photo files read from a rooms folder.
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp"})


def room_photos(folder: Path) -> list[Path]:
    """The photos in ``folder`` (by suffix, sorted).

    Raises:
        FileNotFoundError: ``folder`` is not a directory or holds no photo.
    """
    if not Path(folder).is_dir():
        raise FileNotFoundError(f"no rooms folder at {folder}")
    photos = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    if not photos:
        raise FileNotFoundError(f"no room photos ({', '.join(sorted(PHOTO_SUFFIXES))}) in {folder}")
    return photos


def fit_whitening(
    engine,  # noqa: ANN001 - mars.engine.Engine
    photos: Sequence[Path],
    *,
    dim: int = DEFAULT_DIM,
    eps: float = DEFAULT_EPS,
    region_step: int = 5,
    on_photo: Callable[[], None] | None = None,
) -> Whitening:
    """Fit a whitening on every stored product image vector and every ``region_step``-th region
    of each room photo in ``photos`` (read with the engine's image limits).

    Raises:
        RuntimeError: nothing with a photo is indexed yet.
        ValueError: ``region_step`` < 1, or the fit's own checks (:meth:`Whitening.fit`).
        FileNotFoundError / ImageRejected: a photo is missing or unreadable.
    """
    if region_step < 1:
        raise ValueError(f"region_step must be >= 1, got {region_step}")
    t0 = time.perf_counter()
    store = engine.vector_store()
    products = [p.vectors["image"] for p in store.scan() if "image" in p.vectors] if store is not None else []
    if not products:
        raise RuntimeError("no product image vectors are indexed: run `mars ingest` before `mars train whitening`")
    settings = engine.settings
    regions = []
    for path in photos:
        image = decode_image(read_image_bytes(str(path), max_bytes=settings.max_image_bytes), max_pixels=settings.max_image_pixels)
        regions.append(engine.funnel.region_vectors(image)[::region_step])
        if on_photo:
            on_photo()
    vectors = np.concatenate([np.stack(products), *regions]) if regions else np.stack(products)
    meta = {"products": len(products), "room_photos": len(photos), "regions": int(sum(len(r) for r in regions)),
            "region_step": region_step, "seconds": round(time.perf_counter() - t0, 1)}
    return Whitening.fit(vectors, settings.image_encoder, dim=dim, eps=eps, meta=meta)


__all__ = ["PHOTO_SUFFIXES", "fit_whitening", "room_photos"]
