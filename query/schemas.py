"""Response models of a search (shared by the CLI's ``--json`` output and the API)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Path

from pydantic import BaseModel, Field

Mode = Literal["bm25", "vector", "hybrid", "full"]


class StageHit(BaseModel):
    """An item's 1-based rank and score in one stage's list."""

    rank: int
    score: float


class CriticResult(BaseModel):
    """The critic's verdict on one item."""

    score: float
    rationale: str


class Provenance(BaseModel):
    """Why an item ranked where it did: its rank and score in each retriever's list, keyed by
    retriever name (``bm25``, ``text``, ``aligned``, ``image``, ``prior``:
    :data:`query.retrievers.RETRIEVERS`; a list the item was not in, or that did not run, is
    absent), its fused rank and score (absent only for a pinned product that retrieval did not
    return), the critic's verdict, and what the merchandising rules did to it
    (:mod:`query.rules`), e.g. ``"pinned at #1 by rule 7"``, ``"boosted x1.5 by rule 3 (brand IKEA)"``."""

    retrievers: dict[str, StageHit] = Field(
        default_factory=dict, description="Rank and score in each retriever's list, by retriever name (GET /v1/retrievers)."
    )
    fused: StageHit | None = None
    critic: CriticResult | None = None
    rules: list[str] = Field(default_factory=list, description="What merchandising rules did to this item, in order.")


class ResultItem(BaseModel):
    """One ranked product with its provenance; ``score`` is the fused RRF score times any
    boost/bury factors (0 for a pinned product retrieval did not return), or the critic's score.
    Pinned products stand at their positions whatever their score."""

    rank: int
    id: str
    title: str
    type: str
    colour: str
    image: str | None
    score: float
    provenance: Provenance


class LockInfo(BaseModel):
    """The category lock applied to the query and why."""

    applied: bool
    source: str
    key: str | None = None
    name: str | None = None
    level: str | None = None
    reason: str


class CriticStatus(BaseModel):
    """What the critic stage did: ``status`` is "skipped" (mode ≠ full), "not configured",
    "scored", "unavailable" (the critic timed out, could not be reached or gave an answer it
    could not read: the fused order stands and ``detail`` says why) or "pending" (the
    re-ranked list will be at ``result_url``)."""

    backend: str
    status: str
    scored: int = 0
    detail: str = ""
    result_url: str | None = None


class SearchResponse(BaseModel):
    """A ranked list with the lock, the critic's status, fusion settings and stage timings (ms)."""

    mode: Mode
    text: str | None
    has_image: bool
    lock: LockInfo
    critic: CriticStatus
    fusion: dict[str, float] = Field(description="RRF k and the weight of each list used.")
    timings_ms: dict[str, float]
    items: list[ResultItem]
    synonyms: list[str] = Field(
        default_factory=list, description="Synonym rules applied to the query text, e.g. \"'couch' → 'sofa' by rule 5\"."
    )
    rewritten_text: str | None = Field(
        None, description="The query text after the synonyms (what BM25 and the text vector searched, before the room "
        "context); null when no synonym applied."
    )


#: A catalog row id in a URL path: a positive 32-bit integer (the INTEGER primary keys of
#: SQLite and PostgreSQL), so an oversized id is a 422, not a database overflow.
RowId = Annotated[int, Path(ge=1, le=2**31 - 1)]
