"""The critic seam: the :class:`Critic` protocol, its input :class:`CriticPair`, its
:class:`Verdict`, and its one error contract, :class:`CriticUnavailable` (with
:class:`CriticTimeout`, a critic that missed its deadline).

Backends (the learned critic, Qwen2-VL, an OpenAI-compatible endpoint, the queued client)
implement the same protocol; the funnel only calls :meth:`Critic.score` and, when it raises
:class:`CriticUnavailable`, keeps the fused order and says why in the response.
:func:`mars.registry.build_critic` builds the one the settings name. Standard library and
numpy only (PIL images are only typed here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class CriticPair:
    """One pair to judge: the query text, the room photo (either may be None) and the product.

    VLM critics read the images and texts. The funnel also passes what it has already
    computed, for critics that work on features: ``product_class`` and ``product_type``
    (taxonomy class and type keys), ``fused_rank`` (1-based rank in the fused list), ``room_regions`` (float32 (R, D) unit
    image-encoder vectors of the photo's regions, row 0 the whole photo; whitened, like the
    product's ``image`` vector, when the index has a whitening),
    ``query_vector`` (float32 (D,) unit text vector) and ``product_vectors`` (the product's
    stored named vectors, e.g. ``image``, ``text``).
    """

    query_text: str | None
    room_image: Image.Image | None
    product_id: str
    product_text: str
    product_image: Image.Image | None
    product_class: str | None = None
    product_type: str | None = None
    fused_rank: int | None = None
    room_regions: np.ndarray | None = None
    query_vector: np.ndarray | None = None
    product_vectors: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Verdict:
    """A critic's judgement: ``score`` in [0, 1], a one-line ``rationale``, the backend's name
    and the latency in seconds of the batch that produced it."""

    score: float
    rationale: str
    backend: str
    latency_s: float

    def __post_init__(self) -> None:
        if not 0.0 <= self.score <= 1.0:
            raise ValueError(f"critic score must be in [0, 1], got {self.score}")


@runtime_checkable
class Critic(Protocol):
    """Scores a batch of pairs; returns one :class:`Verdict` per pair, in order.

    ``uses_images`` tells the funnel whether to decode the product photos into
    ``CriticPair.product_image`` (a VLM reads them; the learned critic uses stored vectors).
    """

    name: str
    uses_images: bool

    def score(self, pairs: Sequence[CriticPair]) -> list[Verdict]:
        """One :class:`Verdict` per pair, in order.

        Raises:
            CriticUnavailable: the backend could not judge the pairs (a timeout, a transport
                error, an answer it could not read): the caller keeps its own order.
        """


class CriticUnavailable(RuntimeError):
    """A critic could not judge this request: a timeout, a transport error, or an output it
    could not read. Every backend raises this (and only this) for such failures, so the funnel
    keeps the fused order and puts ``str(exc)`` in the response's critic detail."""


class CriticTimeout(CriticUnavailable, TimeoutError):
    """A critic did not answer within the request's deadline; the fused order should stand.

    Raised by the queued critic (:class:`workers.critic_client.QueuedCritic`, and inside its
    worker by :class:`critic.batching.MicroBatcher` when a request's deadline passes before its
    pairs reach the model).

    Attributes:
        task_id: the Celery task id of the request, or None (its late result is never read).
        deadline_ms: the deadline that passed, in milliseconds, or None when not known.
    """

    def __init__(self, message: str, task_id: str | None = None, deadline_ms: float | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        self.deadline_ms = deadline_ms

    def __reduce__(self):  # noqa: ANN204  # pickling keeps the attributes (args holds only the message)
        return (self.__class__, (str(self), self.task_id, self.deadline_ms))
