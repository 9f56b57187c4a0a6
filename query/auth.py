"""API keys, roles and per-key rate limits of the HTTP API: the checks behind the
:func:`query.deps.require` dependency (this module does not know how the app holds its engine).

Each route names the weakest role it needs with ``dependencies=[Depends(require(role))]``:

* ``viewer`` — search and every read (``POST /v1/search``, the ``GET`` routes);
* ``editor`` — viewer + writes (``POST /v1/items:bulk``, ``POST /v1/items``,
  ``DELETE /v1/items/{id}``, and ``POST``/``PATCH``/``DELETE`` of ``/v1/rules``);
* ``admin`` — editor + key management (:mod:`query.routes.keys`: ``/v1/keys``).

A request sends its key as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. A missing,
unknown or revoked key is answered 401 with ``WWW-Authenticate: Bearer`` (RFC 6750 §3), a key
whose role is too weak 403, and a key over its rate limit 429 with ``Retry-After`` (seconds,
RFC 9110 §10.2.3). ``/healthz`` (and the OpenAPI docs) need no key. Keys are read from the
catalog on every request (:mod:`catalog.api_keys`), so ``mars keys revoke`` takes effect at once,
also while ``mars serve`` runs.

The mode comes from the app's settings: ``MARS_API_AUTH=open`` (``mars serve
--open``) lets every request act as ``admin`` without a key, for a local demo; the server warns
at start and ``/healthz`` says ``"auth": "open"``.

Rate limits (``MARS_RATE_LIMIT``, e.g. ``600/minute``; ``''`` turns them off) count the
requests of each key (of each client IP in open mode) in a moving window, with the ``limits``
library (``MovingWindowRateLimiter`` over ``MemoryStorage``:
https://limits.readthedocs.io/en/stable/strategies.html). The counters live in the API
process's memory, so each replica counts on its own.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from fastapi import HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPBearer
from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from catalog import api_keys
from catalog.api_keys import Role

if TYPE_CHECKING:
    from mars.settings import Settings

log = logging.getLogger("mars.auth")

#: The line the server prints at start in open mode.
OPEN_MODE_WARNING = (
    "MARS_API_AUTH=open: the API asks for no key and every request acts as admin (search, ingest, "
    "deletes, key management). For a local demo only: never expose this server."
)

#: The two ways to send a key, as OpenAPI security schemes (read by :func:`query.deps.get_principal`).
bearer_scheme = HTTPBearer(auto_error=False, description="An API key from `mars keys create`, as a Bearer token.")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The same API key, as a header.")


@dataclass(frozen=True)
class Principal:
    """Who a request acts as; stored on ``request.state.api_key`` for logging.

    ``key_id``, ``name`` and ``prefix`` describe the key (``key_id`` and ``prefix`` are None in
    open mode); the secret is never kept.
    """

    role: Role
    key_id: int | None
    name: str
    prefix: str | None

    def __str__(self) -> str:
        return f"key {self.key_id} ({self.prefix}…, {self.name}, {self.role})" if self.key_id else f"{self.name} ({self.role})"


#: Every request of an open-mode server.
OPEN_PRINCIPAL = Principal(role="admin", key_id=None, name="open mode", prefix=None)


class RateLimiter:
    """Per-identity request limits of one API process (moving window, in memory).

    Args:
        spec: limits in the ``limits`` notation, e.g. ``"600/minute"`` or
            ``"10/second;600/minute"`` (every one must hold); blank for none.

    Raises:
        ValueError: if ``spec`` is not valid ``limits`` notation.
    """

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.items: list[RateLimitItem] = parse_many(spec) if spec.strip() else []
        self._limiter = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, identity: str) -> int | None:
        """Count one request of ``identity`` (e.g. ``"key:3"``) against each limit in turn.

        Returns:
            None when every limit allows it; else the whole seconds (≥ 1) until the first
            exhausted limit lets one more through. The exhausted limit does not count the
            refused request (limits listed before it do).
        """
        for item in self.items:
            if not self._limiter.hit(item, identity):  # atomic check-and-count per limit
                reset = self._limiter.get_window_stats(item, identity).reset_time
                return max(1, math.ceil(reset - time.time()))
        return None


_limiter_lock = threading.Lock()


def rate_limiter(state: Any, spec: str) -> RateLimiter:
    """The :class:`RateLimiter` for ``spec`` kept on ``state`` (an app's ``app.state``), made on
    first use and remade when the spec changes."""
    limiter = getattr(state, "rate_limiter", None)
    if limiter is None or limiter.spec != spec:
        with _limiter_lock:
            limiter = getattr(state, "rate_limiter", None)
            if limiter is None or limiter.spec != spec:
                limiter = state.rate_limiter = RateLimiter(spec)
    return limiter


def _unauthorized(detail: str, invalid: bool) -> HTTPException:
    """A 401 with the RFC 6750 challenge (``error="invalid_token"`` when a key was sent)."""
    challenge = 'Bearer error="invalid_token"' if invalid else "Bearer"
    return HTTPException(401, detail, headers={"WWW-Authenticate": challenge})


def key_principal(sessions: Callable[[], AbstractContextManager[Session]], key: str) -> Principal:
    """The :class:`Principal` of a sent key, refreshing its ``last_used_at`` (best effort: a
    busy catalog is logged, not an error).

    Args:
        sessions: a catalog sessionmaker (the engine's ``sessions``).
        key: the secret as sent.

    Raises:
        HTTPException: 401 when the key is unknown or revoked.
    """
    with sessions() as session:
        row = api_keys.find_key(session, key)
        if row is None:
            raise _unauthorized("unknown API key", invalid=True)
        if row.revoked_at is not None:
            raise _unauthorized(f"API key {row.prefix}… ({row.name}) was revoked", invalid=True)
        principal = Principal(role=row.role, key_id=row.id, name=row.name, prefix=row.prefix)  # type: ignore[arg-type]
        try:
            api_keys.mark_used(session, row)
        except SQLAlchemyError as exc:  # bookkeeping only: a busy catalog must not refuse the request
            session.rollback()
            log.warning("could not record the use of %s: %s", principal, exc)
    return principal


def authenticate(
    request: Request, key: str | None, settings: Settings, sessions: Callable[[], AbstractContextManager[Session]]
) -> Principal:
    """Who ``request`` acts as, once per request (cached on ``request.state.api_key``), after
    counting it against the rate limit of its key (of its client IP in open mode).

    Args:
        request: the request (its state caches the answer; its app's state keeps the limiter).
        key: the API key sent (``Authorization: Bearer`` or ``X-API-Key``), or None.
        settings: the app's settings (``api_auth``, ``rate_limit``).
        sessions: a catalog sessionmaker, to look the key up.

    Raises:
        HTTPException: 401 (no, unknown or revoked key; ``WWW-Authenticate: Bearer``),
            429 (over the rate limit; ``Retry-After`` in seconds).
    """
    cached = getattr(request.state, "api_key", None)
    if isinstance(cached, Principal):
        return cached
    if settings.api_auth == "open":
        principal, identity = OPEN_PRINCIPAL, f"ip:{request.client.host if request.client else 'unknown'}"
    else:
        if not key:
            raise _unauthorized("an API key is needed: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>' "
                                "(`mars keys create --name NAME --role viewer|editor|admin` makes one)", invalid=False)
        principal = key_principal(sessions, key)
        identity = f"key:{principal.key_id}"
    retry_after = rate_limiter(request.app.state, settings.rate_limit).hit(identity)
    if retry_after is not None:
        raise HTTPException(429, f"rate limit of {settings.rate_limit} exceeded for {principal}; retry in "
                            f"{retry_after} s", headers={"Retry-After": str(retry_after)})
    request.state.api_key = principal
    return principal


def check_role(principal: Principal, role: Role) -> None:
    """Let ``principal`` act when its role is ``role`` or a stronger one.

    Raises:
        HTTPException: 403 when its role is weaker.
    """
    if not api_keys.role_allows(principal.role, role):
        raise HTTPException(403, f"this needs the {role} role; {principal} has {principal.role}")
