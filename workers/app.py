"""The Celery app of the server mode: queues ``ingest``, ``embed``, ``index``, ``critic`` on Redis.

Run workers with e.g. ``celery -A workers.app worker -Q ingest,embed -c 2`` (CPU),
``celery -A workers.app worker -Q index -c 1`` (the one process that owns embedded stores;
with Qdrant server + OpenSearch it can scale too) and, on a GPU,
``celery -A workers.app worker -Q critic -P threads -c 4 --prefetch-multiplier 1`` (the queued
critic, :mod:`workers.critic`).

Delivery settings (Celery docs, "Tasks" → ``acks_late`` and "Using Redis" → visibility
timeout): a task is acknowledged only after it returns (``task_acks_late``) and is re-queued
when its worker process dies (``task_reject_on_worker_lost``); Redis re-delivers a message
not acknowledged within ``MARS_TASK_VISIBILITY_TIMEOUT_S``, which must exceed the longest
task. Each worker reserves one task at a time (``worker_prefetch_multiplier = 1``) so a
killed worker strands at most one chunk. Settings are read when the app is first
configured, not at import time.

Results: only the critic task (``ignore_result=False``) stores one, in Redis on the broker URL
(``result_backend``), for ``result_expires`` seconds; every other task's result is ignored
(``task_ignore_result``). Celery gives each thread its own backend instance, so the critic
worker's threads pool and the API's request threads share no connection.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from critic.wire import QUEUE as CRITIC_QUEUE
from critic.wire import TASK_NAME as CRITIC_TASK
from mars.settings import Settings, get_settings

QUEUES: tuple[str, ...] = ("ingest", "embed", "index", "critic")

#: The ingest tasks by name (:mod:`workers.tasks`), each on its own queue; a submitter sends the
#: first by name (:class:`workers.celery_jobs.CeleryJobs`) without importing the task code.
INGEST_TASK, EMBED_TASK, INDEX_TASK = "mars.ingest_chunk", "mars.embed_chunk", "mars.index_chunk"


def celery_config(settings: Settings) -> dict[str, Any]:
    """The Celery configuration for ``settings`` (broker, routing, delivery guarantees)."""
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": {"visibility_timeout": settings.task_visibility_timeout_s},
        "broker_connection_retry_on_startup": True,
        "task_default_queue": "ingest",
        "task_routes": {
            INGEST_TASK: {"queue": "ingest"},
            EMBED_TASK: {"queue": "embed"},
            INDEX_TASK: {"queue": "index"},
            CRITIC_TASK: {"queue": CRITIC_QUEUE},
        },
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": settings.broker_url,
        "result_expires": 300,  # s; a critic result is read within its deadline or never
        "worker_hijack_root_logger": False,
    }


app = Celery("mars", include=["workers.tasks", "workers.critic"])
app.add_defaults(lambda: celery_config(get_settings()))
