"""The funnel for one query: plan (category lock) → BM25 → vectors → weighted RRF → merchandising
rules → critic.

Lists: ``bm25`` (query text, tantivy), ``text`` (query text → product text vectors),
``image`` (room-photo regions → product image vectors, each product scored by its best
region) and, once ``mars train align`` has run, ``aligned`` (query text → the aligned text
head → the products' aligned image vectors, :mod:`indexing.aligned`). Every list is computed within the lock; :func:`query.fusion.weighted_rrf` fuses
them. Modes: ``bm25`` (BM25 only), ``vector`` (vector lists only), ``hybrid`` (all lists)
and ``full`` (hybrid + the critic on the top ``critic_top_n``).

Merchandising rules (:mod:`query.rules`) act at two points: after the plan, synonyms rewrite
the query text the BM25 and text-vector lists search with; after fusion and before the cut to
``top_k`` and the critic's top N, boosts and buries re-order the whole fused list and pins place
their products (the critic, in mode ``full``, re-orders the others around the pins).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
from cachetools import LRUCache
from PIL import Image
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session, raiseload, sessionmaker

from catalog.locking import CategoryLock, Taxonomy
from catalog.models import Product
from catalog.rules import brands_of, products_within
from critic.protocol import Critic, CriticPair, CriticUnavailable
from indexing.aligned import AlignHeads
from indexing.encoders import ImageEncoder, TextEncoder
from indexing.lexical_index import LexicalIndex
from indexing.staging_prior import StagedHit, StagingPrior, room_type_key
from indexing.vector_store import VectorHit, VectorPoint, VectorStore
from indexing.whitening import Whitening
from ingestion.remote import is_remote
from query.fusion import Fused, weighted_rrf
from query.regions import embed_regions, grid_cell_count
from query.rules import Ranked, Rule, in_scope, merchandise, place_pins, rewrite
from query.schemas import (
    CriticResult,
    CriticStatus,
    LockInfo,
    Mode,
    Provenance,
    ResultItem,
    SearchResponse,
    StageHit,
)

MODES: tuple[str, ...] = ("bm25", "vector", "hybrid", "full")


class QueryError(ValueError):
    """The query cannot run as asked (e.g. BM25 without text); the message says why."""


@dataclass
class SearchQuery:
    """One query: text and/or a room photo, an optional explicit category, an optional room
    type (``room``, e.g. "Bedroom": context for the text-side lists, see :func:`search_text`),
    whether a category lock may be resolved from the text (``auto_lock``; False for a query
    that describes a whole room, such as a room's title), how many results, the mode, and optional per-list RRF weight overrides (``bm25``,
    ``image``, ``text``)."""

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
    #: each list name -> weight; a list not named weighs 1.0.
    weights: dict[str, dict[str, float]] = field(default_factory=lambda: {"photo": {}, "text": {}})
    grids: tuple[int, ...] = (1, 2, 3)
    critic_top_n: int = 20
    critic_detail: str = ""
    #: Query texts whose vectors are cached (least recently used dropped first).
    cache_size: int = 512
    #: Bytes of room-photo region vectors cached (raw and whitened; ~3.4 MB a photo with the
    #: dense windows of a CNN encoder, so 512 MiB holds ~150 photos).
    region_cache_bytes: int = 512 * 2**20
    #: Hits the per-stage result cache (:meth:`Funnel.stage_hits`) may hold in all, about 200
    #: bytes each (0 = off). Only safe when this process sees every index write (embedded
    #: stores): :meth:`Funnel.invalidate_results` must be called after each one.
    result_cache_hits: int = 0
    #: Catalog rows (without their categories) kept for the response, least recently used
    #: dropped first (0 = off); dropped with the stage results by :meth:`Funnel.invalidate_results`.
    row_cache_size: int = 0
    #: Product image vectors (raw, or whitened) kept for the image list's re-scoring, least
    #: recently used dropped first (0 = off; ~2-5 KB each); dropped by
    #: :meth:`Funnel.invalidate_results`, so only safe with embedded stores, like the row cache.
    product_vector_cache: int = 0


@dataclass
class Retrieval:
    """Stages 1-2 and fusion for one query: the lock, each stage's hits, the fused list,
    the RRF weights used and per-stage timings in ms; the merchandising rules in scope of the
    query, the synonym notes and the rewritten query text (None when no synonym applied)."""

    lock: CategoryLock
    lists: dict[str, list]
    fused: list[Fused]
    weights: dict[str, float]
    timings: dict[str, float]
    rules: list[Rule] = field(default_factory=list)
    synonyms: list[str] = field(default_factory=list)
    rewritten_text: str | None = None


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


def critic_order(ids: Sequence[str], scores: Mapping[str, float]) -> list[str]:
    """``ids`` (fused order) re-ordered for ``--mode full``: ids with a critic score first,
    highest score first, then the unscored ones; ties keep their fused order (stable sort)."""
    return sorted(ids, key=lambda i: (i not in scores, -scores.get(i, 0.0)))


def image_vectors(stored: Mapping[str, VectorPoint], whitening: Whitening | None) -> dict[str, np.ndarray]:
    """The ``image`` vectors of ``stored`` points (product id -> point), whitened in one batch
    when a ``whitening`` is given: float32 (D,) each, or (whitening dim,); points without an
    image vector are left out."""
    ids = [i for i, p in stored.items() if "image" in p.vectors]
    if not ids:
        return {}
    raw = np.stack([stored[i].vectors["image"] for i in ids])
    return dict(zip(ids, whitening.apply(raw) if whitening is not None else raw))


def max_over_regions(per_region: Sequence[Sequence[VectorHit]], limit: int) -> list[VectorHit]:
    """Combine per-region hit lists: each product keeps its best region's score; best first, ties by id."""
    best: dict[str, float] = {}
    for hits in per_region:
        for h in hits:
            if h.score > best.get(h.id, -np.inf):
                best[h.id] = h.score
    return sorted((VectorHit(i, s) for i, s in best.items()), key=lambda h: (-h.score, h.id))[:limit]


class Funnel:
    """Runs queries against the catalog and the indexes.

    Args:
        sessions: catalog session factory (product details for the response).
        taxonomy: callable returning the current :class:`Taxonomy` snapshot.
        lexical: the BM25 index.
        vectors: callable returning the vector store, or None while nothing is indexed.
        encoders: callable returning the (image, text) encoders (loaded lazily).
        critic: the stage-3 critic, or None when none is configured.
        config: depth, fusion and region settings.
        rules: callable returning the active merchandising rules (e.g. a
            :class:`query.rules.RuleCache`), or None for none.
        aligner: callable returning the cross-modal alignment heads
            (:class:`indexing.aligned.AlignHeads`) or None while none is trained.
        whitening: callable returning the image-vector whitening
            (:class:`indexing.whitening.Whitening`) or None while none is fitted.
        prior: callable returning the staging prior
            (:class:`indexing.staging_prior.StagingPrior`) or None while none is fitted.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        taxonomy: Callable[[], Taxonomy],
        lexical: LexicalIndex,
        vectors: Callable[[], VectorStore | None],
        encoders: Callable[[], tuple[ImageEncoder, TextEncoder]],
        critic: Critic | None,
        config: FunnelConfig,
        rules: Callable[[], Sequence[Rule]] | None = None,
        aligner: Callable[[], AlignHeads | None] | None = None,
        whitening: Callable[[], Whitening | None] | None = None,
        prior: Callable[[], StagingPrior | None] | None = None,
    ) -> None:
        self.sessions, self.taxonomy, self.lexical = sessions, taxonomy, lexical
        self.vectors, self.encoders, self.critic, self.config = vectors, encoders, critic, config
        self.rules, self.aligner, self.whitening, self.prior = rules, aligner, whitening, prior
        # Least-recently-used caches (cachetools), all guarded by one lock. Stage results are
        # sized in hits (a list counts its hits + 1); cachetools wants maxsize >= 1.
        self._region_cache: LRUCache[str, np.ndarray] = LRUCache(config.region_cache_bytes, getsizeof=lambda a: a.nbytes)
        self._text_cache: LRUCache[str, np.ndarray] = LRUCache(config.cache_size)
        self._results: LRUCache[tuple, tuple] = LRUCache(max(config.result_cache_hits, 1), getsizeof=lambda hits: len(hits) + 1)
        self._rows: LRUCache[tuple[str, str], Product] = LRUCache(max(config.row_cache_size, 1))
        self._product_vectors: LRUCache[tuple[str, str], np.ndarray] = LRUCache(max(config.product_vector_cache, 1))
        self._cache_lock = threading.Lock()
        self._results_generation = 0

    def _cached(self, cache: LRUCache, key: str, compute: Callable[[], np.ndarray]) -> np.ndarray:
        with self._cache_lock:
            value = cache.get(key)
        if value is None:
            value = compute()
            with self._cache_lock:
                cache[key] = value
        return value

    @staticmethod
    def region_key(image: Image.Image) -> str:
        """The region-cache key of a photo: ``image.info["mars_digest"]`` when the caller set
        one (the API sets the SHA-256 of the uploaded bytes), else the SHA-256 of the pixels,
        then remembered there (a search asks for it up to four times)."""
        key = image.info.get("mars_digest")
        if key is None:
            key = image.info["mars_digest"] = hashlib.sha256(image.tobytes()).hexdigest() + repr(image.size)
        return key

    def has_region_vectors(self, key: str) -> bool:
        """Whether the region vectors of the photo with :meth:`region_key` ``key`` are cached."""
        with self._cache_lock:
            return key in self._region_cache

    def region_vectors(self, image: Image.Image) -> np.ndarray:
        """Unit embeddings of the photo's regions, float32 (regions, dim), cached by
        :meth:`region_key`: the grid cells first (row 0 the whole photo), then the dense
        windows when the image encoder has a feature map (:func:`query.regions.embed_regions`)."""
        key = self.region_key(image)
        return self._cached(
            self._region_cache, key, lambda: embed_regions(self.encoders()[0], image, self.config.grids)
        )

    def whitened_regions(self, image: Image.Image, whitening: Whitening) -> np.ndarray:
        """:meth:`region_vectors` of the photo whitened by ``whitening``, float32 (regions,
        whitening dim), unit rows; cached by :meth:`region_key` and the whitening's digest."""
        key = f"{self.region_key(image)}@{whitening.digest}"
        return self._cached(self._region_cache, key, lambda: whitening.apply(self.region_vectors(image)))

    def _by_id(self, cache: LRUCache, enabled: bool, tag: str, ids: Sequence[str],
               fetch: Callable[[list[str]], dict[str, object]]) -> dict:
        """Values of ``ids`` from ``cache`` (keys ``(tag, id)``) when ``enabled``, the misses
        from ``fetch(missing)`` in one call (ids it does not return stay absent). Fetched values
        are kept unless :meth:`invalidate_results` ran meanwhile (they may predate a write)."""
        found: dict = {}
        with self._cache_lock:
            for i in ids if enabled else ():
                value = cache.get((tag, i))
                if value is not None:
                    found[i] = value
            generation = self._results_generation
        missing = [i for i in ids if i not in found]
        if missing:
            fetched = fetch(missing)
            found.update(fetched)
            if enabled:
                with self._cache_lock:
                    if generation == self._results_generation:
                        cache.update(((tag, i), v) for i, v in fetched.items())
        return found

    def product_image_vectors(
        self, store: VectorStore, product_ids: Sequence[str], whitening: Whitening | None
    ) -> dict[str, np.ndarray]:
        """Stored image vectors of ``product_ids`` (float32 (D,) each; whitened, (dim,), with a
        ``whitening``), for products that have one. With ``config.product_vector_cache`` > 0
        they are kept in a bounded LRU cache (by whitening digest and product id) that
        :meth:`invalidate_results` drops; misses are fetched from ``store`` in one call."""

        tag = f"white:{whitening.digest}" if whitening is not None else "raw"
        return self._by_id(self._product_vectors, self.config.product_vector_cache > 0, tag, product_ids,
                           lambda missing: image_vectors(store.fetch(missing), whitening))

    def image_hits(
        self, store: VectorStore, image: Image.Image, depth: int, cats: Sequence[str] | None,
        whitening: Whitening | None = None,
    ) -> list[VectorHit]:
        """The image list of a room photo: each product scored by its best region, best first,
        ties by id.

        The grid cells (the first :func:`query.regions.grid_cell_count` rows of
        :meth:`region_vectors`) are searched in the index. When there are more regions (dense
        windows) or a ``whitening``, the candidates' stored image vectors are fetched and
        re-scored exactly: the max over every region of the cosine similarity, of the whitened
        vectors when a whitening is given (:mod:`indexing.whitening`). Within a lock of at
        most ``depth`` products that is the exact max over all regions.
        """
        regions = self.region_vectors(image)
        cells = grid_cell_count(self.config.grids)
        candidates = max_over_regions(store.search_many("image", regions[:cells], depth, cats), depth)
        if (len(regions) <= cells and whitening is None) or not candidates:
            return candidates
        vectors = self.product_image_vectors(store, [h.id for h in candidates], whitening)
        ids = [h.id for h in candidates if h.id in vectors]
        if not ids:
            return candidates
        if whitening is not None:
            regions = self.whitened_regions(image, whitening)
        best = (regions @ np.stack([vectors[i] for i in ids]).T).max(axis=0)
        return sorted((VectorHit(i, float(s)) for i, s in zip(ids, best)), key=lambda h: (-h.score, h.id))

    def prior_hits(self, prior: StagingPrior, room: str, cats: Sequence[str] | None, depth: int) -> list[StagedHit]:
        """The ``prior`` list of a query about a ``room`` room type: the staging prior's order
        (:meth:`StagingPrior.ranked`) kept to the products still in the catalog and within the
        lock ``cats``, at most ``depth``."""
        ranked = prior.ranked(room)
        with self.sessions() as session:
            keep = products_within(session, [h.id for h in ranked], cats[0] if cats else None)
        return [h for h in ranked if h.id in keep][:depth]

    def text_vector(self, text: str) -> np.ndarray:
        """Embedding of the query text, float32 (1, dim), cached by text."""
        return self._cached(self._text_cache, text, lambda: self.encoders()[1].encode_texts([text]))

    def stage_hits(
        self, name: str, key: str, cats: Sequence[str] | None, depth: int, compute: Callable[[], list]
    ) -> list:
        """One stage's hit list (``name``: ``bm25``, ``text``, ``aligned``, ``image`` or
        ``prior``) for the query input ``key`` (search text, the photo's :meth:`region_key`, or
        the room type) within ``cats`` at ``depth``:
        from the result cache (like Solr's queryResultCache) when ``config.result_cache_hits``
        > 0, else ``compute()``. Least recently used lists are dropped past that many hits in
        all (a list counts its hits + 1), and every list by :meth:`invalidate_results`; a list
        computed while an invalidation happened is returned but not kept. Each call returns a
        fresh list of the (frozen) hits."""
        budget = self.config.result_cache_hits
        if budget <= 0:
            return compute()
        cache_key = (name, key, tuple(cats) if cats else None, depth)
        with self._cache_lock:
            hits = self._results.get(cache_key)
            if hits is not None:
                return list(hits)
            generation = self._results_generation
        hits = compute()
        with self._cache_lock:
            if generation == self._results_generation and len(hits) < budget:
                self._results[cache_key] = tuple(hits)
        return hits

    def invalidate_results(self) -> None:
        """Drop every cached stage result and catalog row (call after each write to the catalog
        or the indexes)."""
        with self._cache_lock:
            self._results.clear()
            self._rows.clear()
            self._product_vectors.clear()
            self._results_generation += 1

    def retrieve(self, query: SearchQuery) -> Retrieval:
        """Plan (category lock), the merchandising rules in scope and their synonyms, BM25 and
        vector search within the lock, weighted RRF.

        BM25 hits carry BM25 scores, vector hits cosine similarities (the image list keeps
        each product's best region).
        """
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        lock = self.taxonomy().resolve(query_text(query), query.category, from_text=query.auto_lock)
        cats = [lock.key] if lock.applied and lock.key else None
        timings["plan"] = (time.perf_counter() - t0) * 1000

        t = time.perf_counter()
        rules = in_scope(self.rules(), self.lock_keys(lock), query_text(query)) if self.rules is not None else []
        rewritten, synonyms = rewrite(query_text(query), [r for r in rules if r.kind == "synonym"])
        text = search_text(replace(query, text=rewritten) if synonyms else query)
        timings["rules"] = (time.perf_counter() - t) * 1000

        lists: dict[str, list] = {}
        depth = max(self.config.depth, query.top_k)
        weights = {**self.config.weights.get(query_shape(query), {}), **query.weights}
        wanted = lambda name: query.mode == "bm25" or weights.get(name, 1.0) > 0  # noqa: E731 - a list weighted 0 cannot change the order
        if query.mode in ("bm25", "hybrid", "full") and text and wanted("bm25"):
            t = time.perf_counter()
            lists["bm25"] = self.stage_hits("bm25", text, cats, depth, lambda: self.lexical.search(text, depth, cats))
            timings["bm25"] = (time.perf_counter() - t) * 1000
        store = self.vectors()
        if query.mode in ("vector", "hybrid", "full") and store is not None:
            t = time.perf_counter()
            if text and "text" in store.dims and wanted("text"):
                lists["text"] = self.stage_hits(
                    "text", text, cats, depth, lambda: store.search_many("text", self.text_vector(text), depth, cats)[0]
                )
            heads = self.aligner() if self.aligner is not None and text and "aligned" in store.dims and wanted("aligned") else None
            if heads is not None:
                lists["aligned"] = self.stage_hits(
                    "aligned", f"{text}@{heads.digest}", cats, depth,
                    lambda: store.search_many("aligned", heads.text(self.text_vector(text)), depth, cats)[0],
                )
            if query.image is not None and "image" in store.dims and wanted("image"):
                image = query.image
                white = self.whitening() if self.whitening is not None else None
                lists["image"] = self.stage_hits(
                    "image", self.region_key(image) + (f"@{white.digest}" if white is not None else ""), cats, depth,
                    lambda: self.image_hits(store, image, depth, cats, white),
                )
            timings["vector"] = (time.perf_counter() - t) * 1000
        prior = self.prior() if self.prior is not None and query.room and query.mode in ("hybrid", "full") and wanted("prior") else None
        if prior is not None:
            t = time.perf_counter()
            room = query.room
            lists["prior"] = self.stage_hits(
                "prior", f"{room_type_key(room)}@{prior.digest}", cats, depth, lambda: self.prior_hits(prior, room, cats, depth)
            )
            timings["prior"] = (time.perf_counter() - t) * 1000

        t = time.perf_counter()
        used = {name: weights.get(name, 1.0) for name in lists}
        fused = weighted_rrf({name: [h.id for h in hits] for name, hits in lists.items()}, used, self.config.rrf_k)
        timings["fuse"] = (time.perf_counter() - t) * 1000
        return Retrieval(lock, lists, fused, used, timings, rules, synonyms, rewritten if synonyms else None)

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

    def critic_pairs(self, query: SearchQuery, head: Sequence[Fused], products: dict[str, Product]) -> list[CriticPair]:
        """The critic's input for the fused ``head``: texts, images and the vectors already at hand
        (room regions, query text vector, each product's stored vectors and taxonomy class and
        type). With a whitening (:mod:`indexing.whitening`) and a room photo, the room regions
        and the products' ``image`` vectors are passed whitened, as the image list compared them.
        Products missing from ``products`` (deleted meanwhile) are skipped."""
        text = query_text(query)
        head = [f for f in head if f.id in products]
        store = self.vectors()
        stored = store.fetch([f.id for f in head]) if store is not None else {}
        regions = self.region_vectors(query.image) if query.image is not None and store is not None and "image" in store.dims else None
        white = self.whitening() if self.whitening is not None else None
        if white is not None and regions is not None:  # the critic compares in the space the image list ranked in
            regions = self.whitened_regions(query.image, white)
            whitened = image_vectors(stored, white)
            stored = {i: replace(p, vectors={**p.vectors, "image": whitened[i]}) if i in whitened else p for i, p in stored.items()}
        qvec = self.text_vector(text)[0] if text and store is not None and "text" in store.dims else None
        categories = self.taxonomy().categories
        photos = {f.id: _product_photo(products[f.id]) for f in head} if self.critic is not None and self.critic.uses_images else {}
        pairs = []
        for f in head:
            point = stored.get(f.id)
            levels = {categories[c].level: c for c in reversed(point.category_ids if point else []) if c in categories}
            pairs.append(
                CriticPair(
                    query_text=text,
                    room_image=query.image,
                    product_id=f.id,
                    product_text=_product_text(products[f.id]),
                    product_image=photos.get(f.id),
                    product_class=levels.get("class"),
                    product_type=levels.get("type"),
                    fused_rank=f.rank,
                    room_regions=regions,
                    query_vector=qvec,
                    product_vectors=point.vectors if point else {},
                )
            )
        return pairs

    def search(self, query: SearchQuery) -> SearchResponse:
        """Run one query through the funnel: :meth:`retrieve`, the merchandising rules
        (:meth:`merchandise`), the cut to ``top_k`` (and the critic's top N in mode ``full``;
        pinned products keep their positions), the response with provenance.

        Raises:
            QueryError: unknown mode, no text and no image, BM25 without text, or top_k < 1.
        """
        if query.mode not in MODES:
            raise QueryError(f"unknown mode {query.mode!r}; use one of {', '.join(MODES)}")
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
        r.timings["rules"] += (time.perf_counter() - t) * 1000

        keep = ranked[: max(query.top_k, self.config.critic_top_n if query.mode == "full" else 0)]
        products = self.products([x.id for x in keep], categories=False)
        verdicts: dict[str, CriticResult] = {}
        if query.mode != "full":
            critic_status = CriticStatus(backend=self.critic.name if self.critic else "none", status="skipped",
                                         detail=self.config.critic_detail)
        elif self.critic is None:
            critic_status = CriticStatus(backend="none", status="not configured", detail=self.config.critic_detail)
        else:
            t = time.perf_counter()
            pairs = self.critic_pairs(query, [x.fused for x in keep[: self.config.critic_top_n]], products)
            try:
                scored = self.critic.score(pairs)
            except CriticUnavailable as exc:  # a timeout, a transport error, an unreadable answer: the fused order stands
                detail = "; ".join(d for d in (str(exc), self.config.critic_detail) if d)
                critic_status = CriticStatus(backend=self.critic.name, status="unavailable", detail=detail)
            else:
                for pair, verdict in zip(pairs, scored):
                    verdicts[pair.product_id] = CriticResult(score=verdict.score, rationale=verdict.rationale)
                critic_status = CriticStatus(backend=self.critic.name, status="scored", scored=len(verdicts),
                                             detail=self.config.critic_detail)
                by_id = {x.id: x for x in keep}
                order = critic_order(list(by_id), {i: v.score for i, v in verdicts.items()})
                keep = [by_id[i] for i in place_pins(order, [(x.id, x.slot) for x in keep if x.slot is not None])]
            r.timings["critic"] = (time.perf_counter() - t) * 1000

        stage = {name: {h.id: (rank, h.score) for rank, h in enumerate(hits, start=1)} for name, hits in r.lists.items()}
        items: list[ResultItem] = []
        for x in keep:
            f = x.fused
            p = products.get(f.id)
            if p is None:  # indexed but no longer in the catalog: never show a ghost
                continue
            hit = lambda name: StageHit(rank=stage[name][f.id][0], score=stage[name][f.id][1]) if f.id in stage.get(name, {}) else None  # noqa: E731
            critic = verdicts.get(f.id)
            items.append(
                ResultItem(
                    rank=len(items) + 1,
                    id=p.id,
                    title=p.title,
                    type=p.type,
                    colour=p.colour,
                    image=p.image,
                    score=critic.score if critic else x.score,
                    provenance=Provenance(
                        bm25=hit("bm25"), image=hit("image"), text=hit("text"), aligned=hit("aligned"), prior=hit("prior"),
                        fused=None if x.inserted else StageHit(rank=f.rank, score=f.score), critic=critic, rules=x.notes,
                    ),
                )
            )
            if len(items) == query.top_k:
                break
        r.timings["total"] = (time.perf_counter() - t0) * 1000
        return SearchResponse(
            mode=query.mode,
            text=text,
            has_image=query.image is not None,
            lock=LockInfo(**r.lock.as_dict()),
            critic=critic_status,
            fusion={"k": self.config.rrf_k, **r.weights},
            timings_ms={k: round(v, 3) for k, v in r.timings.items()},
            items=items,
            synonyms=r.synonyms,
            rewritten_text=r.rewritten_text,
        )

    def products(self, ids: list[str], categories: bool = True) -> dict[str, Product]:
        """Catalog rows of ``ids`` by id (ids no longer in the catalog are absent), detached.

        With ``categories=False`` the rows' categories are not loaded (the response and the
        critic read only the product's own columns; reading ``categories`` then raises), and
        rows come from the row cache when ``config.row_cache_size`` > 0 (like Solr's
        documentCache; emptied by :meth:`invalidate_results`)."""
        if not ids:
            return {}
        if categories:
            with self.sessions() as session:
                rows = session.execute(select(Product).where(Product.id.in_(ids))).scalars().all()
                return {p.id: p for p in rows}

        def fetch(missing: list[str]) -> dict[str, Product]:
            with self.sessions() as session:
                return {p.id: p for p in session.execute(_ROWS_WITHOUT_CATEGORIES, {"ids": missing}).scalars().all()}

        return self._by_id(self._rows, self.config.row_cache_size > 0, "row", ids, fetch)


#: Catalog rows by id without their categories (built once: SQLAlchemy caches its compilation).
_ROWS_WITHOUT_CATEGORIES = (
    select(Product).where(Product.id.in_(bindparam("ids", expanding=True))).options(raiseload(Product.categories))
)


def _product_photo(p: Product) -> Image.Image | None:
    """The product's stored photo for an image-reading critic; None when it has none or it is
    a URL (the query path never downloads). A local file that no longer decodes raises."""
    if not p.image or is_remote(p.image):
        return None
    with Image.open(p.image) as img:
        return img.convert("RGB")


def _product_text(p: Product) -> str:
    return ". ".join(part for part in (p.type, p.colour, p.title, p.text) if part)
