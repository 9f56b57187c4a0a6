"""The queued critic's client: :class:`QueuedCritic` sends a search's pairs to the ``critic``
queue and waits for the worker's verdicts (:class:`CriticReply`).

:class:`QueuedCritic` implements :class:`critic.protocol.Critic`: it serialises the pairs
(:func:`critic.wire.pairs_to_json`), sends one ``mars.critic_score`` task per request (served
by :mod:`workers.critic`) and waits at most its deadline (``critic_deadline_ms``); past it,
:class:`critic.protocol.CriticTimeout`. Each request has its own task id, so its result can
only come back to its own caller; a late result of a timed-out request is never read. The
deadline also travels with the task: the broker message expires then (Celery "Calling Tasks"
→ ``expires``: the worker marks an expired message REVOKED instead of running it, and the
client reads that REVOKED state as a :class:`~critic.protocol.CriticTimeout` too) and the
worker's batcher (:mod:`critic.batching`) drops pairs whose deadline has passed before they
reach the model.

Errors follow the critic contract: whatever keeps the worker from judging a request (a
missed deadline, a broker or result backend that cannot be reached, an exception on the
worker's side that Celery re-raises here) is a :class:`~critic.protocol.CriticUnavailable`
(:class:`~critic.protocol.CriticTimeout` for the deadline), chained from its cause, so the
funnel keeps the fused order and says why.

Results come back through the app's Redis result backend (``result_backend`` in
:mod:`workers.app`); Celery keeps one backend per thread (``app.backend``), so the API's
request threads each get their own connection. Importing this module loads no model and does
not import the worker's task module.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from celery import Celery
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.exceptions import OperationalError
from kombu.utils.url import maybe_sanitize_url

from critic.batching import BatchInfo
from critic.prompt import one_line
from critic.protocol import CriticPair, CriticTimeout, CriticUnavailable, Verdict
from critic.wire import TASK_NAME, pairs_to_json, verdict_from_json
from workers.app import app

if TYPE_CHECKING:
    from mars.settings import Settings

__all__ = ["CriticReply", "QueuedCritic"]


@dataclass(frozen=True)
class CriticReply:
    """What one queued request got back: the ``verdicts`` (one per pair, in order), the
    ``batches`` (:class:`~critic.batching.BatchInfo`) they were scored in, the ``task_id`` and
    the round trip in ms."""

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
            CriticUnavailable: the broker cannot be reached (chained from kombu's
                ``OperationalError``), nor the result backend (chained from Celery's
                "retry limit exceeded" ``RuntimeError``, after the backend's own reconnect
                retries: ``result_backend_transport_options["retry_policy"]``), or the task
                failed: the worker's critic could not judge the pairs, or raised anything else,
                which Celery re-raises here and this chains from.
        """
        return self.request(pairs).verdicts

    def request(self, pairs: Sequence[CriticPair], deadline_ms: float | None = None) -> CriticReply:
        """:meth:`score` with what the worker reports: the batches the pairs were scored in.

        ``deadline_ms`` overrides the critic's deadline for this request.

        Raises:
            CriticTimeout, CriticUnavailable: as :meth:`score`.
        """
        t0 = time.monotonic()
        deadline_ms = deadline_ms if deadline_ms is not None else self.deadline_ms
        if not pairs:
            return CriticReply([], [], "", 0.0)
        deadline = time.time() + deadline_ms / 1000
        payload = {**pairs_to_json(pairs, self.image_format, self.jpeg_quality), "deadline": deadline}
        # The Redis result backend subscribes to the task's result before the message is sent,
        # so a fast answer cannot be missed.
        try:
            result = self.app.send_task(
                TASK_NAME, args=[payload], expires=max(0.0, deadline - time.time()),
                retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.1, "interval_max": 0.2},
            )
        except OperationalError as exc:
            raise CriticUnavailable(one_line(
                f"the queued critic cannot reach the broker at {maybe_sanitize_url(self.app.conf.broker_url)}: {exc}"
            )) from exc
        except RuntimeError as exc:
            if not self._backend_unreachable(exc):
                raise
            raise CriticUnavailable(self._backend_message(exc)) from exc
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
        except Exception as exc:  # the task's failure, re-raised by Celery, or the result backend's
            if self._backend_unreachable(exc):
                raise CriticUnavailable(self._backend_message(exc)) from exc
            raise CriticUnavailable(one_line(
                f"the queued critic's task {result.id} failed on the worker: {type(exc).__name__}: {exc}"
            )) from exc
        result.forget()
        return CriticReply(
            [verdict_from_json(v) for v in value["verdicts"]],
            [BatchInfo(**b) for b in value["batches"]],
            result.id,
            (time.monotonic() - t0) * 1000,
        )

    def _backend_unreachable(self, exc: BaseException) -> bool:
        """Whether ``exc`` is Celery's "retry limit exceeded" for the result backend: the
        ``RuntimeError`` its result consumer raises from a connection error after its reconnect
        failed (``celery.backends.asynchronous.BaseResultConsumer.reconnect_on_error``; it
        reconnects on a later call once the store is back)."""
        errors = tuple(getattr(self.app.backend, "connection_errors", ()) or ())
        return isinstance(exc, RuntimeError) and bool(errors) and isinstance(exc.__cause__, errors)

    def _backend_message(self, exc: BaseException) -> str:
        url = maybe_sanitize_url(str(self.app.conf.result_backend))
        return one_line(f"the queued critic cannot reach the result backend at {url}: {exc.__cause__}")
