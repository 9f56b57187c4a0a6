"""Cross-fitting by room: the learned whitening stage and the staging prior fitted without the
rooms being scored.

Both learn from judged rooms (:mod:`training.whitening`, :mod:`indexing.staging_prior`). Any
score computed for a room they were fitted on is in-sample: the image list of a dev room
then finds its own products far better than it would for a new room. Whatever scores dev
rooms needs out-of-sample scores: the room cross-validation benchmark (:mod:`evaluation.room_cv`),
``mars tune``'s lists, the ablation, and the learned critic's pair mining (``mars train critic``:
its features include the image list's scores and the fused rank, and a critic trained on
in-sample scores learns to trust them too much).

:func:`funnel_without` builds a funnel whose learned stage is refitted on the judged rooms
outside a held-out group (on the installed whitening's PCA stage, which is unsupervised) and
whose prior is counted from them, for those of the two that are installed. The refitted
pieces live in memory only (:meth:`query.artifacts.Artifacts.with_values`): nothing under
``MARS_HOME`` is written, and the engine's own funnel is untouched. :func:`out_of_fold` runs a
function over queries that way: the critic's mining, ``mars tune``'s lists, the room
cross-validation and the ablation use it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from evaluation.beir import BenchmarkQuery
from evaluation.folds import cv_fold
from indexing.staging_prior import StagingPrior
from indexing.whitening import DEFAULT_LEARNED_DIM, DEFAULT_SHRINK
from training.whitening import background_vectors, judged_photos, learn_stage, product_vectors

if TYPE_CHECKING:
    from query.funnel import Funnel

T = TypeVar("T")


def room_fold(folds: int) -> Callable[[BenchmarkQuery], int | None]:
    """The fold of a query's room (:func:`evaluation.folds.cv_fold` of its room id), None
    for a query without a room."""
    return lambda q: cv_fold(q.room_id, folds) if q.room_id else None


def learned_from_rooms(engine: Any) -> bool:
    """Whether ``engine`` has a piece fitted on judged rooms installed: a whitening with a
    learned stage, or a staging prior."""
    white = engine.artifacts.whitening()
    return (white is not None and white.learned_projection is not None) or engine.artifacts.prior() is not None


def seen_by(engine: Any) -> Callable[[BenchmarkQuery], bool]:
    """Whether a query's room is one the installed pieces were fitted on: its photo among the
    learned stage's photos (by file name), or its room id among the prior's rooms."""
    white, prior = engine.artifacts.whitening(), engine.artifacts.prior()
    photos = set(white.meta.get("learned", {}).get("photos", ())) if white is not None else set()
    rooms = prior.room_ids if prior is not None else frozenset()
    return lambda q: bool(q.room_id) and ((q.image is not None and q.image.name in photos) or q.room_id in rooms)


def funnel_without(
    engine: Any,
    queries: Sequence[BenchmarkQuery],
    qrels: Mapping[str, set[str]],
    held_out: Callable[[BenchmarkQuery], bool],
    *,
    region_step: int = 5,
) -> Funnel:
    """The engine's funnel with what it has installed that was fitted on judged rooms refitted,
    in memory, on the judged room queries that are not ``held_out``: the whitening's learned
    stage (on the installed PCA stage, with its dim and shrink; the background vectors are the
    products and every ``region_step``-th region of every judged photo) and the staging prior.
    With neither installed it is the engine's funnel as it is. Nothing is written to disk.

    Raises:
        RuntimeError: the queries outside ``held_out`` give fewer than 2 pairs.
        ValueError: no query outside ``held_out`` has a room, a room type and judgments.
    """
    train = [q for q in queries if q.room_id and not held_out(q)]
    base = engine.artifacts.whitening()
    refitted: dict[str, Any] = {}
    if base is not None and base.learned_projection is not None:
        products = product_vectors(engine)
        background = background_vectors(engine, products, sorted(judged_photos(queries, qrels)), region_step)
        learned = base.meta.get("learned", {})
        refitted["whitening"] = learn_stage(engine, base, judged_photos(train, qrels), products, background,
                                            learned_dim=learned.get("dim", DEFAULT_LEARNED_DIM),
                                            shrink=learned.get("shrink", DEFAULT_SHRINK))
    if engine.artifacts.prior() is not None:
        refitted["prior"] = StagingPrior.from_judgments(train, qrels)
    if not refitted:
        return engine.funnel
    return engine.funnel.with_artifacts(engine.artifacts.with_values(**refitted))


def out_of_fold(
    engine: Any,
    queries: Sequence[BenchmarkQuery],
    qrels: Mapping[str, set[str]],
    run: Callable[[Funnel, Sequence[BenchmarkQuery]], list[T]],
    *,
    folds: int = 2,
    progress: Callable[[str], None] | None = None,
) -> list[T]:
    """``run(funnel, queries)``, out of fold where it matters: the queries of rooms the installed
    pieces were fitted on (:func:`seen_by`) are split by :func:`room_fold` and each group is
    run with the funnel of :func:`funnel_without` it, refitted on the other seen rooms' queries
    (so ``qrels`` must hold those rooms' judgments: the training data); every other query (a
    room never seen, e.g. a held-out split, or no room) runs once with the engine's funnel. The
    results are concatenated (seen rooms' groups first, in fold order). ``progress`` is called
    with a line before each fold is refitted."""
    if not learned_from_rooms(engine):
        return run(engine.funnel, queries)
    seen = seen_by(engine)
    pool = [q for q in queries if seen(q)]
    fold_of = room_fold(folds)
    out: list[T] = []
    for k in range(folds):
        in_fold = lambda q, k=k: fold_of(q) == k  # noqa: E731
        group = [q for q in pool if in_fold(q)]
        if group:
            if progress:
                rooms = len({q.room_id for q in pool if not in_fold(q)})
                progress(f"fold {k + 1}/{folds}: {len(group)} queries, fitting on {rooms} rooms")
            out += run(funnel_without(engine, pool, qrels, in_fold), group)
    rest = [q for q in queries if not seen(q)]
    return out + (run(engine.funnel, rest) if rest else [])


__all__ = ["funnel_without", "learned_from_rooms", "out_of_fold", "room_fold", "seen_by"]
