"""The queued critic's worker: the ``mars.critic_score`` task, the worker signals that load the
model before anything is consumed, and :func:`warm_up`.

Server side
    One GPU worker per device consumes queue ``critic`` (routed in :mod:`workers.app`). Each
    request (one search's pairs, typically ``MARS_CRITIC_TOP_N`` = 20) is one task,
    :func:`critic_score`. The task does not call the model itself: it hands its pairs to the
    process's :class:`critic.batching.MicroBatcher`, whose one model thread scores up to ``B``
    pairs (``critic_queue_max_pairs``) at once, taken from every request in flight, or
    whatever has arrived ``T`` ms (``critic_queue_max_wait_ms``) after the oldest waiting pair,
    whichever comes first. So the model runs with concurrency 1 while many requests are in
    flight (:mod:`critic.batching` explains the batcher and why ``celery-batches`` is not
    used). Start the worker with the **threads** pool; ``-c`` is how many requests may wait in
    the batcher at once (each holds one pool thread while it waits)::

        celery -A workers.app worker -Q critic -P threads -c 4 --prefetch-multiplier 1

    (:mod:`workers.app` includes this module, so the task is registered in every worker.)
    With ``-P prefork`` or ``-P solo`` the worker runs one task at a time, so every batch holds
    one request (correct, but no batching). With the threads pool and
    ``worker_prefetch_multiplier = 1`` the worker reserves exactly ``-c`` messages
    (Celery docs, "Optimizing" → "Prefetch Limits": prefetch count = multiplier × concurrency),
    so ``-c`` bounds both the requests that can share a batch and the messages a dead worker
    strands. Pick ``-c >= 2 * ceil(B / MARS_CRITIC_TOP_N)`` (4 for the defaults 32 and 20) so
    one batch fills while the previous one is on the GPU; much more only parks messages on
    this GPU that an idle one could take.

    The model is loaded and one dummy scoring runs before the worker consumes anything
    (:func:`warm_up`, from the ``worker_init`` signal for the threads pool and from
    ``worker_process_init`` for solo; Celery docs, "Signals" → "Worker Signals"); a worker that
    cannot load its critic exits with the reason. A prefork child warms up in a background
    thread instead (Celery kills a child whose ``worker_process_init`` outlasts
    ``worker_proc_alive_timeout``, 4 s) and its first task waits for it. Only a worker that
    consumes ``critic`` loads the model; importing this module loads no model and no torch.

Client side
    :class:`workers.critic_client.QueuedCritic` (the API process imports only that module).

Results
    The app's Redis result backend (``result_backend``, ``result_expires`` in
    :mod:`workers.app`); the app ignores results by default and this task sets
    ``ignore_result=False``. Celery keeps one backend per thread (``app.backend``), so the
    worker's pool threads and the API's request threads each get their own connection. A
    task that raises stores the exception, which Celery re-raises at the client (a
    :class:`~critic.protocol.CriticUnavailable` there).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TYPE_CHECKING, Any

from celery import Task
from celery.signals import worker_init, worker_process_init, worker_shutdown
from PIL import Image

from critic.batching import MicroBatcher
from critic.protocol import CriticPair, CriticTimeout, CriticUnavailable
from critic.wire import QUEUE, TASK_NAME, pairs_from_json, verdict_to_json
from workers.app import app

if TYPE_CHECKING:
    from mars.settings import Settings

__all__ = ["critic_score", "warm_up", "QUEUE", "TASK_NAME"]

log = logging.getLogger("mars.workers.critic")


# ------------------------------------------------------------------ the worker process

_state_lock = threading.Lock()
_batcher: MicroBatcher | None = None
_consumes_critic = False
_pool = ""


def warm_up(settings: "Settings | None" = None) -> MicroBatcher:
    """Build this process's critic and batcher once and run one dummy scoring through them.

    The critic is :func:`mars.registry.build_critic` of ``settings`` (default
    :func:`mars.settings.get_settings`) with ``critic_queue`` off, so a worker that shares the
    API's configuration (``MARS_CRITIC_QUEUE=true``) serves the real critic instead of sending
    requests to its own queue; B and T come from ``critic_queue_max_pairs`` and
    ``critic_queue_max_wait_ms``. The dummy request has two pairs (a Qwen2-VL critic with
    ``rationale_top_k >= 1`` exercises both paths). An invalid JSON answer to the dummy (a
    :class:`~critic.protocol.CriticUnavailable` caused by a
    :class:`critic.prompt.CriticAnswerError`) is only logged: the weights did load.

    Raises:
        RuntimeError: the settings configure no critic (the message says why).
        CriticUnavailable: the dummy scoring failed otherwise (e.g. an OpenAI-compatible
            endpoint that cannot be reached).
        ValueError, OSError: from :func:`build_critic` / the model loading.
    """
    global _batcher
    with _state_lock:
        if _batcher is not None:
            return _batcher
        from critic.prompt import CriticAnswerError
        from mars.registry import build_critic
        from mars.settings import get_settings

        s = settings or get_settings()
        t0 = time.perf_counter()
        critic, note = build_critic(s.model_copy(update={"critic_queue": False}))
        if critic is None:
            raise RuntimeError(f"the critic worker has no critic to serve: {note}")
        if hasattr(critic, "warm_up"):
            critic.warm_up()  # type: ignore[attr-defined]
        batcher = MicroBatcher(critic, s.critic_queue_max_pairs, s.critic_queue_max_wait_ms / 1000)
        image = Image.new("RGB", (64, 64), (128, 128, 128)) if critic.uses_images else None
        dummy = [CriticPair("warm-up", image, f"warm-up-{i}", "warm-up product", image) for i in range(2)]
        try:
            batcher.submit(dummy).result()
        except CriticUnavailable as e:
            if not isinstance(e.__cause__, CriticAnswerError):
                batcher.close()
                raise
            log.warning("critic warm-up: the dummy answer was not valid JSON (%s); the model is loaded",
                        e.__cause__.reason)
        except BaseException:
            batcher.close()
            raise
        _batcher = batcher
        log.info("critic worker ready: %s; B=%d pairs, T=%.0f ms; warm-up %.1f s", note, batcher.max_pairs,
                 batcher.max_wait_s * 1000, time.perf_counter() - t0)
        return batcher


def _warm_or_exit() -> None:
    """:func:`warm_up`, or end the worker process with the reason (a critic worker that cannot
    load its model must not take requests). ``SystemExit`` passes through Celery's signal
    dispatch, which logs and swallows ordinary exceptions."""
    try:
        warm_up()
    except Exception as exc:
        log.critical("the critic worker cannot start: %s", exc, exc_info=True)
        raise SystemExit(f"the critic worker cannot start: {exc.__class__.__name__}: {exc}") from exc


def _warm_logged() -> None:
    """:func:`warm_up` in a prefork child's background thread; a failure reaches the callers
    through the tasks, which call :func:`warm_up` again."""
    try:
        warm_up()
    except Exception:
        log.exception("critic warm-up failed")


@worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Note whether this worker consumes ``critic`` and its pool; with the threads pool (tasks
    run in this process, no ``worker_process_init``) warm up now, before anything is consumed."""
    global _consumes_critic, _pool
    from celery.concurrency import get_implementation

    try:
        _consumes_critic = QUEUE in sender.app.amqp.queues.consume_from
        pool_cls = sender.pool_cls  # may still be a name such as "threads"
        _pool = (get_implementation(pool_cls) if isinstance(pool_cls, str) else pool_cls).__module__
    except AttributeError:
        _consumes_critic = False
    if _consumes_critic and _pool not in ("celery.concurrency.prefork", "celery.concurrency.solo"):
        _warm_or_exit()


@worker_process_init.connect
def _on_worker_process_init(**_: Any) -> None:
    """Warm up in the process that runs the tasks: inline for solo (before consuming); for a
    prefork child in a background thread, because Celery kills a child whose
    ``worker_process_init`` takes longer than ``worker_proc_alive_timeout`` (4 s by default),
    and the child's first task waits for it (:func:`warm_up` holds its lock while loading)."""
    if not _consumes_critic:
        return
    if _pool == "celery.concurrency.solo":
        _warm_or_exit()
    else:
        threading.Thread(target=_warm_logged, name="critic-warm-up", daemon=True).start()


@worker_shutdown.connect
def _on_worker_shutdown(**_: Any) -> None:
    """Stop the model thread (pending requests fail; their callers time out anyway)."""
    if _batcher is not None:
        _batcher.close()


# ------------------------------------------------------------------ the task


@app.task(name=TASK_NAME, bind=True, ignore_result=False, acks_late=False, throws=(CriticTimeout,))
def critic_score(self: Task, payload: dict[str, Any]) -> dict[str, Any]:
    """Score one request's pairs in this worker's batcher.

    ``payload`` is :func:`critic.wire.pairs_to_json` plus ``"deadline"`` (``time.time()``
    seconds, or None). Returns ``{"verdicts": [verdict_to_json, ...], "batches": [{"id",
    "pairs", "requests", "model_ms"}, ...], "queued_ms": <ms from the task's start to its
    result>}``.

    Acknowledged on receipt (``acks_late=False``): a critic request is interactive, so a
    re-delivery after a worker crash would arrive long after its caller gave up. A missed
    deadline is an expected outcome (``throws``: logged at INFO without a traceback; Celery
    docs, "Tasks" → ``Task.throws``).

    Raises:
        CriticTimeout: the deadline passed before the pairs were scored.
        CriticUnavailable: the critic could not judge the pairs (e.g. an unreadable answer).
        ValueError: a payload of another version.

    Whatever it raises is stored as the task's failure and re-raised by Celery at the client,
    which reports it as :class:`~critic.protocol.CriticUnavailable`.
    """
    t0 = time.perf_counter()
    batcher = warm_up()
    deadline = payload.get("deadline")
    future = batcher.submit(pairs_from_json(payload), deadline)
    timeout = None if deadline is None else max(0.0, deadline - time.time()) + 0.05
    try:
        verdicts, batches = future.result(timeout=timeout)
    except FutureTimeout:
        batcher.cancel(future)
        raise CriticTimeout(f"deadline passed while waiting for the critic ({self.request.id})", self.request.id) from None
    return {
        "verdicts": [verdict_to_json(v) for v in verdicts],
        "batches": [b.__dict__ for b in batches],
        "queued_ms": (time.perf_counter() - t0) * 1000,
    }
