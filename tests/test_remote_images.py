"""RemoteImageFetcher against a real loopback HTTP server (http.server in a thread)."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from ingestion.images import InvalidImage
from ingestion.remote import RemoteImageFetcher, is_remote


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 40, 40)).save(buf, "JPEG")
    return buf.getvalue()


def _bomb() -> bytes:
    """A valid PNG of 8000x8000 one-bit pixels: a few KB on the wire, 64 Mpx decoded."""
    buf = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buf, "PNG")
    return buf.getvalue()


JPEG = _jpeg()
BOMB = _bomb()
LIMIT = 1_000_000
CHUNK = b"\0" * 65536


class _Handler(BaseHTTPRequestHandler):
    """HTTP/1.0 handler: each response closes its connection; routes keyed by path."""

    server: "_Server"

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes = b"", ctype: str = "image/jpeg", headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, total: int, declared: int | None, pause_s: float = 0.0, chunk: bytes = CHUNK) -> None:
        """Write ``total`` bytes in chunks until done or the client hangs up (recorded)."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        if declared is not None:
            self.send_header("Content-Length", str(declared))
        self.end_headers()
        sent = 0
        try:
            while sent < total:
                self.wfile.write(chunk)
                self.wfile.flush()
                sent += len(chunk)
                if pause_s:
                    time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):
            self.server.hung_up.add(self.path)
        self.server.sent[self.path] = sent

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        with self.server.lock:
            self.server.hits[self.path] += 1
            n = self.server.hits[self.path]
        path = self.path
        if path == "/good.jpg":
            self._send(200, JPEG)
        elif path == "/good-as-text":
            self._send(200, JPEG, ctype="text/plain")
        elif path == "/redirect.jpg":
            self._send(302, headers={"Location": "/good.jpg"})
        elif path == "/loop":
            self._send(302, headers={"Location": "/loop"})
        elif path == "/missing.jpg":
            self._send(404, b"not found", ctype="text/plain")
        elif path == "/forbidden.jpg":
            self._send(403, b"forbidden", ctype="text/plain")
        elif path == "/flaky.jpg":
            self._send(503, b"busy", ctype="text/plain") if n == 1 else self._send(200, JPEG)
        elif path == "/rate-limited.jpg":
            self._send(429, b"slow down", "text/plain", {"Retry-After": "0"}) if n == 1 else self._send(200, JPEG)
        elif path == "/down.jpg":
            self._send(503, b"down", ctype="text/plain")
        elif path == "/slow.jpg":
            time.sleep(0.6)
            try:
                self._send(200, JPEG)
            except (BrokenPipeError, ConnectionResetError):
                self.server.hung_up.add(path)
        elif path == "/big-declared.jpg":
            self._stream(2_000_000, declared=2_000_000)
        elif path == "/big-streamed.jpg":
            self._stream(50_000_000, declared=None)
        elif path == "/trickle.jpg":
            self._stream(1000, declared=1000, pause_s=0.1, chunk=b"\0" * 10)
        elif path == "/not-image.jpg":
            self._send(200, b"<html><body>this is not a picture</body></html>")
        elif path == "/bomb.png":
            self._send(200, BOMB, ctype="image/png")
        else:
            self._send(404, b"no route", ctype="text/plain")


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.hits: Counter[str] = Counter()
        self.sent: dict[str, int] = {}
        self.hung_up: set[str] = set()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture(scope="module")
def server():
    srv = _Server()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def sleeps() -> list[float]:
    return []


@pytest.fixture
def fetcher(server, sleeps):
    server.hits.clear()
    with RemoteImageFetcher(
        max_bytes=LIMIT,
        max_pixels=LIMIT,
        connect_timeout_s=1.0,
        read_timeout_s=0.2,
        total_timeout_s=5.0,
        retries=2,
        backoff_s=0.01,
        max_backoff_s=0.05,
        sleep=sleeps.append,
    ) as f:
        yield f


def test_good_image_is_returned_whatever_the_content_type(fetcher, server, sleeps):
    assert fetcher.fetch(f"{server.base}/good.jpg") == JPEG
    assert fetcher.fetch(f"{server.base}/good-as-text") == JPEG
    assert fetcher.fetch(f"{server.base}/redirect.jpg") == JPEG
    assert server.hits["/good.jpg"] == 2 and not sleeps


@pytest.mark.parametrize("path,status", [("/missing.jpg", 404), ("/forbidden.jpg", 403)])
def test_final_statuses_are_not_retried(fetcher, server, sleeps, path, status):
    url = f"{server.base}{path}"
    with pytest.raises(InvalidImage) as info:
        fetcher.fetch(url)
    assert str(info.value) == f"HTTP {status} from {url}"
    assert server.hits[path] == 1 and not sleeps


def test_transient_statuses_are_retried_with_exponential_backoff(fetcher, server, sleeps):
    assert fetcher.fetch(f"{server.base}/flaky.jpg") == JPEG
    assert server.hits["/flaky.jpg"] == 2 and sleeps == [0.01]
    assert fetcher.fetch(f"{server.base}/rate-limited.jpg") == JPEG  # 429 with Retry-After: 0
    assert server.hits["/rate-limited.jpg"] == 2
    sleeps.clear()
    url = f"{server.base}/down.jpg"
    with pytest.raises(InvalidImage) as info:
        fetcher.fetch(url)
    assert str(info.value) == f"still failing after 2 retries: HTTP 503 from {url}"
    assert server.hits["/down.jpg"] == 3 and sleeps == [0.01, 0.02]


def test_delay_grows_doubles_honours_retry_after_and_is_capped(fetcher):
    assert [fetcher.delay_s(i) for i in range(4)] == [0.01, 0.02, 0.04, 0.05]
    assert fetcher.delay_s(0, retry_after_s=0.03) == 0.03
    assert fetcher.delay_s(0, retry_after_s=120) == 0.05


def test_read_timeout_is_retried_then_reported(fetcher, server, sleeps):
    with pytest.raises(InvalidImage, match=r"^timed out after 2 retries: ReadTimeout on GET http://127\.0\.0\.1:\d+/slow\.jpg$"):
        fetcher.fetch(f"{server.base}/slow.jpg")
    assert server.hits["/slow.jpg"] == 3 and sleeps == [0.01, 0.02]


def test_connection_refused_is_retried_then_reported(fetcher, sleeps):
    with socket.socket() as sock:  # a port that was free a moment ago and has no listener now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(InvalidImage, match=r"^connection failed after 2 retries: ConnectError on GET"):
        fetcher.fetch(f"http://127.0.0.1:{port}/x.jpg")
    assert sleeps == [0.01, 0.02]


def test_declared_oversized_body_is_refused_before_reading(fetcher, server, sleeps):
    url = f"{server.base}/big-declared.jpg"
    with pytest.raises(InvalidImage) as info:
        fetcher.fetch(url)
    assert str(info.value) == f"image over {LIMIT} bytes (Content-Length 2000000) from {url}"
    assert server.hits["/big-declared.jpg"] == 1 and not sleeps


def test_undeclared_oversized_body_stops_reading_at_the_limit(fetcher, server, sleeps):
    url = f"{server.base}/big-streamed.jpg"
    started = time.perf_counter()
    with pytest.raises(InvalidImage) as info:
        fetcher.fetch(url)
    assert str(info.value) == f"image over {LIMIT} bytes from {url} (stopped reading)"
    assert time.perf_counter() - started < 3
    assert server.hits["/big-streamed.jpg"] == 1 and not sleeps
    deadline = time.monotonic() + 5
    while "/big-streamed.jpg" not in server.sent and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "/big-streamed.jpg" in server.hung_up and server.sent["/big-streamed.jpg"] < 50_000_000


def test_download_deadline_bounds_a_trickling_server(server, sleeps):
    with RemoteImageFetcher(read_timeout_s=1.0, total_timeout_s=0.3, sleep=sleeps.append) as fetcher:
        url = f"{server.base}/trickle.jpg"
        with pytest.raises(InvalidImage, match=r"took over 0\.3 s"):
            fetcher.fetch(url)
    assert not sleeps


def test_non_image_body_is_rejected_despite_its_content_type(fetcher, server, sleeps):
    with pytest.raises(InvalidImage, match=r"^image from http://\S+/not-image\.jpg is not a readable image"):
        fetcher.fetch(f"{server.base}/not-image.jpg")
    assert server.hits["/not-image.jpg"] == 1 and not sleeps


def test_decompression_bomb_is_rejected_by_its_header(fetcher, server, sleeps):
    assert len(BOMB) < 50_000
    started = time.perf_counter()
    with pytest.raises(InvalidImage, match=r"has 8000x8000 pixels, over the limit of 1000000"):
        fetcher.fetch(f"{server.base}/bomb.png")
    assert time.perf_counter() - started < 1
    assert server.hits["/bomb.png"] == 1 and not sleeps


def test_other_http_errors_and_bad_urls_are_final(fetcher, server, sleeps):
    with pytest.raises(InvalidImage, match=r"failed: TooManyRedirects"):
        fetcher.fetch(f"{server.base}/loop")
    assert server.hits["/loop"] == 6  # the request and 5 redirects
    with pytest.raises(InvalidImage, match="not an http"):
        fetcher.fetch("file:///etc/passwd")
    assert not sleeps
    assert is_remote("HTTPS://x/y.jpg") and not is_remote("/tmp/y.jpg") and not is_remote(None)


def test_constructor_validates_its_limits():
    for bad in ({"max_bytes": 0}, {"read_timeout_s": 0}, {"retries": -1}):
        with pytest.raises(ValueError):
            RemoteImageFetcher(**bad)
