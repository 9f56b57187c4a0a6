"""The engine: the composition root every entry point goes through (the CLI, ``mars serve``
and the ``index`` worker).

It opens the catalog and the stores the settings name (:class:`mars.stores.Stores`), reads
the trained artifacts (:class:`query.artifacts.Artifacts`), builds the funnel and the job
queue (:mod:`mars.wiring`), and offers the few operations the rest of MARS needs: search,
ingest, bulk jobs, deletes and installing trained artifacts.

Embedded mode (tantivy and/or Qdrant Edge under ``MARS_HOME``): one process owns the stores
(``owner.lock``) and runs every write itself; bulk jobs run on a background thread of that
process. Server mode (Qdrant server + OpenSearch): no lock; any number of API and worker
processes share the stores and bulk jobs go to the Celery queues.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select

from catalog.db import make_engine, session_factory, upgrade_to_head
from catalog.locking import Taxonomy
from catalog.models import Product
from catalog.rules import list_rules
from indexing.aligned import VECTOR as ALIGNED, heads_path, with_aligned
from indexing.staging_prior import staging_prior_path
from indexing.vector_store import VectorPoint
from indexing.whitening import whitening_path
from ingestion.pipeline import IngestReport, IngestTargets, run_ingest
from ingestion.remote import RemoteImageFetcher
from mars.registry import encoders_for
from mars.stores import IndexMismatchError, StoreBusyError, Stores
from mars.wiring import build_funnel, build_jobs
from query.artifacts import Artifacts
from query.funnel import SearchQuery
from query.rules import Rule, RuleCache
from query.schemas import SearchResponse

if TYPE_CHECKING:
    from critic.protocol import Critic
    from indexing.aligned import AlignHeads
    from indexing.encoders import ImageEncoder, TextEncoder
    from indexing.lexical_index import LexicalIndex
    from indexing.staging_prior import StagingPrior
    from indexing.vector_store import VectorStore
    from indexing.whitening import Whitening
    from ingestion.raw_records import RawRecord
    from query.retriever import Retriever
    from mars.settings import Settings

__all__ = ["Engine", "IndexMismatchError", "StoreBusyError"]


class Engine:
    """Opens the catalog and the stores for ``settings``; created once per process.

    Args:
        settings: the MARS settings (backends: ``MARS_VECTOR_BACKEND``, ``MARS_LEXICAL_BACKEND``).
        encoders: optional ready (image, text) encoders, e.g. shared between engines in tests.

    Raises:
        StoreBusyError: embedded stores, and another process holds ``MARS_HOME``.
        IndexMismatchError: the manifest names other encoders than the settings.
        ValueError: a server backend without its URL, or a critic that cannot be built.
    Whatever was opened before a failure (the owner lock, the stores, the database) is released.
    """

    def __init__(self, settings: Settings, encoders: tuple[ImageEncoder, TextEncoder] | None = None) -> None:
        self.settings = settings
        self._encoders = encoders
        self._taxonomy: Taxonomy | None = None
        self._closed = False
        #: Serialises index writes of this process (bulk-job batches, streamed items, deletes).
        self.write_lock = threading.Lock()
        with ExitStack() as undo:
            self.stores = Stores(settings)
            undo.callback(self.stores.close)
            self.db = make_engine(settings.catalog_url)
            undo.callback(self.db.dispose)
            upgrade_to_head(self.db)
            self.sessions = session_factory(self.db)
            #: The trained pieces, each re-read when its file changes (:mod:`query.artifacts`).
            self.artifacts = Artifacts.watched(settings, self.stores.home)
            #: The active merchandising rules, cached for ``MARS_RULES_CACHE_S`` (see :meth:`refresh_rules`).
            self.rules = RuleCache(self._load_rules, settings.rules_cache_s)
            self.funnel = build_funnel(settings, self.stores, self.sessions, self.taxonomy, self.encoders,
                                       self.artifacts, self.rules)
            undo.callback(self._close_critic)
            self.jobs = build_jobs(settings, self.sessions, self.ingest)
            undo.pop_all()

    # ---------------------------------------------------------------- what the engine holds

    @property
    def home(self) -> Path:
        """``MARS_HOME``, resolved."""
        return self.stores.home

    @property
    def lexical(self) -> LexicalIndex:
        """The BM25 index."""
        return self.stores.lexical

    @property
    def manifest(self) -> dict[str, Any] | None:
        """The index manifest (encoders and vector dimensions), or None while nothing is indexed."""
        return self.stores.manifest

    @property
    def critic(self) -> Critic | None:
        """The stage-3 critic, or None when none is configured."""
        return self.funnel.critic_stage.critic

    def encoders(self) -> tuple[ImageEncoder, TextEncoder]:
        """The (image, text) encoders, loaded on first use."""
        if self._encoders is None:
            self._encoders = encoders_for(self.settings)
        return self._encoders

    def vector_store(self) -> VectorStore | None:
        """The vector store, or None while nothing has been indexed."""
        return self.stores.vectors()

    def search_store(self) -> VectorStore | None:
        """The store queries use (the exact FAISS reference with ``MARS_VECTOR_BACKEND=faiss``)."""
        return self.stores.search_store()

    def taxonomy(self) -> Taxonomy:
        """The category tree snapshot used for locks (reloaded after each write)."""
        taxonomy = self._taxonomy  # read once: refresh() may drop it from another thread meanwhile
        if taxonomy is None:
            with self.sessions() as session:
                taxonomy = self._taxonomy = Taxonomy.load(session)
        return taxonomy

    # ---------------------------------------------------------------- queries

    def search(self, query: SearchQuery) -> SearchResponse:
        """Run a query through the funnel (:meth:`query.funnel.Funnel.search`)."""
        return self.funnel.search(query)

    def retrievers(self) -> list[Retriever]:
        """The ranked lists the funnel fuses, in fusion order (:data:`query.retrievers.RETRIEVERS`)."""
        return list(self.funnel.retrievers)

    def has_region_vectors(self, digest: str) -> bool:
        """Whether the region vectors of the room photo whose region key is ``digest`` are
        cached (then an upload of it is checked but not decoded again)."""
        return self.funnel.query_vectors.has_region_vectors(digest)

    def counts(self) -> dict[str, int]:
        """How many products the catalog, the BM25 index and the vector store hold."""
        with self.sessions() as session:
            products = session.execute(select(func.count()).select_from(Product)).scalar_one()
        store = self.vector_store()
        return {"products": products, "bm25_docs": self.lexical.count(), "vectors": store.count() if store is not None else 0}

    def warm_up(self) -> None:
        """Load what the first search would: the encoders, the store queries use and the lock taxonomy."""
        self.encoders()
        self.search_store()
        self.taxonomy()

    # ---------------------------------------------------------------- writes

    def ingest_targets(self, fetch_image: Callable[[str], bytes] | None = None) -> IngestTargets:
        """What the ingest stages write to: this engine's catalog, BM25 index, vector store
        (created on first write) and encoders, and the trained heads ingestion applies."""
        def create_vectors() -> VectorStore:
            def dims() -> dict[str, int]:
                image, text = self.encoders()
                return {"image": image.dim, "text": text.dim}

            return self.stores.create_vectors(dims)

        return IngestTargets(
            sessions=self.sessions,
            lexical=self.lexical,
            vectors=create_vectors,
            existing_vectors=self.vector_store,
            encoders=self.encoders,
            max_image_pixels=self.settings.max_image_pixels,
            max_image_bytes=self.settings.max_image_bytes,
            fetch_image=fetch_image,
            write_lock=self.write_lock,
            category_head=self.artifacts.category_head,
            aligner=self.artifacts.aligned,
        )

    def ingest(
        self,
        records: Iterable[RawRecord],
        source: str,
        total_hint: int | None = None,
        on_progress: Callable[[int], None] | None = None,
        job_id: int | None = None,
    ) -> IngestReport:
        """Upsert records in this process (see :func:`ingestion.pipeline.run_ingest`; ``job_id``
        an already queued job to run) and refresh the lock snapshot. Images given by http(s)
        URL are downloaded with the ``MARS_IMAGE_FETCH_*`` limits."""
        fetcher = RemoteImageFetcher.from_settings(self.settings)

        def progress(done: int) -> None:  # after each batch's writes: no cached list may predate them
            self.funnel.invalidate_results()
            if on_progress is not None:
                on_progress(done)

        try:
            return run_ingest(records, self.ingest_targets(fetcher.fetch), source=source, total_hint=total_hint,
                              on_progress=progress, job_id=job_id)
        finally:
            fetcher.close()
            self.refresh()

    def submit_bulk(self, records: Sequence[RawRecord], source: str) -> int:
        """Queue ``records`` as one bulk job and return its id at once (its progress is in the
        catalog: :func:`catalog.jobs.job_progress`): on this process's job thread in embedded
        mode, on the Celery queues in server mode (:func:`mars.wiring.build_jobs`)."""
        return self.jobs.submit(records, source)

    def bulk_jobs(self) -> dict[str, int]:
        """This process's bulk jobs: ``waiting`` behind the job thread and ``running``."""
        return self.jobs.counts()

    def delete_items(self, product_ids: Sequence[str]) -> list[str]:
        """Delete products from the vector store, the BM25 index and the catalog (in that
        order, under :attr:`write_lock`); returns the ids that were in the catalog."""
        with self.write_lock, self.sessions() as session:
            found = list(session.execute(select(Product.id).where(Product.id.in_(product_ids))).scalars())
            store = self.vector_store()
            if store is not None:
                store.delete(list(product_ids))
            self.lexical.delete(list(product_ids))
            session.execute(delete(Product).where(Product.id.in_(product_ids)))
            session.commit()
        self.refresh()
        return found

    def refresh(self) -> None:
        """Drop the snapshots derived from the catalog and the stores (the lock taxonomy, the
        exact reference and the funnel's cached results) after writes; they are rebuilt on next use."""
        self._taxonomy = None
        self.stores.refresh()
        self.funnel.invalidate_results()

    def _load_rules(self) -> list[Rule]:
        """The active merchandising rules from the catalog, oldest first."""
        with self.sessions() as session:
            return [Rule.from_row(row) for row in list_rules(session, active=True)]

    def refresh_rules(self) -> None:
        """Drop the cached merchandising rules after a rule write of this process; the next search
        reads them again. Writes of other processes (API replicas, the ``mars`` CLI) show within
        ``MARS_RULES_CACHE_S`` seconds."""
        self.rules.invalidate()

    # ---------------------------------------------------------------- trained artifacts

    def install_aligned(self, heads: AlignHeads) -> int:
        """Make ``heads`` the index's alignment heads: rebuild the vector collection with the
        ``aligned`` named vector (the image head on every stored ``image`` vector; products
        without a photo get none) through the store's ``reindex`` (built beside the live one,
        then swapped), then store the heads at :func:`indexing.aligned.heads_path` and the new
        dimensions in the manifest. Later ingests add ``aligned`` to each new product.

        Returns:
            The number of points rewritten.

        Raises:
            RuntimeError: nothing has been indexed yet.
            ValueError: the heads were trained on other encoders than the index's.
        """
        reason = heads.mismatch(self.settings.image_encoder, self.settings.text_encoder)
        if reason is not None:
            raise ValueError(f"the alignment heads were {reason}")
        with self.write_lock:
            store = self.vector_store()
            if store is None:
                raise RuntimeError("nothing is indexed yet: run `mars ingest` before `mars train align`")
            dims = {**{k: v for k, v in store.dims.items() if k != ALIGNED}, ALIGNED: heads.dim}
            points = [
                VectorPoint(p.product_id, with_aligned(p.vectors, heads), p.category_ids, p.type, p.colour)
                for p in store.scan()
            ]
            store.reindex(points, dims=dims)
            heads.save(heads_path(self.home))
            self.stores.set_dims(dims)
        self.refresh()
        return len(points)

    def install_whitening(self, whitening: Whitening) -> None:
        """Make ``whitening`` the index's image-vector whitening: store it at
        :func:`indexing.whitening.whitening_path` and drop the cached search results. Nothing is
        re-indexed: the image list whitens at query time.

        Raises:
            ValueError: it was fitted on another image encoder than the index's.
        """
        reason = whitening.mismatch(self.settings.image_encoder)
        if reason is not None:
            raise ValueError(f"the whitening was {reason}")
        whitening.save(whitening_path(self.home))
        self.funnel.invalidate_results()

    def install_prior(self, prior: StagingPrior) -> None:
        """Make ``prior`` the index's staging prior: store it at
        :func:`indexing.staging_prior.staging_prior_path` and drop the cached search results."""
        prior.save(staging_prior_path(self.home))
        self.funnel.invalidate_results()

    # ---------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Stop the job queue (a running in-process job stops after its batch), close the critic's
        connections, dispose of the database, then flush and release every store and the owner
        lock — each even if an earlier step fails. Closing a closed engine does nothing."""
        if self._closed:
            return
        self._closed = True
        with ExitStack() as closing:  # callbacks run last first: jobs, critic, database, stores (lock last)
            closing.callback(self.stores.close)
            closing.callback(self.db.dispose)
            closing.callback(self._close_critic)
            closing.callback(self.jobs.close)

    def _close_critic(self) -> None:
        """Release the critic's connections (an endpoint critic's HTTP client), if it holds any."""
        close = getattr(self.critic, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
