"""A fresh PostgreSQL database per use, on the machine's server (127.0.0.1:5432, trust auth):
shared by the catalog and the worker tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest

from workers.local import scratch_database

ADMIN_URL = os.environ.get("MARS_TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
START_HINT = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


@contextmanager
def fresh_database() -> Iterator[str]:
    """Create a uniquely named PostgreSQL database, yield its SQLAlchemy URL, drop it; a clear
    failure with the start command when the server is not reachable."""
    try:
        psycopg.connect(ADMIN_URL, connect_timeout=5).close()
    except psycopg.OperationalError as exc:
        pytest.fail(f"PostgreSQL is not reachable at {ADMIN_URL} ({exc}).\nStart it with: {START_HINT}", pytrace=False)
    with scratch_database(ADMIN_URL, "mars_test") as url:
        yield url
