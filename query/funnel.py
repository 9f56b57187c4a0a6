"""The funnel for one query: plan (category lock) → retrievers → weighted RRF → merchandising
rules → critic → response.

1. **Plan**: the catalog's taxonomy resolves the category lock from the request or the text
   (:meth:`catalog.locking.Taxonomy.resolve`); the merchandising rules in scope are picked and
   synonym rules rewrite the text the text-side lists search with (:mod:`query.rules`).
2. **Retrieve**: every configured :class:`query.retriever.Retriever` (BM25, text, aligned,
   image regions, staging prior: :mod:`query.retrievers`) that applies to the query and that
   its mode runs gives a list within the lock, cached by :class:`query.search_cache.SearchCache`.
3. **Fuse**: :func:`query.fusion.weighted_rrf` with the weights of the query's shape (photo or
   text only) and any per-query overrides; a list weighted 0 is not computed (except in mode
   ``bm25``).
4. **Merchandise**: boosts, buries and pins re-order the fused list (:func:`query.rules.merchandise`).
5. **Critic** (mode ``full``): :class:`query.critic_stage.CriticStage` re-ranks the top N.
6. **Respond**: items with their provenance, keyed by retriever name, and the trained stages
   with plain notes on those the query had to do without (:func:`stages`).

Modes: ``bm25`` (BM25 only), ``vector`` (vector lists only), ``hybrid`` (all lists) and
``full`` (hybrid + the critic).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, raiseload, sessionmaker

from catalog.locking import CategoryLock, Taxonomy
from catalog.models import Product
from catalog.rules import brands_of, products_within
from critic.protocol import CriticPair
from query.artifacts import Artifacts, Trained
from query.critic_stage import CriticStage
from query.fusion import Fused, weighted_rrf
from query.query_vectors import QueryVectors
from query.retriever import MODE_KINDS, RetrievalQuery, Retriever
from query.rules import Ranked, Rule, in_scope, merchandise, rewrite
from query.schemas import LockInfo, Mode, Provenance, ResultItem, SearchResponse, StageHit, Stages
from query.search_cache import SearchCache

MODES: tuple[str, ...] = tuple(MODE_KINDS)


class QueryError(ValueError):
    """The query cannot run as asked (e.g. BM25 without text); the message says why."""


@dataclass
class SearchQuery:
    """One query: text and/or a room photo, an optional explicit category, an optional room
    type (``room``, e.g. "Bedroom": context for the text-side lists, see :func:`search_text`),
    whether a category lock may be resolved from the text (``auto_lock``; False for a query
    that describes a whole room, such as a room's title), how many results, the mode, and
    optional per-list RRF weight overrides by retriever name (``bm25``, ``image``, ...)."""

    text: str | None = None
    image: Image.Image | None = None
    category: str | None = None
    room: str | None = None
    auto_lock: bool = True
    top_k: int = 10
    mode: Mode = "hybrid"
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class FunnelConfig:
    """Funnel settings (see :class:`mars.settings.Settings` for their meaning and sources)."""

    depth: int = 200
    rrf_k: float = 60.0
    #: RRF weights per query shape: ``"photo"`` (a room photo is given) and ``"text"`` (text only),
    #: each retriever name -> weight; a list not named weighs 1.0.
    weights: dict[str, dict[str, float]] = field(default_factory=lambda: {"photo": {}, "text": {}})


@dataclass
class Retrieval:
    """Stages 1-2 and fusion for one query: the lock, each retriever's hits by name, the fused
    list, the RRF weights used and timings in ms; the merchandising rules in scope of the
    query, the synonym notes, the rewritten query text (None when no synonym applied) and the
    trained pieces the query read."""

    lock: CategoryLock
    lists: dict[str, list]
    fused: list[Fused]
    weights: dict[str, float]
    timings: dict[str, float]
    rules: list[Rule] = field(default_factory=list)
    synonyms: list[str] = field(default_factory=list)
    rewritten_text: str | None = None
    trained: Trained = field(default_factory=Trained)


def query_shape(query: SearchQuery) -> str:
    """Which RRF weights a query uses: ``"photo"`` when it has a room photo, else ``"text"``."""
    return "photo" if query.image is not None else "text"


def query_text(query: SearchQuery) -> str | None:
    """The query's text stripped, or None when it is empty."""
    return (query.text or "").strip() or None


def search_text(query: SearchQuery) -> str | None:
    """The text the BM25 and text-vector lists search with: the query text plus the room type
    when one is given and the text does not already name it ("a cosy space for coffee" +
    "Living Room" → "a cosy space for coffee living room"); the room type alone when there is
    no text; None when there is neither. The category lock reads the query text only, so a
    room type never locks ("kitchen" says where the product goes, not what it is)."""
    text = query_text(query)
    room = (query.room or "").strip().lower() or None
    if room is None or (text is not None and all(w in text.lower().split() for w in room.split())):
        return text
    return f"{text} {room}" if text else room


#: What a search says, in plain words, about a trained stage it would have used but that is absent.
ABSENT_NOTES: dict[str, str] = {
    "aligned": "“Text to photo” matching is off: it is not trained yet.",
    "whitening": "“Room photo” matching runs without its photo calibration: it is not trained yet.",
    "learned": "“Room photo” matching runs without the calibration learned from judged rooms.",
    "prior": "“Often in this room” is off: it is learned from judged rooms.",
}


def stages(trained: Trained, critic_ready: bool, mode: str, text: str | None, image: bool, room: str | None,
           weights: Mapping[str, float]) -> Stages:
    """The trained stages of ``trained`` (one query's snapshot) and the plain notes
    (:data:`ABSENT_NOTES`) for those the query would have used but that are absent: text-side
    matching for a search ``text`` (after synonyms and room type), the room-photo calibration for
    a room ``image``, the room prior for a ``room`` type, each only in a mode that runs its kind
    of list and when its list's RRF weight (``weights``, by list name; 1.0 when not named) is
    above 0. No I/O: it reads the snapshot the retrievers read."""
    kinds = MODE_KINDS.get(mode, frozenset())
    runs = {name for name in ("aligned", "image", "prior") if weights.get(name, 1.0) > 0}
    white = trained.whitening
    learned = white is not None and getattr(white, "learned_projection", None) is not None
    notes = []
    if "vector" in kinds and "aligned" in runs and text is not None and trained.aligned is None:
        notes.append(ABSENT_NOTES["aligned"])
    if "vector" in kinds and "image" in runs and image and not learned:
        notes.append(ABSENT_NOTES["whitening" if white is None else "learned"])
    if "prior" in kinds and "prior" in runs and room and trained.prior is None:
        notes.append(ABSENT_NOTES["prior"])
    return Stages(
        aligned="trained" if trained.aligned is not None else "absent",
        whitening="absent" if white is None else "PCA + learned" if learned else "PCA",
        prior="trained" if trained.prior is not None else "absent",
        critic="ready" if critic_ready else "absent",
        absent=notes,
    )


def _ms_since(t: float) -> float:
    return (time.perf_counter() - t) * 1000


class Funnel:
    """Runs queries against the catalog and the retrievers.

    Args:
        sessions: catalog session factory (product rows for the response and the rules).
        taxonomy: returns the current category tree snapshot (locks).
        retrievers: the ranked lists, in the order they are fused (:func:`query.retrievers.build_retrievers`).
        artifacts: the trained pieces (:class:`query.artifacts.Artifacts`), read once per query.
        critic: stage 3 (:class:`query.critic_stage.CriticStage`).
        cache: the per-retriever list, row and product-vector caches.
        query_vectors: the query encodings (shared with the retrievers and the critic stage).
        config: depth and fusion settings.
        rules: returns the active merchandising rules (e.g. a :class:`query.rules.RuleCache`), or None.
    """

    def __init__(self, sessions: sessionmaker[Session], taxonomy: Callable[[], Taxonomy], retrievers: Sequence[Retriever],
                 artifacts: Artifacts, critic: CriticStage, cache: SearchCache, query_vectors: QueryVectors,
                 config: FunnelConfig, rules: Callable[[], Sequence[Rule]] | None = None) -> None:
        self.sessions, self.taxonomy, self.retrievers = sessions, taxonomy, list(retrievers)
        self.artifacts, self.critic_stage, self.cache, self.query_vectors = artifacts, critic, cache, query_vectors
        self.config, self.rules = config, rules

    def with_artifacts(self, artifacts: Artifacts) -> "Funnel":
        """A funnel like this one reading ``artifacts`` instead (e.g. refitted in memory for
        cross-fitting). It shares the stores and the caches: every cache key names the version
        of the trained piece it depends on."""
        return Funnel(self.sessions, self.taxonomy, self.retrievers, artifacts, self.critic_stage, self.cache,
                      self.query_vectors, self.config, self.rules)

    def retriever_names(self) -> list[str]:
        """The names of the configured retrievers, in fusion order."""
        return [r.name for r in self.retrievers]

    def list_weights(self, query: SearchQuery) -> dict[str, float]:
        """The RRF weight of each list named for ``query``: its shape's configured weights with the
        query's overrides (a list not named weighs 1.0; one weighted 0 is not searched)."""
        return {**self.config.weights.get(query_shape(query), {}), **query.weights}

    def invalidate_results(self) -> None:
        """Drop every cached list, catalog row and product vector (call after each write)."""
        self.cache.invalidate()

    def retrieve(self, query: SearchQuery) -> Retrieval:
        """Plan (category lock), the merchandising rules in scope and their synonyms, every
        retriever that applies within the lock, weighted RRF."""
        timings: dict[str, float] = {}
        t = time.perf_counter()
        lock = self.taxonomy().resolve(query_text(query), query.category, from_text=query.auto_lock)
        cats = [lock.key] if lock.applied and lock.key else None
        timings["plan"] = _ms_since(t)

        t = time.perf_counter()
        rules = in_scope(self.rules(), self.lock_keys(lock), query_text(query)) if self.rules is not None else []
        rewritten, synonyms = rewrite(query_text(query), [r for r in rules if r.kind == "synonym"])
        text = search_text(replace(query, text=rewritten) if synonyms else query)
        timings["rules"] = _ms_since(t)

        trained = self.artifacts.current()
        kinds = MODE_KINDS[query.mode]
        image_key = self.query_vectors.region_key(query.image) if query.image is not None and "vector" in kinds else None
        input_ = RetrievalQuery(text=text, image=query.image, image_key=image_key, room=query.room, trained=trained)
        depth = max(self.config.depth, query.top_k)
        weights = self.list_weights(query)
        lists: dict[str, list] = {}
        for r in self.retrievers:
            # a list weighted 0 cannot change the fused order (mode bm25 has one list, unweighted)
            if r.kind not in kinds or (query.mode != "bm25" and not weights.get(r.name, 1.0) > 0) or not r.applies(input_):
                continue
            t = time.perf_counter()
            lists[r.name] = self.cache.hits(r.name, r.cache_key(input_), cats, depth,
                                            lambda r=r: r.run(input_, cats, depth))
            timings[r.name] = _ms_since(t)

        t = time.perf_counter()
        used = {name: weights.get(name, 1.0) for name in lists}
        fused = weighted_rrf({name: [h.id for h in hits] for name, hits in lists.items()}, used, self.config.rrf_k)
        timings["fuse"] = _ms_since(t)
        return Retrieval(lock, lists, fused, used, timings, rules, synonyms, rewritten if synonyms else None, trained)

    def lock_keys(self, lock: CategoryLock) -> set[str]:
        """The category keys a rule's ``category`` scope is matched against: the lock's key and,
        for a type lock, its class's key; empty when no lock applied."""
        if not lock.applied or not lock.key:
            return set()
        info = self.taxonomy().categories.get(lock.key)
        return {lock.key} | ({info.parent_key} if info is not None and info.parent_key else set())

    def merchandise(self, r: Retrieval) -> list[Ranked]:
        """The fused list of ``r`` with its in-scope boosts, buries and pins applied
        (:func:`query.rules.merchandise`): brands are read from the catalog only when a brand
        rule is in scope, and a pinned product that retrieval did not return is inserted only
        when it is in the catalog and within the lock."""
        rules = [rule for rule in r.rules if rule.kind != "synonym"]
        if not rules:
            return [Ranked(f, f.score) for f in r.fused]
        fused_ids = {f.id for f in r.fused}
        missing = [rule.product_id for rule in rules if rule.kind == "pin" and rule.product_id not in fused_ids]
        with self.sessions() as session:
            brands = brands_of(session, [f.id for f in r.fused]) if any(rule.brand for rule in rules) else {}
            insertable = products_within(session, missing, r.lock.key if r.lock.applied else None)  # type: ignore[arg-type]
        return merchandise(r.fused, rules, brands, insertable)

    def critic_pairs(self, query: SearchQuery, head: Sequence[Fused], products: dict[str, Product],
                     trained: Trained | None = None) -> list[CriticPair]:
        """The critic's input for the fused ``head`` of ``query``, as a search builds it
        (:meth:`query.critic_stage.CriticStage.pairs`), with the trained pieces its retrieval read
        (``Retrieval.trained``; default: this funnel's current ones)."""
        return self.critic_stage.pairs(query_text(query), query.image, head, products,
                                       trained if trained is not None else self.artifacts.current())

    def search(self, query: SearchQuery) -> SearchResponse:
        """Run one query through the funnel: :meth:`retrieve`, the merchandising rules
        (:meth:`merchandise`), the cut to ``top_k`` (and the critic's top N in mode ``full``;
        pinned products keep their positions), the response with provenance.

        Raises:
            QueryError: unknown mode, no text and no image, BM25 without text, top_k < 1, or a
                weight for a list that does not exist or that is not a finite number ≥ 0.
        """
        if query.mode not in MODES:
            raise QueryError(f"unknown mode {query.mode!r}; use one of {', '.join(MODES)}")
        unknown = sorted(set(query.weights) - set(self.retriever_names()))
        if unknown:
            raise QueryError(f"no list named {', '.join(map(repr, unknown))} to weigh; the lists are "
                             f"{', '.join(self.retriever_names())}")
        bad = {name: w for name, w in query.weights.items() if not 0 <= w < math.inf}
        if bad:
            raise QueryError(f"list weights must be finite numbers ≥ 0, got {bad}")
        text = query_text(query)
        if text is None and query.image is None:
            raise QueryError("a query needs text, a room photo, or both")
        if query.mode == "bm25" and text is None:
            raise QueryError("mode bm25 needs query text")
        if query.top_k < 1:
            raise QueryError("top_k must be at least 1")
        t0 = time.perf_counter()
        r = self.retrieve(query)
        t = time.perf_counter()
        ranked = self.merchandise(r)
        r.timings["rules"] += _ms_since(t)

        stage = self.critic_stage
        keep = ranked[: max(query.top_k, stage.top_n if query.mode == "full" else 0)]
        products = self.products([x.id for x in keep], categories=False)
        if query.mode == "full" and stage.critic is not None:
            t = time.perf_counter()
            outcome = stage.rerank(text, query.image, keep, products, r.trained)
            keep, critic_status, verdicts = outcome.ranked, outcome.status, outcome.verdicts
            r.timings["critic"] = _ms_since(t)
        else:
            critic_status, verdicts = stage.skipped(query.mode), {}

        ranks = {name: {h.id: StageHit(rank=rank, score=h.score) for rank, h in enumerate(hits, start=1)}
                 for name, hits in r.lists.items()}
        items: list[ResultItem] = []
        for x in keep:
            p = products.get(x.id)
            if p is None:  # indexed but no longer in the catalog: never show a ghost
                continue
            critic = verdicts.get(x.id)
            items.append(ResultItem(
                rank=len(items) + 1, id=p.id, title=p.title, type=p.type, colour=p.colour, image=p.image,
                score=critic.score if critic else x.score,
                provenance=Provenance(
                    retrievers={name: by_id[x.id] for name, by_id in ranks.items() if x.id in by_id},
                    fused=None if x.inserted else StageHit(rank=x.fused.rank, score=x.fused.score),
                    critic=critic, rules=x.notes,
                ),
            ))
            if len(items) == query.top_k:
                break
        r.timings["total"] = _ms_since(t0)
        return SearchResponse(
            mode=query.mode, text=text, has_image=query.image is not None, lock=LockInfo(**r.lock.as_dict()),
            critic=critic_status, fusion={"k": self.config.rrf_k, **r.weights},
            stages=stages(r.trained, stage.critic is not None, query.mode, search_text(query), query.image is not None,
                          (query.room or "").strip() or None, self.list_weights(query)),
            timings_ms={k: round(v, 3) for k, v in r.timings.items()}, items=items,
            synonyms=r.synonyms, rewritten_text=r.rewritten_text,
        )

    def products(self, ids: list[str], categories: bool = True) -> dict[str, Product]:
        """Catalog rows of ``ids`` by id (ids no longer in the catalog are absent), detached.

        With ``categories=False`` the rows' categories are not loaded (the response and the
        critic read only the product's own columns; reading ``categories`` then raises), and
        rows come from the row cache (:meth:`query.search_cache.SearchCache.rows`)."""
        if not ids:
            return {}
        if categories:
            with self.sessions() as session:
                rows = session.execute(select(Product).where(Product.id.in_(ids))).scalars().all()
                return {p.id: p for p in rows}

        def fetch(missing: list[str]) -> dict[str, Any]:
            with self.sessions() as session:
                return {p.id: p for p in session.execute(_ROWS_WITHOUT_CATEGORIES, {"ids": missing}).scalars().all()}

        return self.cache.rows(ids, fetch)


#: Catalog rows by id without their categories (built once: SQLAlchemy caches its compilation).
_ROWS_WITHOUT_CATEGORIES = (
    select(Product).where(Product.id.in_(bindparam("ids", expanding=True))).options(raiseload(Product.categories))
)
