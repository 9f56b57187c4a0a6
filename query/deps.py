"""The API's FastAPI dependencies, as ``Annotated`` aliases for route parameters.

* :data:`EngineDep` — the app's :class:`mars.engine.Engine` (opened by the lifespan of
  :func:`query.app.create_app`, or injected by tests); this is the one module that reads it
  from the app's state.
* :data:`SettingsDep` — the app's :class:`mars.settings.Settings`: the ``settings`` given to
  ``create_app``, else the engine's.
* :data:`SessionDep` — a catalog session from the engine's sessionmaker, closed after the
  request.
* :data:`PrincipalDep` — who the request acts as (its API key and role), and :func:`require`,
  the dependency that lets a request through when its key holds a role; the checks themselves
  (keys, roles, rate limits) are :mod:`query.auth`.
* :data:`DeferredDep` and :data:`PhotosDep` — the app's deferred critic results and its cache
  of decoded base64 room photos.

The engine is typed under ``TYPE_CHECKING`` only, so importing this module (or the routes)
does not import :mod:`mars.engine`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, FastAPI, Request, Security
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.orm import Session

from catalog.api_keys import ROLES, Role
from mars.settings import Settings
from query.auth import Principal, api_key_header, authenticate, bearer_scheme, check_role
from query.bodies import Base64Photos
from query.deferred import DeferredResults

if TYPE_CHECKING:
    from mars.engine import Engine


async def get_engine(request: Request) -> Engine:
    """The engine owned by the running app (``create_app(engine=...)`` injects one).
    Async on purpose: it does no I/O, and FastAPI runs a sync dependency in the thread pool."""
    return request.app.state.engine


def engine_of(app: FastAPI) -> Engine | None:
    """``app``'s engine, or None before its lifespan opened one (e.g. for a ``/metrics`` scrape)."""
    return getattr(app.state, "engine", None)


def bulk_jobs_of(app: FastAPI) -> dict[str, int] | None:
    """The in-process bulk jobs of ``app``'s engine (:meth:`mars.engine.Engine.bulk_jobs`:
    ``{"waiting": n, "running": n}``), or None while it has no engine."""
    engine = engine_of(app)
    return engine.bulk_jobs() if engine is not None else None


async def get_settings(request: Request) -> Settings:
    """The app's settings: ``create_app(settings=...)``, else the engine's (set by ``create_app``)."""
    return request.app.state.settings


EngineDep = Annotated["Engine", Depends(get_engine)]
SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session(engine: EngineDep) -> Iterator[Session]:
    """A catalog session from the engine's sessionmaker for one request; closed (its
    transaction rolled back if it was not committed) after the request."""
    with engine.sessions() as session:
        yield session


async def get_deferred(request: Request) -> DeferredResults:
    """The app's deferred critic re-rankings (made by the lifespan)."""
    return request.app.state.deferred


async def get_photos(request: Request) -> Base64Photos:
    """The app's cache of decoded base64 room photos (made by ``create_app``)."""
    return request.app.state.photos


SessionDep = Annotated[Session, Depends(get_session)]
DeferredDep = Annotated[DeferredResults, Depends(get_deferred)]
PhotosDep = Annotated[Base64Photos, Depends(get_photos)]


async def get_principal(
    request: Request,
    engine: EngineDep,
    settings: SettingsDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
    header_key: Annotated[str | None, Security(api_key_header)],
) -> Principal:
    """Who the request acts as (:func:`query.auth.authenticate`: the sent key looked up in the
    engine's catalog, or everyone as admin in open mode), once per request. The catalog lookup
    runs in the thread pool; open mode needs none and answers on the event loop (a thread-pool
    hop costs a thread wake-up and a GIL hand-off per request).

    Raises:
        HTTPException: 401 (no, unknown or revoked key), 429 (over the rate limit).
    """
    key = bearer.credentials if bearer is not None else header_key
    if settings.api_auth == "open" or isinstance(getattr(request.state, "api_key", None), Principal):
        return authenticate(request, key, settings, engine.sessions)
    return await run_in_threadpool(authenticate, request, key, settings, engine.sessions)


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(role: Role) -> Callable[..., Principal]:
    """A dependency that lets a request through when its key holds ``role`` or a stronger one,
    and returns its :class:`~query.auth.Principal`; use it as
    ``dependencies=[Depends(require("editor"))]`` or as a parameter's ``Depends``.

    It answers 401 or 429 as :func:`get_principal` does, and 403 when the role is too weak
    (:func:`query.auth.check_role`).

    Raises:
        ValueError: if ``role`` is not one of :data:`catalog.api_keys.ROLES` (when the route is
            declared, not per request).
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")

    async def dependency(principal: PrincipalDep) -> Principal:
        check_role(principal, role)
        return principal

    dependency.__name__ = f"require_{role}"
    dependency.__doc__ = f"Let the request through when its API key holds the {role} role (or a stronger one)."
    return dependency
