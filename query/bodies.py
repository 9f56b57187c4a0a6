"""Request bodies read with a size limit: at most ``limit + 1`` bytes are ever held.

A declared ``Content-Length`` over the limit is refused before anything is read; a body
without one (chunked) is streamed and refused as soon as it passes the limit. Either way the
answer is 413 Content Too Large (RFC 9110 section 15.5.14) as a problem body.
"""

from __future__ import annotations

import base64
import hashlib
import threading

from cachetools import LRUCache
from fastapi import HTTPException, Request
from starlette.types import Message, Receive


async def read_body(request: Request, limit: int, what: str = "request body", setting: str | None = None) -> bytes:
    """The body of ``request`` if it is at most ``limit`` bytes.

    Raises:
        HTTPException: 413 when the body is (or declares to be) larger than ``limit``.
    """
    hint = f" ({setting})" if setting else ""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"{what} is {int(declared)} bytes, over the limit of {limit}{hint}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"{what} is over the limit of {limit} bytes{hint}")
        chunks.append(chunk)
    return b"".join(chunks)


def replay(body: bytes) -> Receive:
    """An ASGI ``receive`` that hands over ``body`` already read, to parse it again (e.g. as a form)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


def photo_digest(data: bytes) -> str:
    """The key of an uploaded photo in the funnel's region cache: ``"sha256:<hex>"`` of its bytes
    (set as ``image.info["mars_digest"]``, :meth:`query.query_vectors.QueryVectors.region_key`)."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Base64Photos:
    """Decodes base64 photos (``image_base64`` of ``POST /v1/search``), remembering the most
    recent ones: a photo sent again (a merchandiser refining a search for the same room) is
    recognised by the SHA-256 of its base64 text and neither decoded nor hashed again.

    Decoding is a pure function of the text, so nothing here ever goes stale. At most
    ``max_bytes`` of decoded photos are kept, least recently used dropped first.

    Args:
        max_bytes: the memory bound (decoded bytes); 0 keeps nothing.
    """

    def __init__(self, max_bytes: int = 32_000_000) -> None:
        self.max_bytes = max_bytes
        self._photos: LRUCache[bytes, tuple[bytes, str]] = LRUCache(max(max_bytes, 1), getsizeof=lambda e: len(e[0]))
        self._lock = threading.Lock()

    def decode(self, text: str) -> tuple[bytes, str]:
        """The photo's bytes and their digest (``"sha256:<hex>"``, the key of the funnel's
        region cache).

        Raises:
            ValueError: ``text`` is not strict base64 (``binascii.Error`` is a ValueError).
        """
        key = hashlib.sha256(text.encode("ascii")).digest()  # non-ASCII: UnicodeEncodeError, a ValueError
        with self._lock:
            hit = self._photos.get(key)
            if hit is not None:
                return hit
        data = base64.b64decode(text, validate=True)
        entry = (data, photo_digest(data))
        if len(data) <= self.max_bytes:
            with self._lock:
                self._photos.setdefault(key, entry)
        return entry
