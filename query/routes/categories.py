"""``GET /v1/categories``: the category tree the lock resolves against (needs a ``viewer`` key)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel

from query.deps import EngineDep, require


class CategoryOut(BaseModel):
    """A category node: key, name, level (class|type), parent key and product count."""

    key: str
    name: str
    level: str
    parent_key: str | None
    products: int


router = APIRouter()


@router.get("/v1/categories", response_model=list[CategoryOut], summary="The category tree",
            dependencies=[Depends(require("viewer"))])
def get_categories(eng: EngineDep) -> list[CategoryOut]:
    """Every class and type, classes first, then by product count."""
    cats = sorted(eng.taxonomy().categories.values(), key=lambda c: (c.level != "class", -c.products, c.key))
    return [CategoryOut(**c.__dict__) for c in cats]
