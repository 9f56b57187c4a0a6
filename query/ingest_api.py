"""The write side of the API: bulk jobs, streamed single items, deletes and job progress.

* ``POST /v1/items:bulk`` — a JSON-lines body (``application/x-ndjson``) or ``{"path": ...}``
  (a catalog on the server: BEIR folder, ``.jsonl``, ``.csv`` or ABO listings) becomes one
  job; the answer (202) carries its id at once.
* ``GET /v1/jobs/{id}`` — progress counts (queued, embedded, indexed, unchanged, rejected),
  ETA and the rejections with their reasons; ``GET /v1/jobs`` lists the newest jobs.
* ``POST /v1/items`` — one record, applied before the answer, so it is searchable when the
  answer arrives; ``DELETE /v1/items/{id}`` removes an item from every store.

Reads need a ``viewer`` API key, writes an ``editor`` one (:mod:`query.auth`).

Where a job runs is the engine's business (:meth:`mars.engine.Engine.submit_bulk`): on the
Celery queues in server mode, on the server process's job thread in embedded mode. Single
items and deletes are always applied by the process that answers, under the engine's write
lock.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ingestion.readers import RawRecord, open_source, parse_mapping, read_jsonl_lines
from query.auth import require
from query.bodies import read_body
from query.schemas import RowId
from workers.jobs import job_progress, recent_jobs

#: Content types accepted as a JSON-lines bulk body.
JSONL_TYPES: tuple[str, ...] = ("application/x-ndjson", "application/jsonl", "application/json-lines", "application/jsonlines")


class BulkPath(BaseModel):
    """JSON body of ``POST /v1/items:bulk`` naming a catalog on the server's file system."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, examples=["/data/ikea"], description="BEIR folder, .jsonl, .csv or ABO listings.")
    mapping: list[str] = Field(default_factory=list, examples=[["id=_id"]], description="MARS_FIELD=SOURCE_FIELD pairs.")


class JobAccepted(BaseModel):
    """Answer of ``POST /v1/items:bulk``: the job id, its record count and where to poll."""

    job_id: int
    total: int
    status_url: str


class ItemWritten(BaseModel):
    """Answer of ``POST /v1/items``: ``status`` is ``indexed`` or ``unchanged``; ``warnings``
    name e.g. an image that could not be used (the item is then indexed by text)."""

    id: str
    status: str
    job_id: int
    warnings: list[str]


def _engine(request: Request):  # noqa: ANN202 - the Engine, typed in query.api
    return request.app.state.engine


router = APIRouter(tags=["ingest"])


@router.post("/v1/items:bulk", status_code=202, response_model=JobAccepted, summary="Queue a bulk upsert job",
             dependencies=[Depends(require("editor"))],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/x-ndjson": {"schema": {"type": "string", "description": "One product record per line."}},
                 "application/json": {"schema": BulkPath.model_json_schema()}}}})
async def bulk(request: Request) -> JobAccepted:
    """JSON lines (one record per line, MARS field names) or ``{"path": ...}``; returns the job
    id at once. Malformed lines are not an error here: the job rejects them with reasons."""
    eng = _engine(request)
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limit = eng.settings.max_bulk_bytes
    if content_type in JSONL_TYPES:
        body = await read_body(request, limit, "the bulk body", "MARS_MAX_BULK_BYTES; split the catalog into several jobs")
        records = list(read_jsonl_lines("api:bulk", body.splitlines(), None, Path.cwd()))
        source = "api:bulk"
    elif content_type == "application/json":
        try:
            spec = BulkPath.model_validate_json(await read_body(request, limit, "the bulk body", "MARS_MAX_BULK_BYTES"))
            mapping = parse_mapping(spec.mapping)
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_url=False)) from exc
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        try:
            records = await run_in_threadpool(lambda: list(open_source(Path(spec.path), mapping)))
        except (FileNotFoundError, ValueError) as exc:
            raise HTTPException(422, str(exc)) from exc
        source = spec.path
    else:
        raise HTTPException(415, f"send {JSONL_TYPES[0]} (one record per line) or application/json {{\"path\": ...}}")
    if not records:
        raise HTTPException(422, "no records: the body has no non-blank line")
    job_id = await run_in_threadpool(eng.submit_bulk, records, source)
    return JobAccepted(job_id=job_id, total=len(records), status_url=f"/v1/jobs/{job_id}")


@router.get("/v1/jobs/{job_id}", summary="Progress of a job", dependencies=[Depends(require("viewer"))])
def get_job(job_id: RowId, request: Request) -> dict[str, Any]:
    """Counts by item status, ``done``, ``eta_s`` and the first 100 rejections; 404 if unknown."""
    with _engine(request).sessions() as session:
        progress = job_progress(session, job_id)
    if progress is None:
        raise HTTPException(404, f"no job {job_id}")
    return progress


@router.get("/v1/jobs", summary="The newest jobs", dependencies=[Depends(require("viewer"))])
def list_jobs(request: Request, limit: int = Query(20, ge=1, le=500)) -> list[dict[str, Any]]:
    """The ``limit`` newest jobs, newest first."""
    with _engine(request).sessions() as session:
        return recent_jobs(session, limit)


@router.post("/v1/items", response_model=ItemWritten, summary="Upsert one item (searchable on return)",
             dependencies=[Depends(require("editor"))])
async def put_item(request: Request, record: dict[str, Any]) -> ItemWritten:
    """One product record (MARS field names: ``id``, ``title``, ``text``, ``type``, ``colour``,
    ``size``, ``image`` (URL or server path), ``attributes``). 422 with the reason if it is
    rejected (the rejection is also stored with the job)."""
    eng = _engine(request)
    raw = RawRecord("api:item", 1, record, raw=record)
    report = await run_in_threadpool(eng.ingest, [raw], "api:item", 1)
    if report.rejected:
        raise HTTPException(422, report.rejections[0].reason)
    status = "indexed" if report.ingested else "unchanged"
    return ItemWritten(id=str(record.get("id")), status=status, job_id=report.job_id, warnings=report.warnings)


@router.delete("/v1/items/{item_id}", summary="Delete one item from the catalog and every index",
               dependencies=[Depends(require("editor"))])
async def delete_item(item_id: str, request: Request) -> dict[str, str]:
    """Removes the item's point, BM25 document and catalog row; 404 if the catalog has no such item."""
    found = await run_in_threadpool(_engine(request).delete_items, [item_id])
    if not found:
        raise HTTPException(404, f"no item {item_id!r}")
    return {"deleted": item_id}
