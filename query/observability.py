"""Request ids, structured logs and Prometheus metrics of the API (``install_observability``).

Request ids
    Each HTTP request gets an id: the client's ``X-Request-ID`` when it is sane (1..128
    characters of ``[A-Za-z0-9._-]``), else a fresh uuid4 hex. It is sent back in the
    ``X-Request-ID`` response header, put in ``request.state.request_id``, in every problem
    body (:mod:`query.problems`) and — through a :class:`contextvars.ContextVar` that
    :class:`RequestContextFilter` reads — in every log line written while the request runs
    (also from the threadpool, which copies the context).

Logs
    :func:`configure_logging` (called by ``mars serve``) writes one line per record to
    stderr: ``MARS_LOG_FORMAT=json`` (default) is one JSON object per line (python-json-logger)
    with ``time``, ``level``, ``logger``, ``message``, ``request_id`` and, on the access line
    of each request (logger ``mars.access``), ``method``, ``path``, ``status``,
    ``duration_ms`` and ``api_key`` (the *name* of the key the auth layer put in
    ``request.state.api_key``, never the secret); ``text`` is a plain one-line format.

Metrics (``GET /metrics``, Prometheus text or OpenMetrics by ``Accept``)
    Names and units follow the Prometheus naming guide (https://prometheus.io/docs/practices/naming/:
    base unit seconds, ``_total`` for counters) and the instrumentation guide
    (https://prometheus.io/docs/practices/instrumentation/); values read from another system at
    scrape time come from custom collectors ("Custom Collectors" in the prometheus-client docs):

    * ``mars_http_request_duration_seconds{method,route,status}`` — histogram per route
      *template* (``/v1/items/{item_id}``; ``unmatched`` for 404s of no route, so the label
      set stays bounded);
    * ``mars_search_stage_duration_seconds{stage}`` — the funnel stages of each search
      (``SearchResponse.timings_ms``: plan, rules, one per retriever that ran — bm25, text,
      aligned, image, prior — then fuse, critic, total);
    * ``mars_critic_unavailable_total`` — searches whose critic was unavailable (timed out, unreachable,
      or answered unreadably: the fused order stood);
    * ``mars_queue_depth{queue}`` — messages waiting in the Celery queues ``ingest``,
      ``embed``, ``index``, ``critic`` (Redis list lengths at ``MARS_BROKER_URL``, read on
      scrape; absent when Redis cannot be read, which counts in
      ``mars_queue_depth_scrape_errors_total``);
    * ``mars_bulk_jobs_waiting`` / ``mars_bulk_jobs_running`` — in-process bulk jobs
      (embedded mode; server-mode jobs are in the queues);
    * ``process_cpu_seconds_total``, ``process_resident_memory_bytes`` and the other standard
      ``process_*`` metrics of prometheus-client's ``ProcessCollector`` (on Linux), e.g. for
      the CPU time per request of a load benchmark (:mod:`evaluation.load_test`).

    Each app has its own :class:`prometheus_client.CollectorRegistry` (``app.state.metrics``),
    so tests can build many apps. With several server processes, each exposes its own
    numbers (scrape each; prometheus-client's multiprocess mode is not set up).
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TextIO

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter
from starlette.datastructures import Headers, MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from fastapi import FastAPI

    from mars.settings import Settings
    from query.schemas import SearchResponse

log = logging.getLogger("mars.observability")
access_log = logging.getLogger("mars.access")

REQUEST_ID_HEADER = "X-Request-ID"
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_LOGGED = "_mars_logged"

#: The id of the request being served in this context (None outside a request).
request_id_var: ContextVar[str | None] = ContextVar("mars_request_id", default=None)


def request_id_of(request: Request) -> str | None:
    """The id the middleware gave ``request`` (None if the app has no observability installed)."""
    return request.scope.get("state", {}).get("request_id") or request_id_var.get()


def mark_logged(exc: BaseException) -> None:
    """Note that ``exc`` was logged with its traceback, so the server's own report of it is dropped."""
    try:
        setattr(exc, _LOGGED, True)
    except AttributeError:  # an exception type without __dict__: the server logs it once more
        pass


# --- logs -------------------------------------------------------------------------------


class RequestContextFilter(logging.Filter):
    """A handler filter: sets ``record.request_id`` from the context (unless the record has one),
    and drops the server's ("uvicorn.*") second traceback of an exception that
    :func:`query.problems.unhandled_exception_handler` already logged with its request id."""

    def __init__(self, missing: str | None = None) -> None:
        super().__init__()
        self.missing = missing

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = request_id_var.get() or self.missing
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and getattr(exc, _LOGGED, False) and record.name.startswith("uvicorn"))


class _JsonLineFormatter(JsonFormatter):
    """python-json-logger's formatter with an ISO 8601 UTC ``time`` (millisecond precision)."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging API
        return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")


def log_handler(fmt: str = "json", stream: TextIO | None = None) -> logging.Handler:
    """A stream handler (stderr by default) writing ``fmt`` ("json" or "text") lines, with
    :class:`RequestContextFilter` attached."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonLineFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            reserved_attrs=[*RESERVED_ATTRS, "color_message"],  # uvicorn's ANSI copy of its message
        ))
        handler.addFilter(RequestContextFilter())
    elif fmt == "text":
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"))
        handler.addFilter(RequestContextFilter(missing="-"))
    else:
        raise ValueError(f"log format must be 'json' or 'text', got {fmt!r}")
    handler._mars = True  # type: ignore[attr-defined] - lets configure_logging replace its own handler
    return handler


def configure_logging(fmt: str = "json", level: str | int = "INFO") -> None:
    """Send every logger's records (MARS's, uvicorn's, libraries') to one stderr handler
    writing ``fmt`` lines at ``level``; calling it again replaces that handler."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_mars", False)]:
        root.removeHandler(old)
    root.addHandler(log_handler(fmt))
    root.setLevel(level.upper() if isinstance(level, str) else level)


# --- metrics ------------------------------------------------------------------------------

_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class QueueDepthCollector:
    """``mars_queue_depth{queue}`` read on scrape: the length of each Celery queue's Redis list
    (Celery's Redis transport keeps a queue's messages in a list named after the queue).
    When Redis cannot be read the gauge is left out of that scrape (no error reaches the
    scraper) and ``mars_queue_depth_scrape_errors_total`` counts it."""

    def __init__(self, broker_url: str, queues: tuple[str, ...], timeout_s: float = 0.5) -> None:
        self.broker_url = broker_url
        self.queues = queues
        self.timeout_s = timeout_s
        self._client: Any = None
        self._errors = 0
        self._lock = threading.Lock()

    def _redis(self) -> Any:
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(
                self.broker_url, socket_connect_timeout=self.timeout_s, socket_timeout=self.timeout_s
            )
        return self._client

    def collect(self):  # noqa: ANN201 - Iterable[Metric], the Collector protocol
        depth = GaugeMetricFamily(
            "mars_queue_depth", "Messages waiting in a Celery queue (Redis list length at MARS_BROKER_URL).",
            labels=["queue"],
        )
        if self.broker_url.startswith(("redis://", "rediss://", "unix://")):
            try:
                with self._redis().pipeline(transaction=False) as pipe:
                    for queue in self.queues:
                        pipe.llen(queue)
                    lengths = pipe.execute()
            except Exception as exc:  # noqa: BLE001 - any failure of the broker is one scrape error
                with self._lock:
                    self._errors += 1
                log.debug("queue depth scrape failed: %s: %s", exc.__class__.__name__, exc)
            else:
                for queue, length in zip(self.queues, lengths):
                    depth.add_metric([queue], length)
                yield depth
        yield CounterMetricFamily(
            "mars_queue_depth_scrape_errors", "Scrapes that could not read the queue lengths from Redis.",
            value=self._errors,
        )


class BulkJobsCollector:
    """``mars_bulk_jobs_waiting`` and ``mars_bulk_jobs_running``: in-process bulk jobs (embedded
    mode), read on scrape.

    Args:
        counts: returns ``{"waiting": n, "running": n}`` (the engine's ``bulk_jobs()``), or None
            while there is no engine (both gauges are then 0).
    """

    def __init__(self, counts: Callable[[], Mapping[str, int] | None]) -> None:
        self.counts = counts

    def collect(self):  # noqa: ANN201 - Iterable[Metric], the Collector protocol
        counts = self.counts() or {"waiting": 0, "running": 0}
        yield GaugeMetricFamily("mars_bulk_jobs_waiting", "In-process bulk jobs queued behind the running one.",
                                value=counts["waiting"])
        yield GaugeMetricFamily("mars_bulk_jobs_running", "In-process bulk jobs running now (0 or 1).",
                                value=counts["running"])


@dataclass
class ApiMetrics:
    """The app's registry and the metrics its code observes directly."""

    registry: CollectorRegistry
    requests: Histogram
    stages: Histogram
    critic_unavailable: Counter

    @classmethod
    def create(cls) -> ApiMetrics:
        """Fresh metrics in a fresh registry."""
        registry = CollectorRegistry()
        return cls(
            registry=registry,
            requests=Histogram(
                "mars_http_request_duration_seconds", "HTTP request latency by route template and status.",
                ["method", "route", "status"], buckets=_REQUEST_BUCKETS, registry=registry,
            ),
            stages=Histogram(
                "mars_search_stage_duration_seconds", "Latency of each funnel stage of a search (timings_ms).",
                ["stage"], buckets=_STAGE_BUCKETS, registry=registry,
            ),
            critic_unavailable=Counter(
                "mars_critic_unavailable",
                "Searches whose critic was unavailable: timed out, unreachable or unreadable (the fused order stood).",
                registry=registry,
            ),
        )

    def observe_search(self, response: SearchResponse) -> None:
        """Record one search's stage timings and whether its critic was unavailable."""
        for stage, ms in response.timings_ms.items():
            self.stages.labels(stage).observe(ms / 1000.0)
        if response.critic.status == "unavailable":
            self.critic_unavailable.inc()


def observe_search(app: FastAPI, response: SearchResponse) -> SearchResponse:
    """Record ``response`` in ``app``'s metrics (if installed) and return it."""
    metrics: ApiMetrics | None = getattr(app.state, "metrics", None)
    if metrics is not None:
        metrics.observe_search(response)
    return response


# --- the middleware ---------------------------------------------------------------------------


def _api_key_name(state: dict[str, Any]) -> str | None:
    key = state.get("api_key")
    if key is None or isinstance(key, str):
        return key
    return getattr(key, "name", None)


class RequestContextMiddleware:
    """Pure ASGI middleware (no body buffering): request id in and out, one access log line
    and one latency observation per HTTP request — also when the app raised (status 500)."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = Headers(scope=scope).get(REQUEST_ID_HEADER)
        request_id = given if given and _SANE_REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if REQUEST_ID_HEADER not in headers:
                    headers.append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - start
            method = scope["method"] if scope["method"] in _METHODS else "other"
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            self.metrics.requests.labels(method, route, str(status)).observe(duration)
            access_log.log(
                logging.WARNING if status >= 500 else logging.INFO,
                "%s %s %d %.1fms", scope["method"], scope["path"], status, duration * 1000,
                extra={
                    "request_id": request_id, "method": scope["method"], "path": scope["path"], "status": status,
                    "duration_ms": round(duration * 1000, 3), "api_key": _api_key_name(scope.get("state", {})),
                },
            )
            request_id_var.reset(token)


def install_observability(
    app: FastAPI, settings: Settings, bulk_jobs: Callable[[], Mapping[str, int] | None] = lambda: None
) -> None:
    """Request ids, access logs and metrics for ``app``: the outermost middleware (add it after
    any other middleware), ``app.state.metrics`` and ``GET /metrics``; ``bulk_jobs`` feeds
    :class:`BulkJobsCollector` (by default no in-process jobs)."""
    from workers.app import QUEUES

    metrics = ApiMetrics.create()
    metrics.registry.register(QueueDepthCollector(settings.broker_url, QUEUES))
    metrics.registry.register(BulkJobsCollector(bulk_jobs))
    ProcessCollector(registry=metrics.registry)  # process_cpu_seconds_total, memory, open fds
    app.state.metrics = metrics
    app.add_middleware(RequestContextMiddleware, metrics=metrics)

    def prometheus_metrics(request: Request) -> Response:
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encoder(metrics.registry), media_type=content_type)

    app.add_api_route("/metrics", prometheus_metrics, methods=["GET"], include_in_schema=False)
