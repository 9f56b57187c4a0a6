"""The engine's indexes: who owns them, what they were built with, and how they are opened.

:class:`Stores` holds, for one process:

* the **owner lock** (embedded mode only): ``MARS_HOME/owner.lock``, so one process at a time
  writes an embedded tantivy index or Qdrant Edge shard (their own locks would otherwise fail
  deep inside a write);
* the **manifest** ``MARS_HOME/index/manifest.json``: the encoders the index was built with and
  its vector dimensions; opening it with other encoder settings is refused;
* the **lexical index** and the **vector store** the settings name (:mod:`mars.registry`);
  the vector store is opened on first use and created on the first write;
* the **exact reference**: a FAISS ``IndexFlatIP`` built from the store's vectors, which serves
  queries when the backend asks for exact search (``MARS_VECTOR_BACKEND=faiss``) and is rebuilt
  after writes (:meth:`refresh`).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

from mars import registry

if TYPE_CHECKING:
    from indexing.lexical_index import LexicalIndex
    from indexing.vector_store import VectorStore
    from mars.settings import Settings


class StoreBusyError(RuntimeError):
    """Another process owns the embedded stores under ``MARS_HOME``."""


class IndexMismatchError(RuntimeError):
    """The index on disk was built with other encoders than the settings ask for."""


class Stores:
    """Opens the indexes the settings name under ``settings.home`` (see the module docstring).

    Args:
        settings: the MARS settings.

    Raises:
        ValueError: a server backend without its URL.
        StoreBusyError: embedded stores, and another process holds ``MARS_HOME``.
        IndexMismatchError: the manifest names other encoders than the settings.
    """

    def __init__(self, settings: Settings) -> None:
        registry.check_url(settings)
        self.settings = settings
        self.home = settings.home.resolve()
        self.home.mkdir(parents=True, exist_ok=True)
        self.backend = registry.VECTOR_BACKENDS[settings.vector_backend]
        self.manifest_path = self.home / "index" / "manifest.json"
        self._open_lock = threading.Lock()  # a bulk job's first batch and a search must not both create the shard
        self._vectors: VectorStore | None = None
        self._reference: VectorStore | None = None
        self._closed = False
        with ExitStack() as undo:  # whatever was opened is released if a later step fails
            self._lock: FileLock | None = None
            if settings.embedded_stores:
                self._lock = self._acquire_owner_lock()
                undo.callback(self._lock.release)
            self.manifest: dict[str, Any] | None = self._read_manifest()
            self.lexical: LexicalIndex = registry.LEXICAL_BACKENDS[settings.lexical_backend].open(settings, self.home)
            undo.pop_all()

    def _acquire_owner_lock(self) -> FileLock:
        lock = FileLock(str(self.home / "owner.lock"))
        try:
            lock.acquire(timeout=0)
        except Timeout as exc:
            try:
                pid = (self.home / "owner.pid").read_text().strip()
            except OSError:
                pid = "unknown"
            raise StoreBusyError(
                f"another MARS process owns {self.home} (pid {pid}); stop it, or send requests to its API "
                "(`mars serve`), or point MARS_HOME elsewhere"
            ) from exc
        try:
            (self.home / "owner.pid").write_text(str(os.getpid()))
        except BaseException:
            lock.release()
            raise
        return lock

    def _read_manifest(self) -> dict[str, Any] | None:
        if not self.manifest_path.exists():
            return None
        manifest = json.loads(self.manifest_path.read_text())
        s = self.settings
        if manifest["image_encoder"] != s.image_encoder or manifest["text_encoder"] != s.text_encoder:
            raise IndexMismatchError(
                f"the index in {self.home / 'index'} was built with image encoder {manifest['image_encoder']!r} and "
                f"text encoder {manifest['text_encoder']!r}, but the settings ask for {s.image_encoder!r} and "
                f"{s.text_encoder!r}; set MARS_IMAGE_ENCODER/MARS_TEXT_ENCODER back, or use a new MARS_HOME and ingest again"
            )
        return manifest

    def _write_manifest(self, dims: dict[str, int]) -> None:
        self.manifest = {"image_encoder": self.settings.image_encoder, "text_encoder": self.settings.text_encoder,
                         "dims": dict(dims)}
        self.manifest_path.parent.mkdir(parents=True, exist_ok=True)
        self.manifest_path.write_text(json.dumps(self.manifest, indent=2))

    def vectors(self) -> VectorStore | None:
        """The vector store, opened on first use; None while nothing has been indexed (no manifest).

        Raises:
            RuntimeError: the stores were closed.
        """
        if self._vectors is None and self.manifest is not None:
            with self._open_lock:
                if self._closed:
                    raise RuntimeError(f"the stores of {self.home} are closed")
                if self._vectors is None:
                    self._vectors = self.backend.open(self.settings, self.home, self.manifest["dims"])
        return self._vectors

    def create_vectors(self, dims: Callable[[], dict[str, int]]) -> VectorStore:
        """The vector store, created with ``dims()`` (vector name -> dimension, asked only when
        nothing is indexed yet: it may load the encoders) and recorded in the manifest."""
        store = self.vectors()
        if store is None:
            self._write_manifest(dims())
            store = self.vectors()
        return store  # type: ignore[return-value]

    def set_dims(self, dims: dict[str, int]) -> None:
        """Record new vector dimensions in the manifest (after a reindex added a named vector)."""
        self._write_manifest(dims)

    def search_store(self) -> VectorStore | None:
        """The store queries use: the vector store or, for a backend with ``exact_search``, the
        exact FAISS ``IndexFlatIP`` reference built from its vectors (rebuilt after each write)."""
        store = self.vectors()
        if not self.backend.exact_search or store is None:
            return store
        reference = self._reference  # read once: refresh() may drop it from another thread meanwhile
        if reference is None:
            from indexing.faiss_flat import FaissFlatStore

            reference = self._reference = FaissFlatStore.from_store(store)
        return reference

    def refresh(self) -> None:
        """Drop the exact reference after a write; it is rebuilt on next use."""
        self._reference = None

    def close(self) -> None:
        """Flush and release the indexes, then the owner lock (each even if an earlier close
        fails); closing twice does nothing, and no store opens after it."""
        with self._open_lock:
            if self._closed:
                return
            self._closed = True
        with ExitStack() as closing:
            if self._lock is not None:
                closing.callback(self._lock.release)
            if self._vectors is not None:
                closing.callback(self._vectors.close)
            closing.callback(self.lexical.close)
