"""``mars train mine``: the (room, query, product) pairs a teacher critic labels for distillation.

The candidates are those of the learned critic's miner (:func:`training.critic.room_candidates`:
each judged room query — room photo + request text — through the hybrid funnel, stages 1-2
and fusion). From each query's fused list this module picks three kinds of pairs, each with a
``reason`` that says why:

* ``hard_positive`` — products staged in the room (qrels) that the funnel ranked LOW: the
  lowest-ranked staged products first;
* ``hard_negative`` — products NOT staged in the room that the funnel ranked HIGH and that
  share the class of the staged products (the lock usually makes them all the same class);
  when there are too few, the visually closest others (best image-list rank) fill in;
* ``random_control`` — products drawn uniformly from the rest of the fused list, staged or not
  (``relevant`` says which), so the teacher also sees ordinary pairs.

A hard negative is never in the query's qrels nor staged anywhere in its room (the union of
the qrels of the room's queries, :func:`room_products`). Picks are deterministic for a seed: each query
draws from its own ``random.Random(f"{seed}:{query_id}")``, so a query's pairs do not depend on
which other queries were mined. This is the data side of knowledge distillation (Hinton,
Vinyals & Dean, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531): the
student learns the teacher's graded judgements on the pairs the funnel actually gets wrong.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from catalog.models import Product
from evaluation.beir import BenchmarkQuery
from ingestion.remote import is_remote
from query.fusion import Fused
from training.critic import RoomCandidates, room_candidates
from training.rows import write_rows

#: The room tasks mined by default: the request names one kind of product.
DISTILL_TASKS: tuple[str, ...] = ("room-class", "room-type")
#: The kinds of pairs, in the order they are written for a query.
KINDS: tuple[str, ...] = ("hard_positive", "hard_negative", "random_control")


@dataclass(frozen=True)
class PerQuery:
    """How many pairs of each kind to pick per query (fewer when the fused list has fewer)."""

    positives: int = 2
    negatives: int = 4
    controls: int = 2

    def __post_init__(self) -> None:
        for name in ("positives", "negatives", "controls"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} per query must be >= 0, got {getattr(self, name)}")


def product_class(product: Product, categories: dict[str, Any]) -> str | None:
    """The taxonomy class key of ``product`` (its type leaf's parent, e.g. ``"lamp"``), or None
    when it has no category; ``categories`` is the taxonomy's key -> node map."""
    for c in product.categories:
        node = categories.get(c.key)
        if node is not None:
            return node.key if node.level == "class" else node.parent_key
    return None


def target_class(relevant: set[str], classes: dict[str, str | None]) -> str | None:
    """The class most of the ``relevant`` products have (ties: alphabetical), or None."""
    counts = Counter(classes[i] for i in relevant if classes.get(i))
    if not counts:
        return None
    return min(counts, key=lambda c: (-counts[c], c))


def _image_rank(f: Fused) -> str:
    rank = f.ranks.get("image")
    return f", image rank {rank}" if rank else ""


def select(
    c: RoomCandidates, classes: dict[str, str | None], counts: PerQuery, rng: random.Random,
    in_room: set[str] | frozenset[str] = frozenset(),
) -> list[tuple[Fused, str, str]]:
    """The picked ``(fused result, kind, reason)`` of one query, kinds in :data:`KINDS` order.

    Args:
        c: the query's candidates (fused list best first, relevant ids).
        classes: product id -> class key, for the fused products and the relevant ones.
        counts: how many of each kind.
        rng: the query's own random generator (random controls).
        in_room: every product staged in the query's room (any query's qrels); never a hard
            negative, even when this query does not ask for it.
    """
    fused = c.retrieval.fused
    n, target = len(fused), target_class(c.relevant, classes)
    staged = [f for f in fused if f.id in c.relevant]
    picked: list[tuple[Fused, str, str]] = []
    for i, f in enumerate(sorted(staged, key=lambda f: -f.rank)[: counts.positives]):
        which = (f"the {_ordinal(i + 1)} lowest-ranked of {len(staged)} staged products retrieved" if len(staged) > 1
                 else "the only staged product retrieved")
        picked.append((f, "hard_positive", f"staged in the room (qrels), fused rank {f.rank} of {n}{_image_rank(f)}; {which}"))
    others = [f for f in fused if f.id not in c.relevant and f.id not in in_room]
    same = [f for f in others if target is not None and classes.get(f.id) == target]
    for f in same[: counts.negatives]:
        picked.append((f, "hard_negative", f"fused rank {f.rank}{_image_rank(f)}, same class {target!r} as the staged "
                       "products, not in the room"))
    taken = {f.id for f, _, _ in picked}
    close = sorted((f for f in others if f.id not in taken and "image" in f.ranks), key=lambda f: (f.ranks["image"], f.rank))
    for f in close[: max(0, counts.negatives - len(same))]:
        picked.append((f, "hard_negative", f"visually close: image rank {f.ranks['image']}, fused rank {f.rank}, "
                       f"class {classes.get(f.id)!r} (staged: {target!r}), not in the room"))
    taken = {f.id for f, _, _ in picked}
    rest = [f for f in fused if f.id not in taken]
    for f in sorted(rng.sample(rest, min(counts.controls, len(rest))), key=lambda f: f.rank):
        staged_note = ("relevant: staged in the room" if f.id in c.relevant
                       else "staged in the room but not asked for" if f.id in in_room else "not in the room")
        picked.append((f, "random_control", f"random control drawn from {len(rest)} unpicked fused results: fused rank "
                       f"{f.rank}{_image_rank(f)}, class {classes.get(f.id)!r}, {staged_note}"))
    return picked


def _ordinal(k: int) -> str:
    return {1: "1st", 2: "2nd", 3: "3rd"}.get(k, f"{k}th")


def room_products(queries: Sequence[BenchmarkQuery], qrels: dict[str, set[str]]) -> dict[str, set[str]]:
    """Room id -> every product staged in it: the union of the qrels of all its queries (the
    room-scene query lists them all; room-class / room-type ones a part)."""
    rooms: dict[str, set[str]] = defaultdict(set)
    for q in queries:
        if q.room_id:
            rooms[q.room_id] |= qrels.get(q.id, set())
    return dict(rooms)


def limit_queries(queries: Sequence[BenchmarkQuery], qrels: dict[str, set[str]], tasks: Sequence[str],
                  limit: int | None, seed: int) -> list[BenchmarkQuery]:
    """The judged queries of ``tasks``; with ``limit``, at most ``limit`` per task drawn at random
    (``random.Random(seed)``), kept in input order."""
    judged = [q for q in queries if q.task in tasks and qrels.get(q.id)]
    if limit is None:
        return judged
    by_task: dict[str, list[BenchmarkQuery]] = defaultdict(list)
    for q in judged:
        by_task[q.task].append(q)
    rng = random.Random(seed)
    keep = {q.id for task in sorted(by_task) for q in rng.sample(by_task[task], min(limit, len(by_task[task])))}
    return [q for q in judged if q.id in keep]


def mine_pairs(
    engine,
    queries: Sequence[BenchmarkQuery],
    qrels: dict[str, set[str]],
    *,
    counts: PerQuery = PerQuery(),
    tasks: Sequence[str] = DISTILL_TASKS,
    limit: int | None = None,
    seed: int = 0,
    on_query: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Mine distillation pairs (rows of :mod:`training.rows`) from the judged room queries.

    Args:
        engine: a :class:`mars.engine.Engine` on the catalog the qrels judge.
        queries: benchmark queries (only judged ones of ``tasks`` are mined).
        qrels: query id -> the product ids staged in its room.
        counts: pairs of each kind per query.
        tasks: the tasks to mine (default :data:`DISTILL_TASKS`).
        limit: at most this many queries per task (random with ``seed``), or all.
        seed: makes the query sample and the random controls reproducible.
        on_query: called after each mined query (progress).

    Returns:
        The rows, query by query (input order), kinds in :data:`KINDS` order.

    Raises:
        FileNotFoundError / InvalidImage: a query photo is missing or unreadable.
    """
    funnel = engine.funnel
    rows: list[dict[str, Any]] = []
    chosen = limit_queries(queries, qrels, tasks, limit, seed)
    staged = room_products(queries, qrels)
    categories = funnel.taxonomy().categories
    for c in room_candidates(engine, chosen, qrels, tasks):
        products = funnel.products(sorted({f.id for f in c.retrieval.fused} | c.relevant))
        classes = {i: product_class(p, categories) for i, p in products.items()}
        in_room = staged.get(c.query.room_id or "", set())
        picked = select(c, classes, counts, random.Random(f"{seed}:{c.query.id}"), in_room)
        heads = [f for f, _, _ in picked]
        pairs = {p.product_id: p for p in funnel.critic_pairs(c.search, heads, products, c.retrieval.trained)}
        target = target_class(c.relevant, classes)
        for f, kind, reason in picked:
            if f.id not in pairs:  # deleted from the catalog meanwhile
                continue
            image = products[f.id].image
            rows.append({
                "query_id": c.query.id, "task": c.query.task, "room_id": c.query.room_id,
                "room_category": c.query.room_category, "query": c.query.text,
                "room_image": str(c.query.image) if c.query.image else None,
                "product_id": f.id, "product_text": pairs[f.id].product_text,
                "product_image": str(Path(image).resolve()) if image and not is_remote(image) else None,
                "product_class": classes.get(f.id), "target_class": target,
                "fused_rank": f.rank, "image_rank": f.ranks.get("image"), "relevant": f.id in c.relevant,
                "in_room": f.id in in_room or f.id in c.relevant,
                "kind": kind, "reason": reason,
            })
        if on_query:
            on_query()
    return rows


def write_pairs(rows: Sequence[dict[str, Any]], out: Path) -> dict[str, int]:
    """Write ``rows`` to ``out`` (JSONL, replaced; parent folders made) and return the count of
    each kind plus ``queries`` (distinct query ids)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        write_rows(fh, rows)
    summary = {kind: sum(1 for r in rows if r["kind"] == kind) for kind in KINDS}
    summary["queries"] = len({r["query_id"] for r in rows})
    return summary
