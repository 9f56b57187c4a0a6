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

Learned stage (:meth:`Whitening.learn`, ``mars train whitening --queries --qrels``): a
supervised, discriminative whitening fitted on matching pairs, after Mikolajczyk & Matas,
"Improving descriptors for fast tree matching by optimal linear projection", ICCV 2007, as
used for CNN retrieval by Radenović, Tolias & Chum, "CNN image retrieval learns from BoW",
ECCV 2016. The pairs are (best-matching region of a judged room photo, relevant product
photo), both PCA-whitened: ``C_S`` is the covariance of their differences, shrunk toward
its mean eigenvalue (``shrink``; Ledoit-Wolf style); ``C_S^(-1/2)`` whitens what varies
between a product in a room and its catalog photo, then a PCA of the whitened training
vectors keeps ``dim`` directions. The stage is another ``(mean, projection)`` applied to the
PCA stage's unit output, re-normalised.

Used by the funnel's image list to re-score the candidates that the grid cells found
(:class:`query.retrievers.ImageRegionsRetriever`). Stored as safetensors at :func:`whitening_path`
(``<MARS_HOME>/index/whitening.safetensors``): ``mean`` float32 ``(D,)`` and ``projection``
float32 ``(D, dim)``, with the image encoder and the fit report as metadata.

On the IKEA dev rooms (exact in-lock image list, 123 rooms, 2,187 product photos; fitted on
the products + every 5th region of the rooms of the other fold, 2-fold by room), dim 512 and
eps 1.0 gave room-class nDCG@10 0.2757 -> 0.3041, room-type 0.6411 -> 0.6540 and room-scene
0.0868 -> 0.1563 over raw cosine; dim 256 and eps 0.1 were lower. With GeM-pooled vectors
(:data:`indexing.efficientnet.GEM_POWER`) the PCA stage gave 0.3547 / 0.6568 / 0.1782, and the
learned stage, fitted on the pairs of the other fold's rooms only, 0.3944 / 0.6768 / 0.1911
(shrink 0.45, dim 384; shrink 0.3-0.6 and dim 256-512 all gave 0.38-0.39 / 0.667-0.677).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexing.encoders import l2_normalize
from mars.checkpoints import SavedCheckpoint, WatchedCheckpoint, checkpoint_bytes, read_checkpoint

log = logging.getLogger("mars.whitening")

FORMAT = "mars-whitening/1"
#: Whitened dimensions kept (leading principal components).
DEFAULT_DIM = 512
#: Ridge on the eigenvalues, as a multiple of their mean.
DEFAULT_EPS = 1.0
#: Learned stage: dimensions kept, and shrinkage of the pairs' difference covariance toward
#: its mean eigenvalue (0: none, 1: identity).
DEFAULT_LEARNED_DIM = 384
DEFAULT_SHRINK = 0.5


class WhiteningError(ValueError):
    """A file that is not a usable whitening checkpoint."""


def whitening_path(home: Path) -> Path:
    """Where the whitening of the index under ``home`` (``MARS_HOME``) is stored."""
    return Path(home) / "index" / "whitening.safetensors"


@dataclass
class Whitening(SavedCheckpoint):
    """A fitted PCA whitening, optionally followed by a learned (supervised) stage.

    Attributes:
        mean: float32 ``(D,)``; projection: float32 ``(D, dim)``: the PCA stage.
        learned_mean, learned_projection: float32 ``(dim,)`` and ``(dim, out)``, or None: the
            learned stage (:meth:`learn`), applied to the PCA stage's unit output.
        image_encoder: the ``MARS_IMAGE_ENCODER`` whose vectors it was fitted on.
        meta: the fit report (vectors per domain, dim, eps, variance kept).
        digest: first 12 hex digits of the checkpoint file's sha256 (set by :meth:`load`, or by
            :meth:`~mars.checkpoints.SavedCheckpoint.fingerprinted` for one built in memory).

    Raises:
        WhiteningError: the shapes do not agree.
    """

    mean: np.ndarray
    projection: np.ndarray
    image_encoder: str
    meta: dict[str, Any] = field(default_factory=dict)
    digest: str | None = None
    learned_mean: np.ndarray | None = None
    learned_projection: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.mean = np.ascontiguousarray(self.mean, dtype=np.float32)
        self.projection = np.ascontiguousarray(self.projection, dtype=np.float32)
        if self.mean.ndim != 1 or self.projection.ndim != 2 or self.projection.shape[0] != self.mean.shape[0]:
            raise WhiteningError(f"whitening needs mean (D,) and projection (D, dim), got {self.mean.shape} and {self.projection.shape}")
        if (self.learned_mean is None) != (self.learned_projection is None):
            raise WhiteningError("a learned stage needs both learned_mean and learned_projection")
        if self.learned_mean is not None:
            self.learned_mean = np.ascontiguousarray(self.learned_mean, dtype=np.float32)
            self.learned_projection = np.ascontiguousarray(self.learned_projection, dtype=np.float32)
            dim = self.projection.shape[1]
            if self.learned_mean.shape != (dim,) or self.learned_projection.ndim != 2 or self.learned_projection.shape[0] != dim:
                raise WhiteningError(f"the learned stage needs mean ({dim},) and projection ({dim}, out), got "
                                     f"{self.learned_mean.shape} and {self.learned_projection.shape}")

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

    def learn(self, regions: np.ndarray, products: np.ndarray, background: np.ndarray, *,
              dim: int = DEFAULT_LEARNED_DIM, shrink: float = DEFAULT_SHRINK,
              meta: dict[str, Any] | None = None) -> "Whitening":
        """This PCA stage followed by a learned stage fitted on matching pairs (module doc).

        Args:
            regions, products: float ``(n, D)`` raw vectors; row i of each is a matching pair
                (a room region and the catalog photo of the product it shows).
            background: float ``(m, D)`` raw vectors of both domains (the PCA fit's vectors),
                for the final rotation.
            dim: directions kept; shrink: in [0, 1], see :data:`DEFAULT_SHRINK`.

        Raises:
            ValueError: shapes disagree, fewer than 2 pairs, ``dim`` not in [1, PCA dim], or
                ``shrink`` not in [0, 1] (0 needs at least as many pairs as PCA dims).
        """
        x, y, bg = (np.atleast_2d(np.asarray(a, dtype=np.float64)) for a in (regions, products, background))
        if x.shape != y.shape or x.ndim != 2 or len(x) < 2 or bg.ndim != 2 or bg.shape[1] != x.shape[1]:
            raise ValueError(f"need >= 2 matching (region, product) pairs and background vectors of one dimension, got "
                             f"{x.shape}, {y.shape}, {bg.shape}")
        width = self.projection.shape[1]
        if not 1 <= dim <= width:
            raise ValueError(f"dim must be in [1, {width}], got {dim}")
        if not 0.0 <= shrink <= 1.0:
            raise ValueError(f"shrink must be in [0, 1], got {shrink}")
        pca = self.pca_stage()
        diff = pca.apply(x).astype(np.float64) - pca.apply(y)
        cov = diff.T @ diff / len(diff)
        cov = (1.0 - shrink) * cov + shrink * np.trace(cov) / width * np.eye(width)
        lam, vec = np.linalg.eigh(cov)
        if lam.min() <= 1e-12:
            raise ValueError(f"the pairs' difference covariance is singular ({len(diff)} pairs for {width} dims): raise shrink")
        inv_sqrt = (vec / np.sqrt(lam)) @ vec.T
        z = pca.apply(bg).astype(np.float64)
        center = z.mean(axis=0)
        lam2, vec2 = np.linalg.eigh(np.cov((z - center) @ inv_sqrt, rowvar=False))
        rotation = vec2[:, np.argsort(lam2)[::-1][:dim]]
        report = {**self.meta, "learned": {"pairs": len(diff), "dim": dim, "shrink": shrink, **(meta or {})}}
        return Whitening(self.mean, self.projection, self.image_encoder, report, None,
                         center.astype(np.float32), (inv_sqrt @ rotation).astype(np.float32))

    def pca_stage(self) -> "Whitening":
        """This whitening without its learned stage (the PCA stage and its fit report)."""
        return Whitening(self.mean, self.projection, self.image_encoder, {k: v for k, v in self.meta.items() if k != "learned"})

    @property
    def output_dim(self) -> int:
        """Dimension of :meth:`apply`'s vectors."""
        stage = self.learned_projection if self.learned_projection is not None else self.projection
        return int(stage.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whitened unit vectors: float ``(n, D)`` -> float32 ``(n, output_dim)``.

        Raises:
            ValueError: ``x`` has another dimension than the image encoder's.
        """
        v = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if v.ndim != 2 or v.shape[1] != self.input_dim:
            raise ValueError(f"the whitening expects vectors of dimension {self.input_dim}, got shape {np.shape(x)}")
        out = l2_normalize((v - self.mean) @ self.projection)
        if self.learned_projection is not None:
            out = l2_normalize((out - self.learned_mean) @ self.learned_projection)
        return out

    def mismatch(self, image_encoder: str) -> str | None:
        """Why this whitening does not fit an index built with ``image_encoder``, or None."""
        return None if self.image_encoder == image_encoder else f"fitted on {self.image_encoder!r}, the index uses {image_encoder!r}"

    def to_bytes(self) -> bytes:
        """The checkpoint's bytes (safetensors; metadata: format, image encoder, meta as JSON)."""
        learned = {} if self.learned_mean is None else {"learned_mean": self.learned_mean,
                                                         "learned_projection": self.learned_projection}
        return checkpoint_bytes({"mean": self.mean, "projection": self.projection, **learned},
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
                       json.loads(metadata.get("meta", "{}")), digest,
                       tensors.get("learned_mean"), tensors.get("learned_projection"))
        except (KeyError, ValueError) as exc:
            raise WhiteningError(f"{path} is an incomplete whitening checkpoint: {exc!r}") from exc


def WhiteningFile(path: Path, image_encoder: str) -> WatchedCheckpoint[Whitening]:  # noqa: N802 - a class-like factory
    """The whitening at ``path`` for an index built with ``image_encoder``, loaded on first call
    and re-read when the file changes. Calling it returns the :class:`Whitening`, or None when
    there is no file, the file is not usable, or it was fitted on another encoder (logged once
    per file version): without it the image list compares raw cosine similarities."""
    return WatchedCheckpoint(path, Whitening.load, WhiteningError, lambda white: white.mismatch(image_encoder), log, "whitening")
