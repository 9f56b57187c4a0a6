"""``GET /healthz``: liveness and index counts; the one route that needs no API key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from query.deps import EngineDep, SettingsDep

router = APIRouter()


@router.get("/healthz", summary="Liveness and index counts")
def healthz(eng: EngineDep, settings: SettingsDep) -> dict[str, Any]:
    """``status`` plus catalog, BM25 and vector counts, the critic (its name, or ``none`` when
    this server has none: ``mode=full`` then keeps the fused order), ``critic_note`` (the plain
    one-line note a ``mode=full`` search carries, e.g. how to set the critic up; no file paths)
    and ``auth`` (``keys``, or ``open`` when every request acts as admin without a key). Needs
    no key: the console reads it to offer the full mode only when there is a critic."""
    return {
        "status": "ok",
        **eng.counts(),
        "critic": eng.critic.name if eng.critic else "none",
        "critic_note": eng.funnel.critic_stage.detail,
        "auth": settings.api_auth,
    }
