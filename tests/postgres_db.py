"""A fresh PostgreSQL database per use, on the machine's server (127.0.0.1:5432, trust auth):
shared by the catalog and the worker tests."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg import sql

ADMIN_URL = os.environ.get("MARS_TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
START_HINT = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"


def _admin_connection() -> psycopg.Connection:
    try:
        return psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL is not reachable at {ADMIN_URL} ({exc}).\n"
            f"Start it with: {START_HINT}",
            pytrace=False,
        )


def _drop_stale_databases(admin: psycopg.Connection) -> None:
    """Drop ``mars_test_<pid>_*`` databases left by killed runs on this host (their pid is gone)."""
    host = psycopg.conninfo.conninfo_to_dict(ADMIN_URL).get("host", "")
    if host not in ("", "127.0.0.1", "localhost", "::1") and not host.startswith("/"):
        return  # a shared server: other hosts' pids mean nothing here
    for (name,) in admin.execute("SELECT datname FROM pg_database WHERE datname LIKE 'mars\\_test\\_%'").fetchall():
        match = re.fullmatch(r"mars_test_(\d+)_[0-9a-f]{8}", name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        except PermissionError:
            continue  # alive, another user's


@contextmanager
def fresh_database() -> Iterator[str]:
    """Create a uniquely named PostgreSQL database, yield its SQLAlchemy URL, drop it."""
    name = f"mars_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    with _admin_connection() as admin:
        _drop_stale_databases(admin)
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    admin_info = psycopg.conninfo.conninfo_to_dict(ADMIN_URL)
    user = admin_info.get("user", "postgres")
    host, port = admin_info.get("host", "127.0.0.1"), admin_info.get("port", "5432")
    try:
        yield f"postgresql+psycopg://{user}@{host}:{port}/{name}"
    finally:
        with _admin_connection() as admin:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
