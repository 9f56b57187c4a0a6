"""Error bodies as Problem Details for HTTP APIs (RFC 9457, ``application/problem+json``).

Every error the API answers has the members of RFC 9457 section 3.1 — ``type``, ``title``,
``status``, ``detail``, ``instance`` — plus two extension members (section 3.2):

* ``request_id``: the request's id (also the ``X-Request-ID`` response header, see
  :mod:`query.observability`), to find the request's log lines;
* ``errors``: for validation failures, the field errors (``loc``, ``msg``, ``type``, ``ctx``).

``type`` is ``about:blank`` (section 4.2.1: the problem has no semantics beyond its HTTP
status code), so ``title`` is the status code's phrase. ``instance`` is the request path.
``detail`` is the human-readable explanation; for :class:`fastapi.HTTPException` raised
with a string it is that string unchanged.

Unhandled exceptions answer 500 with a generic ``detail`` (nothing of the exception leaks to
the client) and are logged with their traceback on ``mars.api`` together with the request id;
Starlette's ``ServerErrorMiddleware`` re-raises them afterwards, so the server still sees them
(:mod:`query.observability` keeps the server from logging the same traceback twice).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.utils import is_body_allowed_for_status_code
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

from query.observability import REQUEST_ID_HEADER, mark_logged, request_id_of

log = logging.getLogger("mars.api")

#: Media type of a problem details body (RFC 9457 section 3).
PROBLEM_JSON = "application/problem+json"


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def clean_errors(errors: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI field errors as JSON: ``loc``, ``msg``, ``type`` and ``ctx`` (values that
    are not JSON scalars are turned into strings). The rejected ``input`` is left out, so an
    error body never echoes a large or secret payload back."""
    cleaned = []
    for err in errors:
        item: dict[str, Any] = {"loc": list(err.get("loc", ())), "msg": str(err.get("msg", "")), "type": str(err.get("type", ""))}
        ctx = err.get("ctx")
        if ctx:
            item["ctx"] = {k: v if isinstance(v, (str, int, float, bool)) or v is None else str(v) for k, v in ctx.items()}
        cleaned.append(item)
    return cleaned


def _summary(errors: list[dict[str, Any]]) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]]
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def problem_response(
    request: Request,
    status: int,
    detail: str,
    *,
    errors: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """An RFC 9457 problem details response for ``request`` (see the module docstring)."""
    request_id = request_id_of(request)
    out_headers = dict(headers or {})
    if request_id:
        out_headers.setdefault(REQUEST_ID_HEADER, request_id)
    if not is_body_allowed_for_status_code(status):
        return Response(status_code=status, headers=out_headers)
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": _title(status),
        "status": status,
        "detail": detail,
        "instance": request.url.path,
        "request_id": request_id,
    }
    if errors is not None:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, headers=out_headers, media_type=PROBLEM_JSON)


async def http_exception_handler(request: Request, exc: StarletteHTTPException) -> Response:
    """Any HTTPException (FastAPI's, Starlette's 404/405): a string ``detail`` is kept as is;
    a list of field errors (a body validated in the endpoint) goes to ``errors``."""
    detail = exc.detail
    if isinstance(detail, list):
        errors = clean_errors(d for d in detail if isinstance(d, Mapping))
        return problem_response(request, exc.status_code, _summary(errors), errors=errors, headers=exc.headers)
    return problem_response(request, exc.status_code, str(detail), headers=exc.headers)


async def validation_exception_handler(request: Request, exc: RequestValidationError) -> Response:
    """A request that FastAPI's own parameter/body validation refused: 422 with ``errors``."""
    errors = clean_errors(exc.errors())
    return problem_response(request, 422, _summary(errors), errors=errors)


async def unhandled_exception_handler(request: Request, exc: Exception) -> Response:
    """A bug: log it with its traceback and the request id, answer 500 with a generic detail."""
    log.error(
        "unhandled %s in %s %s", exc.__class__.__name__, request.method, request.url.path,
        exc_info=exc, extra={"request_id": request_id_of(request)},
    )
    mark_logged(exc)
    return problem_response(request, 500, "internal server error; quote the request_id when reporting it")


def install_problem_handlers(app: FastAPI) -> None:
    """Answer HTTP errors, validation errors and unhandled exceptions of ``app`` as problem details."""
    app.add_exception_handler(StarletteHTTPException, http_exception_handler)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, validation_exception_handler)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, unhandled_exception_handler)
