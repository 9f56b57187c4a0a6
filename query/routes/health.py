"""``GET /healthz``: liveness and index counts; the one route that needs no API key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from query.deps import EngineDep, SettingsDep

router = APIRouter()


@router.get("/healthz", summary="Liveness and index counts")
def healthz(eng: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    """``status`` plus catalog, BM25 and vector counts, the critic, and ``auth`` (``keys``, or
    ``open`` when every request acts as admin without a key). Needs no key."""
    return {
        "status": "ok",
        **eng.counts(),
        "critic": eng.critic.name if eng.critic else "none",
        "auth": settings.api_auth,
    }
