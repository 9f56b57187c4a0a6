"""The FastAPI app (``mars serve``): :func:`create_app` assembles the lifespan, the problem
handlers, CORS, observability, the routers of :mod:`query.routes` and the console's static
files. OpenAPI at ``/docs``. Every route but ``/healthz`` needs an API key with the role it
names (:mod:`query.auth`).

In embedded mode the server process owns the stores: the :class:`mars.engine.Engine` is
created in the lifespan (or injected by tests) and reached by the routes through
:data:`query.deps.EngineDep`. Importing this module does not import :mod:`mars.engine`; the
lifespan does, when it opens an engine.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import TYPE_CHECKING

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from mars.settings import Settings, get_settings
from query.bodies import Base64Photos
from query.cors import install_cors
from query.deferred import DeferredResults
from query.deps import bulk_jobs_of
from query.observability import install_observability
from query.problems import install_problem_handlers
from query.routes import categories, console, health, items, jobs, keys, retrievers, rules, search

if TYPE_CHECKING:
    from mars.engine import Engine


def warm_up(engine: Engine) -> None:
    """Load what the first search would (:meth:`mars.engine.Engine.warm_up`: the encoders, the
    vector store, the lock taxonomy), then ``gc.collect()`` and ``gc.freeze()``: the ~600k
    objects of the loaded models and libraries move to the collector's permanent generation.
    Without that, every full collection walks them all (~200 ms on 2 cores, every few seconds
    under load: all requests stall meanwhile); afterwards it walks only what requests and
    caches allocated since."""
    engine.warm_up()
    gc.collect()
    gc.freeze()


def create_app(engine: Engine | None = None, settings: Settings | None = None, warm_start: bool = False) -> FastAPI:
    """Build the app; with no ``engine`` the lifespan opens one from ``settings``/the environment
    (and closes it at shutdown; an injected engine is left open).

    ``settings`` default to the engine's; they are the app's settings (:data:`query.deps.SettingsDep`:
    auth mode, rate limit, body and image limits, CORS, the broker whose queues ``/metrics``
    reads). With ``warm_start`` (``mars serve``) the lifespan also loads the encoders, the
    vector store and the lock taxonomy before the first request, then freezes the garbage
    collector's view of everything loaded so far (:func:`warm_up`)."""
    app_settings = settings or (engine.settings if engine is not None else get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if engine is None:
            from mars.engine import Engine  # here, not at module level: the engine loads the stores

            opened = Engine(app_settings)
        else:
            opened = engine
        app.state.engine = opened  # read by the routes through query.deps
        app.state.deferred = DeferredResults()
        try:  # a warm-up that fails still closes the engine the lifespan opened (and its owner lock)
            if warm_start:
                await run_in_threadpool(warm_up, opened)
            yield
        finally:
            app.state.deferred.close()
            if engine is None:
                opened.close()

    app = FastAPI(
        title="MARS",
        version="0.1.0",
        description="Multimodal Agentic Room Search: hybrid BM25 + vector product search with a category lock.",
        lifespan=lifespan,
    )
    app.state.settings = app_settings
    app.state.photos = Base64Photos()  # base64 room photos sent again are not decoded again
    install_problem_handlers(app)
    install_cors(app, app_settings)
    # the outermost middleware: add other middleware before it
    install_observability(app, app_settings, bulk_jobs=partial(bulk_jobs_of, app))
    for module in (search, retrievers, items, categories, health, jobs, console, keys, rules):
        app.include_router(module.router)
    console.mount_console(app)  # after console.router: GET /console itself redirects to /console/
    return app
