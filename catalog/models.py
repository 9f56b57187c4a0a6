"""SQLAlchemy 2.x models of the catalog (created by the first Alembic revision).

Tables: ``products``, ``categories`` (a two-level tree: a coarse *class* parent such as
"rug" over fine-grained *type* leaves such as "Rug, flatwoven"), ``category_synonyms``,
``product_categories``, ``ingest_jobs``, ``ingest_job_items``, ``rejected_records``,
``api_keys`` (hashed API keys with their roles, :mod:`catalog.api_keys`) and ``merch_rules``
(merchandising rules: pins, boosts, buries, synonyms; :mod:`catalog.rules`).

The same models and migrations serve SQLite (embedded mode) and PostgreSQL (server mode,
``postgresql+psycopg://``); the differences between the two are handled here:

- timestamps use :class:`UTCDateTime`, so both return timezone-aware UTC datetimes (SQLite
  drops the offset, PostgreSQL returns the session's time zone);
- ``sa.JSON`` is ``json`` on PostgreSQL (not ``jsonb``: it keeps a rejected record's raw
  input verbatim, ``\u0000`` escapes included, which ``jsonb`` refuses);
- PostgreSQL enforces ``VARCHAR(n)`` lengths and refuses NUL characters in text, SQLite does
  neither: the diagnostic fields of :class:`RejectionRow` and :class:`IngestJob` are
  made storable on both (see :func:`storable_text`); product fields are bounded by the
  ingestion validation (``ingestion.records.ProductRecord``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Boolean, CheckConstraint, DateTime, Dialect, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, validates
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    """Timezone-aware current UTC time (stored by every timestamp column)."""
    return datetime.now(timezone.utc)


def iso_or_none(t: datetime | None) -> str | None:
    """``t`` as an ISO 8601 string for JSON, or None."""
    return t.isoformat() if t is not None else None


class UTCDateTime(TypeDecorator[datetime]):
    """``DateTime(timezone=True)`` that stores UTC and always reads back aware UTC datetimes.

    SQLite keeps no offset (it would store an aware value's local wall time and read it back
    naive); PostgreSQL's ``timestamptz`` reads back in the session's ``TimeZone``. Values are
    converted to UTC before they are written, and tagged/converted to UTC when read, so the
    two dialects agree. A naive datetime is taken to be UTC already.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    @staticmethod
    def _as_utc(value: datetime | None) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert ``value`` to aware UTC before it is written."""
        return self._as_utc(value)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Return the stored value as an aware UTC datetime."""
        return self._as_utc(value)


def storable_text(value: str | None, max_length: int | None = None) -> str | None:
    """``value`` made storable on every catalog dialect: NUL characters written as ``\\x00``
    (PostgreSQL refuses them in text) and, with ``max_length``, clipped to the column's length
    with a trailing ``…`` (PostgreSQL enforces ``VARCHAR(n)``, SQLite does not).

    Only for diagnostic fields (why a record was rejected, where it came from), never for
    catalog data, which must be validated instead of altered.
    """
    if value is None:
        return None
    value = value.replace("\x00", "\\x00")
    if max_length is not None and len(value) > max_length:
        value = value[: max_length - 1] + "…"
    return value


class Base(DeclarativeBase):
    """Declarative base of every catalog table."""


class Product(Base):
    """One catalog item; ``content_hash`` (sha256 hex) decides whether it must be re-embedded."""

    __tablename__ = "products"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    title: Mapped[str] = mapped_column(String(512), default="")
    text: Mapped[str] = mapped_column(Text, default="")
    type: Mapped[str] = mapped_column(String(256), default="", index=True)
    colour: Mapped[str] = mapped_column(String(256), default="")
    size: Mapped[str] = mapped_column(String(128), default="")
    image: Mapped[str | None] = mapped_column(String(2048), nullable=True)
    attributes: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    content_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    categories: Mapped[list["Category"]] = relationship(secondary="product_categories", lazy="selectin")


class Category(Base):
    """A node of the category tree.

    ``key`` is stable and readable: ``"rug"`` for a class, ``"rug/rug-flatwoven"`` for a type
    leaf; it is what the indexes store in their category fields.
    """

    __tablename__ = "categories"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    key: Mapped[str] = mapped_column(String(300), unique=True)
    name: Mapped[str] = mapped_column(String(256))
    level: Mapped[str] = mapped_column(String(16))  # "class" or "type"
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("categories.id"), nullable=True, index=True)

    parent: Mapped["Category | None"] = relationship(remote_side=[id], lazy="joined")
    synonyms: Mapped[list["CategorySynonym"]] = relationship(
        back_populates="category", cascade="all, delete-orphan", lazy="selectin"
    )


class CategorySynonym(Base):
    """Another surface form of a category's name (plural/singular), lower-case."""

    __tablename__ = "category_synonyms"
    __table_args__ = (UniqueConstraint("category_id", "phrase"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id", ondelete="CASCADE"), index=True)
    phrase: Mapped[str] = mapped_column(String(256))

    category: Mapped[Category] = relationship(back_populates="synonyms")


class ProductCategory(Base):
    """Association of a product with its type leaf (its class follows from the tree)."""

    __tablename__ = "product_categories"

    product_id: Mapped[str] = mapped_column(ForeignKey("products.id", ondelete="CASCADE"), primary_key=True)
    category_id: Mapped[int] = mapped_column(ForeignKey("categories.id", ondelete="CASCADE"), primary_key=True)


class IngestJob(Base):
    """One run of ``mars ingest`` (or an API bulk job) with its counts."""

    __tablename__ = "ingest_jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    source: Mapped[str] = mapped_column(String(2048))
    status: Mapped[str] = mapped_column(String(32), default="running")  # running|done|failed
    total: Mapped[int] = mapped_column(Integer, default=0)
    ingested: Mapped[int] = mapped_column(Integer, default=0)
    unchanged: Mapped[int] = mapped_column(Integer, default=0)
    rejected: Mapped[int] = mapped_column(Integer, default=0)
    without_image: Mapped[int] = mapped_column(Integer, default=0)
    items_per_s: Mapped[float | None] = mapped_column(Float, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    @validates("error")
    def _storable_error(self, _key: str, value: str | None) -> str | None:
        return storable_text(value)


class JobItem(Base):
    """Where one record of a queued ingest job stands; the job's progress counts are counts of
    these rows by ``status`` (``queued`` → ``embedded`` → ``indexed``, or ``unchanged`` /
    ``rejected``). One row per (job, position): a task that runs again after a worker died
    overwrites its rows, so the counts never double."""

    __tablename__ = "ingest_job_items"

    job_id: Mapped[int] = mapped_column(ForeignKey("ingest_jobs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    product_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    has_image: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)

    @validates("product_id")
    def _storable_id(self, _key: str, value: str | None) -> str | None:
        return storable_text(value, 128)


class RejectionRow(Base):
    """A record that failed validation, with its reason and the raw input (as JSON)."""

    __tablename__ = "rejected_records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("ingest_jobs.id", ondelete="SET NULL"), index=True)
    source: Mapped[str] = mapped_column(String(2048))
    position: Mapped[int] = mapped_column(Integer)  # 1-based line/row number in the source
    record_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    raw: Mapped[Any] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    @validates("source", "record_id", "reason")
    def _storable_diagnostics(self, key: str, value: str | None) -> str | None:
        # the id of a rejected record is untrusted input: it may be longer than any valid id
        length = getattr(self.__table__.c[key].type, "length", None)
        return storable_text(value, length)


class ApiKey(Base):
    """An API key of the HTTP API (:mod:`query.auth`); the secret itself is never stored.

    ``hash`` is the SHA-256 hex digest of the whole key and ``prefix`` its first characters,
    shown in listings so that a key can be recognised without revealing it (see
    :mod:`catalog.api_keys` for the format and why a fast hash is right for random keys).
    ``role`` is ``viewer``, ``editor`` or ``admin``. A revoked key (``revoked_at`` set) stays
    listed; ``last_used_at`` is refreshed at most once a minute by the API.
    """

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("role IN ('viewer', 'editor', 'admin')", name="ck_api_keys_role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class MerchRule(Base):
    """A merchandising rule applied by the search funnel (:mod:`query.rules` says how).

    ``kind`` and the fields it uses (the others stay NULL; :func:`catalog.rules.check_rule`
    enforces it):

    * ``pin``: ``product_id`` at ``position`` (1-based) of the ranked list;
    * ``boost`` / ``bury``: ``product_id`` or ``brand`` (matched case-insensitively against
      ``products.attributes["brand"]``), fused score multiplied by ``factor`` (> 1 for a boost,
      between 0 and 1 for a bury);
    * ``synonym``: whole-word ``term`` in the query text replaced by ``replacement`` before
      BM25 and the text vector.

    Scope: ``category`` (a category key; the rule applies to searches locked to it or, for a
    class, to one of its types) and ``query_pattern`` (a phrase matched case-insensitively as
    whole words in the query text); NULL means anywhere. Inactive rules (``active`` false) are
    kept but never applied. ``created_by`` is the name of the API key that created the rule
    (None from the CLI). ``product_id`` is no foreign key: deleting a product leaves its rules
    listed, and they match nothing until the product comes back.
    """

    __tablename__ = "merch_rules"
    __table_args__ = (
        CheckConstraint("kind IN ('pin', 'boost', 'bury', 'synonym')", name="ck_merch_rules_kind"),
        CheckConstraint("position IS NULL OR position >= 1", name="ck_merch_rules_position"),
        CheckConstraint("factor IS NULL OR factor > 0", name="ck_merch_rules_factor"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16))
    product_id: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    brand: Mapped[str | None] = mapped_column(String(256), nullable=True)
    position: Mapped[int | None] = mapped_column(Integer, nullable=True)
    factor: Mapped[float | None] = mapped_column(Float, nullable=True)
    term: Mapped[str | None] = mapped_column(String(200), nullable=True)
    replacement: Mapped[str | None] = mapped_column(String(500), nullable=True)
    category: Mapped[str | None] = mapped_column(String(300), nullable=True)
    query_pattern: Mapped[str | None] = mapped_column(String(200), nullable=True)
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
