"""``mars serve``: the HTTP API under uvicorn, with the stores warmed before the first request."""

from __future__ import annotations

from typing import Annotated

import typer

from mars.cli.common import err
from mars.settings import get_settings

app = typer.Typer()


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    open_: Annotated[bool, typer.Option("--open", help="No API keys: every request acts as admin "
                                        "(MARS_API_AUTH=open). For a local demo only.")] = False,
) -> None:
    """Serve the HTTP API (OpenAPI docs at /docs): search, bulk jobs, streamed items. With
    embedded stores this process owns them and runs bulk jobs itself; with Qdrant server +
    OpenSearch, bulk jobs go to the Celery workers.

    Every route but /healthz needs an API key (`mars keys create`) with its role, and each key
    is held to MARS_RATE_LIMIT; --open (or MARS_API_AUTH=open) turns the keys off."""
    import uvicorn

    from query.app import create_app
    from query.auth import OPEN_MODE_WARNING
    from query.observability import configure_logging

    settings = get_settings()
    if open_:
        settings = settings.model_copy(update={"api_auth": "open"})
    if settings.api_auth == "open":
        err.print(f"[bold red]WARNING:[/bold red] {OPEN_MODE_WARNING}", highlight=False, soft_wrap=True)  # one line
    # MARS_LOG_FORMAT lines for every logger; the app writes the access lines (with request ids).
    configure_logging(settings.log_format, settings.log_level)
    # warm_start: models, stores and taxonomy load before the first request, then gc.freeze()
    # (full garbage collections otherwise stall every request for ~200 ms every few seconds).
    uvicorn.run(create_app(settings=settings, warm_start=True), host=host, port=port, log_config=None, access_log=False)
