"""Bulk ingest jobs as the catalog records them: progress by item status, rate and ETA, the
first rejections, the newest jobs. Read the same way whether a job ran in-process
(:class:`workers.inprocess_jobs.InProcessJobs`) or on the Celery queues
(:class:`workers.celery_jobs.CeleryJobs`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from catalog.models import IngestJob, JobItem, RejectionRow, iso_or_none, utcnow


def status_counts(session: Session, job_id: int) -> dict[str, int]:
    """How many items of job ``job_id`` are in each status (statuses with none are absent)."""
    rows = session.execute(select(JobItem.status, func.count()).where(JobItem.job_id == job_id).group_by(JobItem.status))
    return dict(rows.all())


def job_progress(session: Session, job_id: int) -> dict[str, Any] | None:
    """Progress of job ``job_id`` (None if unknown): ``status`` (queued|running|done|failed),
    ``error``, ``total``, the counts by item status (``queued``, ``embedded``, ``indexed``,
    ``unchanged``, ``rejected``), ``done`` (items past the queue), ``eta_s`` (seconds:
    remaining items at the rate so far; None before the first item is done or after the end),
    ``without_image``, ``items_per_s`` and the first 100 ``rejections``.

    Queued jobs count their :class:`JobItem` rows; jobs run in-process count on the job row
    (updated per batch, so ``queued`` there means "not processed yet")."""
    job = session.get(IngestJob, job_id)
    if job is None:
        return None
    counts = status_counts(session, job_id)
    if not counts:  # a job run in-process (``mars ingest``, embedded API) keeps counts on its row
        counts = {"indexed": job.ingested, "unchanged": job.unchanged, "rejected": job.rejected}
        counts["queued"] = max(job.total - sum(counts.values()), 0) if job.status in ("queued", "running") else 0
    done = counts.get("indexed", 0) + counts.get("unchanged", 0) + counts.get("rejected", 0)
    elapsed = ((job.finished_at or utcnow()) - job.started_at).total_seconds()
    eta = (job.total - done) * elapsed / done if done and job.status not in ("done", "failed") else None
    rejections = session.execute(
        select(RejectionRow.position, RejectionRow.record_id, RejectionRow.reason)
        .where(RejectionRow.job_id == job_id)
        .order_by(RejectionRow.position)
        .limit(100)
    ).all()
    return {
        "id": job.id,
        "source": job.source,
        "status": job.status,
        "error": job.error,
        "total": job.total,
        **{k: counts.get(k, 0) for k in ("queued", "embedded", "indexed", "unchanged", "rejected")},
        "done": done,
        "eta_s": round(eta, 1) if eta is not None else None,
        "without_image": job.without_image,
        "items_per_s": job.items_per_s,
        "started_at": job.started_at.isoformat(),
        "finished_at": iso_or_none(job.finished_at),
        "rejections": [{"position": p, "record_id": r, "reason": why} for p, r, why in rejections],
    }


def recent_jobs(session: Session, limit: int = 20) -> list[dict[str, Any]]:
    """The ``limit`` newest jobs, newest first, each as :func:`job_progress` gives it."""
    ids = session.execute(select(IngestJob.id).order_by(IngestJob.id.desc()).limit(limit)).scalars().all()
    return [job_progress(session, job_id) for job_id in ids]
