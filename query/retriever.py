"""The retriever seam: one ranked list of the funnel (``docs/architecture.md``, "Adding a retriever").

A :class:`Retriever` turns one query into a ranked list of products within the category lock.
The funnel (:mod:`query.funnel`) runs every configured retriever that :meth:`~Retriever.applies`
to the query and whose kind the query's mode runs (:data:`MODE_KINDS`), caches each list by
:meth:`~Retriever.cache_key`, and fuses the lists by weighted Reciprocal Rank Fusion
(:func:`query.fusion.weighted_rrf`), weighted by the retriever's :attr:`~Retriever.name`. The
response's provenance, ``mars tune`` and the console are keyed by the same names
(:data:`query.retrievers.RETRIEVERS`).

Standard library only (the query's photo is typed, not imported).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL import Image

    from query.artifacts import Trained

#: What a retriever reads: ``lexical`` (the query text against the BM25 index), ``vector``
#: (encoded query inputs against the vector store) or ``prior`` (what is known about the
#: query's context, e.g. its room type).
Kind = Literal["lexical", "vector", "prior"]

#: The query input a retriever reads: its text, its room photo, or its room type.
Needs = Literal["text", "image", "room"]

#: The kinds of retriever each search mode runs: ``bm25`` BM25 only, ``vector`` the vector
#: lists only, ``hybrid`` and ``full`` (hybrid + the critic) every list.
MODE_KINDS: dict[str, frozenset[str]] = {
    "bm25": frozenset({"lexical"}),
    "vector": frozenset({"vector"}),
    "hybrid": frozenset({"lexical", "vector", "prior"}),
    "full": frozenset({"lexical", "vector", "prior"}),
}


class Hit(Protocol):
    """One retrieved product: its id and the retriever's score (higher is better; BM25 scores,
    cosine similarities or staging counts: only the order matters to fusion)."""

    @property
    def id(self) -> str: ...

    @property
    def score(self) -> float: ...


class ScoredHit(NamedTuple):
    """A ready-made :class:`Hit` for a new retriever: a product id and its score."""

    id: str
    score: float


@dataclass(frozen=True)
class RetrievalQuery:
    """What a retriever sees of one query.

    Attributes:
        text: the search text: the query text after synonym rules, plus the room type when the
            text does not name it (:func:`query.funnel.search_text`); None without either.
        image: the room photo (RGB), or None.
        image_key: the photo's region-cache key (:meth:`query.query_vectors.QueryVectors.region_key`), or None.
        room: the room type, e.g. "Bedroom" (context, never a lock), or None.
        trained: the trained pieces as they were when the query started (one snapshot per query).
    """

    text: str | None
    image: Image.Image | None
    image_key: str | None
    room: str | None
    trained: Trained


@runtime_checkable
class Retriever(Protocol):
    """One ranked list of the funnel.

    Attributes:
        name: the list's name: its RRF weight, its provenance entry and its cache entries are
            keyed by it (e.g. ``"bm25"``).
        label: a short name a merchandiser reads in the console (e.g. ``"Keywords"``).
        kind: which search modes run it (:data:`MODE_KINDS`).
        needs: the query input it reads (without it the list does not apply).
    """

    name: str
    label: str
    kind: Kind
    needs: Needs

    def applies(self, query: RetrievalQuery) -> bool:
        """Whether this list can be computed for ``query`` (its inputs are there, and what it
        searches is indexed or trained)."""

    def cache_key(self, query: RetrievalQuery) -> str:
        """The query input this list depends on, including the version of any trained piece it
        uses (e.g. ``text@<heads digest>``): equal keys, lock and depth give equal lists."""

    def run(self, query: RetrievalQuery, lock: Sequence[str] | None, depth: int) -> list[Hit]:
        """At most ``depth`` products within ``lock`` (category keys; None: the whole
        catalog), best first, ties by id. Called only when :meth:`applies` is true."""
