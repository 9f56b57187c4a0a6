"""The category head: a linear classifier over frozen product image vectors that suggests the
class of a product that arrives without a ``type``.

The head is multinomial logistic regression, ``p = softmax(W x + b)``, over a product's stored
``image`` vector ``x`` (float32 ``(dim,)``, unit L2 norm, from the index's image encoder, e.g.
EfficientNet-Lite0 with ``dim = 1280``). Its classes are the catalog's class keys (the class
key of a product's type, :func:`catalog.taxonomy.place_type`, e.g. ``"lamp"``). It is trained
by ``mars train category-head`` (:mod:`training.category_head`) and stored as safetensors:
tensors ``weight`` float32 ``(n_classes, dim)`` and ``bias`` float32 ``(n_classes,)``, with the
class keys, the image encoder and the training provenance as JSON in the metadata.

Ingestion (``ingestion.pipeline.suggest_categories``, called by its ``embed`` stage) asks
:meth:`CategoryHead.suggest` for the items of a batch without a type but with an image vector:
each gets its top-3 classes stored in ``attributes["suggested_category"]`` and reported as an
ingest warning (:func:`suggestion_warning`). The suggestion is never applied: the product is
stored without a category, as before. Inference is numpy only (no torch); this module takes
plain arrays and knows nothing of the ingestion pipeline.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mars.checkpoints import SavedCheckpoint, WatchedCheckpoint, checkpoint_bytes, read_checkpoint

if TYPE_CHECKING:  # pragma: no cover
    from mars.settings import Settings

log = logging.getLogger("mars.category_head")

FORMAT = "mars-category-head/1"
#: Where ingestion stores a suggestion in a product's attributes.
ATTRIBUTE = "suggested_category"
#: How many classes a suggestion lists.
SUGGEST_TOP_K = 3


class CategoryHeadError(ValueError):
    """A file that is not a usable category-head checkpoint."""


def category_head_path(settings: "Settings") -> Path:
    """Where the head is read and written: ``MARS_CATEGORY_HEAD`` when set, else
    ``<MARS_HOME>/category_head.safetensors``."""
    configured = settings.category_head
    return Path(configured) if configured else settings.home / "category_head.safetensors"


@dataclass
class CategoryHead(SavedCheckpoint):
    """``softmax(weight @ x + bias)`` over ``classes``.

    Attributes:
        weight: float32 ``(n_classes, dim)``.
        bias: float32 ``(n_classes,)``.
        classes: the class keys, row ``i`` of ``weight`` is ``classes[i]``.
        image_encoder: the ``MARS_IMAGE_ENCODER`` whose vectors it was trained on.
        meta: training provenance (products, classes, held-out metrics, L-BFGS steps, ...).
        digest: first 12 hex digits of the checkpoint file's sha256 (set by :meth:`load`, or by
            :meth:`~mars.checkpoints.SavedCheckpoint.fingerprinted` for one built in memory).
    """

    weight: np.ndarray
    bias: np.ndarray
    classes: list[str]
    image_encoder: str
    meta: dict[str, Any] = field(default_factory=dict)
    digest: str | None = None

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float32)
        self.bias = np.asarray(self.bias, dtype=np.float32)
        n = len(self.classes)
        if self.weight.ndim != 2 or self.weight.shape[0] != n or self.bias.shape != (n,):
            raise CategoryHeadError(
                f"category head shapes disagree: weight {self.weight.shape}, bias {self.bias.shape}, {n} classes"
            )
        if len(set(self.classes)) != n:
            raise CategoryHeadError("category head class keys are not unique")

    @property
    def dim(self) -> int:
        """Input dimension (the image encoder's)."""
        return int(self.weight.shape[1])

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities of image vectors.

        Args:
            x: float ``(n, dim)`` (or one ``(dim,)`` vector), unit-norm image vectors.

        Returns:
            float32 ``(n, n_classes)``, rows sum to 1 (``(n_classes,)`` for one vector).

        Raises:
            ValueError: ``x`` has another dimension than the head.
        """
        v = np.asarray(x, dtype=np.float32)
        one = v.ndim == 1
        v = v[None, :] if one else v
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"category head expects vectors of dimension {self.dim}, got shape {np.shape(x)}")
        logits = v @ self.weight.T + self.bias
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        return p[0] if one else p

    def top(self, x: np.ndarray, k: int = SUGGEST_TOP_K) -> list[list[tuple[str, float]]]:
        """The ``k`` most probable ``(class key, probability)`` of each row of ``x`` (float
        ``(n, dim)``), most probable first (ties by key)."""
        p = self.probabilities(np.atleast_2d(x))
        out = []
        for row in p:
            order = sorted(range(len(self.classes)), key=lambda i: (-row[i], self.classes[i]))[:k]
            out.append([(self.classes[i], float(row[i])) for i in order])
        return out

    def suggest(self, x: np.ndarray, k: int = SUGGEST_TOP_K) -> list[dict[str, Any]]:
        """The suggestion stored under ``attributes["suggested_category"]`` for each row of ``x``.

        Args:
            x: float ``(n, dim)`` unit-norm image vectors (or one ``(dim,)`` vector, taken as ``n = 1``).
            k: how many classes each suggestion lists.

        Returns:
            ``n`` dicts ``{"key", "probability", "top": [{"key", "probability"}, ...k], "head":
            digest}``: the most probable class first (ties by key), probabilities (float)
            rounded to 4 places, ``head`` the checkpoint digest (None for a head not loaded
            from a file).

        Raises:
            ValueError: ``x`` has another dimension than the head.
        """
        out = []
        for top in self.top(x, k):
            ranked = [{"key": key, "probability": round(p, 4)} for key, p in top]
            out.append({**ranked[0], "top": ranked, "head": self.digest})
        return out

    def to_bytes(self) -> bytes:
        """The checkpoint's bytes (safetensors: ``weight``, ``bias``; metadata: format, classes,
        image encoder, provenance as JSON strings); :meth:`save` writes them atomically."""
        return checkpoint_bytes(
            {"weight": self.weight, "bias": self.bias},
            {"format": FORMAT, "classes": json.dumps(self.classes), "image_encoder": self.image_encoder,
             "meta": json.dumps(self.meta, sort_keys=True)},
        )

    @classmethod
    def load(cls, path: Path) -> "CategoryHead":
        """Read a checkpoint written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path`` (train one with ``mars train category-head``).
            CategoryHeadError: the file is not a category-head checkpoint, or its shapes disagree.
        """
        tensors, metadata, digest = read_checkpoint(path, FORMAT, CategoryHeadError)
        if set(tensors) != {"weight", "bias"}:
            raise CategoryHeadError(f"{path} holds tensors {sorted(tensors)}, expected weight and bias")
        try:
            classes, encoder = json.loads(metadata["classes"]), metadata["image_encoder"]
            meta = json.loads(metadata.get("meta", "{}"))
        except (KeyError, ValueError) as exc:
            raise CategoryHeadError(f"{path} has incomplete category-head metadata: {exc!r}") from exc
        return cls(tensors["weight"], tensors["bias"], classes, encoder, meta, digest)


def CategoryHeadFile(path: Path, image_encoder: str) -> WatchedCheckpoint[CategoryHead]:  # noqa: N802 - a class-like factory
    """The head at ``path`` for an index built with ``image_encoder``, loaded on first call and
    re-read when the file changes (a head trained while ``mars serve`` runs is picked up).

    Calling it returns the :class:`CategoryHead`, or None when there is no file, the file is not a
    usable checkpoint, or it was trained on another image encoder (both logged once per file
    version): a bad head never stops an ingest, it only means no suggestions.
    """

    def mismatch(head: CategoryHead) -> str | None:
        if head.image_encoder == image_encoder:
            return None
        return f"trained on image encoder {head.image_encoder!r}, the index uses {image_encoder!r}"

    return WatchedCheckpoint(path, CategoryHead.load, CategoryHeadError, mismatch, log, "category head")


def suggestion_warning(product_id: str, suggestion: dict[str, Any]) -> str:
    """The ingest warning line of one suggestion (:meth:`CategoryHead.suggest`), e.g. ``"p1: no
    type; category head suggests lamp (0.91), lamp-shade (0.04), table (0.01)
    (attributes.suggested_category; not applied)"``."""
    listed = ", ".join(f"{r['key']} ({r['probability']:.2f})" for r in suggestion["top"])
    return f"{product_id}: no type; category head suggests {listed} (attributes.{ATTRIBUTE}; not applied)"
