"""The :class:`Critic` protocol, its :class:`Verdict`, and the "none" critic.

Later backends (Qwen2-VL, an OpenAI-compatible endpoint, a learned critic) implement the
same protocol; the funnel only calls :meth:`Critic.score`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class CriticPair:
    """One pair to judge: the query text, the room photo (either may be None) and the product."""

    query_text: str | None
    room_image: Image.Image | None
    product_id: str
    product_text: str
    product_image: Image.Image | None


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
    """Scores a batch of pairs; returns one :class:`Verdict` per pair, in order."""

    name: str

    def score(self, pairs: Sequence[CriticPair]) -> list[Verdict]: ...


def build_critic(name: str) -> Critic | None:
    """The critic named by ``MARS_CRITIC``; "none" gives None (the funnel says so in its response).

    Raises:
        ValueError: for a name no backend answers to yet.
    """
    if name == "none":
        return None
    raise ValueError(f"unknown critic {name!r}; available: none")
