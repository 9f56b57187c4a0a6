"""Fetching product images given by http(s) URL, with the same limits as local files.

One :class:`RemoteImageFetcher` holds one ``httpx.Client`` (connection pooling, keep-alive)
for a whole ingest run. Per URL it enforces:

* connect and read timeouts (``httpx.Timeout``; the read timeout bounds the wait for
  each chunk) and an overall deadline for one download;
* a byte limit: a ``Content-Length`` over the limit is refused before the body is read,
  and the body is counted while streaming, reading stops as soon as it passes the limit
  (this also covers chunked responses and compressed bodies: decoded bytes are counted);
* content sniffing and the pixel limit: the bytes must decode as an image with
  :func:`ingestion.images.decode_image`, whatever ``Content-Type`` claims;
* retries with exponential backoff for transient failures only: connection errors,
  timeouts, and HTTP 429/502/503/504 (``Retry-After`` in seconds is honoured up to the
  backoff cap). Any other status (404, 403, ...), an oversized or undecodable body is
  final at once.

Every failure is raised as :class:`ingestion.images.InvalidImage` whose message is the
reason shown to the user, e.g. ``"HTTP 404 from https://..."``,
``"image over 1000000 bytes (Content-Length 2000000) from https://..."``,
``"timed out after 2 retries: ReadTimeout on GET https://..."``.

Retry policy: retries only for transient errors (Celery's and the AWS SDKs' convention); status codes per
RFC 9110 (502/503/504) and RFC 6585 (429, ``Retry-After``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import httpx

from ingestion.images import InvalidImage, decode_image

if TYPE_CHECKING:
    from mars.settings import Settings

#: HTTP statuses worth retrying: rate limited, bad gateway, unavailable, gateway timeout.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})


def is_remote(image: str | None) -> bool:
    """Whether an image reference is an http(s) URL (as opposed to a local path or None)."""
    return bool(image) and image.lower().startswith(("http://", "https://"))


class _Transient(Exception):
    """A failure worth retrying; ``kind`` starts the final message ("timed out", ...)."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


def _retry_after_s(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "").strip()
    return float(value) if value.isdigit() else None


class RemoteImageFetcher:
    """Downloads images over http(s) with limits, sniffing and transient-only retries.

    Args:
        max_bytes: largest body accepted, in bytes (decoded), like ``MARS_MAX_IMAGE_BYTES``.
        max_pixels: largest width*height accepted, like ``MARS_MAX_IMAGE_PIXELS``.
        connect_timeout_s: seconds to establish a connection.
        read_timeout_s: seconds to wait for each chunk of the response.
        total_timeout_s: seconds one download (one attempt) may take in all; exceeding it
            is final (not retried), so a server that trickles bytes cannot stall an ingest.
        retries: how many times a transient failure is retried (attempts = retries + 1).
        backoff_s: delay before the first retry, in seconds; doubled for each further one.
        max_backoff_s: cap of a single delay, in seconds (also caps ``Retry-After``).
        max_redirects: redirects followed per request.
        user_agent: the ``User-Agent`` header sent.
        transport: an ``httpx`` transport to use instead of the network (tests, proxies).
        sleep: function used to wait between attempts (``time.sleep``; replaceable in tests).

    Raises:
        ValueError: a limit, timeout or retry count is out of range.
    """

    def __init__(
        self,
        *,
        max_bytes: int = 20_000_000,
        max_pixels: int = 40_000_000,
        connect_timeout_s: float = 5.0,
        read_timeout_s: float = 10.0,
        total_timeout_s: float = 60.0,
        retries: int = 2,
        backoff_s: float = 0.5,
        max_backoff_s: float = 8.0,
        max_redirects: int = 5,
        user_agent: str = "mars-ingest/0.1 (+image fetcher)",
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if max_bytes < 1 or max_pixels < 1:
            raise ValueError("max_bytes and max_pixels must be positive")
        if min(connect_timeout_s, read_timeout_s, total_timeout_s) <= 0:
            raise ValueError("timeouts must be positive")
        if retries < 0 or backoff_s < 0 or max_backoff_s < 0 or max_redirects < 0:
            raise ValueError("retries, backoff_s, max_backoff_s and max_redirects must not be negative")
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels
        self.total_timeout_s = total_timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._sleep = sleep
        self._client = httpx.Client(
            timeout=httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=read_timeout_s, pool=connect_timeout_s),
            follow_redirects=True,
            max_redirects=max_redirects,
            headers={"User-Agent": user_agent, "Accept": "image/*"},
            transport=transport,
        )

    def delay_s(self, retry: int, retry_after_s: float | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (0-based): ``backoff_s * 2**retry``,
        at least ``retry_after_s`` when the server sent one, at most ``max_backoff_s``."""
        delay = self.backoff_s * (2**retry)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        return min(delay, self.max_backoff_s)

    def fetch(self, url: str) -> bytes:
        """Download the image at ``url`` and return its bytes once they decode as an image
        within ``max_pixels``.

        Raises:
            InvalidImage: not an http(s) URL; a final HTTP status ("HTTP 404 from <url>");
                a transient failure still failing after ``retries`` retries ("timed out
                after 2 retries: ...", "connection failed after 2 retries: ...", "still
                failing after 2 retries: HTTP 503 from <url>"); a body over ``max_bytes`` ("image over N bytes ..."); a download
                over ``total_timeout_s``; a body that is not a readable image or has too
                many pixels; any other ``httpx`` error (too many redirects, bad URL, ...).
        """
        if not is_remote(url):
            raise InvalidImage(f"not an http(s) URL: {url!r}")
        retry = 0
        while True:
            try:
                data = self._get_once(url)
                break
            except _Transient as exc:
                if retry >= self.retries:
                    raise InvalidImage(f"{exc.kind} after {retry} retries: {exc.detail}") from exc
                self._sleep(self.delay_s(retry, exc.retry_after))
                retry += 1
        decode_image(data, max_pixels=self.max_pixels, what=f"image from {url}")
        return data

    def _get_once(self, url: str) -> bytes:
        deadline = time.monotonic() + self.total_timeout_s
        try:
            with self._client.stream("GET", url) as response:
                status = response.status_code
                if status in TRANSIENT_STATUSES:
                    raise _Transient("still failing", f"HTTP {status} from {url}", _retry_after_s(response))
                if not 200 <= status < 300:
                    raise InvalidImage(f"HTTP {status} from {url}")
                length = response.headers.get("content-length", "").strip()
                if length.isdigit() and int(length) > self.max_bytes:
                    raise InvalidImage(f"image over {self.max_bytes} bytes (Content-Length {length}) from {url}")
                body = bytearray()
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) > self.max_bytes:
                        raise InvalidImage(f"image over {self.max_bytes} bytes from {url} (stopped reading)")
                    if time.monotonic() > deadline:
                        raise InvalidImage(f"download from {url} took over {self.total_timeout_s:g} s")
                return bytes(body)
        except httpx.TimeoutException as exc:
            raise _Transient("timed out", f"{exc.__class__.__name__} on GET {url}") from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise _Transient("connection failed", f"{exc.__class__.__name__} on GET {url}: {exc}") from exc
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise InvalidImage(f"GET {url} failed: {exc.__class__.__name__}: {exc}") from exc

    @classmethod
    def from_settings(cls, settings: "Settings") -> "RemoteImageFetcher":
        """The fetcher the settings describe: ``MARS_MAX_IMAGE_BYTES`` / ``_PIXELS``, read timeout
        ``MARS_IMAGE_FETCH_TIMEOUT_S`` (connect: half of it), ``MARS_IMAGE_FETCH_RETRIES``."""
        return cls(
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            connect_timeout_s=settings.image_fetch_timeout_s / 2,
            read_timeout_s=settings.image_fetch_timeout_s,
            retries=settings.image_fetch_retries,
        )

    def close(self) -> None:
        """Close the HTTP client and its pooled connections."""
        self._client.close()

    def __enter__(self) -> "RemoteImageFetcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
