"""The engine's wiring: builds what the settings name, through :mod:`mars.registry`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mars.registry import build_critic

if TYPE_CHECKING:
    from critic.protocol import Critic
    from mars.settings import Settings


def stage3_critic(settings: "Settings") -> tuple["Critic | None", str]:
    """The critic the funnel calls and a one-line note for responses: the one
    :func:`mars.registry.build_critic` builds in this process or, with ``MARS_CRITIC_QUEUE``, a
    :class:`workers.critic.QueuedCritic` that sends its work to the Celery ``critic`` queue,
    whose worker builds the named critic with :func:`~mars.registry.build_critic`.

    Raises:
        ValueError, RuntimeError: as :func:`mars.registry.build_critic`.
    """
    if settings.critic != "none" and settings.critic_queue:
        from workers.critic import QueuedCritic  # the Celery client; the worker builds the real critic

        queued = QueuedCritic.from_settings(settings)
        return queued, f"{settings.critic} critic on the Celery 'critic' queue (deadline {settings.critic_deadline_ms:.0f} ms)"
    return build_critic(settings)
