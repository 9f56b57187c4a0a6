"""The web console: ``GET /`` and ``GET /console`` redirect to ``/console/``, which serves the
static files of ``query/console/`` (plain HTML, CSS and JavaScript, no external resources).

The console talks to the same API as any client (``/v1/search``, ``/v1/categories``,
``/v1/items``, ``/v1/items:bulk``, ``/v1/jobs``, ``/v1/items/{id}/image``) and sends
``Authorization: Bearer <key>`` when the user entered an API key; its static files and the
redirects need none (the console asks for the key). :func:`mount_console` adds the static
files to an app; :data:`router` holds the redirects.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.types import Scope

#: Where the console's static files live (shipped as package data of ``query``).
CONSOLE_DIR = Path(__file__).resolve().parent.parent / "console"

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


class ConsoleFiles(StaticFiles):
    """:class:`StaticFiles` that adds :data:`CONSOLE_HEADERS` to every file it serves."""

    def file_response(self, full_path, stat_result, scope: Scope, status_code: int = 200) -> Response:  # noqa: ANN001
        """The file's response (Starlette's), with :data:`CONSOLE_HEADERS` added."""
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
    """``/console`` without its slash: redirect to the console's index."""
    return RedirectResponse("/console/", status_code=307)


def mount_console(app: FastAPI) -> None:
    """Serve the console's static files at ``/console/`` (include :data:`router` first, so that
    ``/console`` itself redirects)."""
    app.mount("/console", ConsoleFiles(directory=CONSOLE_DIR, html=True), name="console")
