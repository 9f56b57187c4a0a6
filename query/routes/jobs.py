"""Bulk job progress: ``GET /v1/jobs/{id}`` (counts by item status — queued, embedded,
indexed, unchanged, rejected — ETA and the rejections with their reasons) and ``GET /v1/jobs``
(the newest jobs). Jobs are made by ``POST /v1/items:bulk`` (:mod:`query.routes.items`).
Both need a ``viewer`` key."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query

from catalog.jobs import job_progress, recent_jobs
from query.deps import SessionDep, require
from query.schemas import RowId

router = APIRouter(tags=["ingest"])


@router.get("/v1/jobs/{job_id}", summary="Progress of a job", dependencies=[Depends(require("viewer"))])
def get_job(job_id: RowId, session: SessionDep) -> dict[str, Any]:
    """Counts by item status, ``done``, ``eta_s`` and the first 100 rejections; 404 if unknown."""
    progress = job_progress(session, job_id)
    if progress is None:
        raise HTTPException(404, f"no job {job_id}")
    return progress


@router.get("/v1/jobs", summary="The newest jobs", dependencies=[Depends(require("viewer"))])
def list_jobs(session: SessionDep, limit: int = Query(20, ge=1, le=500)) -> list[dict[str, Any]]:
    """The ``limit`` newest jobs, newest first."""
    return recent_jobs(session, limit)
