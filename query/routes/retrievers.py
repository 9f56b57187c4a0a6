"""``GET /v1/retrievers``: the ranked lists this server fuses, in fusion order (needs a ``viewer``
key). The console builds its weight sliders and the rank rows of its result cards from it, and a
search's ``weights`` and each item's ``provenance.retrievers`` are keyed by these names."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from query.deps import EngineDep, require


class RetrieverOut(BaseModel):
    """One ranked list (:class:`query.retriever.Retriever`)."""

    name: str = Field(description="The list's name: the key of its RRF weight and of its provenance entry.")
    label: str = Field(description="What the console calls it.")
    kind: str = Field(description="lexical | vector | prior: the search modes that run it (bm25: lexical; vector: vector; hybrid, full: all).")
    needs: str = Field(description="The query input it reads: text, image or room.")


router = APIRouter()


@router.get("/v1/retrievers", response_model=list[RetrieverOut], summary="The ranked lists that are fused",
            dependencies=[Depends(require("viewer"))])
def get_retrievers(eng: EngineDep) -> list[RetrieverOut]:
    """Every configured retriever, in the order the funnel fuses them."""
    return [RetrieverOut(name=r.name, label=r.label, kind=r.kind, needs=r.needs) for r in eng.retrievers()]
