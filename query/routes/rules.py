"""``/v1/rules``: the merchandising rules of the catalog over HTTP (pins, boosts, buries,
synonyms; :mod:`query.rules` says what each does and where the funnel applies it).

Reads need a ``viewer`` key, writes an ``editor`` key (:mod:`query.auth`). A write takes
effect on this process's next search (the engine's rule cache is dropped); other processes
(API replicas) see it within ``MARS_RULES_CACHE_S`` seconds. Invalid rules are answered 422
with the reason: a field the kind needs is missing or one it does not use is set, a value is
out of range, the product is not in the catalog, the category is unknown. ``category`` may be
given as a key, name or synonym (``GET /v1/categories``); the rule stores the key.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from catalog import rules
from catalog.models import MerchRule
from catalog.rules import MAX_FACTOR, MAX_POSITION, RuleError, RuleKind
from query.auth import Principal
from query.deps import EngineDep, SessionDep, require

if TYPE_CHECKING:
    from mars.engine import Engine


class _RuleFields(BaseModel):
    """The fields of a rule besides its kind (which ones a kind uses: :mod:`catalog.rules`)."""

    model_config = ConfigDict(extra="forbid")

    product_id: str | None = Field(None, min_length=1, max_length=128, description="pin, boost, bury: the product.")
    brand: str | None = Field(
        None, min_length=1, max_length=256,
        description="boost, bury: every product whose attributes.brand is this (case-insensitive), instead of product_id.",
    )
    position: int | None = Field(None, ge=1, le=MAX_POSITION, description="pin: the 1-based position.")
    factor: float | None = Field(
        None, gt=0, le=MAX_FACTOR, allow_inf_nan=False,
        description="boost (> 1), bury (between 0 and 1): the fused score is multiplied by it.",
    )
    term: str | None = Field(None, min_length=1, max_length=200, examples=["couch"],
                             description="synonym: words of the query text to replace (whole words, case-insensitive).")
    replacement: str | None = Field(None, min_length=1, max_length=500, examples=["sofa"],
                                    description="synonym: what replaces them (include the term to expand instead).")
    category: str | None = Field(None, min_length=1, max_length=300,
                                 description="Scope: only searches locked to this category (or, for a class, one of its types).")
    query_pattern: str | None = Field(
        None, min_length=1, max_length=200,
        description="Scope: only queries containing this phrase as whole words (case-insensitive; not a regular expression).",
    )


class RuleCreate(_RuleFields):
    """Body of ``POST /v1/rules``."""

    kind: RuleKind
    active: bool = True


class RulePatch(_RuleFields):
    """Body of ``PATCH /v1/rules/{id}``: only the fields sent change (``null`` clears one); the
    kind cannot change."""

    active: bool | None = None


class RuleOut(_RuleFields):
    """A stored rule; timestamps in ISO 8601 UTC, ``created_by`` the API key name that made it."""

    model_config = ConfigDict(extra="ignore")

    id: int
    kind: RuleKind
    active: bool
    created_by: str | None
    created_at: str
    updated_at: str
    summary: str = Field(description="What the rule does and where, in one sentence.")


router = APIRouter(tags=["rules"])

#: A rule id in a path (bounded: a larger number cannot be a stored id, and would not fit the column).
RuleId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The rule's id.")]


def with_category_key(values: dict[str, Any], eng: Engine) -> dict[str, Any]:
    """``values`` with a ``category`` given by name or synonym replaced by its key (left as
    given when the taxonomy does not know it: :func:`catalog.rules.check_rule` refuses it)."""
    if values.get("category"):
        info = eng.taxonomy().find(values["category"])
        if info is not None:
            values = {**values, "category": info.key}
    return values


def write_rule(
    session: Session, eng: Engine, write: Callable[[Session], MerchRule | None], rule_id: int | None = None
) -> dict[str, Any]:
    """Run ``write(session)`` (a :mod:`catalog.rules` write, which commits, returning the row or
    None), drop the engine's rule cache and describe the row.

    Raises:
        HTTPException: 404 when ``write`` found no rule ``rule_id``; 422 for a
            :class:`~catalog.rules.RuleError`, with the reason.
    """
    try:
        row = write(session)
    except RuleError as exc:
        raise HTTPException(422, str(exc)) from exc
    if row is None:
        raise HTTPException(404, f"no rule {rule_id}")
    out = rules.describe(row)
    eng.refresh_rules()
    return out


@router.get("/v1/rules", response_model=list[RuleOut], summary="The merchandising rules",
            dependencies=[Depends(require("viewer"))])
def list_rules(session: SessionDep, active: bool | None = None, kind: RuleKind | None = None) -> list[dict[str, Any]]:
    """Every rule, oldest first; ``?active=true|false`` and ``?kind=`` filter."""
    return [rules.describe(row) for row in rules.list_rules(session, active=active, kind=kind)]


@router.get("/v1/rules/{rule_id}", response_model=RuleOut, summary="One merchandising rule",
            dependencies=[Depends(require("viewer"))])
def get_rule(rule_id: RuleId, session: SessionDep) -> dict[str, Any]:
    """The rule; 404 if there is no such rule."""
    row = rules.get_rule(session, rule_id)
    if row is None:
        raise HTTPException(404, f"no rule {rule_id}")
    return rules.describe(row)


@router.post("/v1/rules", status_code=201, response_model=RuleOut, summary="Create a merchandising rule (editor)")
def create_rule(body: RuleCreate, eng: EngineDep, session: SessionDep,
                principal: Principal = Depends(require("editor"))) -> dict[str, Any]:  # noqa: B008
    """Store a rule (``created_by``: the key's name); it applies from the next search. 422 for
    an invalid rule, with the reason."""
    values = with_category_key(body.model_dump(), eng)
    return write_rule(session, eng, lambda s: rules.create_rule(s, values, created_by=principal.name))


@router.patch("/v1/rules/{rule_id}", response_model=RuleOut, summary="Change a merchandising rule (editor)",
              dependencies=[Depends(require("editor"))])
def patch_rule(rule_id: RuleId, body: RulePatch, eng: EngineDep, session: SessionDep) -> dict[str, Any]:
    """Change the fields sent (e.g. ``{"active": false}``, ``{"factor": 2}``); the changed rule is
    checked as a whole. 404 if there is no such rule, 422 if the result is invalid."""
    changes = with_category_key(body.model_dump(exclude_unset=True), eng)
    if changes.get("active", True) is None:
        raise HTTPException(422, "active must be true or false")
    return write_rule(session, eng, lambda s: rules.update_rule(s, rule_id, changes), rule_id)


@router.delete("/v1/rules/{rule_id}", response_model=RuleOut, summary="Delete a merchandising rule (editor)",
               dependencies=[Depends(require("editor"))])
def delete_rule(rule_id: RuleId, eng: EngineDep, session: SessionDep) -> dict[str, Any]:
    """Delete the rule (answered with it, as it was); 404 if there is no such rule."""
    return write_rule(session, eng, lambda s: rules.delete_rule(s, rule_id), rule_id)
