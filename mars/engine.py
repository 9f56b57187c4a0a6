"""The embedded engine: one process owns the catalog, the tantivy index and the Qdrant Edge
shard under ``MARS_HOME``, applies every write and answers queries (ARCHITECTURE.md,
"Two run modes"). The CLI and ``mars serve`` both go through it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable

from filelock import FileLock, Timeout

from catalog.db import make_engine, session_factory, upgrade_to_head
from catalog.locking import Taxonomy
from critic.registry import build_critic
from indexing.encoders import ImageEncoder, TextEncoder, load_encoders
from indexing.lexical import TantivyIndex
from indexing.vectors import FaissFlatStore, QdrantEdgeStore, VectorStore
from ingestion.pipeline import IngestReport, IngestTargets, run_ingest
from ingestion.readers import RawRecord
from ingestion.remote import RemoteImageFetcher
from mars.settings import Settings
from query.funnel import Funnel, FunnelConfig, SearchQuery
from query.schemas import SearchResponse


class StoreBusyError(RuntimeError):
    """Another process owns the embedded stores under ``MARS_HOME``."""


class IndexMismatchError(RuntimeError):
    """The index on disk was built with other encoders than the settings ask for."""


class Engine:
    """Owns the embedded stores; created once per process (CLI command or server lifespan).

    Args:
        settings: the MARS settings.
        encoders: optional ready (image, text) encoders, e.g. shared between engines in tests.

    Raises:
        StoreBusyError: another process holds ``MARS_HOME``.
        IndexMismatchError: the manifest names other encoders than the settings.
    """

    def __init__(self, settings: Settings, encoders: tuple[ImageEncoder, TextEncoder] | None = None) -> None:
        self.settings = settings
        self.home = settings.home.resolve()
        self.home.mkdir(parents=True, exist_ok=True)
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
            self.lexical = TantivyIndex(
                self.home / "index" / "bm25",
                {
                    "title": settings.boost_title,
                    "type": settings.boost_type,
                    "colour": settings.boost_colour,
                    "text": settings.boost_text,
                },
            )
        except Exception:
            self._lock.release()
            raise
        self._encoders = encoders
        self._store: QdrantEdgeStore | None = None
        self._reference: FaissFlatStore | None = None
        self._taxonomy: Taxonomy | None = None
        self.critic, critic_detail = build_critic(settings)
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
                weights={"bm25": settings.weight_bm25, "image": settings.weight_image, "text": settings.weight_text},
                grids=tuple(settings.grid_sizes),
                critic_top_n=settings.critic_top_n,
                critic_detail=critic_detail,
            ),
        )

    def _owner_pid(self) -> str:
        try:
            return (self.home / "owner.pid").read_text().strip()
        except OSError:
            return "unknown"

    def encoders(self) -> tuple[ImageEncoder, TextEncoder]:
        """The (image, text) encoders, loaded on first use."""
        if self._encoders is None:
            self._encoders = load_encoders(
                self.settings.image_encoder, self.settings.text_encoder, self.settings.embed_batch_size
            )
        return self._encoders

    def vector_store(self) -> QdrantEdgeStore | None:
        """The Qdrant Edge shard, or None while nothing has been indexed."""
        if self._store is None and self.manifest is not None:
            self._store = QdrantEdgeStore(self.home / "index" / "vectors", self.manifest["dims"])
        return self._store

    def _create_vector_store(self) -> QdrantEdgeStore:
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

    def search_store(self) -> VectorStore | None:
        """The store queries use: Qdrant Edge, or with ``MARS_VECTOR_BACKEND=faiss`` the exact
        FAISS ``IndexFlatIP`` reference built from the same vectors (rebuilt after each ingest).
        The backend name is validated by :class:`~mars.settings.Settings`."""
        store = self.vector_store()
        if self.settings.vector_backend == "qdrant-edge" or store is None:
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
    ) -> IngestReport:
        """Upsert records (see :func:`ingestion.pipeline.run_ingest`) and refresh the lock snapshot.
        Images given by http(s) URL are downloaded with the ``MARS_IMAGE_FETCH_*`` limits."""
        fetcher = RemoteImageFetcher(
            max_bytes=self.settings.max_image_bytes,
            max_pixels=self.settings.max_image_pixels,
            connect_timeout_s=self.settings.image_fetch_timeout_s / 2,
            read_timeout_s=self.settings.image_fetch_timeout_s,
            retries=self.settings.image_fetch_retries,
        )
        targets = self.ingest_targets(fetcher.fetch)
        try:
            return run_ingest(records, targets, source=source, total_hint=total_hint, on_progress=on_progress)
        finally:
            fetcher.close()
            self.refresh()

    def refresh(self) -> None:
        """Drop the snapshots derived from the catalog and the stores (the lock taxonomy and
        the FAISS reference) after writes; they are rebuilt on next use."""
        self._taxonomy = None
        self._reference = None

    def ingest_targets(self, fetch_image: Callable[[str], bytes] | None = None) -> IngestTargets:
        """What the ingest stages write to: this engine's catalog, BM25 index, vector store
        (created on first write) and encoders."""
        return IngestTargets(
            sessions=self.sessions,
            lexical=self.lexical,
            vectors=self._create_vector_store,
            existing_vectors=self.vector_store,
            encoders=self.encoders,
            max_image_pixels=self.settings.max_image_pixels,
            max_image_bytes=self.settings.max_image_bytes,
            fetch_image=fetch_image,
        )

    def search(self, query: SearchQuery) -> SearchResponse:
        """Run a query through the funnel."""
        return self.funnel.search(query)

    def close(self) -> None:
        """Flush and release every store and the ownership lock."""
        try:
            self.lexical.close()
            if self._store is not None:
                self._store.close()
                self._store = None
            self.db.dispose()
        finally:
            self._lock.release()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
