"""Server mode: the Celery app (:mod:`workers.app`), its tasks and the bulk-job API (:mod:`workers.jobs`)."""
