"""The queued critic: the ``mars.critic_score`` task, its cross-request micro-batcher, its client.

Server side
    One GPU worker per device consumes queue ``critic`` (routed in :mod:`workers.app`). Each
    request (one search's pairs, typically ``MARS_CRITIC_TOP_N`` = 20) is one task,
    :func:`critic_score`. The task does not call the model itself: it hands its pairs to the
    process's :class:`MicroBatcher`, whose one model thread scores up to ``B`` pairs
    (``critic_queue_max_pairs``) at once, taken from every request in flight, or whatever has
    arrived ``T`` ms (``critic_queue_max_wait_ms``) after the oldest waiting pair, whichever
    comes first. So the model runs with concurrency 1 while many requests are in flight. Start
    the worker with the **threads** pool; ``-c`` is how many requests may wait in the batcher at
    once (each holds one pool thread while it waits)::

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
    :class:`QueuedCritic` implements :class:`critic.protocol.Critic`: it serialises the pairs
    (:func:`critic.wire.pairs_to_json`), sends one task per request and waits at most its
    deadline (``critic_deadline_ms``); past it, :class:`critic.protocol.CriticTimeout` (a
    :class:`TimeoutError`). Each request has its own task id, so its result can only come back
    to its own caller; a late result of a timed-out request is never read. The deadline also
    travels with the task: the broker message expires then (Celery "Calling Tasks" →
    ``expires``: the worker marks an expired message REVOKED instead of running it, and the
    client reads that REVOKED state as a :class:`~critic.protocol.CriticTimeout` too) and the
    batcher drops pairs whose deadline has passed before they reach the model.

Results
    The app's Redis result backend (``result_backend``, ``result_expires`` in
    :mod:`workers.app`); the app ignores results by default and this task sets
    ``ignore_result=False``. Celery keeps one backend per thread (``app.backend``), so the
    worker's pool threads and the API's request threads each get their own connection.

Why not ``celery-batches``
    celery-batches 0.11 (``Batches`` task class, ``flush_every`` / ``flush_interval``;
    https://celery-batches.readthedocs.io) buffers *messages* in the worker's consumer and
    hands the batch task a list of ``SimpleRequest``. It was evaluated and not used:
    (1) it requires ``celery<5.7`` and this project runs Celery 5.7.0, so installing it
    downgrades Celery to 5.6.3; (2) ``flush_every`` counts messages, not pairs, so "up to B
    pairs" cannot be expressed when requests carry 20 pairs each; (3) ``flush_interval`` is a
    repeating timer started by the first message, not "T ms after the oldest waiting pair";
    (4) buffered messages are acknowledged only when their batch runs (or returns, under this
    app's ``task_acks_late``), so the buffer can never hold more than the prefetch count: the
    worker would need ``--prefetch-multiplier >= flush_every`` (with ``-c 1``), while
    ``workers.app`` sets 1 for every worker; (5) its flush hands the buffered requests to the
    pool directly, so per-message ``expires`` and revocation are not checked, and the batch
    function has to store every request's result or failure itself
    (``backend.mark_as_done``). The threads pool plus a small in-process batcher needs no
    dependency and keeps Celery's own result storage, expiry and failure handling per request.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from celery import Celery, Task
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from celery.signals import worker_init, worker_process_init, worker_shutdown
from PIL import Image

from critic.protocol import Critic, CriticPair, CriticTimeout, Verdict
from critic.wire import pairs_from_json, pairs_to_json, verdict_from_json, verdict_to_json
from workers.app import app

if TYPE_CHECKING:
    from mars.settings import Settings

__all__ = ["QueuedCritic", "CriticReply", "BatchInfo", "MicroBatcher", "critic_score", "warm_up", "QUEUE", "TASK_NAME"]

log = logging.getLogger("mars.workers.critic")

QUEUE = "critic"
TASK_NAME = "mars.critic_score"


# ------------------------------------------------------------------ batch scoring


@dataclass(frozen=True)
class BatchInfo:
    """One model call of the batcher: its sequence number in the worker process (``id``), how
    many ``pairs`` from how many ``requests`` it scored, and its wall time in ms (``model_ms``)."""

    id: int
    pairs: int
    requests: int
    model_ms: float


@dataclass
class _Request:
    """A request inside the batcher: its pairs, deadline (``time.time()`` seconds or None),
    the future its task waits on, and what has been scored so far."""

    pairs: Sequence[CriticPair]
    deadline: float | None
    future: Future
    arrived: float
    verdicts: list[Verdict | None] = field(default_factory=list)
    batches: dict[int, BatchInfo] = field(default_factory=dict)
    left: int = 0

    @property
    def done(self) -> bool:
        return self.future.done()


@dataclass(frozen=True)
class _Unit:
    """What the batcher never splits: ``pairs`` of one request starting at ``offset``; ``kind``
    is ``"full"`` / ``"fast"`` (one VLM pair on that path) or ``"request"`` (a whole request)."""

    request: _Request
    offset: int
    pairs: tuple[CriticPair, ...]
    kind: str


class _Scorer:
    """How a critic's work is cut into units and scored in one call per batch.

    For a Qwen2-VL critic (duck-typed: ``answers``, ``yes_probabilities``, ``verdicts``,
    ``rationale_top_k``; see :class:`critic.vlm.QwenVLCritic`) each pair is a unit: a request's
    first ``rationale_top_k`` pairs go to the full path (generation), the rest to the fast path,
    so one batch makes one ``answers`` call and one ``yes_probabilities`` call over the pairs of
    every request in it, and each request gets exactly what ``critic.score(its pairs)`` would
    give. Any other critic may depend on the whole list (the protocol does not promise pairwise
    independence), so its unit is a whole request, scored by ``critic.score``.
    """

    def __init__(self, critic: Critic) -> None:
        self.critic = critic
        self.vlm = all(hasattr(critic, a) for a in ("answers", "yes_probabilities", "verdicts", "rationale_top_k"))

    def units(self, request: _Request) -> list[_Unit]:
        if not self.vlm:
            return [_Unit(request, 0, tuple(request.pairs), "request")] if request.pairs else []
        k = self.critic.rationale_top_k  # type: ignore[attr-defined]
        return [_Unit(request, i, (p,), "full" if i < k else "fast") for i, p in enumerate(request.pairs)]

    def score(self, units: Sequence[_Unit]) -> list[list[Verdict]]:
        """The verdicts of each unit, in order; all units in one model call (per path)."""
        t0 = time.perf_counter()
        if not self.vlm:
            return [self.critic.score(u.pairs) for u in units]
        critic: Any = self.critic
        full = [u for u in units if u.kind == "full"]
        fast = [u for u in units if u.kind == "fast"]
        answers = critic.answers([u.pairs[0] for u in full]) if full else []
        yes = critic.yes_probabilities([u.pairs[0] for u in fast]) if fast else []
        verdicts = critic.verdicts(answers, yes, time.perf_counter() - t0)
        by_unit = {id(u): [v] for u, v in zip(full + fast, verdicts)}
        return [by_unit[id(u)] for u in units]


class MicroBatcher:
    """Scores the pairs of concurrent requests together: one model thread, batches of at most
    ``max_pairs`` pairs, closed ``max_wait_s`` after the oldest waiting pair arrived.

    :meth:`submit` is thread-safe and returns a :class:`concurrent.futures.Future`; its result
    is ``(verdicts, batches)``: one :class:`Verdict` per pair in order (as ``critic.score``
    would give for the request alone) and the :class:`BatchInfo` of each model call that
    scored some of them. Pairs leave in arrival order (FIFO); a Qwen2-VL request may be split
    over two consecutive batches, another critic's request never is (a request larger than
    ``max_pairs`` is then a batch of its own). If a batch fails, each of its requests is
    scored alone so that one bad request fails only its own future.

    Args:
        critic: any :class:`Critic`; Qwen2-VL critics are batched per pair (see ``_Scorer``).
        max_pairs: B, pairs per model call (>= 1).
        max_wait_s: T, seconds a batch may wait for more pairs after its first (>= 0).

    Raises:
        ValueError: ``max_pairs < 1`` or ``max_wait_s < 0``.
    """

    def __init__(self, critic: Critic, max_pairs: int, max_wait_s: float) -> None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be >= 1, got {max_pairs}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait_s must be >= 0, got {max_wait_s}")
        self.critic = critic
        self.max_pairs = int(max_pairs)
        self.max_wait_s = float(max_wait_s)
        self._scorer = _Scorer(critic)
        self._pending: deque[_Unit] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._ids = itertools.count(1)
        self.dropped = 0  #: requests dropped because their deadline passed before scoring
        self._thread = threading.Thread(target=self._run, name="critic-batcher", daemon=True)
        self._thread.start()

    def submit(self, pairs: Sequence[CriticPair], deadline: float | None = None) -> Future:
        """Queue ``pairs`` (one request); ``deadline`` is a ``time.time()`` in seconds after which
        its unscored pairs are dropped and the future fails with :class:`CriticTimeout`.

        Raises:
            RuntimeError: the batcher is closed.
        """
        future: Future = Future()
        request = _Request(pairs, deadline, future, time.monotonic(), [None] * len(pairs), left=len(pairs))
        if not pairs:
            future.set_result(([], []))
            return future
        units = self._scorer.units(request)
        with self._cond:
            if self._closed:
                raise RuntimeError("the critic batcher is closed")
            self._pending.extend(units)
            self._cond.notify()
        return future

    def cancel(self, future: Future) -> None:
        """Give up on a submitted request: its pairs not yet taken are never scored."""
        _fail(future, CriticTimeout("request cancelled by its task"))

    def close(self) -> None:
        """Stop the model thread after the batch it is scoring; pending requests fail."""
        with self._cond:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for u in pending:
            _fail(u.request.future, RuntimeError("the critic batcher was closed"))
        self._thread.join(timeout=60)

    # ---------------------------------------------------------------- model thread

    def _take(self) -> list[_Unit] | None:
        """Wait for the next batch: up to ``max_pairs`` live pairs, or what arrived within
        ``max_wait_s`` of the oldest; None once closed."""
        with self._cond:
            while True:
                self._drop_dead()
                while not self._pending and not self._closed:
                    self._cond.wait()
                    self._drop_dead()
                if self._closed:
                    return None
                close_at = self._pending[0].request.arrived + self.max_wait_s
                while sum(len(u.pairs) for u in self._pending) < self.max_pairs and not self._closed:
                    remaining = close_at - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                self._drop_dead()
                if not self._pending:
                    continue
                batch, size = [], 0
                while self._pending and (not batch or size + len(self._pending[0].pairs) <= self.max_pairs):
                    unit = self._pending.popleft()
                    batch.append(unit)
                    size += len(unit.pairs)
                return batch

    def _drop_dead(self) -> None:
        """Remove units of requests that are finished (failed, cancelled) or past their deadline."""
        now = time.time()
        keep: deque[_Unit] = deque()
        for u in self._pending:
            r = u.request
            if not r.done and r.deadline is not None and now > r.deadline:
                self.dropped += 1
                _fail(r.future, CriticTimeout(f"deadline passed before scoring ({len(r.pairs)} pairs dropped)"))
            if not r.done:
                keep.append(u)
        self._pending = keep

    def _run(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                self._score(batch)
            except BaseException as exc:  # never let the model thread die with requests waiting
                log.exception("critic batch failed")
                for u in batch:
                    _fail(u.request.future, exc)

    def _score(self, batch: list[_Unit]) -> None:
        requests = list({id(u.request): u.request for u in batch}.values())
        t0 = time.perf_counter()
        results: dict[int, list[Verdict] | BaseException] = {}
        try:
            results.update(zip(map(id, batch), self._scorer.score(batch)))
        except Exception:
            if len(requests) == 1:
                raise
            log.warning("critic batch of %d requests failed; scoring them one by one", len(requests), exc_info=True)
            for r in requests:
                mine = [u for u in batch if u.request is r]
                try:
                    results.update(zip(map(id, mine), self._scorer.score(mine)))
                except Exception as exc:  # only this request fails
                    results.update((id(u), exc) for u in mine)
        info = BatchInfo(next(self._ids), sum(len(u.pairs) for u in batch), len(requests), (time.perf_counter() - t0) * 1000)
        log.info("critic batch %d: %d pairs from %d requests in %.1f ms", info.id, info.pairs, info.requests, info.model_ms)
        for unit in batch:
            r, verdicts = unit.request, results[id(unit)]
            if r.done:
                continue
            if isinstance(verdicts, BaseException):
                _fail(r.future, verdicts)
                continue
            r.verdicts[unit.offset:unit.offset + len(verdicts)] = verdicts
            r.batches[info.id] = info
            r.left -= len(unit.pairs)
            if r.left == 0:
                try:
                    r.future.set_result((list(r.verdicts), sorted(r.batches.values(), key=lambda b: b.id)))
                except InvalidStateError:  # its task gave up meanwhile
                    pass


def _fail(future: Future, exc: BaseException) -> None:
    """Fail ``future`` with ``exc`` unless it is already settled (e.g. cancelled by its task)."""
    try:
        future.set_exception(exc)
    except InvalidStateError:
        pass


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
    ``rationale_top_k >= 1`` exercises both paths). An invalid JSON answer to the dummy
    (:class:`critic.prompt.CriticAnswerError`) is only logged: the weights did load.

    Raises:
        RuntimeError: the settings configure no critic (the message says why).
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
        except CriticAnswerError as e:
            log.warning("critic warm-up: the dummy answer was not valid JSON (%s); the model is loaded", e.reason)
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
        ValueError: a payload of another version.
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


# ------------------------------------------------------------------ the client


@dataclass(frozen=True)
class CriticReply:
    """What one queued request got back: the ``verdicts`` (one per pair, in order), the
    ``batches`` (:class:`BatchInfo`) they were scored in, the ``task_id`` and the round trip in ms."""

    verdicts: list[Verdict]
    batches: list[BatchInfo]
    task_id: str
    round_trip_ms: float


class QueuedCritic:
    """A :class:`critic.protocol.Critic` that sends each request to the ``critic`` queue.

    Args:
        deadline_ms: per-request deadline in milliseconds (send + queue + scoring + result).
        name: the backend name the funnel reports (the verdicts carry the worker critic's name).
        uses_images: whether the funnel should decode product photos for this critic (True for
            the Qwen2-VL worker, False for the learned critic).
        image_format: ``"JPEG"`` (default; small, lossy: a VLM's scores move slightly against
            in-process scoring of the original pixels) or ``"PNG"`` (lossless, larger).
        jpeg_quality: 1..95 when ``image_format="JPEG"``.
        celery_app: the app whose broker, routes and result backend to use; default
            :data:`workers.app.app`.

    Raises:
        ValueError: ``deadline_ms <= 0`` or another image format.

    Thread-safe: Celery gives each calling thread its own result-backend connection.
    """

    def __init__(
        self,
        *,
        deadline_ms: float,
        name: str = "queued:vlm",
        uses_images: bool = True,
        image_format: str = "JPEG",
        jpeg_quality: int = 95,
        celery_app: Celery | None = None,
    ) -> None:
        if deadline_ms <= 0:
            raise ValueError(f"deadline_ms must be > 0, got {deadline_ms}")
        if image_format.upper() not in ("JPEG", "PNG"):
            raise ValueError(f"image_format must be JPEG or PNG, got {image_format!r}")
        self.deadline_ms = float(deadline_ms)
        self.name = name
        self.uses_images = uses_images
        self.image_format = image_format.upper()
        self.jpeg_quality = jpeg_quality
        self.app = celery_app or app

    @classmethod
    def from_settings(cls, settings: "Settings", celery_app: Celery | None = None) -> "QueuedCritic":
        """The client for the worker that ``settings`` describe: deadline ``critic_deadline_ms``,
        ``uses_images`` unless ``MARS_CRITIC=learned`` (it scores stored vectors), name
        ``queued:<MARS_CRITIC>``."""
        return cls(
            deadline_ms=settings.critic_deadline_ms,
            name=f"queued:{settings.critic}",
            uses_images=settings.critic != "learned",
            celery_app=celery_app,
        )

    def score(self, pairs: Sequence[CriticPair]) -> list[Verdict]:
        """One :class:`Verdict` per pair, in order, scored by the ``critic`` worker.

        Raises:
            CriticTimeout: no result within ``deadline_ms``, or the message expired in the queue
                (Celery stored it REVOKED) before a worker took it; the fused order should stand.
            kombu.exceptions.OperationalError: the broker cannot be reached.
            Exception: what the worker's critic raised, re-raised here by Celery (e.g.
                :class:`critic.prompt.CriticAnswerError`).
        """
        return self.request(pairs).verdicts

    def request(self, pairs: Sequence[CriticPair], deadline_ms: float | None = None) -> CriticReply:
        """:meth:`score` with what the worker reports: the batches the pairs were scored in.

        ``deadline_ms`` overrides the critic's deadline for this request.

        Raises:
            CriticTimeout, kombu.exceptions.OperationalError, Exception: as :meth:`score`.
        """
        t0 = time.monotonic()
        deadline_ms = deadline_ms if deadline_ms is not None else self.deadline_ms
        if not pairs:
            return CriticReply([], [], "", 0.0)
        deadline = time.time() + deadline_ms / 1000
        payload = {**pairs_to_json(pairs, self.image_format, self.jpeg_quality), "deadline": deadline}
        # The Redis result backend subscribes to the task's result before the message is sent,
        # so a fast answer cannot be missed.
        result = self.app.send_task(
            TASK_NAME, args=[payload], expires=max(0.0, deadline - time.time()),
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.2},
        )
        try:
            value = result.get(timeout=max(0.0, deadline - time.time()))
        except CriticTimeout as exc:  # the worker gave up on it (its clock saw the deadline pass)
            raise CriticTimeout(f"the queued critic dropped the request: {exc} (task {result.id}); the fused "
                                "order stands", result.id, deadline_ms) from None
        except TaskRevokedError as exc:  # the message expired in the queue: the worker stored REVOKED
            raise CriticTimeout(f"the queued critic's message was revoked ({exc}) before a worker took it "
                                f"(task {result.id}); the fused order stands", result.id, deadline_ms) from None
        except CeleryTimeout:
            result.backend.remove_pending_result(result)  # unsubscribe; a late result is never read
            raise CriticTimeout(
                f"the queued critic gave no answer within {deadline_ms:.0f} ms (task {result.id}); "
                "the fused order stands", result.id, deadline_ms,
            ) from None
        result.forget()
        return CriticReply(
            [verdict_from_json(v) for v in value["verdicts"]],
            [BatchInfo(**b) for b in value["batches"]],
            result.id,
            (time.monotonic() - t0) * 1000,
        )
