"""The ingest tasks: ``ingest`` (validate, read images, hash) → ``embed`` (one encoder batch
per chunk) → ``index`` (vector points, BM25 documents, catalog rows).

Each task runs one stage of :mod:`ingestion.pipeline` on a chunk of records, commits its
progress (:class:`catalog.models.JobItem` rows) and only then sends the next task. Every stage
is keyed by product id and content hash, so a task that runs again after its worker died
stores nothing twice: an item already indexed with the same hash is not re-embedded, and
index writes are upserts by product id. Transient errors (database or broker connection,
timeouts) are retried with exponential backoff; any other error rejects the chunk's records
with the error as their reason, then fails the task.

Process roles: ``ingest``/``embed`` workers use the catalog and the encoders only; the
``index`` worker opens the :class:`mars.engine.Engine` and so owns the embedded stores (one
such process per ``MARS_HOME``).
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import numpy as np
from celery.signals import worker_shutdown
from redis.exceptions import ConnectionError as RedisConnectionError
from sqlalchemy import delete, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from catalog.category_head import CategoryHeadFile, category_head_path
from catalog.db import make_engine, session_factory
from catalog.models import IngestJob, JobItem, RejectionRow, utcnow
from mars.registry import encoders_for
from ingestion.pipeline import (
    Embedded,
    IngestTargets,
    Prepared,
    Rejection,
    apply,
    embed,
    prepare,
    record_rejections,
    split_unchanged,
)
from ingestion.raw_records import RawRecord, raw_to_json
from ingestion.records import ProductRecord
from ingestion.remote import RemoteImageFetcher
from mars.settings import get_settings
from workers.app import EMBED_TASK, INDEX_TASK, INGEST_TASK, app
from catalog.jobs import status_counts

log = logging.getLogger("mars.workers")

#: Errors worth a retry: the database or the broker went away for a moment.
TRANSIENT: tuple[type[BaseException], ...] = (OperationalError, RedisConnectionError, ConnectionError, TimeoutError)

#: Status order: a late re-run of an earlier stage never moves an item back.
STATUS_RANK = {"queued": 0, "unchanged": 1, "rejected": 1, "embedded": 1, "indexed": 2}

_RETRY = {"autoretry_for": TRANSIENT, "retry_backoff": True, "retry_backoff_max": 60, "max_retries": 8}


# ------------------------------------------------------------------ per-process state


@lru_cache(maxsize=1)
def _sessions():  # noqa: ANN202
    return session_factory(make_engine(get_settings().catalog_url))


@lru_cache(maxsize=1)
def _encoders():  # noqa: ANN202
    return encoders_for(get_settings())


@lru_cache(maxsize=1)
def _fetcher() -> RemoteImageFetcher:
    return RemoteImageFetcher.from_settings(get_settings())


@lru_cache(maxsize=1)
def _category_head() -> CategoryHeadFile:
    s = get_settings()
    return CategoryHeadFile(category_head_path(s), s.image_encoder)


def _no_store() -> Any:
    raise RuntimeError("ingest/embed workers never write the indexes; the index task does")


def _stage_targets() -> IngestTargets:
    """Targets of the ``ingest`` and ``embed`` stages: catalog, encoders, image limits, and the
    category head (re-read when its file changes) that suggests classes for untyped items."""
    s = get_settings()
    return IngestTargets(
        sessions=_sessions(),
        lexical=None,  # type: ignore[arg-type]
        vectors=_no_store,
        existing_vectors=lambda: None,
        encoders=_encoders,
        max_image_pixels=s.max_image_pixels,
        max_image_bytes=s.max_image_bytes,
        fetch_image=_fetcher().fetch,
        category_head=_category_head(),
    )


@lru_cache(maxsize=1)
def index_engine():  # noqa: ANN201
    """The :class:`~mars.engine.Engine` of this ``index`` worker process (owns the stores)."""
    from mars.engine import Engine

    return Engine(get_settings())


# ------------------------------------------------------------------ (de)serialisation


def _prepared_to_json(p: Prepared) -> dict[str, Any]:
    return {
        "raw": raw_to_json(p.raw),
        "record": p.record.model_dump(mode="json"),
        "hash": p.hash,
        "image": base64.b64encode(p.image_bytes).decode() if p.image_bytes is not None else None,
        "image_note": p.image_note,
    }


def _prepared_from_json(d: dict[str, Any]) -> Prepared:
    image = base64.b64decode(d["image"]) if d["image"] is not None else None
    return Prepared(RawRecord(**d["raw"]), ProductRecord.model_validate(d["record"]), image, d["hash"], d["image_note"])


def _embedded_to_json(e: Embedded) -> dict[str, Any]:
    vectors = {k: base64.b64encode(np.asarray(v, dtype=np.float32).tobytes()).decode() for k, v in e.vectors.items()}
    return {"record": e.record.model_dump(mode="json"), "hash": e.hash, "position": e.position, "vectors": vectors}


def _embedded_from_json(d: dict[str, Any]) -> Embedded:
    vectors = {k: np.frombuffer(base64.b64decode(v), dtype=np.float32) for k, v in d["vectors"].items()}
    return Embedded(ProductRecord.model_validate(d["record"]), d["hash"], vectors, d["position"])


# ------------------------------------------------------------------ progress


def set_status(session: Session, job_id: int, rows: Sequence[tuple[int, str | None, str, bool | None]]) -> None:
    """Upsert ``(position, product_id, status, has_image)`` rows of job ``job_id``; a status of
    lower :data:`STATUS_RANK` than the stored one is ignored (a re-run never moves back)."""
    if not rows:
        return
    positions = [r[0] for r in rows]
    stored = {
        item.position: item
        for item in session.execute(
            select(JobItem).where(JobItem.job_id == job_id, JobItem.position.in_(positions))
        ).scalars()
    }
    for position, product_id, status, has_image in rows:
        item = stored.get(position)
        if item is None:
            session.add(JobItem(job_id=job_id, position=position, product_id=product_id, status=status, has_image=has_image))
        elif STATUS_RANK[status] >= STATUS_RANK[item.status]:
            item.product_id, item.status = product_id or item.product_id, status
            item.has_image = has_image if has_image is not None else item.has_image


def _reject(session: Session, job_id: int, rejected: Sequence[Rejection]) -> None:
    """Record ``rejected`` for job ``job_id`` once: a re-run replaces its earlier rows."""
    positions = [r.position for r in rejected]
    if not positions:
        return
    session.execute(delete(RejectionRow).where(RejectionRow.job_id == job_id, RejectionRow.position.in_(positions)))
    record_rejections(session, job_id, rejected)
    set_status(session, job_id, [(r.position, r.record_id, "rejected", None) for r in rejected])


def finish_if_done(session: Session, job_id: int) -> None:
    """Close job ``job_id`` when none of its items waits any more: status ``done``, the counts
    copied onto the job row and ``items_per_s`` over the job's wall time."""
    counts = status_counts(session, job_id)
    job = session.get(IngestJob, job_id)
    if job is None or counts.get("queued", 0) or counts.get("embedded", 0) or sum(counts.values()) < job.total:
        return
    job.status, job.finished_at = "done", utcnow()
    job.ingested, job.unchanged, job.rejected = counts.get("indexed", 0), counts.get("unchanged", 0), counts.get("rejected", 0)
    job.without_image = session.execute(
        select(func.count()).where(JobItem.job_id == job_id, JobItem.status == "indexed", JobItem.has_image.is_(False))
    ).scalar_one()
    seconds = (job.finished_at - job.started_at).total_seconds()
    job.items_per_s = job.total / seconds if seconds > 0 else None


def _commit_progress(
    session: Session, job_id: int, rejected: Sequence[Rejection], rows: Sequence[tuple[int, str | None, str, bool | None]]
) -> None:
    """Record a stage's rejections and item statuses, close the job if nothing waits, commit."""
    _reject(session, job_id, rejected)
    set_status(session, job_id, rows)
    finish_if_done(session, job_id)
    session.commit()


@contextmanager
def _rejects_on_failure(job_id: int, records: Sequence[tuple[RawRecord, str | None]], stage: str) -> Iterator[None]:
    """Turn a permanent (non-transient) failure of a stage into rejections of its records, then re-raise."""
    try:
        yield
    except TRANSIENT:
        raise
    except Exception as exc:
        reason = f"{stage} stage failed: {exc.__class__.__name__}: {exc}"
        log.exception("job %s: %s (%d records rejected)", job_id, reason, len(records))
        with _sessions()() as session:
            _commit_progress(session, job_id, [Rejection(raw, rid, reason) for raw, rid in records], [])
        raise


# ------------------------------------------------------------------ tasks


@app.task(name=INGEST_TASK, **_RETRY)
def ingest_chunk(job_id: int, raws: list[dict[str, Any]]) -> int:
    """Stage ``ingest``: validate, read images, hash; record rejections and unchanged items,
    commit, then send the rest to ``embed``. Returns how many were sent on."""
    records = [RawRecord(**r) for r in raws]
    with _rejects_on_failure(job_id, [(r, None) for r in records], "ingest"):
        prepared, rejected = prepare(records, _stage_targets(), {})
        with _sessions()() as session:
            todo, unchanged = split_unchanged(prepared, session, None)
            _commit_progress(session, job_id, rejected, [(p.raw.position, p.record.id, "unchanged", None) for p in unchanged])
    if todo:
        embed_chunk.delay(job_id, [_prepared_to_json(p) for p in todo])
    return len(todo)


@app.task(name=EMBED_TASK, **_RETRY)
def embed_chunk(job_id: int, items: list[dict[str, Any]]) -> int:
    """Stage ``embed``: one image-encoder and one text-encoder batch for the chunk; commit,
    then send the vectors to ``index``. Returns how many were embedded."""
    prepared = [_prepared_from_json(d) for d in items]
    with _rejects_on_failure(job_id, [(p.raw, p.record.id) for p in prepared], "embed"):
        rejected: list[Rejection] = []
        embedded, warnings = embed(prepared, _stage_targets(), rejected)
        for warning in warnings:
            log.info("job %s: %s", job_id, warning)
        with _sessions()() as session:
            _commit_progress(
                session, job_id, rejected, [(e.position, e.record.id, "embedded", "image" in e.vectors) for e in embedded]
            )
    if embedded:
        index_chunk.delay(job_id, [_embedded_to_json(e) for e in embedded])
    return len(embedded)


@app.task(name=INDEX_TASK, **_RETRY)
def index_chunk(job_id: int, items: list[dict[str, Any]]) -> int:
    """Stage ``index`` (the store owner): upsert points and BM25 documents, then the catalog
    rows and the items' status, in one commit. Returns how many were indexed."""
    embedded = [_embedded_from_json(d) for d in items]
    raws = [(RawRecord(f"job {job_id}", e.position, None), e.record.id) for e in embedded]
    with _rejects_on_failure(job_id, raws, "index"):
        engine = index_engine()
        with engine.sessions() as session:
            apply(embedded, engine.ingest_targets(), session)
            _commit_progress(session, job_id, [], [(e.position, e.record.id, "indexed", "image" in e.vectors) for e in embedded])
        engine.refresh()
    return len(embedded)


@worker_shutdown.connect
def _close_index_engine(**_: Any) -> None:
    """On worker shutdown, flush and release the stores if this process opened them."""
    if index_engine.cache_info().currsize:
        index_engine().close()
