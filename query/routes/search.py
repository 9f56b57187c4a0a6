"""``POST /v1/search`` (text and/or a room photo, JSON or multipart) and ``GET
/v1/search/results/{id}`` (a deferred critic re-ranking, :mod:`query.deferred`). Both need a
``viewer`` key."""

from __future__ import annotations

import binascii
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ingestion.images import InvalidImage, decode_image
from mars.settings import Settings
from query.bodies import Base64Photos, photo_digest, read_body, replay
from query.deps import DeferredDep, EngineDep, PhotosDep, SettingsDep, require
from query.funnel import QueryError, SearchQuery
from query.observability import observe_search
from query.schemas import CriticStatus, Mode, SearchResponse

if TYPE_CHECKING:
    from PIL import Image

    from mars.engine import Engine

log = logging.getLogger("mars.api")

#: Room photos are sniffed (PIL format detection, not the file name or Content-Type): these only.
ROOM_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")


class SearchBody(BaseModel):
    """JSON body of ``POST /v1/search``; the room photo, if any, is base64 in ``image_base64``."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=1000, examples=["a lamp for this bedroom"])
    image_base64: str | None = Field(None, description="Room photo (JPEG/PNG), base64-encoded.")
    category: str | None = Field(None, max_length=256, description="Explicit category lock (key, name or synonym).")
    room: str | None = Field(
        None, max_length=100, examples=["Bedroom"], description="Room type: context for the text-side lists, never a lock."
    )
    auto_lock: bool = Field(True, description="Resolve a category lock from the text; false for a whole-room query.")
    top_k: int = Field(10, ge=1, le=1000)
    mode: Mode = "hybrid"
    weights: dict[str, float] = Field(
        default_factory=dict, description="RRF weight overrides by list name (GET /v1/retrievers), each a finite "
        "number ≥ 0; 0 leaves a list out.")
    critic_wait: bool = Field(
        True,
        description="mode=full only: false answers at once with the fused order (critic status 'pending') "
        "and the critic's re-ranking is fetched from critic.result_url when it lands.",
    )


def search_body_limit(settings: Settings) -> int:
    """Largest ``POST /v1/search`` body in bytes: a base64 room photo of ``max_image_bytes``
    (4/3 of it) plus 1 MB for the other fields and multipart framing."""
    return settings.max_image_bytes * 4 // 3 + 1_000_000


_MULTIPART_SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string"},
        "image": {"type": "string", "format": "binary", "description": "Room photo (JPEG/PNG)."},
        "category": {"type": "string"},
        "top_k": {"type": "integer", "default": 10, "minimum": 1, "maximum": 1000},
        "mode": {"type": "string", "enum": ["bm25", "vector", "hybrid", "full"], "default": "hybrid"},
        "critic_wait": {"type": "boolean", "default": True},
    },
}


def room_image(data: bytes, eng: Engine, settings: Settings, digest: str | None = None) -> Image.Image:
    """The uploaded room photo ``data`` as a PIL image (:data:`ROOM_FORMATS` only, at most
    ``max_image_bytes`` and ``max_image_pixels``), tagged with its region-cache key in
    ``image.info["mars_digest"]`` (``digest``, or the SHA-256 of ``data``). A photo whose region
    vectors the engine has cached is checked but not decoded (``lazy``).

    Raises:
        HTTPException: 413 over ``max_image_bytes``; 422 not a readable image of those formats
            or over ``max_image_pixels``.
    """
    if len(data) > settings.max_image_bytes:
        raise HTTPException(413, f"image is {len(data)} bytes, over the limit of {settings.max_image_bytes}")
    # Keyed on the uploaded bytes: a photo whose region vectors are cached (a merchandiser
    # refining a search for the same room) is checked but neither decoded nor hashed again.
    digest = digest or photo_digest(data)
    try:
        image = decode_image(data, max_pixels=settings.max_image_pixels, what="uploaded image",
                             formats=ROOM_FORMATS, lazy=eng.has_region_vectors(digest))
    except InvalidImage as exc:
        raise HTTPException(422, str(exc)) from exc
    image.info["mars_digest"] = digest
    return image


async def read_search_body(
    request: Request, settings: Settings, photos: Base64Photos
) -> tuple[SearchBody, bytes | None, str | None]:
    """The search body of ``request`` (JSON, or multipart with an ``image`` file), the room
    photo's bytes (None without one) and their digest when already known (a base64 photo sent
    before).

    Raises:
        HTTPException: 413 (body over :func:`search_body_limit`), 415 (another content type),
            422 (invalid fields or base64).
    """
    content_type = request.headers.get("content-type", "")
    data: bytes | None = None
    digest: str | None = None
    body_limit = search_body_limit(settings)
    if content_type.startswith("multipart/form-data"):
        raw = await read_body(request, body_limit, "search body")
        form = await Request(request.scope, replay(raw)).form()
        upload = form.get("image")
        fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
        try:
            body = SearchBody.model_validate(fields)
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_url=False)) from exc
        if upload is not None and not isinstance(upload, str):
            data = await upload.read(settings.max_image_bytes + 1)
    elif content_type.startswith("application/json"):
        try:
            body = SearchBody.model_validate_json(await read_body(request, body_limit, "search body"))
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_url=False)) from exc
        if body.image_base64:
            try:
                data, digest = photos.decode(body.image_base64)
            except (binascii.Error, ValueError) as exc:
                raise HTTPException(422, "image_base64 is not valid base64") from exc
    else:
        raise HTTPException(415, "send application/json or multipart/form-data")
    return body, data, digest


router = APIRouter()


@router.post(
    "/v1/search",
    response_model=SearchResponse,
    summary="Search with text and/or a room photo",
    dependencies=[Depends(require("viewer"))],
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": SearchBody.model_json_schema(ref_template="#/components/schemas/{model}")},
                "multipart/form-data": {"schema": _MULTIPART_SCHEMA},
            },
        }
    },
)
async def search(
    request: Request, eng: EngineDep, settings: SettingsDep, photos: PhotosDep, deferred_results: DeferredDep
) -> SearchResponse:
    """JSON (`SearchBody`) or multipart with an `image` file upload; returns ranked items with provenance."""
    body, data, digest = await read_search_body(request, settings, photos)
    deferred = body.mode == "full" and not body.critic_wait and eng.critic is not None

    def checked_search() -> tuple[SearchQuery, SearchResponse]:
        # One thread-pool hop for the photo check and the funnel (each hop costs a thread
        # wake-up and a GIL hand-off, a large share of a cached search).
        query = SearchQuery(
            text=body.text,
            image=room_image(data, eng, settings, digest) if data is not None else None,
            category=body.category,
            room=body.room,
            auto_lock=body.auto_lock,
            top_k=body.top_k,
            mode=body.mode,
            weights=body.weights,
        )
        return query, eng.search(replace(query, mode="hybrid") if deferred else query)

    try:
        query, response = await run_in_threadpool(checked_search)
    except QueryError as exc:
        raise HTTPException(422, str(exc)) from exc
    observe_search(request.app, response)
    if not deferred:
        return response
    result_id = deferred_results.submit(lambda app=request.app: observe_search(app, eng.search(query)))
    response.mode = "full"
    response.critic = CriticStatus(
        backend=eng.critic.name, status="pending", detail="fused order; the critic's re-ranking is at result_url",
        result_url=f"/v1/search/results/{result_id}",
    )
    return response


@router.get("/v1/search/results/{result_id}", response_model=SearchResponse, summary="A deferred critic re-ranking",
            dependencies=[Depends(require("viewer"))],
            responses={202: {"description": "The critic has not answered yet; ask again."}})
def deferred_result(result_id: str, deferred_results: DeferredDep) -> SearchResponse | JSONResponse:
    """The full (critic re-ranked) response of a ``critic_wait: false`` search: 202 while the
    critic works, 404 when the id is unknown or expired (10 minutes by default)."""
    future = deferred_results.get(result_id)
    if future is None:
        raise HTTPException(404, f"no deferred result {result_id!r} (unknown, or expired after {deferred_results.ttl_s:g} s)")
    if not future.done():
        return JSONResponse({"status": "pending", "result_url": f"/v1/search/results/{result_id}"}, status_code=202)
    exc = future.exception()
    if exc is not None:
        log.error("deferred search %s failed", result_id, exc_info=exc)
        raise HTTPException(500, "the deferred search failed; the server log has the details (quote the request_id)")
    return future.result()
