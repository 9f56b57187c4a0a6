"""SQLAlchemy 2.x models of the catalog (created by the first Alembic revision).

Tables: ``products``, ``categories`` (a two-level tree: a coarse *class* parent such as
"rug" over fine-grained *type* leaves such as "Rug, flatwoven"), ``category_synonyms``,
``product_categories``, ``ingest_jobs`` and ``rejected_records``.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> datetime:
    """Timezone-aware current UTC time (stored by every timestamp column)."""
    return datetime.now(timezone.utc)


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
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

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
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RejectedRecord(Base):
    """A record that failed validation, with its reason and the raw input (as JSON)."""

    __tablename__ = "rejected_records"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("ingest_jobs.id", ondelete="SET NULL"), index=True)
    source: Mapped[str] = mapped_column(String(2048))
    position: Mapped[int] = mapped_column(Integer)  # 1-based line/row number in the source
    record_id: Mapped[str | None] = mapped_column(String(128), nullable=True)
    reason: Mapped[str] = mapped_column(Text)
    raw: Mapped[Any] = mapped_column(JSON, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
