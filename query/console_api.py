"""The web console (``/console/``) and the product photo endpoint it shows on result cards.

* ``GET /`` redirects to ``/console/``; ``/console/`` serves the static files of
  ``query/console/`` (plain HTML, CSS and JavaScript, no external resources). The console
  talks to the same API as any client (``/v1/search``, ``/v1/categories``, ``/v1/items``,
  ``/v1/items:bulk``, ``/v1/jobs``) and sends ``Authorization: Bearer <key>`` when the user
  entered an API key.
* ``GET /v1/items/{id}/image`` — the product's stored photo: the bytes of the local file the
  catalog row names, with the content type read from the bytes (404 when the item has no
  photo or the file is gone or is not an image). A photo stored as a URL answers 307 to it.
  Needs a ``viewer`` API key like every read (:mod:`query.auth`); the console's static files
  and the ``/`` redirect need none (the console asks for the key).

:func:`mount_console` adds both to an app (``query.api.create_app`` calls it).
"""

from __future__ import annotations

import io
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image, UnidentifiedImageError
from starlette.types import Scope

from catalog.models import Product
from ingestion.images import InvalidImage, read_image_bytes
from ingestion.remote import is_remote
from query.auth import require

#: Where the console's static files live (shipped as package data of ``query``).
CONSOLE_DIR = Path(__file__).resolve().parent / "console"

#: The console loads only its own files and talks only to this server; product photos may
#: also be URLs of the catalog (``http:``/``https:``) or blob URLs made from fetched bytes.
CONSOLE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data: http: https:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}

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


class ConsoleFiles(StaticFiles):
    """:class:`StaticFiles` that adds :data:`CONSOLE_HEADERS` to every file it serves."""

    def file_response(self, full_path, stat_result, scope: Scope, status_code: int = 200) -> Response:  # noqa: ANN001
        response = super().file_response(full_path, stat_result, scope, status_code)
        response.headers.update(CONSOLE_HEADERS)
        return response


router = APIRouter()


@router.get("/", include_in_schema=False)
def root() -> RedirectResponse:
    """The console is the server's front page."""
    return RedirectResponse("/console/", status_code=307)


@router.get("/console", include_in_schema=False)
def console_no_slash() -> RedirectResponse:
    return RedirectResponse("/console/", status_code=307)


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
def item_image(item_id: str, request: Request) -> Response:
    """The bytes of the photo file the catalog names for this item, with its content type.
    Only the file of the item's catalog row is ever read; the ETag is the item's content hash."""
    eng = request.app.state.engine
    with eng.sessions() as session:
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
        data = read_image_bytes(image, max_bytes=eng.settings.max_image_bytes)
    except InvalidImage as exc:
        raise HTTPException(404, f"item {item_id!r}: {exc}") from exc
    media_type = image_media_type(data)
    if media_type is None:
        raise HTTPException(404, f"item {item_id!r}: its photo file is not a readable image")
    return Response(data, media_type=media_type, headers=headers)


def mount_console(app: FastAPI) -> None:
    """Add the photo endpoint, the ``/`` redirect and the console's static files to ``app``."""
    app.include_router(router)
    app.mount("/console", ConsoleFiles(directory=CONSOLE_DIR, html=True), name="console")
