"""``/v1/keys``: API key management over HTTP (list, create, revoke); every route needs an
``admin`` key. Keys, roles and how a request is checked: :mod:`query.auth`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from catalog import api_keys
from catalog.api_keys import Role
from query.deps import SessionDep, require
from query.schemas import RowId


class KeyOut(BaseModel):
    """An API key as listed: no secret, timestamps in ISO 8601 UTC (None when unset)."""

    id: int
    name: str
    role: Role
    prefix: str = Field(description="The key's first characters, to recognise it.")
    created_at: str
    last_used_at: str | None
    revoked_at: str | None


class KeyCreated(KeyOut):
    """Answer of ``POST /v1/keys``: the key itself is in ``key``, shown this once only."""

    key: str


class KeyRequest(BaseModel):
    """Body of ``POST /v1/keys``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=128, examples=["catalog sync"])
    role: Role


router = APIRouter(tags=["keys"], dependencies=[Depends(require("admin"))])


@router.get("/v1/keys", response_model=list[KeyOut], summary="Every API key (admin)")
def list_keys(session: SessionDep) -> list[dict[str, Any]]:
    """Every key, revoked ones included, oldest first; no secrets."""
    return [api_keys.describe(row) for row in api_keys.list_keys(session)]


@router.post("/v1/keys", status_code=201, response_model=KeyCreated, summary="Create an API key (admin)")
def create_key(body: KeyRequest, session: SessionDep) -> dict[str, Any]:
    """A new key with ``role``; the answer carries the key once (only its hash is stored);
    422 for a blank name."""
    try:
        row, key = api_keys.create_key(session, body.name, body.role)
    except ValueError as exc:  # a blank name
        raise HTTPException(422, str(exc)) from exc
    return {**api_keys.describe(row), "key": key}


@router.delete("/v1/keys/{key_id}", response_model=KeyOut, summary="Revoke an API key (admin)")
def revoke_key(key_id: RowId, session: SessionDep) -> dict[str, Any]:
    """Revoke key ``key_id`` at once; 404 if there is no such key."""
    row = api_keys.revoke_key(session, key_id)
    if row is None:
        raise HTTPException(404, f"no API key {key_id}")
    return api_keys.describe(row)
