"""Bulk jobs of server mode: the job's chunks go to the Celery queues ``ingest`` → ``embed`` →
``index`` (:mod:`workers.tasks`), sent by task name so the submitting process (an API replica)
imports no task code."""

from __future__ import annotations

from collections.abc import Sequence
from itertools import islice
from typing import TYPE_CHECKING

from sqlalchemy.orm import Session, sessionmaker

from catalog.models import IngestJob, JobItem, utcnow

if TYPE_CHECKING:
    from ingestion.raw_records import RawRecord

class CeleryJobs:
    """A :class:`workers.job_queue.JobQueue` on the Celery queues.

    Args:
        sessions: catalog sessions (the job row and one status row per record).
        chunk_size: records per ``ingest`` task (one encoder batch each).

    Raises:
        ValueError: ``chunk_size`` < 1.
    """

    def __init__(self, sessions: sessionmaker[Session], chunk_size: int) -> None:
        if chunk_size < 1:
            raise ValueError("chunk_size must be at least 1")
        self.sessions, self.chunk_size = sessions, chunk_size

    def submit(self, records: Sequence[RawRecord], source: str) -> int:
        """Queue ``records`` as one job and return its id.

        The job row and one ``queued`` :class:`~catalog.models.JobItem` per record are committed
        first; only then are the ``ingest`` tasks sent, ``chunk_size`` records each (so a task
        never refers to rows that a rolled-back transaction lost). An empty job is done at once.
        """
        from ingestion.raw_records import raw_to_json
        from workers.app import INGEST_TASK, app

        records = list(records)
        with self.sessions() as session:
            job = IngestJob(source=source, status="queued", total=len(records))
            session.add(job)
            session.flush()
            session.add_all(JobItem(job_id=job.id, position=r.position, status="queued") for r in records)
            if not records:
                job.status, job.finished_at = "done", utcnow()
            session.commit()
            job_id = job.id
        it = iter(records)
        while chunk := list(islice(it, self.chunk_size)):
            app.send_task(INGEST_TASK, args=[job_id, [raw_to_json(r) for r in chunk]])
        return job_id

    def counts(self) -> dict[str, int]:
        """Zeros: the jobs run in the workers, not in this process (their progress is in the catalog)."""
        return {"waiting": 0, "running": 0}

    def close(self) -> None:
        """Nothing to stop here: queued chunks stay on the broker for the workers."""
