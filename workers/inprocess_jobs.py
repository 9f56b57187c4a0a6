"""Bulk jobs of embedded mode: one job thread in the process that owns the stores.

Jobs run one after another (FIFO). A failure marks the job ``failed`` with its error (the
ingest run does that) and is logged once. :meth:`InProcessJobs.close` stops a running job
after its current batch (:class:`JobInterrupted`) and marks jobs that never started failed,
saying to submit them again (a re-submit skips what was stored, as unchanged).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from catalog.models import IngestJob, utcnow

if TYPE_CHECKING:
    from ingestion.raw_records import RawRecord

log = logging.getLogger("mars.jobs")

#: ``run(records, source, total_hint, on_progress, job_id)``: ingests one job's records
#: (e.g. :meth:`mars.engine.Engine.ingest`), calling ``on_progress(done)`` after each batch.
RunJob = Callable[[Sequence["RawRecord"], str, int, Callable[[int], None], int], Any]


class JobInterrupted(RuntimeError):
    """An in-process bulk job stopped at a batch boundary because the engine is closing."""


class InProcessJobs:
    """A :class:`workers.job_queue.JobQueue` on one thread of this process.

    Args:
        sessions: catalog sessions (the job rows).
        run: runs one job (:data:`RunJob`).
    """

    def __init__(self, sessions: sessionmaker[Session], run: RunJob) -> None:
        self.sessions, self.run = sessions, run
        self._pool: ThreadPoolExecutor | None = None
        self._queued: dict[int, Future] = {}
        self._closing = threading.Event()

    def submit(self, records: Sequence[RawRecord], source: str) -> int:
        """Commit the job row, queue the job on the job thread, return its id.

        Raises:
            RuntimeError: the queue was closed (nothing is written).
        """
        if self._closing.is_set():
            raise RuntimeError("the server is stopping: no new bulk jobs are taken; submit it again once it is back")
        with self.sessions() as session:
            job = IngestJob(source=source, status="queued", total=len(records))
            session.add(job)
            session.commit()
            job_id = job.id
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mars-job")
        future = self._pool.submit(self._run_job, records, source, job_id)
        future.add_done_callback(_log_job_failure)
        self._queued[job_id] = future
        future.add_done_callback(lambda f, j=job_id: None if f.cancelled() else self._queued.pop(j, None))
        return job_id

    def _run_job(self, records: Sequence[RawRecord], source: str, job_id: int) -> Any:
        """Run job ``job_id`` on the job thread. Its row's ``started_at`` (the submit time until
        now) becomes the time it starts running, so a job that waited behind another gets its
        rate and ETA (:func:`catalog.jobs.job_progress`) from its own run, not from the wait."""
        with self.sessions() as session:
            job = session.get(IngestJob, job_id)
            if job is not None:
                job.started_at = utcnow()
                session.commit()
        return self.run(records, source, len(records), self._stop_if_closing, job_id)

    def _stop_if_closing(self, _done: int) -> None:
        """Progress hook: stop a running job at the next batch once :meth:`close` was called."""
        if self._closing.is_set():
            raise JobInterrupted("the server stopped during this job; submit it again (stored items are skipped as unchanged)")

    def counts(self) -> dict[str, int]:
        """Jobs ``waiting`` behind the job thread and ``running`` on it."""
        futures = list(self._queued.values())
        running = sum(f.running() for f in futures)
        return {"waiting": sum(not f.done() for f in futures) - running, "running": running}

    def close(self) -> None:
        """Stop the running job after its batch, cancel the waiting ones and mark them failed;
        later submits are refused."""
        self._closing.set()
        if self._pool is None:
            return
        self._pool.shutdown(wait=True, cancel_futures=True)
        cancelled = [job_id for job_id, future in self._queued.items() if future.cancelled()]
        if cancelled:
            with self.sessions() as session:
                for job in session.execute(select(IngestJob).where(IngestJob.id.in_(cancelled))).scalars():
                    job.status, job.error = "failed", "the server stopped before this job ran; submit it again"
                session.commit()


def _log_job_failure(future: Future) -> None:
    """Log a failed job (the ingest run has already marked its row ``failed``); a job cancelled
    before it started is not a failure here (:meth:`InProcessJobs.close` marks it)."""
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None:
        log.error("bulk job failed: %s: %s", exc.__class__.__name__, exc, exc_info=exc)
