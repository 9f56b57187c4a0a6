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
    """What the critic stage did. Outside ``mode=full`` the critic does not run: ``status`` is
    "skipped" and ``detail`` is empty, so a client shows a critic line only for ``full``. In
    ``full``, ``status`` is "scored", "not configured" (no critic on this server: the fused order
    stands and ``detail`` says in plain words how to set one up), "unavailable" (the critic timed
    out, could not be reached or gave an answer it could not read: the fused order stands and
    ``detail`` says why) or "pending" (the re-ranked list will be at ``result_url``). ``detail``
    never names a file path (GET /healthz's ``critic_note`` is the same note without a search)."""

    backend: str = Field(description="The critic's name (e.g. learned, qwen2-vl, openai), or none.")
    status: str = Field(description="skipped (mode is not full) | scored | not configured | unavailable | pending.")
    scored: int = 0
    detail: str = Field("", description="mode=full only: a one-line note in plain words; empty when skipped.")
    result_url: str | None = None


class Stages(BaseModel):
    """The trained stages of the funnel as this search found them, and, in plain words, those it
    would have used but that are not trained yet. Without judged rooms a catalog still searches
    on its untrained stages (keywords, text meaning, room photo); each trained piece adds one."""

    aligned: Literal["trained", "absent"] = Field(
        description="The heads of the 'Text to photo' list (mars train align).")
    whitening: Literal["PCA + learned", "PCA", "absent"] = Field(
        description="The room-photo calibration: PCA (from product and room photos), + learned (from judged rooms).")
    prior: Literal["trained", "absent"] = Field(description="The 'Often in this room' list (learned from judged rooms).")
    critic: Literal["ready", "absent"] = Field(description="Whether this server has a critic for mode=full.")
    absent: list[str] = Field(
        default_factory=list,
        description="One plain sentence per stage this query would have used but that is not trained (its mode and "
        "inputs decide which: text, a room photo, a room type); empty when nothing it needs is missing. The critic "
        "is reported by the critic field, not here.")


class SearchResponse(BaseModel):
    """A ranked list with the lock, the critic's status, the trained stages, fusion settings and
    stage timings (ms)."""

    mode: Mode
    text: str | None
    has_image: bool
    lock: LockInfo
    critic: CriticStatus = Field(description="The critic stage: status 'skipped' with no detail unless mode is full.")
    stages: Stages = Field(description="Which trained stages exist and, in plain words, which this query lacked.")
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
