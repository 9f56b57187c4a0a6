"""The FastAPI app (``mars serve``): search, items, categories, health, and the write side
of :mod:`query.ingest_api` (bulk jobs, streamed items, deletes). OpenAPI at ``/docs``.
Every route but ``/healthz`` needs an API key with the role it names (:mod:`query.auth`).

In embedded mode the server process owns the stores: the :class:`mars.engine.Engine` is
created in the lifespan (or injected by tests) and reached through the ``EngineDep`` alias.
"""

from __future__ import annotations

import binascii
import gc
import logging
from dataclasses import replace
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import func, select

from catalog.models import Product
from ingestion.images import InvalidImage, decode_image
from mars.engine import Engine
from mars.settings import Settings, get_settings
from query.auth import require
from query.auth import router as keys_router
from query.bodies import Base64Photos, photo_digest, read_body, replay
from query.console_api import mount_console
from query.cors import install_cors
from query.deferred import DeferredResults
from query.funnel import QueryError, SearchQuery
from query.ingest_api import router as ingest_router
from query.observability import install_observability, observe_search
from query.problems import install_problem_handlers
from query.rules_api import router as rules_router
from query.schemas import CriticStatus, Mode, SearchResponse

log = logging.getLogger("mars.api")


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
    weights: dict[str, float] = Field(default_factory=dict, description="RRF weight overrides: bm25, image, text.")
    critic_wait: bool = Field(
        True,
        description="mode=full only: false answers at once with the fused order (critic status 'pending') "
        "and the critic's re-ranking is fetched from critic.result_url when it lands.",
    )


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


class CategoryOut(BaseModel):
    """A category node: key, name, level (class|type), parent key and product count."""

    key: str
    name: str
    level: str
    parent_key: str | None
    products: int


async def get_engine(request: Request) -> Engine:
    """The engine owned by the running app (replaceable in tests via ``create_app(engine=...)``).
    Async on purpose: it does no I/O, and FastAPI runs a sync dependency in the thread pool."""
    return request.app.state.engine


EngineDep = Annotated[Engine, Depends(get_engine)]

def warm_up(engine: Engine) -> None:
    """Load what the first search would (the encoders, the vector store, the lock taxonomy),
    then ``gc.collect()`` and ``gc.freeze()``: the ~600k objects of the loaded models and
    libraries move to the collector's permanent generation. Without that, every full
    collection walks them all (~200 ms on 2 cores, every few seconds under load: all requests
    stall meanwhile); afterwards it walks only what requests and caches allocated since."""
    engine.encoders()
    engine.search_store()
    engine.taxonomy()
    gc.collect()
    gc.freeze()


#: Room photos are sniffed (PIL format detection, not the file name or Content-Type): these only.
ROOM_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP")


def search_body_limit(settings: Settings) -> int:
    """Largest ``POST /v1/search`` body: a base64 room photo of ``max_image_bytes`` (4/3 of it)
    plus 1 MB for the other fields and multipart framing."""
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


def create_app(engine: Engine | None = None, settings: Settings | None = None, warm_start: bool = False) -> FastAPI:
    """Build the app; with no ``engine`` the lifespan opens one from ``settings``/the environment.

    With ``warm_start`` (``mars serve``) the lifespan also loads the encoders, the vector store
    and the lock taxonomy before the first request, then freezes the garbage collector's view
    of everything loaded so far (:func:`warm_up`)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        owned = engine is None
        app.state.engine = engine or Engine(settings or get_settings())
        app.state.deferred = DeferredResults()
        if warm_start:
            await run_in_threadpool(warm_up, app.state.engine)
        try:
            yield
        finally:
            app.state.deferred.close()
            if owned:
                app.state.engine.close()

    app = FastAPI(
        title="MARS",
        version="0.1.0",
        description="Multimodal Agentic Room Search: hybrid BM25 + vector product search with a category lock.",
        lifespan=lifespan,
    )
    app_settings = settings or (engine.settings if engine is not None else get_settings())
    install_problem_handlers(app)
    install_cors(app, app_settings)
    install_observability(app, app_settings)  # the outermost middleware: add other middleware before it

    photos = Base64Photos()  # base64 room photos sent again are not decoded again

    def room_image(data: bytes, eng: Engine, digest: str | None = None):  # noqa: ANN202
        if len(data) > eng.settings.max_image_bytes:
            raise HTTPException(413, f"image is {len(data)} bytes, over the limit of {eng.settings.max_image_bytes}")
        # Keyed on the uploaded bytes: a photo whose region vectors are cached (a merchandiser
        # refining a search for the same room) is checked but neither decoded nor hashed again.
        digest = digest or photo_digest(data)
        try:
            image = decode_image(data, max_pixels=eng.settings.max_image_pixels, what="uploaded image",
                                 formats=ROOM_FORMATS, lazy=eng.funnel.has_region_vectors(digest))
        except InvalidImage as exc:
            raise HTTPException(422, str(exc)) from exc
        image.info["mars_digest"] = digest
        return image

    @app.post(
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
    async def search(request: Request, eng: EngineDep) -> SearchResponse:
        """JSON (`SearchBody`) or multipart with an `image` file upload; returns ranked items with provenance."""
        content_type = request.headers.get("content-type", "")
        data: bytes | None = None  # the room photo's bytes, if any
        digest: str | None = None  # their SHA-256, when already known
        body_limit = search_body_limit(eng.settings)
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
                data = await upload.read(eng.settings.max_image_bytes + 1)
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
        deferred = body.mode == "full" and not body.critic_wait and eng.critic is not None

        def checked_search() -> tuple[SearchQuery, SearchResponse]:
            # One thread-pool hop for the photo check and the funnel (each hop costs a thread
            # wake-up and a GIL hand-off, a large share of a cached search).
            query = SearchQuery(
                text=body.text,
                image=room_image(data, eng, digest) if data is not None else None,
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
        result_id = request.app.state.deferred.submit(lambda app=request.app: observe_search(app, eng.search(query)))
        response.mode = "full"
        response.critic = CriticStatus(
            backend=eng.critic.name, status="pending", detail="fused order; the critic's re-ranking is at result_url",
            result_url=f"/v1/search/results/{result_id}",
        )
        return response

    @app.get("/v1/search/results/{result_id}", response_model=SearchResponse, summary="A deferred critic re-ranking",
             dependencies=[Depends(require("viewer"))],
             responses={202: {"description": "The critic has not answered yet; ask again."}})
    def deferred_result(result_id: str, request: Request) -> SearchResponse | JSONResponse:
        """The full (critic re-ranked) response of a ``critic_wait: false`` search: 202 while the
        critic works, 404 when the id is unknown or expired (10 minutes by default)."""
        future = request.app.state.deferred.get(result_id)
        if future is None:
            ttl = request.app.state.deferred.ttl_s
            raise HTTPException(404, f"no deferred result {result_id!r} (unknown, or expired after {ttl:g} s)")
        if not future.done():
            return JSONResponse({"status": "pending", "result_url": f"/v1/search/results/{result_id}"}, status_code=202)
        exc = future.exception()
        if exc is not None:
            log.error("deferred search %s failed", result_id, exc_info=exc)
            raise HTTPException(500, "the deferred search failed; the server log has the details (quote the request_id)")
        return future.result()

    @app.get("/v1/items/{item_id}", response_model=ItemOut, summary="One catalog item",
             dependencies=[Depends(require("viewer"))])
    def get_item(item_id: str, eng: EngineDep) -> ItemOut:
        """The item with its category keys; 404 if unknown."""
        with eng.sessions() as session:
            p = session.get(Product, item_id)
            if p is None:
                raise HTTPException(404, f"no item {item_id!r}")
            keys = sorted({k for c in p.categories for k in ([c.parent.key] if c.parent else []) + [c.key]})
            return ItemOut(
                id=p.id, title=p.title, text=p.text, type=p.type, colour=p.colour, size=p.size, image=p.image,
                attributes=p.attributes or {}, categories=keys, content_hash=p.content_hash,
            )

    @app.get("/v1/categories", response_model=list[CategoryOut], summary="The category tree",
             dependencies=[Depends(require("viewer"))])
    def get_categories(eng: EngineDep) -> list[CategoryOut]:
        """Every class and type, classes first, then by product count."""
        cats = sorted(eng.taxonomy().categories.values(), key=lambda c: (c.level != "class", -c.products, c.key))
        return [CategoryOut(**c.__dict__) for c in cats]

    @app.get("/healthz", summary="Liveness and index counts")
    def healthz(eng: EngineDep) -> dict[str, Any]:
        """``status`` plus catalog, BM25 and vector counts, the critic, and ``auth`` (``keys``, or
        ``open`` when every request acts as admin without a key). Needs no key."""
        with eng.sessions() as session:
            products = session.execute(select(func.count()).select_from(Product)).scalar_one()
        store = eng.vector_store()
        return {
            "status": "ok",
            "products": products,
            "bm25_docs": eng.lexical.count(),
            "vectors": store.count() if store is not None else 0,
            "critic": eng.critic.name if eng.critic else "none",
            "auth": eng.settings.api_auth,
        }

    app.include_router(ingest_router)
    mount_console(app)  # GET / -> /console/ (static web console) and GET /v1/items/{id}/image
    app.include_router(keys_router)
    app.include_router(rules_router)  # /v1/rules: merchandising rules
    return app
