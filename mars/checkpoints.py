"""Small model checkpoints stored as safetensors with JSON metadata, and a watcher that
reloads one when its file changes (the alignment heads, the whitening, the staging prior, the
category head: :mod:`query.artifacts`), and the base that saves and versions them.

safetensors layout (huggingface/safetensors, "Format"): an 8-byte little-endian header
length, then a JSON header whose ``__metadata__`` holds string -> string pairs, then the
tensor bytes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np

T = TypeVar("T")


def replace_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: to ``<path>.next`` beside it, then renamed over
    ``path`` (``os.replace``), so a :class:`WatchedCheckpoint` never reads a half-written file.
    Parent folders are created.

    Raises:
        OSError: the folder or the file cannot be written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".next")
    staging.write_bytes(data)
    os.replace(staging, path)


def file_digest(data: bytes) -> str:
    """The first 12 hex digits of the sha256 of a checkpoint file's bytes (its version in
    cache keys)."""
    return hashlib.sha256(data).hexdigest()[:12]


def checkpoint_bytes(tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> bytes:
    """The bytes of a safetensors checkpoint of ``tensors`` with ``metadata``. (Not byte-for-byte
    reproducible: safetensors writes its JSON header from a hash map, so two calls may order it
    differently; the tensors and metadata read back are the same.)"""
    from safetensors.numpy import save

    return save(dict(tensors), metadata=dict(metadata))


def write_checkpoint(path: Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str]) -> None:
    """Write a safetensors checkpoint atomically (:func:`replace_file`).

    Raises:
        OSError: the folder or the file cannot be written.
    """
    replace_file(path, checkpoint_bytes(tensors, metadata))


def read_checkpoint(path: Path, fmt: str, error: type[ValueError]) -> tuple[dict[str, np.ndarray], Mapping[str, str], str]:
    """Read a safetensors checkpoint whose metadata says ``format: fmt``.

    Returns:
        ``(tensors, metadata, digest)``: numpy arrays by name, the ``__metadata__`` strings and
        the first 12 hex digits of the file's sha256.

    Raises:
        FileNotFoundError: no file at ``path``.
        error: the file is not safetensors, or its format is not ``fmt``.
    """
    from safetensors import SafetensorError
    from safetensors.numpy import load

    data = Path(path).read_bytes()
    try:
        header_len = int.from_bytes(data[:8], "little")
        metadata: Mapping[str, str] = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
        tensors = load(data)
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as exc:
        raise error(f"{path} is not a safetensors file: {exc}") from exc
    if metadata.get("format") != fmt:
        raise error(f"{path} is not a {fmt} checkpoint (format {metadata.get('format')!r})")
    return dict(tensors), metadata, file_digest(data)


class SavedCheckpoint:
    """What a checkpoint dataclass with a ``digest`` field and a :meth:`to_bytes` gets: :meth:`save`
    (atomic, :func:`replace_file`) and :meth:`fingerprinted` (a digest of its bytes, so an artifact
    built in memory gets a version in cache keys as one read from a file does: different contents
    never share one)."""

    digest: str | None

    def to_bytes(self) -> bytes:
        """The checkpoint file's bytes."""
        raise NotImplementedError

    def save(self, path: Path) -> None:
        """Write :meth:`to_bytes` to ``path`` atomically.

        Raises:
            OSError: the folder or the file cannot be written.
        """
        replace_file(path, self.to_bytes())

    def fingerprinted(self):  # noqa: ANN201 - the same type as self
        """This checkpoint with ``digest`` set: as loaded, or the :func:`file_digest` of :meth:`to_bytes`."""
        return self if self.digest is not None else dataclasses.replace(self, digest=file_digest(self.to_bytes()))


class WatchedCheckpoint(Generic[T]):
    """The checkpoint at ``path``, loaded on first call and re-read when the file changes
    (its mtime or size), e.g. a model trained while ``mars serve`` runs.

    Calling it returns the loaded object, or None when there is no file, ``load`` raised
    ``OSError`` or ``error``, or ``mismatch(obj)`` returned a reason not to use it (each logged
    once per file version): a bad checkpoint only means the feature is off.

    Args:
        path: the checkpoint file.
        load: reads the file (e.g. ``CategoryHead.load``).
        error: the exception ``load`` raises for an unusable file.
        mismatch: returns why a loaded checkpoint does not fit this index (None when it fits).
        log: the logger for those messages; what: the checkpoint's name in them.
    """

    def __init__(self, path: Path, load: Callable[[Path], T], error: type[Exception],
                 mismatch: Callable[[T], str | None], log: logging.Logger, what: str) -> None:
        self.path = Path(path)
        self._load, self._error, self._mismatch = load, error, mismatch
        self._log, self._what = log, what
        self._version: tuple[int, int] | None = None
        self._value: T | None = None
        self._lock = threading.Lock()

    def __call__(self) -> T | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        version = (st.st_mtime_ns, st.st_size)
        with self._lock:
            if version != self._version:
                self._version, self._value = version, None
                try:
                    value = self._load(self.path)
                except (OSError, self._error) as exc:
                    self._log.warning("%s not used: %s", self._what, exc)
                else:
                    reason = self._mismatch(value)
                    if reason is None:
                        self._value = value
                    else:
                        self._log.warning("%s %s not used: %s", self._what, self.path, reason)
            return self._value
