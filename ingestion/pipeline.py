"""The upsert pipeline: validate → hash → (re-)embed what changed → index → commit the catalog.

Per batch, the indexes are written before the catalog commit, so a crash between the two
leaves the catalog's old hash in place and the next run re-embeds those items. An item
whose hash is unchanged *and* whose point exists in the vector store is skipped.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from catalog.category_head import ATTRIBUTE as SUGGESTION_ATTRIBUTE, CategoryHead, suggestion_warning
from catalog.models import Category, CategorySynonym, IngestJob, Product, ProductCategory, RejectionRow, utcnow
from catalog.taxonomy import TypePlacement, place_type
from indexing.encoders import ImageEncoder, TextEncoder
from indexing.aligned import VECTOR as ALIGNED, AlignHeads, with_aligned
from indexing.lexical_index import LexicalDoc, LexicalIndex
from indexing.vector_store import VectorPoint, VectorStore
from ingestion.images import InvalidImage, decode_image, read_image_bytes
from ingestion.raw_records import RawRecord
from ingestion.records import ProductRecord, content_hash
from ingestion.remote import is_remote


@dataclass
class IngestTargets:
    """Where the pipeline writes: the catalog, the BM25 index, the vector store and the encoders.

    ``vectors`` and ``encoders`` are callables so the models load and the store is created
    only when something actually needs embedding. ``fetch_image`` downloads an http(s)
    image (e.g. :meth:`ingestion.remote.RemoteImageFetcher.fetch`) and raises
    ``InvalidImage`` on failure; without it, URL images are not fetched. Either way an item
    whose URL image is not used is indexed by text, with a warning saying why.
    ``write_lock`` is held around each batch's index writes and catalog commit (the engine's
    lock, so a bulk job and streamed items of one process take turns per batch).
    ``category_head`` returns the trained category head or None (:mod:`catalog.category_head`):
    with a head, items without a type get a suggested class (see :func:`embed`).
    ``aligner`` returns the alignment heads or None (:mod:`indexing.aligned`): when the vector
    store has an ``aligned`` vector, :func:`apply` adds it to each item with a photo.
    """

    sessions: sessionmaker[Session]
    lexical: LexicalIndex
    vectors: Callable[[], VectorStore]
    existing_vectors: Callable[[], VectorStore | None]
    encoders: Callable[[], tuple[ImageEncoder, TextEncoder]]
    max_image_pixels: int
    max_image_bytes: int
    fetch_image: Callable[[str], bytes] | None = None
    write_lock: AbstractContextManager = field(default_factory=nullcontext)
    category_head: Callable[[], CategoryHead | None] | None = None
    aligner: Callable[[], AlignHeads | None] | None = None


@dataclass
class Rejection:
    """A record that will not be stored: the record as read, its id if it had one, and why.

    The one rejection value of the pipeline: the stages return it (:func:`prepare`,
    :func:`embed`), :func:`record_rejections` stores it as a
    :class:`catalog.models.RejectionRow` (with ``raw.source`` and the raw input ``raw.raw``),
    and :class:`IngestReport` lists it.

    Attributes:
        raw: the record as read (its ``source``, 1-based ``position`` and raw input).
        record_id: the product id when the record had a string one, else None.
        reason: why it was rejected, one line (e.g. ``"title: Input should be a valid string"``).
    """

    raw: RawRecord
    record_id: str | None
    reason: str

    @property
    def position(self) -> int:
        """1-based line or row number of the record in its source (``raw.position``)."""
        return self.raw.position

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"position", "record_id", "reason"}`` (the raw input is left out)."""
        return {"position": self.position, "record_id": self.record_id, "reason": self.reason}


@dataclass
class IngestReport:
    """Counts of one ingest run; ``items_per_s`` counts every record read."""

    job_id: int
    source: str
    total: int = 0
    ingested: int = 0
    unchanged: int = 0
    rejected: int = 0
    without_image: int = 0
    seconds: float = 0.0
    rejections: list[Rejection] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def items_per_s(self) -> float:
        """Records processed per second of wall time."""
        return self.total / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary: the counts, ``seconds`` (3 places), ``items_per_s`` (2 places),
        ``rejections`` as :meth:`Rejection.as_dict` (no raw input) and ``warnings``."""
        return {
            "job_id": self.job_id,
            "source": self.source,
            "total": self.total,
            "ingested": self.ingested,
            "unchanged": self.unchanged,
            "rejected": self.rejected,
            "without_image": self.without_image,
            "seconds": round(self.seconds, 3),
            "items_per_s": round(self.items_per_s, 2),
            "rejections": [r.as_dict() for r in self.rejections],
            "warnings": self.warnings,
        }


@dataclass
class Prepared:
    """A validated record with its image bytes (None without a usable photo), its content
    hash and, for a URL photo that could not be used, why (``image_note``)."""

    raw: RawRecord
    record: ProductRecord
    image_bytes: bytes | None
    hash: str
    image_note: str | None = None  # why a URL image is not used


def _batched(items: Iterable[RawRecord], size: int) -> Iterator[list[RawRecord]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _validation_reason(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"{loc}: {err['msg']}")
    return "; ".join(parts)


class _CategoryCache:
    """Finds or creates the class and type categories of a product type within one session."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.by_key: dict[str, Category] = {}
        self.absent: set[str] = set()  # keys a prefetch found missing: created without another query

    def prefetch(self, keys: Iterable[str]) -> None:
        """Load the categories of ``keys`` that exist in one query (a batch names ~100 types)."""
        missing = sorted({k for k in keys if k not in self.by_key})
        if missing:
            self.by_key.update((c.key, c) for c in self.session.execute(select(Category).where(Category.key.in_(missing))).scalars())
            self.absent.update(k for k in missing if k not in self.by_key)

    def _get(self, key: str, name: str, level: str, synonyms: tuple[str, ...], parent: Category | None) -> Category:
        if key in self.by_key:
            return self.by_key[key]
        cat = None if key in self.absent else self.session.execute(select(Category).where(Category.key == key)).scalar_one_or_none()
        if cat is None:  # added, not flushed: the session flushes the batch's new categories together
            cat = Category(key=key, name=name, level=level, parent=parent)
            cat.synonyms = [CategorySynonym(phrase=s) for s in synonyms]
            self.session.add(cat)
        self.by_key[key] = cat
        return cat

    def place(self, placement: TypePlacement) -> Category:
        parent = self._get(placement.class_key, placement.class_name, "class", placement.class_synonyms, None)
        return self._get(placement.type_key, placement.type_name, "type", placement.type_synonyms, parent)


def run_ingest(
    records: Iterable[RawRecord],
    targets: IngestTargets,
    *,
    source: str,
    total_hint: int | None = None,
    batch_size: int = 128,
    on_progress: Callable[[int], None] | None = None,
    job_id: int | None = None,
) -> IngestReport:
    """Upsert ``records`` into the catalog and the indexes; returns the run's report.

    A malformed record (bad JSON, missing id, wrong types, duplicate id, unreadable,
    non-image or oversized image) is rejected with its reason into ``rejected_records`` and
    the report; the rest goes through. A record without an image, or whose URL image
    cannot be fetched or decoded, is indexed by text, counted in ``without_image`` and
    warned about.

    The run is recorded as an :class:`IngestJob` with counts updated per batch: a new one, or
    the already committed job ``job_id`` (e.g. queued by the API), which is set running.
    """
    started = time.perf_counter()
    with targets.sessions() as session:
        job = session.get(IngestJob, job_id) if job_id is not None else None
        if job is None:
            job = IngestJob(source=source, total=total_hint or 0)
            session.add(job)
        job.status, job.total = "running", total_hint or job.total
        session.commit()
        job_id = job.id
    report = IngestReport(job_id=job_id, source=source)
    seen: dict[str, int] = {}
    try:
        for chunk in _batched(records, batch_size):
            _ingest_batch(chunk, targets, report, seen)
            if on_progress:
                on_progress(len(chunk))
    except Exception as exc:
        with targets.sessions() as session:
            job = session.get(IngestJob, job_id)
            job.status, job.error, job.finished_at = "failed", f"{exc.__class__.__name__}: {exc}", utcnow()
            session.commit()
        raise
    report.seconds = time.perf_counter() - started
    with targets.sessions() as session:
        job = session.get(IngestJob, job_id)
        job.status, job.finished_at, job.total = "done", utcnow(), report.total
        job.items_per_s = report.items_per_s
        session.commit()
    return report


def _ingest_batch(chunk: list[RawRecord], targets: IngestTargets, report: IngestReport, seen: dict[str, int]) -> None:
    """One batch in-process: the same four stages the Celery tasks run on separate queues."""
    report.total += len(chunk)
    prepared, rejected = prepare(chunk, targets, seen)
    with targets.sessions() as session:
        todo, unchanged = split_unchanged(prepared, session, targets.existing_vectors())
    report.unchanged += len(unchanged)
    items, warnings = embed(todo, targets, rejected)
    report.warnings.extend(warnings)
    with targets.write_lock, targets.sessions() as session:
        if items:
            apply(items, targets, session)
            report.ingested += len(items)
            report.without_image += sum("image" not in item.vectors for item in items)
        record_rejections(session, report.job_id, rejected)
        report.rejections.extend(rejected)
        report.rejected += len(rejected)
        job = session.get(IngestJob, report.job_id)
        job.ingested, job.unchanged, job.rejected = report.ingested, report.unchanged, report.rejected
        job.without_image, job.total = report.without_image, max(job.total, report.total)
        session.commit()


@dataclass
class Embedded:
    """A validated record with its content hash and its vectors (``text`` always, ``image``
    when the photo decoded), ready for :func:`apply`; ``position`` is its place in the source."""

    record: ProductRecord
    hash: str
    vectors: dict[str, Any]
    position: int


def prepare(chunk: Sequence[RawRecord], targets: IngestTargets, seen: dict[str, int]) -> tuple[list[Prepared], list[Rejection]]:
    """Stage 1 (no catalog access): validate each record, read its image bytes (local file or
    URL) and hash its content. ``seen`` maps ids already taken in this run to their position,
    so a repeated id is rejected as a duplicate (``seen`` is updated).

    Returns:
        ``(prepared, rejected)``: a :class:`Prepared` per valid record, in order, and a
        :class:`Rejection` per record that could not be parsed, failed validation, repeats an
        id, or names a local image that is missing or over ``targets.max_image_bytes``. A URL
        image that cannot be fetched only sets ``image_note`` (the item is indexed by text).
    """
    rejected: list[Rejection] = []
    prepared: list[Prepared] = []
    for raw in chunk:
        if raw.error or raw.data is None:
            rejected.append(Rejection(raw, None, raw.error or "empty record"))
            continue
        try:
            record = ProductRecord.model_validate(raw.data)
        except ValidationError as exc:
            rid = raw.data.get("id") if isinstance(raw.data.get("id"), str) else None
            rejected.append(Rejection(raw, rid, _validation_reason(exc)))
            continue
        if record.id in seen:
            rejected.append(Rejection(raw, record.id, f"duplicate id {record.id!r} (first at record {seen[record.id]})"))
            continue
        seen[record.id] = raw.position
        image_bytes, image_note = None, None
        if record.image and not is_remote(record.image):
            try:
                image_bytes = read_image_bytes(record.image, max_bytes=targets.max_image_bytes)
            except InvalidImage as exc:
                rejected.append(Rejection(raw, record.id, str(exc)))
                continue
        elif record.image and targets.fetch_image is not None:
            try:
                image_bytes = targets.fetch_image(record.image)
            except InvalidImage as exc:
                image_note = f"{record.id}: {exc}; indexed by text"
        prepared.append(Prepared(raw, record, image_bytes, content_hash(record, image_bytes), image_note))
    return prepared, rejected


def split_unchanged(
    prepared: Sequence[Prepared], session: Session, store: VectorStore | None
) -> tuple[list[Prepared], list[Prepared]]:
    """Stage 2: ``(todo, unchanged)``. An item is unchanged when the catalog holds its content
    hash (written only after its index writes) and, when ``store`` is given, its point exists."""
    ids = [p.record.id for p in prepared]
    stored = dict(session.execute(select(Product.id, Product.content_hash).where(Product.id.in_(ids))).all())
    same = [p.record.id for p in prepared if stored.get(p.record.id) == p.hash]
    indexed = (store.present(same) if store is not None else set(same)) if same else set()
    todo = [p for p in prepared if p.record.id not in indexed]
    return todo, [p for p in prepared if p.record.id in indexed]


def embed(todo: Sequence[Prepared], targets: IngestTargets, rejected: list[Rejection]) -> tuple[list[Embedded], list[str]]:
    """Stage 3: decode the photos and encode photos and texts in one batch per encoder.

    A local photo that does not decode is appended to ``rejected`` as a :class:`Rejection`;
    an item without a usable photo is embedded by text and named in the returned warnings.
    With a category head, an item without a type but with a photo gets
    ``attributes["suggested_category"]`` (top-3 classes, not applied) and a warning line
    (:func:`suggest_categories`).

    Returns:
        ``(items, warnings)``: an :class:`Embedded` per item not rejected, in order, with
        ``vectors["text"]`` and, for a decoded photo, ``vectors["image"]`` (the encoders'
        float32 ``(dim,)`` rows); the encoders are loaded only when some item remains.
    """
    images: dict[str, Any] = {}
    ready: list[Prepared] = []
    warnings: list[str] = []
    for p in todo:
        if p.image_bytes is not None:
            try:
                images[p.record.id] = decode_image(p.image_bytes, max_pixels=targets.max_image_pixels, what=f"image {p.record.image}")
            except InvalidImage as exc:
                if not is_remote(p.record.image):
                    rejected.append(Rejection(p.raw, p.record.id, str(exc)))
                    continue
                warnings.append(f"{p.record.id}: {exc}; indexed by text")
        elif p.image_note:
            warnings.append(p.image_note)
        elif p.record.image:
            warnings.append(f"{p.record.id}: remote image {p.record.image} not fetched; indexed by text")
        else:
            warnings.append(f"{p.record.id}: no image; indexed by text")
        ready.append(p)
    if not ready:
        return [], warnings
    image_encoder, text_encoder = targets.encoders()
    with_image = [p for p in ready if p.record.id in images]
    image_vecs = image_encoder.encode_images([images[p.record.id] for p in with_image])
    text_vecs = text_encoder.encode_texts([p.record.embedding_text() for p in ready])
    image_by_id = {p.record.id: image_vecs[i] for i, p in enumerate(with_image)}
    items = []
    for i, p in enumerate(ready):
        vectors = {"text": text_vecs[i]}
        if p.record.id in image_by_id:
            vectors["image"] = image_by_id[p.record.id]
        items.append(Embedded(p.record, p.hash, vectors, p.raw.position))
    warnings += suggest_categories(items, targets.category_head() if targets.category_head else None)
    return items, warnings


def suggest_categories(items: Sequence[Embedded], head: CategoryHead | None) -> list[str]:
    """Suggest a class for each item that has no ``type`` but has an ``image`` vector.

    The suggestion (:meth:`catalog.category_head.CategoryHead.suggest`: ``{"key",
    "probability", "top": [{"key", "probability"}, ...3], "head": checkpoint digest}``) goes
    into the item's record as ``attributes["suggested_category"]``, replacing one already
    there, so :func:`apply` stores it with the product; the item keeps no category. The
    content hash is not touched (it was computed from the record as received), so
    re-ingesting the same record stays unchanged.

    Args:
        items: embedded items of one batch; their ``record`` is replaced (a model copy).
        head: the category head, or None (then nothing is suggested).

    Returns:
        One warning line per suggestion (:func:`catalog.category_head.suggestion_warning`).

    Raises:
        ValueError: the items' image vectors have another dimension than the head.
    """
    if head is None:
        return []
    todo = [it for it in items if not it.record.type and "image" in it.vectors]
    if not todo:
        return []
    warnings = []
    for it, suggestion in zip(todo, head.suggest(np.stack([it.vectors["image"] for it in todo]))):
        attributes = {**it.record.attributes, SUGGESTION_ATTRIBUTE: suggestion}
        it.record = it.record.model_copy(update={"attributes": attributes})
        warnings.append(suggestion_warning(it.record.id, suggestion))
    return warnings


def apply(items: Sequence[Embedded], targets: IngestTargets, session: Session) -> None:
    """Stage 4: write the vector points and BM25 documents, then the catalog rows (categories,
    product with its new content hash) into ``session``; the caller commits. With alignment
    heads and an ``aligned`` vector in the store, each item with a photo gets its ``aligned`` vector. Indexes first,
    so a crash before the commit leaves the old hash and the next run re-embeds the item.
    Upserts are keyed by product id, so applying the same items twice stores them once."""
    cats = _CategoryCache(session)
    placements = {it.record.id: place_type(it.record.type) if it.record.type.strip() else None for it in items}
    cats.prefetch(k for p in placements.values() if p is not None for k in (p.class_key, p.type_key))
    leaves = {pid: cats.place(p) if p is not None else None for pid, p in placements.items()}
    keys = {pid: ([leaf.parent.key, leaf.key] if leaf is not None else []) for pid, leaf in leaves.items()}
    store = targets.vectors()
    heads = targets.aligner() if targets.aligner is not None and ALIGNED in store.dims else None
    points = [
        VectorPoint(it.record.id, with_aligned(it.vectors, heads), keys[it.record.id], it.record.type, it.record.colour)
        for it in items
    ]
    docs = [LexicalDoc(r.id, r.title, r.type, r.colour, r.text, keys[r.id]) for r in (it.record for it in items)]
    store.upsert(points)
    targets.lexical.upsert(docs)

    ids = [it.record.id for it in items]
    existing = {row.id: row for row in session.execute(select(Product).where(Product.id.in_(ids))).scalars()}
    session.execute(delete(ProductCategory).where(ProductCategory.product_id.in_(ids)))
    for it in items:
        r = it.record
        product = existing.get(r.id) or Product(id=r.id)
        product.title, product.text, product.type, product.colour = r.title, r.text, r.type, r.colour
        product.size, product.image, product.attributes, product.content_hash = r.size, r.image, r.attributes, it.hash
        session.add(product)
    session.flush()  # products exist before their category links reference them
    session.add_all(ProductCategory(product_id=pid, category_id=leaf.id) for pid, leaf in leaves.items() if leaf is not None)


def record_rejections(session: Session, job_id: int, rejected: Sequence[Rejection]) -> None:
    """Add ``rejected`` to the ``rejected_records`` table of job ``job_id``, one
    :class:`catalog.models.RejectionRow` each with its source, position, id, reason and raw
    input (the caller commits)."""
    for r in rejected:
        session.add(
            RejectionRow(job_id=job_id, source=r.raw.source, position=r.position, record_id=r.record_id, reason=r.reason, raw=r.raw.raw)
        )
