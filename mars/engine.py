"""The engine: opens the catalog and the stores the settings name, applies writes and answers
queries (ARCHITECTURE.md, "Two run modes"). The CLI, ``mars serve`` and the ``index`` worker
all go through it.

Embedded mode (tantivy and/or Qdrant Edge under ``MARS_HOME``): one process owns the stores
(``owner.lock``) and runs every write itself; bulk jobs run on a background thread of that
process. Server mode (Qdrant server + OpenSearch): no lock; any number of API and worker
processes share the stores and bulk jobs go to the Celery queues.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from filelock import FileLock, Timeout
from sqlalchemy import delete, func, select

from catalog.category_head import CategoryHeadFile, category_head_path
from catalog.db import make_engine, session_factory, upgrade_to_head
from catalog.locking import Taxonomy
from indexing.aligned import VECTOR as ALIGNED, AlignHeads, AlignHeadsFile, heads_path, with_aligned
from indexing.staging_prior import StagingPrior, StagingPriorFile, staging_prior_path
from indexing.whitening import Whitening, WhiteningFile, whitening_path
from indexing.encoders import ImageEncoder, TextEncoder
from mars.registry import load_encoders
from mars.wiring import stage3_critic
from catalog.models import IngestJob, Product
from catalog.rules import list_rules
from indexing.lexical_index import LexicalIndex
from indexing.faiss_flat import FaissFlatStore
from indexing.vector_store import VectorPoint, VectorStore
from mars import registry
from ingestion.pipeline import IngestReport, IngestTargets, run_ingest
from ingestion.readers import RawRecord
from ingestion.remote import RemoteImageFetcher
from mars.settings import Settings
from query.funnel import Funnel, FunnelConfig, SearchQuery
from query.rules import Rule, RuleCache
from query.schemas import SearchResponse

log = logging.getLogger("mars.engine")

#: Catalog rows the funnel keeps for responses in embedded mode (a few KB each).
ROW_CACHE_SIZE = 10_000
#: Product image vectors the funnel keeps for the image list's re-scoring in embedded mode
#: (2-5 KB each, so at most ~100 MB).
PRODUCT_VECTOR_CACHE = 20_000


class StoreBusyError(RuntimeError):
    """Another process owns the embedded stores under ``MARS_HOME``."""


class JobInterrupted(RuntimeError):
    """An in-process bulk job stopped at a batch boundary because the engine is closing."""


class IndexMismatchError(RuntimeError):
    """The index on disk was built with other encoders than the settings ask for."""


class Engine:
    """Opens the catalog and the stores for ``settings``; created once per process (CLI
    command, server lifespan or ``index`` worker).

    Args:
        settings: the MARS settings (backends: ``MARS_VECTOR_BACKEND``, ``MARS_LEXICAL_BACKEND``).
        encoders: optional ready (image, text) encoders, e.g. shared between engines in tests.

    Raises:
        StoreBusyError: embedded stores, and another process holds ``MARS_HOME``.
        IndexMismatchError: the manifest names other encoders than the settings.
        ValueError: a server backend without its URL.
    """

    def __init__(self, settings: Settings, encoders: tuple[ImageEncoder, TextEncoder] | None = None) -> None:
        self.settings = settings
        self.home = settings.home.resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        registry.check_url(settings)
        self._lock: FileLock | None = None
        if settings.embedded_stores:
            self._lock = FileLock(str(self.home / "owner.lock"))
            try:
                self._lock.acquire(timeout=0)
            except Timeout as exc:
                raise StoreBusyError(
                    f"another MARS process owns {self.home} (pid {self._owner_pid()}); stop it, or send requests to "
                    "its API (`mars serve`), or point MARS_HOME elsewhere"
                ) from exc
            (self.home / "owner.pid").write_text(str(os.getpid()))
        try:
            self.db = make_engine(settings.catalog_url)
            upgrade_to_head(self.db)
            self.sessions = session_factory(self.db)
            self.manifest_path = self.home / "index" / "manifest.json"
            self.manifest = json.loads(self.manifest_path.read_text()) if self.manifest_path.exists() else None
            if self.manifest and (
                self.manifest["image_encoder"] != settings.image_encoder
                or self.manifest["text_encoder"] != settings.text_encoder
            ):
                raise IndexMismatchError(
                    f"the index in {self.home / 'index'} was built with image encoder "
                    f"{self.manifest['image_encoder']!r} and text encoder {self.manifest['text_encoder']!r}, but the "
                    f"settings ask for {settings.image_encoder!r} and {settings.text_encoder!r}; set MARS_IMAGE_ENCODER/"
                    "MARS_TEXT_ENCODER back, or use a new MARS_HOME and ingest again"
                )
            self.lexical = self._open_lexical()
        except Exception:
            if self._lock is not None:
                self._lock.release()
            raise
        self._encoders = encoders
        self._store: VectorStore | None = None
        #: Serialises the lazy opening of the vector store: a bulk job's first batch and a
        #: concurrent search must not both open (and create) the same shard.
        self._store_open = threading.Lock()
        self._reference: FaissFlatStore | None = None
        self._taxonomy: Taxonomy | None = None
        #: Serialises index writes of this process (bulk-job batches, streamed items, deletes).
        self.write_lock = threading.Lock()
        self._jobs: ThreadPoolExecutor | None = None
        self._queued: dict[int, Future] = {}
        self._closing = threading.Event()
        self.critic, critic_detail = stage3_critic(settings)
        #: Returns the category head (``mars train category-head``) or None, re-read when its file
        #: changes; ingestion suggests a class for items without a type (:mod:`catalog.category_head`).
        self.category_head = CategoryHeadFile(category_head_path(settings), settings.image_encoder)
        #: Returns the cross-modal alignment heads (``mars train align``) or None; with heads and an
        #: ``aligned`` named vector, text queries get the ``aligned`` list (:mod:`indexing.aligned`).
        self.aligned = AlignHeadsFile(heads_path(self.home), settings.image_encoder, settings.text_encoder)
        #: Returns the image-vector whitening (``mars train whitening``) or None, re-read when its
        #: file changes; the image list then compares whitened vectors (:mod:`indexing.whitening`).
        self.whitening = WhiteningFile(whitening_path(self.home), settings.image_encoder)
        #: Returns the staging prior (``mars train prior``) or None, re-read when its file changes;
        #: queries with a room type then get the ``prior`` list (:mod:`indexing.staging_prior`).
        self.prior = StagingPriorFile(staging_prior_path(self.home))
        #: The active merchandising rules, cached for ``MARS_RULES_CACHE_S`` (see :meth:`refresh_rules`).
        self.rules = RuleCache(self._load_rules, settings.rules_cache_s)
        self.funnel = Funnel(
            self.sessions,
            self.taxonomy,
            self.lexical,
            self.search_store,
            self.encoders,
            self.critic,
            FunnelConfig(
                depth=settings.retrieval_depth,
                rrf_k=settings.rrf_k,
                weights={"photo": dict(settings.weights_photo), "text": dict(settings.weights_text)},
                grids=tuple(settings.grid_sizes),
                critic_top_n=settings.critic_top_n,
                critic_detail=critic_detail,
                # Stage results are cached only where this process makes every index write (and
                # invalidates them in refresh); server-mode stores are written by other processes.
                result_cache_hits=settings.result_cache_hits if settings.embedded_stores else 0,
                row_cache_size=ROW_CACHE_SIZE if settings.embedded_stores else 0,
                product_vector_cache=PRODUCT_VECTOR_CACHE if settings.embedded_stores else 0,
            ),
            rules=self.rules,
            aligner=self.aligned,
            whitening=self.whitening,
            prior=self.prior,
        )

    def _owner_pid(self) -> str:
        try:
            return (self.home / "owner.pid").read_text().strip()
        except OSError:
            return "unknown"

    def _open_lexical(self) -> LexicalIndex:
        return registry.LEXICAL_BACKENDS[self.settings.lexical_backend].open(self.settings, self.home)

    def _open_vector_store(self, dims: dict[str, int]) -> VectorStore:
        return registry.VECTOR_BACKENDS[self.settings.vector_backend].open(self.settings, self.home, dims)

    def encoders(self) -> tuple[ImageEncoder, TextEncoder]:
        """The (image, text) encoders, loaded on first use."""
        if self._encoders is None:
            self._encoders = load_encoders(
                self.settings.image_encoder, self.settings.text_encoder, self.settings.embed_batch_size
            )
        return self._encoders

    def vector_store(self) -> VectorStore | None:
        """The vector store (Qdrant Edge or Qdrant via qdrant-client), or None while nothing
        has been indexed (no manifest yet)."""
        if self._store is None and self.manifest is not None:
            with self._store_open:
                if self._store is None:
                    self._store = self._open_vector_store(self.manifest["dims"])
        return self._store

    def _create_vector_store(self) -> VectorStore:
        store = self.vector_store()
        if store is None:
            image, text = self.encoders()
            self.manifest = {
                "image_encoder": self.settings.image_encoder,
                "text_encoder": self.settings.text_encoder,
                "dims": {"image": image.dim, "text": text.dim},
            }
            self.manifest_path.parent.mkdir(parents=True, exist_ok=True)
            self.manifest_path.write_text(json.dumps(self.manifest, indent=2))
            store = self.vector_store()
        return store

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
            if store is None or self.manifest is None:
                raise RuntimeError("nothing is indexed yet: run `mars ingest` before `mars train align`")
            dims = {**{k: v for k, v in store.dims.items() if k != ALIGNED}, ALIGNED: heads.dim}
            points = [
                VectorPoint(p.product_id, with_aligned(p.vectors, heads), p.category_ids, p.type, p.colour)
                for p in store.scan()
            ]
            store.reindex(points, dims=dims)
            heads.save(heads_path(self.home))
            self.manifest["dims"] = dims
            self.manifest_path.write_text(json.dumps(self.manifest, indent=2))
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

    def search_store(self) -> VectorStore | None:
        """The store queries use: the vector store, or with ``MARS_VECTOR_BACKEND=faiss`` the
        exact FAISS ``IndexFlatIP`` reference built from the same vectors (rebuilt after each
        write). The backend name is validated by :class:`~mars.settings.Settings`."""
        store = self.vector_store()
        if not registry.VECTOR_BACKENDS[self.settings.vector_backend].exact_search or store is None:
            return store
        if self._reference is None:
            self._reference = FaissFlatStore.from_store(store)
        return self._reference

    def taxonomy(self) -> Taxonomy:
        """The category tree snapshot used for locks (reloaded after each ingest)."""
        if self._taxonomy is None:
            with self.sessions() as session:
                self._taxonomy = Taxonomy.load(session)
        return self._taxonomy

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
        targets = self.ingest_targets(fetcher.fetch)

        def progress(done: int) -> None:  # after each batch's writes: no cached stage result may predate them
            self.funnel.invalidate_results()
            if on_progress is not None:
                on_progress(done)

        try:
            return run_ingest(
                records, targets, source=source, total_hint=total_hint, on_progress=progress, job_id=job_id
            )
        finally:
            fetcher.close()
            self.refresh()

    def submit_bulk(self, records: Sequence[RawRecord], source: str) -> int:
        """Queue ``records`` as one bulk job and return its id at once (``GET /v1/jobs/{id}``,
        :func:`workers.jobs.job_progress`, reports its progress).

        Server mode: the job goes to the Celery queues (:func:`workers.jobs.submit_bulk`).
        Embedded mode: the job row is committed and the job runs on this process's job
        thread (jobs run one after another, FIFO); a failure marks the job ``failed`` with
        its error and is logged. :meth:`close` stops a running job after its current batch
        and fails jobs that have not started, saying to submit them again.
        """
        if not self.settings.embedded_stores:
            from workers.jobs import submit_bulk

            return submit_bulk(self.sessions, records, source, self.settings.ingest_chunk_size)
        with self.sessions() as session:
            job = IngestJob(source=source, status="queued", total=len(records))
            session.add(job)
            session.commit()
            job_id = job.id
        if self._jobs is None:
            self._jobs = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mars-job")
        future = self._jobs.submit(self.ingest, records, source, len(records), self._stop_if_closing, job_id)
        future.add_done_callback(_log_job_failure)
        self._queued[job_id] = future
        future.add_done_callback(lambda f, j=job_id: None if f.cancelled() else self._queued.pop(j, None))
        return job_id

    def _stop_if_closing(self, _done: int) -> None:
        """Progress hook of in-process jobs: stop a running job at the next batch once
        :meth:`close` was called (run_ingest marks it failed; a re-submit skips what is stored)."""
        if self._closing.is_set():
            raise JobInterrupted("the server stopped during this job; submit it again (stored items are skipped as unchanged)")

    def bulk_jobs(self) -> dict[str, int]:
        """This process's bulk jobs (embedded mode): ``waiting`` behind the job thread and ``running``."""
        futures = list(self._queued.values())
        running = sum(f.running() for f in futures)
        return {"waiting": sum(not f.done() for f in futures) - running, "running": running}

    def _fail_cancelled_jobs(self) -> None:
        """Mark jobs that never started (cancelled by :meth:`close`) failed, saying so."""
        cancelled = [job_id for job_id, future in self._queued.items() if future.cancelled()]
        if not cancelled:
            return
        with self.sessions() as session:
            for job in session.execute(select(IngestJob).where(IngestJob.id.in_(cancelled))).scalars():
                job.status, job.error = "failed", "the server stopped before this job ran; submit it again"
            session.commit()

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
        FAISS reference and the funnel's cached stage results) after writes; they are rebuilt on
        next use."""
        self._taxonomy = None
        self._reference = None
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

    def ingest_targets(self, fetch_image: Callable[[str], bytes] | None = None) -> IngestTargets:
        """What the ingest stages write to: this engine's catalog, BM25 index, vector store
        (created on first write) and encoders, and the category head that suggests classes."""
        return IngestTargets(
            sessions=self.sessions,
            lexical=self.lexical,
            vectors=self._create_vector_store,
            existing_vectors=self.vector_store,
            encoders=self.encoders,
            max_image_pixels=self.settings.max_image_pixels,
            max_image_bytes=self.settings.max_image_bytes,
            fetch_image=fetch_image,
            write_lock=self.write_lock,
            category_head=self.category_head,
            aligner=self.aligned,
        )

    def search(self, query: SearchQuery) -> SearchResponse:
        """Run a query through the funnel."""
        return self.funnel.search(query)

    def has_region_vectors(self, digest: str) -> bool:
        """Whether the region vectors of the room photo whose region key is ``digest`` are
        cached (then an upload of it is checked but not decoded again)."""
        return self.funnel.has_region_vectors(digest)

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

    def close(self) -> None:
        """Wait for queued in-process jobs, then flush and release every store and the lock."""
        try:
            if self._jobs is not None:
                self._closing.set()
                self._jobs.shutdown(wait=True, cancel_futures=True)
                self._fail_cancelled_jobs()
            self.lexical.close()
            if self._store is not None:
                self._store.close()
                self._store = None
            self.db.dispose()
        finally:
            if self._lock is not None:
                self._lock.release()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _log_job_failure(future: Future) -> None:
    """Log a failed in-process job (run_ingest has already marked its row ``failed``)."""
    exc = future.exception()
    if exc is not None:
        log.error("bulk job failed: %s: %s", exc.__class__.__name__, exc, exc_info=exc)
