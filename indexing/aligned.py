"""Cross-modal alignment heads: the ``aligned`` named vector (``mars train align``).

The offline encoders live in two unrelated spaces (EfficientNet-Lite0 images, 1280-d; MiniLM
texts, 384-d), so a text query cannot be compared with a product photo directly. LiT-style
alignment (Zhai et al., "LiT: Zero-Shot Transfer with Locked-image text Tuning", CVPR 2022)
keeps both towers frozen and learns a small projection head on each side into one shared
space of ``dim`` dimensions, trained with the SigLIP pairwise sigmoid loss (Zhai et al.,
"Sigmoid Loss for Language Image Pre-Training", ICCV 2023; :mod:`training.align`).

Each head is ``Linear(in, hidden) → GELU (tanh approximation) → Linear(hidden, dim)``
followed by L2 normalisation. Inference is numpy only (no torch on the query path).

The product side becomes the ``aligned`` named vector of the collection (the image head
applied to each product's stored ``image`` vector); a text query runs the text head on its
MiniLM vector and searches ``aligned`` (the funnel's ``aligned`` list). The heads are stored
as safetensors at :func:`heads_path` (``<MARS_HOME>/index/aligned.safetensors``): tensors
``image.0.weight`` ``(hidden, in)``, ``image.0.bias``, ``image.2.weight`` ``(dim, hidden)``,
``image.2.bias`` and the same four for ``text``, all float32, with the encoders, the learned
logit scale/bias and the training report as JSON metadata.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexing.encoders import l2_normalize
from mars.checkpoints import SavedCheckpoint, WatchedCheckpoint, checkpoint_bytes, read_checkpoint

log = logging.getLogger("mars.aligned")

FORMAT = "mars-align-heads/1"
#: The named vector the image head's outputs are stored under.
VECTOR = "aligned"
TOWERS = ("image", "text")
_LAYERS = ("0.weight", "0.bias", "2.weight", "2.bias")


class AlignHeadsError(ValueError):
    """A file that is not a usable alignment-heads checkpoint."""


def heads_path(home: Path) -> Path:
    """Where the heads of the index under ``home`` (``MARS_HOME``) are stored."""
    return Path(home) / "index" / "aligned.safetensors"


def gelu_tanh(x: np.ndarray) -> np.ndarray:
    """GELU, tanh approximation (Hendrycks & Gimpel 2016; ``torch.nn.GELU(approximate="tanh")``)."""
    return 0.5 * x * (1.0 + np.tanh(np.float32(np.sqrt(2.0 / np.pi)) * (x + np.float32(0.044715) * x**3)))


@dataclass
class AlignHeads(SavedCheckpoint):
    """The two projection heads.

    Attributes:
        tensors: ``"<tower>.<layer>.<weight|bias>"`` -> float32 array (see the module doc).
        image_encoder: the ``MARS_IMAGE_ENCODER`` whose vectors the image head reads.
        text_encoder: the ``MARS_TEXT_ENCODER`` whose vectors the text head reads.
        meta: logit scale/bias and the training report.
        digest: first 12 hex digits of the checkpoint file's sha256 (set by :meth:`load`, or by
            :meth:`~mars.checkpoints.SavedCheckpoint.fingerprinted` for one built in memory).

    Raises:
        AlignHeadsError: a tensor is missing or the shapes do not chain.
    """

    tensors: dict[str, np.ndarray]
    image_encoder: str
    text_encoder: str
    meta: dict[str, Any] = field(default_factory=dict)
    digest: str | None = None

    def __post_init__(self) -> None:
        expected = {f"{t}.{layer}" for t in TOWERS for layer in _LAYERS}
        if set(self.tensors) != expected:
            raise AlignHeadsError(f"alignment heads need tensors {sorted(expected)}, got {sorted(self.tensors)}")
        self.tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in self.tensors.items()}
        dims = set()
        for tower in TOWERS:
            w0, b0, w2, b2 = (self.tensors[f"{tower}.{layer}"] for layer in _LAYERS)
            if w0.ndim != 2 or b0.shape != (w0.shape[0],) or w2.ndim != 2 or w2.shape[1] != w0.shape[0] or b2.shape != (w2.shape[0],):
                raise AlignHeadsError(f"{tower} head shapes do not chain: {w0.shape}, {b0.shape}, {w2.shape}, {b2.shape}")
            dims.add(w2.shape[0])
        if len(dims) != 1:
            raise AlignHeadsError(f"the image and text heads project to different sizes {sorted(dims)}")

    @property
    def dim(self) -> int:
        """Size of the shared space (the ``aligned`` vector's dimension)."""
        return int(self.tensors["image.2.weight"].shape[0])

    def input_dim(self, tower: str) -> int:
        """Input size of ``tower`` ("image" or "text")."""
        return int(self.tensors[f"{tower}.0.weight"].shape[1])

    def _project(self, tower: str, x: np.ndarray) -> np.ndarray:
        v = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if v.ndim != 2 or v.shape[1] != self.input_dim(tower):
            raise ValueError(f"the {tower} head expects vectors of dimension {self.input_dim(tower)}, got shape {np.shape(x)}")
        t = self.tensors
        h = gelu_tanh(v @ t[f"{tower}.0.weight"].T + t[f"{tower}.0.bias"])
        return l2_normalize(h @ t[f"{tower}.2.weight"].T + t[f"{tower}.2.bias"])

    def image(self, x: np.ndarray) -> np.ndarray:
        """Aligned vectors of image vectors: float ``(n, image_dim)`` -> float32 ``(n, dim)``, unit rows.

        Raises:
            ValueError: ``x`` has another dimension than the image encoder's.
        """
        return self._project("image", x)

    def text(self, x: np.ndarray) -> np.ndarray:
        """Aligned vectors of text vectors: float ``(n, text_dim)`` -> float32 ``(n, dim)``, unit rows.

        Raises:
            ValueError: ``x`` has another dimension than the text encoder's.
        """
        return self._project("text", x)

    def mismatch(self, image_encoder: str, text_encoder: str) -> str | None:
        """Why these heads do not fit an index built with ``image_encoder`` and ``text_encoder``
        (``"trained on encoders ..., the index uses ..."``), or None when they fit."""
        found, wanted = (self.image_encoder, self.text_encoder), (image_encoder, text_encoder)
        return None if found == wanted else f"trained on encoders {found!r}, the index uses {wanted!r}"

    def to_bytes(self) -> bytes:
        """The checkpoint's bytes (safetensors; metadata: format, encoders, meta as JSON)."""
        return checkpoint_bytes(
            self.tensors,
            {"format": FORMAT, "image_encoder": self.image_encoder, "text_encoder": self.text_encoder,
             "meta": json.dumps(self.meta, sort_keys=True)},
        )

    @classmethod
    def load(cls, path: Path) -> "AlignHeads":
        """Read a checkpoint written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path`` (run ``mars train align``).
            AlignHeadsError: the file is not an alignment-heads checkpoint, or its shapes disagree.
        """
        tensors, metadata, digest = read_checkpoint(path, FORMAT, AlignHeadsError)
        try:
            meta = json.loads(metadata.get("meta", "{}"))
            image_encoder, text_encoder = metadata["image_encoder"], metadata["text_encoder"]
        except (KeyError, ValueError) as exc:
            raise AlignHeadsError(f"{path} has incomplete alignment-heads metadata: {exc!r}") from exc
        return cls(tensors, image_encoder, text_encoder, meta, digest)


def AlignHeadsFile(path: Path, image_encoder: str, text_encoder: str) -> WatchedCheckpoint[AlignHeads]:  # noqa: N802 - a class-like factory
    """The heads at ``path`` for an index built with ``image_encoder`` and ``text_encoder``,
    loaded on first call and re-read when the file changes.

    Calling it returns the :class:`AlignHeads`, or None when there is no file, the file is not
    usable, or it was trained on other encoders (logged once per file version): without heads
    the funnel simply has no ``aligned`` list and new items get no ``aligned`` vector.
    """
    return WatchedCheckpoint(path, AlignHeads.load, AlignHeadsError, lambda heads: heads.mismatch(image_encoder, text_encoder),
                             log, "alignment heads")


def with_aligned(vectors: Mapping[str, np.ndarray], heads: AlignHeads | None) -> dict[str, np.ndarray]:
    """A product's named vectors plus ``aligned`` (the image head on its ``image`` vector) when
    there are heads and an image vector; otherwise the vectors unchanged (without ``aligned``)."""
    out = {k: v for k, v in vectors.items() if k != VECTOR}
    if heads is not None and "image" in out:
        out[VECTOR] = heads.image(out["image"])[0]
    return out
