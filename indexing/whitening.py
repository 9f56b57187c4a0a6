"""PCA whitening of image vectors for comparing room-photo regions with product photos
(``mars train whitening``).

Catalog photos (one object on white) and regions of a room photo (objects in context) sit in
different parts of the image encoder's space: raw cosine similarity between them is dominated
by directions the two domains do not share (background, lighting). Learning a PCA whitening
on vectors of both domains and comparing whitened, re-normalised vectors removes the shared
mean and evens out the dominant directions: Jégou & Chum, "Negative evidences and
co-occurrences in image retrieval: the benefit of PCA and whitening", ECCV 2012.

Fit (:meth:`Whitening.fit`): mean ``mu`` and covariance ``C = V diag(lam) V^T`` of the
training vectors; keep the ``dim`` leading eigenvectors; ``W = V_dim diag(1 / sqrt(lam +
eps * mean(lam)))`` (``eps`` regularises small eigenvalues, as a ridge). Apply:
``l2_normalize((x - mu) @ W)``. It is unsupervised: no judgments, only the stored product
image vectors and the regions of room photos (see :mod:`training.whitening`).

Used by the funnel's image list to re-score the candidates that the grid cells found
(:meth:`query.funnel.Funnel.image_hits`). Stored as safetensors at :func:`whitening_path`
(``<MARS_HOME>/index/whitening.safetensors``): ``mean`` float32 ``(D,)`` and ``projection``
float32 ``(D, dim)``, with the image encoder and the fit report as metadata.

On the IKEA dev rooms (exact in-lock image list, 123 rooms, 2,187 product photos; fitted on
the products + every 5th region of the rooms of the other fold, 2-fold by room), dim 512 and
eps 1.0 gave room-class nDCG@10 0.2757 -> 0.3041, room-type 0.6411 -> 0.6540 and room-scene
0.0868 -> 0.1563 over raw cosine; dim 256 and eps 0.1 were lower.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexing.encoders import l2_normalize
from mars.checkpoints import WatchedCheckpoint, read_checkpoint, write_checkpoint

log = logging.getLogger("mars.whitening")

FORMAT = "mars-whitening/1"
#: Whitened dimensions kept (leading principal components).
DEFAULT_DIM = 512
#: Ridge on the eigenvalues, as a multiple of their mean.
DEFAULT_EPS = 1.0


class WhiteningError(ValueError):
    """A file that is not a usable whitening checkpoint."""


def whitening_path(home: Path) -> Path:
    """Where the whitening of the index under ``home`` (``MARS_HOME``) is stored."""
    return Path(home) / "index" / "whitening.safetensors"


@dataclass
class Whitening:
    """A fitted PCA whitening.

    Attributes:
        mean: float32 ``(D,)``; projection: float32 ``(D, dim)``.
        image_encoder: the ``MARS_IMAGE_ENCODER`` whose vectors it was fitted on.
        meta: the fit report (vectors per domain, dim, eps, variance kept).
        digest: first 12 hex digits of the checkpoint file's sha256 (set by :meth:`load`).

    Raises:
        WhiteningError: the shapes do not agree.
    """

    mean: np.ndarray
    projection: np.ndarray
    image_encoder: str
    meta: dict[str, Any] = field(default_factory=dict)
    digest: str | None = None

    def __post_init__(self) -> None:
        self.mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        self.projection = np.ascontiguousarray(self.projection, dtype=np.float32)
        if self.mean.ndim != 1 or self.projection.ndim != 2 or self.projection.shape[0] != self.mean.shape[0]:
            raise WhiteningError(f"whitening needs mean (D,) and projection (D, dim), got {self.mean.shape} and {self.projection.shape}")

    @property
    def input_dim(self) -> int:
        """D, the image encoder's dimension."""
        return int(self.mean.shape[0])

    @classmethod
    def fit(cls, vectors: np.ndarray, image_encoder: str, *, dim: int = DEFAULT_DIM, eps: float = DEFAULT_EPS,
            meta: dict[str, Any] | None = None) -> "Whitening":
        """Fit on ``vectors`` (float ``(n, D)``, e.g. unit image vectors of both domains).

        Raises:
            ValueError: fewer than 2 vectors, ``dim`` not in [1, D], or ``eps`` < 0.
        """
        x = np.asarray(vectors, dtype=np.float64)
        if x.ndim != 2 or len(x) < 2:
            raise ValueError(f"need at least 2 vectors of shape (n, D) to fit a whitening, got {x.shape}")
        if not 1 <= dim <= x.shape[1]:
            raise ValueError(f"dim must be in [1, {x.shape[1]}], got {dim}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        mean = x.mean(axis=0)
        eigenvalues, eigenvectors = np.linalg.eigh(np.cov(x - mean, rowvar=False))
        order = np.argsort(eigenvalues)[::-1][:dim]
        lam = np.maximum(eigenvalues[order], 0.0)
        ridge = eps * max(float(np.maximum(eigenvalues, 0).mean()), 1e-12)
        projection = eigenvectors[:, order] / np.sqrt(lam + ridge)
        report = {"vectors": len(x), "dim": dim, "eps": eps,
                  "variance_kept": round(float(lam.sum() / max(np.maximum(eigenvalues, 0).sum(), 1e-12)), 4), **(meta or {})}
        return cls(mean.astype(np.float32), projection.astype(np.float32), image_encoder, report)

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whitened unit vectors: float ``(n, D)`` -> float32 ``(n, dim)``.

        Raises:
            ValueError: ``x`` has another dimension than the image encoder's.
        """
        v = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if v.ndim != 2 or v.shape[1] != self.input_dim:
            raise ValueError(f"the whitening expects vectors of dimension {self.input_dim}, got shape {np.shape(x)}")
        return l2_normalize((v - self.mean) @ self.projection)

    def mismatch(self, image_encoder: str) -> str | None:
        """Why this whitening does not fit an index built with ``image_encoder``, or None."""
        return None if self.image_encoder == image_encoder else f"fitted on {self.image_encoder!r}, the index uses {image_encoder!r}"

    def save(self, path: Path) -> None:
        """Write the checkpoint (safetensors; metadata: format, image encoder, meta as JSON), atomically."""
        write_checkpoint(path, {"mean": self.mean, "projection": self.projection},
                         {"format": FORMAT, "image_encoder": self.image_encoder, "meta": json.dumps(self.meta, sort_keys=True)})

    @classmethod
    def load(cls, path: Path) -> "Whitening":
        """Read a checkpoint written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path`` (run ``mars train whitening``).
            WhiteningError: the file is not a whitening checkpoint, or its shapes disagree.
        """
        tensors, metadata, digest = read_checkpoint(path, FORMAT, WhiteningError)
        try:
            return cls(tensors["mean"], tensors["projection"], metadata["image_encoder"],
                       json.loads(metadata.get("meta", "{}")), digest)
        except (KeyError, ValueError) as exc:
            raise WhiteningError(f"{path} is an incomplete whitening checkpoint: {exc!r}") from exc


def WhiteningFile(path: Path, image_encoder: str) -> WatchedCheckpoint[Whitening]:  # noqa: N802 - a class-like factory
    """The whitening at ``path`` for an index built with ``image_encoder``, loaded on first call
    and re-read when the file changes. Calling it returns the :class:`Whitening`, or None when
    there is no file, the file is not usable, or it was fitted on another encoder (logged once
    per file version): without it the image list compares raw cosine similarities."""
    return WatchedCheckpoint(path, Whitening.load, WhiteningError, lambda white: white.mismatch(image_encoder), log, "whitening")
