"""The job-queue seam: where a bulk ingest job runs (standard library only).

Two implementations, chosen by the engine's wiring (:mod:`mars.wiring`) from the settings:
:class:`workers.inprocess_jobs.InProcessJobs` (embedded mode: the job runs on a thread of the
process that owns the stores) and :class:`workers.celery_jobs.CeleryJobs` (server mode: the
job's chunks go to the Celery queues ``ingest`` → ``embed`` → ``index``). Either way the job's
row and progress live in the catalog (:mod:`catalog.jobs`), so ``GET /v1/jobs/{id}`` and
``mars jobs`` read them the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ingestion.raw_records import RawRecord


@runtime_checkable
class JobQueue(Protocol):
    """Runs bulk ingest jobs."""

    def submit(self, records: Sequence[RawRecord], source: str) -> int:
        """Queue ``records`` as one job and return its id at once (the job's catalog row is
        committed before anything runs)."""

    def counts(self) -> dict[str, int]:
        """This process's jobs: ``{"waiting": n, "running": n}`` (zeros where jobs run elsewhere)."""

    def close(self) -> None:
        """Stop taking jobs; a running in-process job stops after its current batch and jobs that
        never started are marked failed, saying to submit them again."""
