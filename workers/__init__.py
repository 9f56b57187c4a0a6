"""Where work runs: the job-queue seam (:mod:`workers.job_queue`) and its in-process and Celery implementations, the Celery app (:mod:`workers.app`), its ingest tasks and the queued critic."""
