"""API hardening: RFC 9457 problem bodies, request ids, JSON logs, Prometheus metrics, CORS,
body limits, decompression bombs and strict request models (TestClient, real engine on a
tiny text-only catalog, open auth mode)."""

from __future__ import annotations

import base64
import io
import json
import logging
import struct
import zlib

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ingestion.readers import RawRecord
from query.app import create_app
from query.observability import ApiMetrics, QueueDepthCollector, RequestContextFilter, log_handler, mark_logged
from redis_db import flushed_redis

BROKER = "redis://127.0.0.1:6379/11"  # a database of its own: db 0 may hold other things
PROBLEM_KEYS = {"type", "title", "status", "detail", "instance", "request_id"}
PRODUCTS = [
    {"id": "lamp-1", "title": "Brightly table lamp", "type": "Table lamp", "text": "A small lamp for a bedside table."},
    {"id": "lamp-2", "title": "Glow floor lamp", "type": "Floor lamp", "text": "A tall reading lamp."},
    {"id": "rug-1", "title": "Woolly rug", "type": "Rug, high pile", "text": "A soft rug for the living room."},
    {"id": "sofa-1", "title": "Lounge sofa", "type": "Three-seat sofa", "text": "A three-seat sofa in grey."},
]


@pytest.fixture(scope="module")
def engine(encoders, tmp_path_factory):
    from mars.engine import Engine
    from mars.settings import Settings

    settings = Settings(
        home=tmp_path_factory.mktemp("hardening") / "mars", api_auth="open", rate_limit="", broker_url=BROKER,
        max_image_pixels=1_000_000, max_image_bytes=200_000, max_bulk_bytes=2_000,
    )
    eng = Engine(settings, encoders=encoders)
    eng.ingest([RawRecord("test", i + 1, dict(p), raw=p) for i, p in enumerate(PRODUCTS)], "test")
    yield eng
    eng.close()


def _boom() -> None:
    raise RuntimeError("secret internals: the database password is hunter2")


def make_client(engine, **overrides) -> TestClient:
    settings = engine.settings.model_copy(update=overrides) if overrides else None
    app = create_app(engine=engine, settings=settings)
    app.add_api_route("/test-only/boom", _boom, methods=["GET"])  # an unhandled exception, for the 500 case
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture(scope="module")
def client(engine):
    with make_client(engine) as c:
        yield c


def assert_problem(response, status: int) -> dict:
    """``response`` is an RFC 9457 problem with ``status`` whose request_id is the response header's."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert PROBLEM_KEYS <= body.keys(), body
    assert body["status"] == status and body["type"] == "about:blank" and body["title"] and body["detail"]
    assert body["request_id"] == response.headers["x-request-id"]
    return body


def png_declaring(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares ``width`` x ``height`` (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def image_bytes(fmt: str, size: tuple[int, int] = (32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 180, 120)).save(buf, fmt)
    return buf.getvalue()


def metric_samples(client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def sample(samples, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


# --- problem details -------------------------------------------------------------------------


def test_errors_are_problem_json(client):
    missing = assert_problem(client.get("/v1/items/nope"), 404)
    assert missing["detail"] == "no item 'nope'" and missing["instance"] == "/v1/items/nope"
    assert assert_problem(client.get("/no/such/route"), 404)["title"] == "Not Found"
    wrong_method = client.put("/v1/search", json={})
    assert_problem(wrong_method, 405)
    assert "POST" in wrong_method.headers["allow"]  # the HTTPException's headers are kept

    unknown_field = assert_problem(client.post("/v1/search", json={"text": "lamp", "colour_pref": "red"}), 422)
    assert unknown_field["errors"][0]["loc"] == ["colour_pref"] and unknown_field["errors"][0]["type"] == "extra_forbidden"
    assert "colour_pref" in unknown_field["detail"]
    assert "input" not in unknown_field["errors"][0]  # rejected input is not echoed back
    query_param = assert_problem(client.get("/v1/jobs", params={"limit": 0}), 422)  # FastAPI's own validation
    assert query_param["errors"][0]["loc"] == ["query", "limit"] and query_param["errors"][0]["ctx"] == {"ge": 1}
    nothing = assert_problem(client.post("/v1/search", json={}), 422)  # the funnel's QueryError: a string detail
    assert "errors" not in nothing

    unsupported = assert_problem(client.post("/v1/search", content=b"lamp", headers={"content-type": "text/plain"}), 415)
    assert unsupported["detail"] == "send application/json or multipart/form-data"


def test_unhandled_exception_is_a_generic_500_and_logged_with_traceback(client, caplog):
    caplog.set_level(logging.ERROR, logger="mars.api")
    r = client.get("/test-only/boom", headers={"X-Request-ID": "boom-1"})
    body = assert_problem(r, 500)
    assert body["request_id"] == "boom-1" and "hunter2" not in r.text and "RuntimeError" not in r.text
    [record] = [rec for rec in caplog.records if rec.name == "mars.api"]
    assert record.exc_info[0] is RuntimeError and record.request_id == "boom-1"
    assert "hunter2" in caplog.text and "Traceback" in caplog.text  # logged, not swallowed


def test_server_does_not_log_an_already_logged_traceback_twice():
    exc = RuntimeError("x")
    mark_logged(exc)
    flt = RequestContextFilter()
    second = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application", (),
                               (RuntimeError, exc, None))
    ours = logging.LogRecord("mars.api", logging.ERROR, __file__, 1, "unhandled", (), (RuntimeError, exc, None))
    other = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "boom", (), (ValueError, ValueError(), None))
    assert not flt.filter(second) and flt.filter(ours) and flt.filter(other)


# --- request ids and logs --------------------------------------------------------------------------


def test_request_id_echoed_or_generated(client):
    assert client.get("/healthz", headers={"X-Request-ID": "abc-123.X_y"}).headers["x-request-id"] == "abc-123.X_y"
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0
    for insane in ("has space", "a" * 129, "semi;colon", "ünïcode"):
        given = client.get("/healthz", headers={"X-Request-ID": insane.encode()})
        assert given.headers["x-request-id"] != insane and len(given.headers["x-request-id"]) == 32
    assert client.get("/v1/items/nope", headers={"X-Request-ID": "rid-404"}).json()["request_id"] == "rid-404"


@pytest.fixture
def json_log():
    """JSON log lines of the ``mars`` loggers, as written by ``mars serve`` (MARS_LOG_FORMAT=json)."""
    stream = io.StringIO()
    handler = log_handler("json", stream)
    logger = logging.getLogger("mars")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lambda: [json.loads(line) for line in stream.getvalue().splitlines()]
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def test_access_log_is_one_json_object_per_line(client, json_log):
    client.get("/v1/items/lamp-1", headers={"X-Request-ID": "log-me"})
    client.get("/test-only/boom", headers={"X-Request-ID": "log-boom"})
    lines = json_log()
    [access] = [line for line in lines if line["request_id"] == "log-me"]
    assert access["logger"] == "mars.access" and access["level"] == "INFO" and access["time"].endswith("+00:00")
    assert access["method"] == "GET" and access["path"] == "/v1/items/lamp-1" and access["status"] == 200
    assert access["duration_ms"] >= 0 and access["api_key"] == "open mode"  # the auth layer's key name
    assert access["message"].startswith("GET /v1/items/lamp-1 200")
    boom = [line for line in lines if line["request_id"] == "log-boom"]
    error = next(line for line in boom if line["logger"] == "mars.api")
    assert error["level"] == "ERROR" and "RuntimeError" in error["exc_info"] and "Traceback" in error["exc_info"]
    assert next(line for line in boom if line["logger"] == "mars.access")["status"] == 500


def test_text_log_format_carries_the_request_id():
    stream = io.StringIO()
    logger = logging.getLogger("mars.test-text")
    logger.addHandler(log_handler("text", stream))
    logger.warning("hello")
    assert "WARNING mars.test-text [-] hello" in stream.getvalue()
    with pytest.raises(ValueError, match="json"):
        log_handler("xml")


# --- metrics -----------------------------------------------------------------------------


def test_metrics_request_histogram_and_search_stages(client):
    client.get("/v1/items/nope")
    client.get("/v1/items/lamp-1")
    client.get("/not/a/route/12345")
    search = client.post("/v1/search", json={"text": "a lamp", "mode": "hybrid"})
    assert search.status_code == 200, search.text
    samples = metric_samples(client)
    route = "/v1/items/{item_id}"
    assert sample(samples, "mars_http_request_duration_seconds_count", method="GET", route=route, status="404") >= 1
    assert sample(samples, "mars_http_request_duration_seconds_count", method="GET", route=route, status="200") >= 1
    assert sample(samples, "mars_http_request_duration_seconds_count", method="GET", route="unmatched", status="404") >= 1
    assert not any("12345" in str(key) for key in samples)  # no raw paths as labels
    for stage in search.json()["timings_ms"]:
        assert sample(samples, "mars_search_stage_duration_seconds_count", stage=stage) >= 1, stage
    assert {"bm25", "fuse", "total"} <= set(search.json()["timings_ms"])
    assert sample(samples, "mars_critic_unavailable_total") == 0
    assert sample(samples, "mars_bulk_jobs_waiting") == 0 and sample(samples, "mars_bulk_jobs_running") == 0


def test_unavailable_critics_are_counted(engine):
    from query.funnel import SearchQuery

    result = engine.search(SearchQuery(text="lamp", mode="hybrid"))
    metrics = ApiMetrics.create()
    metrics.observe_search(result.model_copy(update={"critic": result.critic.model_copy(update={"status": "unavailable"})}))
    metrics.observe_search(result)
    assert metrics.registry.get_sample_value("mars_critic_unavailable_total") == 1
    assert metrics.registry.get_sample_value("mars_search_stage_duration_seconds_count", {"stage": "total"}) == 2


def test_queue_depth_gauges_read_redis_on_scrape(client):
    with flushed_redis(BROKER) as redis:
        redis.rpush("embed", "m1", "m2", "m3")
        redis.rpush("critic", "m1")
        samples = metric_samples(client)
    assert sample(samples, "mars_queue_depth", queue="embed") == 3
    assert sample(samples, "mars_queue_depth", queue="critic") == 1
    assert sample(samples, "mars_queue_depth", queue="ingest") == sample(samples, "mars_queue_depth", queue="index") == 0
    assert sample(samples, "mars_queue_depth_scrape_errors_total") == 0


def test_unreachable_redis_skips_the_gauges_and_counts_an_error():
    collector = QueueDepthCollector("redis://127.0.0.1:1/0", ("ingest", "embed"), timeout_s=0.2)
    for expected in (1, 2):
        families = {f.name: f for f in collector.collect()}
        assert "mars_queue_depth" not in families
        assert families["mars_queue_depth_scrape_errors"].samples[0].value == expected


# --- CORS ------------------------------------------------------------------------------------


def test_cors_is_off_by_default_and_on_for_configured_origins(client, engine):
    preflight = {"Origin": "https://shop.example", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    assert "access-control-allow-origin" not in client.options("/v1/search", headers=preflight).headers
    assert "access-control-allow-origin" not in client.get("/healthz", headers={"Origin": "https://shop.example"}).headers
    with make_client(engine, cors_origins="https://shop.example, https://admin.example") as cors:
        allowed = cors.options("/v1/search", headers=preflight)
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "https://shop.example"
        simple = cors.get("/healthz", headers={"Origin": "https://admin.example"})
        assert simple.headers["access-control-allow-origin"] == "https://admin.example"
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
        other = cors.options("/v1/search", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
        assert "access-control-allow-origin" not in cors.get("/healthz", headers={"Origin": "https://evil.example"}).headers


# --- body limits and images --------------------------------------------------------------------------


def test_bulk_body_over_the_limit_is_413_before_reading_it_all(client):
    lines = b"".join(json.dumps({"id": f"x{i}", "title": "t" * 50}).encode() + b"\n" for i in range(100))
    assert len(lines) > 2_000
    declared = assert_problem(client.post("/v1/items:bulk", content=lines, headers={"content-type": "application/x-ndjson"}), 413)
    assert "MARS_MAX_BULK_BYTES" in declared["detail"] and str(len(lines)) in declared["detail"]

    sent = []

    def chunks():  # no Content-Length: the body is streamed and refused once past the limit
        for i in range(0, len(lines), 500):
            sent.append(i)
            yield lines[i:i + 500]

    streamed = client.post("/v1/items:bulk", content=chunks(), headers={"content-type": "application/x-ndjson"})
    assert "over the limit of 2000 bytes" in assert_problem(streamed, 413)["detail"]
    path_spec = client.post("/v1/items:bulk", content=json.dumps({"path": "x" * 3000}).encode(),
                            headers={"content-type": "application/json"})
    assert_problem(path_spec, 413)
    assert client.get("/v1/items/x1").status_code == 404  # nothing was queued


def test_search_body_is_bounded_by_the_image_limit(client):
    big = base64.b64encode(b"\0" * 1_300_000).decode()  # > 200 kB * 4/3 + 1 MB
    assert "search body" in assert_problem(client.post("/v1/search", json={"text": "lamp", "image_base64": big}), 413)["detail"]
    image = client.post("/v1/search", data={"text": "lamp"}, files={"image": ("r.png", b"\0" * 1_300_000, "image/png")})
    assert_problem(image, 413)
    just_over = client.post("/v1/search", data={"text": "lamp"}, files={"image": ("r.png", b"\0" * 200_001, "image/png")})
    assert "over the limit of 200000" in assert_problem(just_over, 413)["detail"]


@pytest.mark.parametrize("width,height,reason", [(100_000, 100_000, "too many pixels"), (5_000, 5_000, "over the limit")])
def test_decompression_bomb_png_is_refused(client, width, height, reason):
    bomb = png_declaring(width, height)
    assert len(bomb) < 100
    upload = client.post("/v1/search", data={"text": "lamp"}, files={"image": ("room.png", bomb, "image/png")})
    assert reason in assert_problem(upload, 422)["detail"]
    as_json = client.post("/v1/search", json={"text": "lamp", "image_base64": base64.b64encode(bomb).decode()})
    assert reason in assert_problem(as_json, 422)["detail"]


def test_room_photo_content_is_sniffed_jpeg_png_webp_only(client):
    for fmt in ("JPEG", "PNG", "WEBP"):
        ok = client.post("/v1/search", data={"text": "lamp"}, files={"image": ("room.bin", image_bytes(fmt), "image/gif")})
        assert ok.status_code == 200 and ok.json()["has_image"], (fmt, ok.text)
    gif = client.post("/v1/search", data={"text": "lamp"}, files={"image": ("room.jpg", image_bytes("GIF"), "image/jpeg")})
    detail = assert_problem(gif, 422)["detail"]
    assert "not a readable image" in detail and "JPEG, PNG, WEBP" in detail


# --- strict request models ------------------------------------------------------------------------


#: Every route with a JSON body: (method, route template) -> (URL, a body that is valid but for the extra field).
JSON_BODIES = {
    ("POST", "/v1/search"): ("/v1/search", {"text": "lamp"}),
    ("POST", "/v1/items:bulk"): ("/v1/items:bulk", {"path": "/nonexistent"}),
    ("POST", "/v1/items"): ("/v1/items", {"id": "strict-1", "title": "A lamp"}),
    ("POST", "/v1/keys"): ("/v1/keys", {"name": "strict", "role": "viewer"}),
    ("POST", "/v1/rules"): ("/v1/rules", {"kind": "pin", "product_id": "lamp-1", "position": 1}),
    ("PATCH", "/v1/rules/{rule_id}"): ("/v1/rules/1", {"active": False}),
}


def test_every_json_endpoint_rejects_unknown_fields(client):
    json_routes = {
        (method, route.path) for route in client.app.routes for method in getattr(route, "methods", ()) or ()
        if method in ("POST", "PUT", "PATCH")
    }
    assert json_routes <= JSON_BODIES.keys(), f"add a strictness case for {json_routes - JSON_BODIES.keys()}"
    for (method, route), (url, body) in JSON_BODIES.items():
        if (method, route) not in json_routes:
            continue  # a route of another module that this app does not have
        problem = assert_problem(client.request(method, url, json={**body, "unexpected_field": 1}), 422)
        assert "unexpected_field" in problem["detail"], (route, problem)
    multipart = client.post("/v1/search", data={"text": "lamp", "unexpected_field": "1"},
                            files={"image": ("room.png", image_bytes("PNG"), "image/png")})
    assert assert_problem(multipart, 422)["errors"][0]["loc"] == ["unexpected_field"]
    assert client.get("/v1/items/strict-1").status_code == 404
