"""``mars train critic``: mine training pairs from staged rooms and fit the learned critic.

Pairs come from room queries (room-class, room-type, room-scene) with qrels (the products
staged in each room):

* **candidates** — the hybrid funnel's top ``depth`` for the query: staged products are
  positives, the others are hard negatives (in the lock, visually and textually close to the
  query, yet not in the room);
* **hard positives** — staged products the funnel ranked below ``depth`` (within its
  retrieval depth);
* **random controls** — ``controls`` products drawn from the rest of the fused list.

Every pair keeps the reason it was picked. Features are computed by the same code the
funnel uses at query time (:meth:`query.critic_stage.CriticStage.pairs`), by retrieval that never
saw the pair's room when the whitening has a learned stage (:func:`mine_out_of_fold`). Evaluation re-ranks
the top ``critic_top_n`` of the fused list by the critic score, as ``--mode full`` does,
and cross-validation holds out whole rooms (no room is seen in training and test).
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from critic.features import FEATURES
from critic.learned import ClassStats, LearnedCritic, feature_matrix
from critic.protocol import CriticPair
from evaluation.beir import BenchmarkQuery, QueryImages
from evaluation.metrics import ndcg_at_k
from query.critic_stage import critic_order
from query.funnel import Funnel, Retrieval, SearchQuery

ROOM_TASKS: tuple[str, ...] = ("room-class", "room-type", "room-scene")


@dataclass
class MinedQuery:
    """One room query's candidates: the fused order (ids, best first), the critic pairs of the
    mined products, their labels (1 = staged in the room) and why each was picked."""

    query: BenchmarkQuery
    fused: list[str]
    pairs: list[CriticPair]
    labels: list[int]
    reasons: list[str]
    relevant: set[str]


@dataclass
class RoomCandidates:
    """One judged room query run through the hybrid funnel: the benchmark query, the
    :class:`~query.funnel.SearchQuery` it became (room photo + text, ``mode="hybrid"``), the
    funnel's :class:`~query.funnel.Retrieval` (lock, per-list hits, fused list best first) and
    the ids staged in the room for it (its qrels)."""

    query: BenchmarkQuery
    search: SearchQuery
    retrieval: Retrieval
    relevant: set[str]


def room_candidates(
    engine,
    queries: Sequence[BenchmarkQuery],
    qrels: dict[str, set[str]],
    tasks: Sequence[str] = ROOM_TASKS,
    funnel: Funnel | None = None,
) -> Iterator[RoomCandidates]:
    """Run each judged room query of ``tasks`` through the hybrid funnel of ``engine`` (stages
    1-2 and fusion, no critic), in input order; queries without qrels or of other tasks are
    skipped. The candidate source of both :func:`mine` (learned critic) and
    :func:`training.mine_pairs.mine_pairs` (VLM distillation). ``funnel`` replaces the
    engine's (e.g. one refitted without the query's room: :func:`training.room_folds.out_of_fold`).

    Raises:
        FileNotFoundError / InvalidImage: a query photo is missing or unreadable.
    """
    funnel = funnel or engine.funnel
    images = QueryImages(engine.settings.max_image_bytes, engine.settings.max_image_pixels)
    for q in queries:
        relevant = qrels.get(q.id, set())
        if q.task not in tasks or not relevant:
            continue
        query = SearchQuery(text=q.text, image=images(q), mode="hybrid")
        yield RoomCandidates(q, query, funnel.retrieve(query), relevant)


def mine(
    engine,
    queries: Sequence[BenchmarkQuery],
    qrels: dict[str, set[str]],
    *,
    depth: int = 40,
    controls: int = 3,
    seed: int = 0,
    on_query: Callable[[], None] | None = None,
    funnel: Funnel | None = None,
) -> list[MinedQuery]:
    """Run each room query through the hybrid funnel of ``engine`` (or ``funnel``) and collect its pairs.

    Queries without qrels or outside :data:`ROOM_TASKS` are skipped.

    Raises:
        FileNotFoundError / InvalidImage: a query photo is missing or unreadable.
    """
    rng = random.Random(seed)
    funnel = funnel or engine.funnel
    mined = []
    for c in room_candidates(engine, queries, qrels, funnel=funnel):
        q, query, r, relevant = c.query, c.search, c.retrieval, c.relevant
        picked: list[tuple[int, str]] = []
        for f in r.fused:
            if f.rank <= depth:
                picked.append((f.rank, f"positive: staged in the room, fused rank {f.rank}" if f.id in relevant
                               else f"hard negative: fused rank {f.rank}, not in the room"))
            elif f.id in relevant:
                picked.append((f.rank, f"hard positive: staged in the room but fused rank {f.rank} > {depth}"))
        rest = [f.rank for f in r.fused[depth:] if f.id not in relevant]
        picked += [(rank, f"random control: fused rank {rank}") for rank in rng.sample(rest, min(controls, len(rest)))]
        head = [r.fused[rank - 1] for rank, _ in picked]
        reason_of = {f.id: reason for f, (_, reason) in zip(head, picked)}
        pairs = funnel.critic_pairs(query, head, funnel.products([f.id for f in head]), r.trained)
        reasons = [reason_of[p.product_id] for p in pairs]
        mined.append(MinedQuery(q, [f.id for f in r.fused], pairs, [int(p.product_id in relevant) for p in pairs],
                                reasons, relevant))
        if on_query:
            on_query()
    return mined


def mine_out_of_fold(
    engine,
    queries: Sequence[BenchmarkQuery],
    qrels: dict[str, set[str]],
    *,
    on_query: Callable[[], None] | None = None,
    **options: int,
) -> list[MinedQuery]:
    """:func:`mine` run by :func:`training.room_folds.out_of_fold`: when the installed whitening
    has a learned stage (fitted on judged rooms), every room's pairs come from retrieval that
    never saw the room. ``options``: ``depth``, ``controls``, ``seed``.

    A critic fitted on in-sample retrieval scores (a dev room's products found far better than
    a new room's would be) learns to trust them too much; out-of-fold features are the usual
    cure (cross-fitting, as in stacked generalisation: Wolpert, Neural Networks 1992).

    Raises:
        FileNotFoundError / InvalidImage: a query photo is missing or unreadable.
    """
    from training.room_folds import out_of_fold

    return out_of_fold(engine, queries, qrels,
                       lambda funnel, group: mine(engine, group, qrels, on_query=on_query, funnel=funnel, **options))


def _room_type(q: BenchmarkQuery) -> str | None:
    return q.room_category.lower() if q.room_category else None


def _room_id(m: MinedQuery) -> str:
    return m.query.room_id or m.query.id


def _stats(mined: Sequence[MinedQuery]) -> ClassStats:
    """Class and type statistics of the mined pairs (labels: staged in the room or not)."""
    pairs = [(p, _room_type(m.query), y) for m in mined for p, y in zip(m.pairs, m.labels)]
    return ClassStats.fit([p.product_class for p, _, _ in pairs], [p.product_type for p, _, _ in pairs],
                          [room for _, room, _ in pairs], [y for _, _, y in pairs])


def fit(mined: Sequence[MinedQuery], *, epochs: int = 300, l2: float = 1e-3, seed: int = 0) -> LearnedCritic:
    """Fit class/type statistics and the logistic weights on the mined pairs (full-batch L-BFGS
    on the mean binary cross-entropy + ``l2`` * ||w||^2, features standardised; the statistics'
    features of a training pair leave its own room out).

    Raises:
        ValueError: no pairs, or only one label class.
    """
    pairs = [p for m in mined for p in m.pairs]
    labels = np.array([y for m in mined for y in m.labels], dtype=np.float32)
    if len(pairs) == 0 or labels.min() == labels.max():
        raise ValueError(f"need positive and negative pairs to train the critic, got {len(pairs)} pairs, {int(labels.sum())} positive")
    stats = _stats(mined)
    # Leave-one-room-out: each training pair is scored with rates that do not count its own
    # room, as an unseen room is at query time (otherwise a type staged once, in this room,
    # would look like a strong prior and earn a weight it does not deserve).
    rooms: dict[str, list[MinedQuery]] = defaultdict(list)
    for m in mined:
        rooms[_room_id(m)].append(m)
    loo = {room: stats.without(_stats(group)) for room, group in rooms.items()}
    x = np.concatenate([feature_matrix(m.pairs, loo[_room_id(m)]) for m in mined if m.pairs])
    mean, std = x.mean(0), x.std(0)
    std[std < 1e-6] = 1.0
    torch.manual_seed(seed)
    z = torch.tensor((x - mean) / std, dtype=torch.float64)
    y = torch.tensor(labels, dtype=torch.float64)
    w = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=epochs, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w @ w)
    meta = {"pairs": len(pairs), "positives": int(labels.sum()), "queries": len(mined),
            "rooms": len({m.query.room_id for m in mined}), "lbfgs_max_iter": epochs, "l2": l2,
            "final_loss": round(float(loss), 6), "step": int(opt.state[w].get("n_iter", 0))}
    return LearnedCritic(w.detach().numpy().astype(np.float32), float(b.detach()[0]), mean, std, stats, meta)


def rerank(critic: LearnedCritic, m: MinedQuery, top_n: int) -> list[str]:
    """The ``--mode full`` order of a mined query: the top ``top_n`` fused ids sorted by critic
    score (ties by fused rank), then the rest in fused order."""
    head_ids = set(m.fused[:top_n])
    head = [p for p in m.pairs if p.product_id in head_ids]
    scores = {p.product_id: v.score for p, v in zip(head, critic.score(head))}
    return critic_order(m.fused[:top_n], scores) + m.fused[top_n:]


Rows = dict[str, list[tuple[float, float]]]


def _score(critic: LearnedCritic, mined: Sequence[MinedQuery], top_n: int, rows: Rows) -> None:
    for m in mined:
        rows[m.query.task].append((ndcg_at_k(m.fused, m.relevant, 10), ndcg_at_k(rerank(critic, m, top_n), m.relevant, 10)))


def _summary(rows: Rows) -> dict[str, dict[str, float]]:
    return {task: {"queries": len(v), "hybrid": float(np.mean([a for a, _ in v])), "full": float(np.mean([b for _, b in v]))}
            for task, v in sorted(rows.items())}


def evaluate(critic: LearnedCritic, mined: Sequence[MinedQuery], top_n: int) -> dict[str, dict[str, float]]:
    """Per task: queries, nDCG@10 of the fused order (``hybrid``) and of the re-ranked order (``full``)."""
    rows: Rows = defaultdict(list)
    _score(critic, mined, top_n, rows)
    return _summary(rows)


def cross_validate(mined: Sequence[MinedQuery], *, folds: int = 5, top_n: int = 20, seed: int = 0) -> dict[str, dict[str, float]]:
    """Room-grouped k-fold: train on the other folds' rooms, re-rank the held-out rooms' queries.

    Returns per task the held-out ``hybrid`` and ``full`` nDCG@10 over all folds.

    Raises:
        ValueError: fewer rooms than folds.
    """
    rooms = sorted({_room_id(m) for m in mined})
    if len(rooms) < folds:
        raise ValueError(f"{len(rooms)} rooms cannot make {folds} folds")
    random.Random(seed).shuffle(rooms)
    fold_of = {room: i % folds for i, room in enumerate(rooms)}
    rows: Rows = defaultdict(list)
    for k in range(folds):
        train = [m for m in mined if fold_of[_room_id(m)] != k]
        test = [m for m in mined if fold_of[_room_id(m)] == k]
        _score(fit(train, seed=seed), test, top_n, rows)
    return _summary(rows)


__all__ = ["FEATURES", "MinedQuery", "ROOM_TASKS", "RoomCandidates", "cross_validate", "evaluate", "fit", "mine",
           "rerank", "room_candidates"]
