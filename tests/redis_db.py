"""A flushed Redis database per use, on the machine's server (127.0.0.1:6379): shared by the
worker tests (each uses its own database number)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import redis

START_HINT = ('redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no '
              "--dir /var/lib/redis --logfile /var/log/redis/ci.log")


@contextmanager
def flushed_redis(url: str) -> Iterator[redis.Redis]:
    """Flush the Redis database at ``url``, yield a client of it, flush it again on the way out;
    a clear failure with the start command when the server is not reachable."""
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis is not reachable at {url} ({exc}); start it with: {START_HINT}", pytrace=False)
    try:
        yield client
    finally:
        client.flushdb()
