"""Cross-request micro-batching for a critic: :class:`MicroBatcher`, and :class:`BatchInfo`,
what each model call reports.

Many requests (one search's pairs each, typically ``MARS_CRITIC_TOP_N`` = 20) share one model:
each is handed to :meth:`MicroBatcher.submit` from its own thread, and the batcher's one model
thread scores up to ``B`` pairs (``max_pairs``) at once, taken from every request in flight,
or whatever has arrived ``T`` seconds (``max_wait_s``) after the oldest waiting pair, whichever
comes first. So the model runs with concurrency 1 while many requests wait. A request whose
deadline passes before its pairs reach the model is dropped
(:class:`~critic.protocol.CriticTimeout`). Each request gets exactly the verdicts that
``critic.score(its pairs)`` would give alone.

Used by the queued critic's Celery worker (:mod:`workers.critic`, the ``mars.critic_score``
task, one batcher per worker process), but free of Celery: it needs only a
:class:`~critic.protocol.Critic` and threads, so it is tested without a broker.

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
    (``backend.mark_as_done``). The threads pool plus this small in-process batcher needs no
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
from dataclasses import dataclass, field
from typing import Any

from critic.prompt import CriticAnswerError, unreadable_answer
from critic.protocol import Critic, CriticPair, CriticTimeout, CriticUnavailable, Verdict

__all__ = ["BatchInfo", "MicroBatcher"]

log = logging.getLogger("mars.critic.batching")


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
    give (an answer that stays unreadable is a :class:`~critic.protocol.CriticUnavailable`, as
    :meth:`critic.vlm.QwenVLCritic.score` raises). Any other critic may depend on the whole list
    (the protocol does not promise pairwise independence), so its unit is a whole request,
    scored by ``critic.score``.
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
        """The verdicts of each unit, in order; all units in one model call (per path).

        Raises:
            CriticUnavailable: a Qwen2-VL full-path answer stayed unreadable after its repair
                round (chained from the :class:`~critic.prompt.CriticAnswerError`).
            Exception: whatever ``critic.score`` (another critic) or the model raises.
        """
        t0 = time.perf_counter()
        if not self.vlm:
            return [self.critic.score(u.pairs) for u in units]
        critic: Any = self.critic
        full = [u for u in units if u.kind == "full"]
        fast = [u for u in units if u.kind == "fast"]
        try:
            answers = critic.answers([u.pairs[0] for u in full]) if full else []
        except CriticAnswerError as exc:  # what critic.score raises for it (QwenVLCritic.unavailable)
            unavailable = getattr(critic, "unavailable", None)
            raise (unavailable(exc) if unavailable else unreadable_answer(f"the {critic.name} critic", exc)) from exc
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
            CriticUnavailable: the batcher is closed.
        """
        future: Future = Future()
        request = _Request(pairs, deadline, future, time.monotonic(), [None] * len(pairs), left=len(pairs))
        if not pairs:
            future.set_result(([], []))
            return future
        units = self._scorer.units(request)
        with self._cond:
            if self._closed:
                raise CriticUnavailable("the critic batcher is closed")
            self._pending.extend(units)
            self._cond.notify()
        return future

    def cancel(self, future: Future) -> None:
        """Give up on a submitted request: its pairs not yet taken are never scored."""
        _fail(future, CriticTimeout("request cancelled by its task"))

    def close(self) -> None:
        """Stop the model thread after the batch it is scoring; pending requests fail with
        :class:`~critic.protocol.CriticUnavailable`."""
        with self._cond:
            self._closed = True
            pending = list(self._pending)
            self._pending.clear()
            self._cond.notify_all()
        for u in pending:
            _fail(u.request.future, CriticUnavailable("the critic batcher was closed"))
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
