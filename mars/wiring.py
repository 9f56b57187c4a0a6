"""The engine's wiring: what the settings name, built once per process and put together.

:class:`mars.engine.Engine` is the composition root; this module holds its recipes, each
reading the settings and :mod:`mars.registry` and nothing else:

* :func:`stage3_critic` — the critic the funnel calls (local, or the Celery queued client);
* :func:`critic_note` — what responses say about the critic, in plain words;
* :func:`build_funnel` — the retrievers, the query encodings, the caches and the critic stage
  around the stores and the trained artifacts;
* :func:`build_jobs` — where bulk jobs run (in-process or on the Celery queues).

The stores (:class:`mars.stores.Stores`) and the artifacts
(:meth:`query.artifacts.Artifacts.watched`) are built by their own classes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from mars.registry import build_critic
from query.critic_stage import CriticStage
from query.funnel import Funnel, FunnelConfig
from query.query_vectors import QueryVectors
from query.retrievers import RetrieverContext, build_retrievers
from query.search_cache import SearchCache

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from catalog.locking import Taxonomy
    from critic.protocol import Critic
    from indexing.encoders import ImageEncoder, TextEncoder
    from mars.settings import Settings
    from mars.stores import Stores
    from query.artifacts import Artifacts
    from query.rules import Rule
    from workers.inprocess_jobs import RunJob
    from workers.job_queue import JobQueue

log = logging.getLogger("mars.wiring")

#: Catalog rows the funnel keeps for responses in embedded mode (a few KB each).
ROW_CACHE_SIZE = 10_000
#: Product image vectors the funnel keeps for the image list's re-scoring in embedded mode
#: (2-5 KB each, so at most ~100 MB).
PRODUCT_VECTOR_CACHE = 20_000


def stage3_critic(settings: Settings) -> tuple[Critic | None, str]:
    """The critic the funnel calls and a one-line note for responses: the one
    :func:`mars.registry.build_critic` builds in this process or, with ``MARS_CRITIC_QUEUE``, a
    :class:`workers.critic_client.QueuedCritic` that sends its work to the Celery ``critic`` queue,
    whose worker builds the named critic with :func:`~mars.registry.build_critic`.

    Raises:
        ValueError, RuntimeError: as :func:`mars.registry.build_critic`.
    """
    if settings.critic != "none" and settings.critic_queue:
        from workers.critic_client import QueuedCritic  # the Celery client; the worker builds the real critic

        queued = QueuedCritic.from_settings(settings)
        return queued, f"{settings.critic} critic on the Celery 'critic' queue (deadline {settings.critic_deadline_ms:.0f} ms)"
    return build_critic(settings)


#: What a mode-full response says when the server has no critic because none is trained yet.
CRITIC_NOT_SET_UP = "The critic is not set up: run `mars setup` on a folder with judged rooms to train it."
#: ... and when the operator switched it off (``MARS_CRITIC=none``).
CRITIC_SWITCHED_OFF = "The critic is switched off on this server (MARS_CRITIC=none)."


def critic_note(settings: Settings, critic: Critic | None, note: str) -> str:
    """The one-line note about the critic that mode-full responses and ``GET /healthz`` carry, in
    words a merchandiser reads, without file paths or endpoint addresses (``note``, the
    registry's operator note from :func:`stage3_critic`, names them; it goes to the log).

    Without a critic: :data:`CRITIC_NOT_SET_UP` (the learned critic has no checkpoint yet) or
    :data:`CRITIC_SWITCHED_OFF`. With one: what it is (the learned critic with its number of
    training pairs, the Qwen2-VL critic, the OpenAI-compatible model's name, the queue);
    ``note`` as it is for a critic this function does not know.
    """
    if critic is None:
        return CRITIC_NOT_SET_UP if settings.critic == "learned" else CRITIC_SWITCHED_OFF
    if settings.critic_queue:
        return note  # "<name> critic on the Celery 'critic' queue (deadline N ms)": no path
    if settings.critic == "learned":
        pairs = getattr(critic, "meta", {}).get("pairs")
        return "learned critic" + (f", trained on {pairs} pairs from judged rooms" if pairs else "")
    if settings.critic == "vlm":
        return "Qwen2-VL critic" + (" with a fine-tuned adapter" if settings.critic_adapter else "")
    if settings.critic == "openai":
        return f"OpenAI-compatible critic ({settings.critic_api_model})"
    return note


def build_funnel(
    settings: Settings,
    stores: Stores,
    sessions: sessionmaker[Session],
    taxonomy: Callable[[], Taxonomy],
    encoders: Callable[[], tuple[ImageEncoder, TextEncoder]],
    artifacts: Artifacts,
    rules: Callable[[], Sequence[Rule]],
) -> Funnel:
    """The funnel over ``stores``: every registered retriever, the query encodings, the caches
    (only where this process sees every write: embedded stores; server-mode stores are written
    by other processes) and the critic stage.

    Raises:
        ValueError, RuntimeError: the critic cannot be built (:func:`stage3_critic`).
    """
    embedded = settings.embedded_stores
    cache = SearchCache(
        result_hits=settings.result_cache_hits if embedded else 0,
        rows=ROW_CACHE_SIZE if embedded else 0,
        product_vectors=PRODUCT_VECTOR_CACHE if embedded else 0,
    )
    query_vectors = QueryVectors(encoders, settings.grid_sizes)
    retrievers = build_retrievers(RetrieverContext(stores.lexical, stores.search_store, query_vectors, cache, sessions))
    critic, note = stage3_critic(settings)
    log.info("critic: %s", note)  # the operator's note (paths, endpoints); responses carry critic_note's words
    stage = CriticStage(critic, critic_note(settings, critic, note), settings.critic_top_n, stores.search_store,
                        query_vectors, taxonomy)
    config = FunnelConfig(
        depth=settings.retrieval_depth,
        rrf_k=settings.rrf_k,
        weights={"photo": dict(settings.weights_photo), "text": dict(settings.weights_text)},
    )
    return Funnel(sessions, taxonomy, retrievers, artifacts, stage, cache, query_vectors, config, rules)


def build_jobs(settings: Settings, sessions: sessionmaker[Session], run: RunJob) -> JobQueue:
    """Where bulk jobs run: on this process's job thread when it owns embedded stores
    (:class:`workers.inprocess_jobs.InProcessJobs` calling ``run``), else on the Celery queues
    (:class:`workers.celery_jobs.CeleryJobs`, chunks of ``MARS_INGEST_CHUNK_SIZE``)."""
    if settings.embedded_stores:
        from workers.inprocess_jobs import InProcessJobs

        return InProcessJobs(sessions, run)
    from workers.celery_jobs import CeleryJobs  # loads Celery only in server mode

    return CeleryJobs(sessions, settings.ingest_chunk_size)
