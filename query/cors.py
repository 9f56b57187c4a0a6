"""Cross-origin requests: off unless ``MARS_CORS_ORIGINS`` lists the origins to allow.

With no origins set, no ``Access-Control-*`` header is ever sent, so browsers keep the
same-origin policy (Fetch standard, "CORS protocol"). With origins set, Starlette's
``CORSMiddleware`` answers preflights and adds the headers for exactly those origins; no
credentials mode (API keys travel in headers, not cookies) and ``X-Request-ID`` is exposed to
scripts.
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from mars.settings import Settings
from query.observability import REQUEST_ID_HEADER


def cors_origins(settings: Settings) -> list[str]:
    """``MARS_CORS_ORIGINS`` split on commas, blanks dropped."""
    return [origin.strip() for origin in settings.cors_origins.split(",") if origin.strip()]


def install_cors(app: FastAPI, settings: Settings) -> None:
    """Add CORSMiddleware for the configured origins; nothing when none are configured."""
    origins = cors_origins(settings)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["*"],
            expose_headers=[REQUEST_ID_HEADER],
        )
