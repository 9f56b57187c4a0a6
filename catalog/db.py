"""Catalog engine, sessions and Alembic migrations applied on start."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, make_url, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"

#: Key of the PostgreSQL advisory lock held while migrations run, so that API and worker
#: processes starting together on one database apply them one at a time.
MIGRATION_LOCK_KEY = 0x4D415253  # "MARS"


def alembic_config(url: str) -> Config:
    """An Alembic :class:`Config` for ``url`` pointing at the project's ``migrations/``.

    The URL goes in ``cfg.attributes["url"]``, which ``migrations/env.py`` prefers to
    ``MARS_DATABASE_URL`` and ``alembic.ini`` (and which, unlike an ini option, needs no
    ``%`` escaping for percent-encoded passwords).
    """
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["url"] = url
    return cfg


def make_engine(url: str) -> Engine:
    """Create the SQLAlchemy engine; SQLite files get foreign keys and WAL journaling,
    server databases (PostgreSQL via ``postgresql+psycopg://``) a pre-ping of pooled
    connections, so a restarted database costs one retry instead of a failed request.

    Raises:
        sqlalchemy.exc.ArgumentError: if ``url`` is not a valid SQLAlchemy URL.
    """
    is_sqlite = make_url(url).get_backend_name() == "sqlite"
    engine = create_engine(url) if is_sqlite else create_engine(url, pool_pre_ping=True)
    if engine.dialect.name == "sqlite":
        if engine.url.database and engine.url.database != ":memory:":
            Path(engine.url.database).parent.mkdir(parents=True, exist_ok=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record):  # noqa: ANN001 - DB-API objects
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

    return engine


def upgrade_to_head(engine: Engine) -> None:
    """Apply every pending Alembic migration to the catalog behind ``engine``.

    On PostgreSQL a transaction-scoped advisory lock serialises concurrent callers (several
    replicas starting at once); the later ones find the schema at head and do nothing.
    """
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, "head")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """A ``sessionmaker`` bound to ``engine`` that keeps objects usable after commit."""
    return sessionmaker(engine, expire_on_commit=False)
