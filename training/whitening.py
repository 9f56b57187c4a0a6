"""``mars train whitening``: fit the PCA whitening of image vectors (:mod:`indexing.whitening`)
on the catalog's stored product image vectors and the regions of room photos, and, given
judged room queries, its learned stage on (room region, product photo) pairs.

The PCA stage is unsupervised: it reads photos, never judgments. The room photos can be any interiors the
catalog is searched with (for the IKEA benchmark, its ``rooms/`` folder of dev rooms; the
held-out rooms are not used). Each photo's regions are the ones the funnel computes at query
time (:meth:`query.query_vectors.QueryVectors.region_vectors`), every ``region_step``-th kept so that
room regions do not outnumber the products by too much.

The learned stage reads judgments: for each judged query with a room photo (e.g. the IKEA
room-scene queries: every product shown in the room), each relevant product with a photo is
paired with the photo's region that best matches it after the PCA stage (the region that
shows it, as far as the PCA stage can tell). A (photo, product) pair judged by several
queries counts once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from evaluation.beir import BenchmarkQuery

from ingestion.images import decode_image, read_image_bytes
from indexing.whitening import DEFAULT_DIM, DEFAULT_EPS, DEFAULT_LEARNED_DIM, DEFAULT_SHRINK, Whitening

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


def judged_photos(queries: Sequence[BenchmarkQuery], qrels: Mapping[str, Iterable[str]]) -> dict[Path, set[str]]:
    """Room photo -> the product ids judged relevant to any query with that photo."""
    judged: dict[Path, set[str]] = {}
    for q in queries:
        if q.image is not None and qrels.get(q.id):
            judged.setdefault(q.image, set()).update(qrels[q.id])
    return judged


def product_vectors(engine) -> dict[str, np.ndarray]:  # noqa: ANN001 - mars.engine.Engine
    """Every stored product image vector by product id (one scan of the vector store).

    Raises:
        RuntimeError: nothing with a photo is indexed yet.
    """
    store = engine.vector_store()
    products = {p.product_id: p.vectors["image"] for p in store.scan() if "image" in p.vectors} if store is not None else {}
    if not products:
        raise RuntimeError("no product image vectors are indexed: run `mars ingest` before `mars train whitening`")
    return products


def photo_regions(engine, path: Path) -> np.ndarray:  # noqa: ANN001 - mars.engine.Engine
    """The funnel's region vectors of the photo at ``path`` (cached by the funnel)."""
    settings = engine.settings
    data = read_image_bytes(str(path), max_bytes=settings.max_image_bytes)
    return engine.funnel.query_vectors.region_vectors(decode_image(data, max_pixels=settings.max_image_pixels, what=str(path)))


def background_vectors(engine, products: Mapping[str, np.ndarray], photos: Sequence[Path],  # noqa: ANN001 - mars.engine.Engine
                       region_step: int = 5, on_photo: Callable[[], None] | None = None) -> np.ndarray:
    """The ``products``' image vectors (:func:`product_vectors`) and every ``region_step``-th
    region of each photo, float32 ``(n, D)``: what the PCA stage is fitted on.

    Raises:
        ValueError: ``region_step`` < 1.
        FileNotFoundError / InvalidImage: a photo is missing or unreadable.
    """
    if region_step < 1:
        raise ValueError(f"region_step must be >= 1, got {region_step}")
    regions = []
    for path in photos:
        regions.append(photo_regions(engine, path)[::region_step])
        if on_photo:
            on_photo()
    return np.concatenate([np.stack(list(products.values())), *regions])


def learn_stage(
    engine,  # noqa: ANN001 - mars.engine.Engine
    white: Whitening,
    judged: Mapping[Path, Iterable[str]],
    products: Mapping[str, np.ndarray],
    background: np.ndarray,
    *,
    learned_dim: int = DEFAULT_LEARNED_DIM,
    shrink: float = DEFAULT_SHRINK,
) -> Whitening:
    """``white``'s PCA stage followed by a learned stage (:meth:`Whitening.learn`) fitted on the
    pairs of ``judged`` (room photo -> relevant product ids, :func:`judged_photos`): each
    relevant product of ``products`` (:func:`product_vectors`) with the photo's region that
    matches it best after the PCA stage; ``background``: :func:`background_vectors`.
    The stage's report (``meta["learned"]``) names the photos it saw (``photos``, file names).

    Raises:
        RuntimeError: fewer than 2 pairs of indexed products.
        ValueError: :meth:`Whitening.learn`'s checks.
        FileNotFoundError / InvalidImage: a photo is missing or unreadable.
    """
    pca = white.pca_stage()
    pairs_x, pairs_y, names = [], [], []
    for path, ids in sorted(judged.items()):
        ids = sorted(i for i in set(ids) if i in products)
        if not ids:
            continue
        names.append(Path(path).name)
        raw = photo_regions(engine, path)
        best = (pca.apply(raw) @ pca.apply(np.stack([products[i] for i in ids])).T).argmax(axis=0)
        pairs_x.append(raw[best])
        pairs_y += [products[i] for i in ids]
    if sum(len(x) for x in pairs_x) < 2:
        raise RuntimeError("the judgments give fewer than 2 (room photo, indexed product) pairs: check that the "
                           "queries have photos and that their relevant products are ingested")
    return pca.learn(np.concatenate(pairs_x), np.stack(pairs_y), background, dim=learned_dim, shrink=shrink,
                     meta={"judged_photos": len(pairs_x), "photos": names})


def fit_whitening(
    engine,  # noqa: ANN001 - mars.engine.Engine
    photos: Sequence[Path],
    *,
    judged: Mapping[Path, Iterable[str]] | None = None,
    dim: int = DEFAULT_DIM,
    eps: float = DEFAULT_EPS,
    learned_dim: int = DEFAULT_LEARNED_DIM,
    shrink: float = DEFAULT_SHRINK,
    region_step: int = 5,
    on_photo: Callable[[], None] | None = None,
) -> Whitening:
    """Fit the PCA stage on :func:`background_vectors` of ``photos`` (read with the engine's
    image limits) and, with ``judged`` (room photo -> relevant product ids,
    :func:`judged_photos`), the learned stage on their pairs (:func:`learn_stage`).

    Raises:
        RuntimeError: nothing with a photo is indexed yet, or ``judged`` yields fewer than 2
            pairs of indexed products.
        ValueError: ``region_step`` < 1, or the fits' own checks.
        FileNotFoundError / InvalidImage: a photo is missing or unreadable.
    """
    t0 = time.perf_counter()
    products = product_vectors(engine)
    vectors = background_vectors(engine, products, photos, region_step, on_photo)
    meta = {"products": len(products), "room_photos": len(photos), "regions": len(vectors) - len(products),
            "region_step": region_step}
    white = Whitening.fit(vectors, engine.settings.image_encoder, dim=dim, eps=eps, meta=meta)
    if judged:
        white = learn_stage(engine, white, judged, products, vectors, learned_dim=learned_dim, shrink=shrink)
    white.meta["seconds"] = round(time.perf_counter() - t0, 1)
    return white


__all__ = ["PHOTO_SUFFIXES", "background_vectors", "fit_whitening", "judged_photos", "learn_stage", "photo_regions", "product_vectors",
           "room_photos"]
