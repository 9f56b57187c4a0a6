"""Request bodies read with a size limit: at most ``limit + 1`` bytes are ever held.

A declared ``Content-Length`` over the limit is refused before anything is read; a body
without one (chunked) is streamed and refused as soon as it passes the limit. Either way the
answer is 413 Content Too Large (RFC 9110 section 15.5.14) as a problem body.
"""

from __future__ import annotations

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
