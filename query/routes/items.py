"""Catalog items: read one, its photo, and the write side (bulk jobs, single upserts, deletes).

* ``GET /v1/items/{id}`` — the item with its category keys.
* ``GET /v1/items/{id}/image`` — the product's stored photo: the bytes of the local file the
  catalog row names, with the content type read from the bytes (404 when the item has no
  photo or the file is gone or is not an image). A photo stored as a URL answers 307 to it.
  The console shows it on result cards.
* ``POST /v1/items:bulk`` — a JSON-lines body (``application/x-ndjson``) or ``{"path": ...}``
  (a catalog on the server: BEIR folder, ``.jsonl``, ``.csv`` or ABO listings) becomes one
  job; the answer (202) carries its id at once (progress: :mod:`query.routes.jobs`).
* ``POST /v1/items`` — one record, applied before the answer, so it is searchable when the
  answer arrives; ``DELETE /v1/items/{id}`` removes an item from every store.

Reads need a ``viewer`` API key, writes an ``editor`` one (:mod:`query.auth`).

Where a job runs is the engine's business (:meth:`mars.engine.Engine.submit_bulk`): on the
Celery queues in server mode, on the server process's job thread in embedded mode. Single
items and deletes are always applied by the process that answers, under the engine's write
lock.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import RedirectResponse, Response
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from catalog.models import Product
from ingestion.images import InvalidImage, read_image_bytes
from ingestion.readers import RawRecord, open_source, parse_mapping, read_jsonl_lines
from ingestion.remote import is_remote
from query.bodies import read_body
from query.deps import EngineDep, SessionDep, SettingsDep, require

#: Content types accepted as a JSON-lines bulk body.
JSONL_TYPES: tuple[str, ...] = ("application/x-ndjson", "application/jsonl", "application/json-lines", "application/jsonlines")


class ItemOut(BaseModel):
    """A catalog item."""

    id: str
    title: str
    text: str
    type: str
    colour: str
    size: str
    image: str | None
    attributes: dict[str, Any]
    categories: list[str]
    content_hash: str


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


_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def image_media_type(data: bytes) -> str | None:
    """The MIME type of image ``data`` from its leading bytes (JPEG, PNG, GIF, WebP, BMP),
    else from Pillow's reading of the header; None when it is not an image."""
    for magic, media_type in _MAGIC:
        if data.startswith(magic):
            return media_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    try:
        with Image.open(io.BytesIO(data)) as img:
            return Image.MIME.get(img.format or "")
    except (UnidentifiedImageError, OSError):
        return None


router = APIRouter()


@router.get("/v1/items/{item_id}", response_model=ItemOut, summary="One catalog item",
            dependencies=[Depends(require("viewer"))])
def get_item(item_id: str, session: SessionDep) -> ItemOut:
    """The item with its category keys; 404 if unknown."""
    p = session.get(Product, item_id)
    if p is None:
        raise HTTPException(404, f"no item {item_id!r}")
    keys = sorted({k for c in p.categories for k in ([c.parent.key] if c.parent else []) + [c.key]})
    return ItemOut(
        id=p.id, title=p.title, text=p.text, type=p.type, colour=p.colour, size=p.size, image=p.image,
        attributes=p.attributes or {}, categories=keys, content_hash=p.content_hash,
    )


@router.get(
    "/v1/items/{item_id}/image",
    summary="The product's stored photo",
    tags=["items"],
    response_class=Response,
    dependencies=[Depends(require("viewer"))],
    responses={
        200: {"content": {"image/jpeg": {}, "image/png": {}, "image/webp": {}, "image/gif": {}}, "description": "The photo's bytes."},
        304: {"description": "Not modified (If-None-Match matched the item's content hash)."},
        307: {"description": "The catalog stores this photo as a URL: redirect to it."},
        404: {"description": "Unknown item, item without photo, or its file is missing or not an image."},
    },
)
def item_image(item_id: str, request: Request, session: SessionDep, settings: SettingsDep) -> Response:
    """The bytes of the photo file the catalog names for this item, with its content type.
    Only the file of the item's catalog row is ever read; the ETag is the item's content hash."""
    product = session.get(Product, item_id)
    if product is None:
        raise HTTPException(404, f"no item {item_id!r}")
    image, etag = product.image, f'"{product.content_hash}"'
    if not image:
        raise HTTPException(404, f"item {item_id!r} has no photo")
    if is_remote(image):
        return RedirectResponse(image, status_code=307)
    headers = {"ETag": etag, "Cache-Control": "private, no-cache", "X-Content-Type-Options": "nosniff"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    try:
        data = read_image_bytes(image, max_bytes=settings.max_image_bytes)
    except InvalidImage as exc:
        raise HTTPException(404, f"item {item_id!r}: {exc}") from exc
    media_type = image_media_type(data)
    if media_type is None:
        raise HTTPException(404, f"item {item_id!r}: its photo file is not a readable image")
    return Response(data, media_type=media_type, headers=headers)


async def read_bulk_records(request: Request, limit: int) -> tuple[list[RawRecord], str]:
    """The records of a ``POST /v1/items:bulk`` body of at most ``limit`` bytes, and their
    source name (``api:bulk``, or the path named by a :class:`BulkPath` body).

    Raises:
        HTTPException: 413 (body over ``limit``), 415 (another content type), 422 (an invalid
            path body, a source that cannot be read, no records).
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
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
    return records, source


@router.post("/v1/items:bulk", status_code=202, response_model=JobAccepted, summary="Queue a bulk upsert job",
             tags=["ingest"], dependencies=[Depends(require("editor"))],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "application/x-ndjson": {"schema": {"type": "string", "description": "One product record per line."}},
                 "application/json": {"schema": BulkPath.model_json_schema()}}}})
async def bulk(request: Request, eng: EngineDep, settings: SettingsDep) -> JobAccepted:
    """JSON lines (one record per line, MARS field names) or ``{"path": ...}``; returns the job
    id at once. Malformed lines are not an error here: the job rejects them with reasons."""
    records, source = await read_bulk_records(request, settings.max_bulk_bytes)
    job_id = await run_in_threadpool(eng.submit_bulk, records, source)
    return JobAccepted(job_id=job_id, total=len(records), status_url=f"/v1/jobs/{job_id}")


@router.post("/v1/items", response_model=ItemWritten, summary="Upsert one item (searchable on return)",
             tags=["ingest"], dependencies=[Depends(require("editor"))])
async def put_item(record: dict[str, Any], eng: EngineDep) -> ItemWritten:
    """One product record (MARS field names: ``id``, ``title``, ``text``, ``type``, ``colour``,
    ``size``, ``image`` (URL or server path), ``attributes``). 422 with the reason if it is
    rejected (the rejection is also stored with the job)."""
    raw = RawRecord("api:item", 1, record, raw=record)
    report = await run_in_threadpool(eng.ingest, [raw], "api:item", 1)
    if report.rejected:
        raise HTTPException(422, report.rejections[0].reason)
    status = "indexed" if report.ingested else "unchanged"
    return ItemWritten(id=str(record.get("id")), status=status, job_id=report.job_id, warnings=report.warnings)


@router.delete("/v1/items/{item_id}", summary="Delete one item from the catalog and every index",
               tags=["ingest"], dependencies=[Depends(require("editor"))])
async def delete_item(item_id: str, eng: EngineDep) -> dict[str, str]:
    """Removes the item's point, BM25 document and catalog row; 404 if the catalog has no such item."""
    found = await run_in_threadpool(eng.delete_items, [item_id])
    if not found:
        raise HTTPException(404, f"no item {item_id!r}")
    return {"deleted": item_id}
