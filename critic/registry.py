"""Build the critic the settings name (``MARS_CRITIC``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from critic.learned import LearnedCritic
from critic.protocol import Critic

if TYPE_CHECKING:
    from mars.settings import Settings

CRITICS: tuple[str, ...] = ("none", "learned", "vlm", "openai")


def build_critic(settings: "Settings") -> tuple[Critic | None, str]:
    """The critic ``settings.critic`` names and a one-line note for responses.

    With ``MARS_CRITIC_QUEUE`` the critic is a :class:`workers.critic.QueuedCritic`: requests
    go to the ``critic`` queue, whose worker builds the named critic with this same function.

    ``"none"`` gives ``(None, "MARS_CRITIC=none")``. ``"learned"`` loads
    ``settings.critic_path`` and, when it does not exist yet, gives ``(None, "<how to train
    one>")`` so search keeps working and ``--mode full`` says why nothing was re-scored.
    ``"vlm"`` builds a :class:`critic.vlm.QwenVLCritic` from ``MARS_CRITIC_MODEL`` (weights
    load on first use, not here); ``"openai"`` a :class:`critic.openai_compat.OpenAICompatCritic`
    on ``MARS_CRITIC_ENDPOINT``.

    Raises:
        ValueError: an unknown name, ``vlm`` without ``MARS_CRITIC_MODEL``, ``openai``
            without ``MARS_CRITIC_ENDPOINT`` / ``MARS_CRITIC_API_MODEL``, or a file that is not
            a learned-critic checkpoint.
        RuntimeError: ``MARS_CRITIC_4BIT`` without CUDA or bitsandbytes.
    """
    name = settings.critic
    if name == "none":
        return None, "MARS_CRITIC=none"
    if settings.critic_queue:
        from workers.critic import QueuedCritic  # the Celery client; the worker builds the real critic

        queued = QueuedCritic.from_settings(settings)
        return queued, f"{name} critic on the Celery 'critic' queue (deadline {settings.critic_deadline_ms:.0f} ms)"
    if name == "learned":
        checkpoint = settings.critic_path
        if not checkpoint.exists():
            return None, f"no learned-critic checkpoint at {checkpoint}; train one with `mars train critic`"
        critic = LearnedCritic.load(checkpoint)
        return critic, f"learned critic from {checkpoint} ({critic.meta.get('pairs', '?')} training pairs)"
    if name == "vlm":
        if not settings.critic_model:
            raise ValueError("MARS_CRITIC=vlm needs MARS_CRITIC_MODEL (a local Qwen2-VL directory)")
        from critic.vlm import QwenVLCritic  # torch-heavy; only when asked for

        vlm = QwenVLCritic(
            settings.critic_model,
            adapter=settings.critic_adapter,
            load_in_4bit=settings.critic_4bit,
            batch_size=settings.critic_batch_size,
            rationale_top_k=settings.critic_rationale_top_k,
        )
        adapter = f" + LoRA {settings.critic_adapter}" if settings.critic_adapter else ""
        return vlm, f"Qwen2-VL critic from {settings.critic_model}{adapter}"
    if name == "openai":
        if not settings.critic_endpoint or not settings.critic_api_model:
            raise ValueError(
                "MARS_CRITIC=openai needs MARS_CRITIC_ENDPOINT (e.g. http://localhost:8000/v1) "
                "and MARS_CRITIC_API_MODEL (the served model name)"
            )
        from critic.openai_compat import OpenAICompatCritic  # imports the openai SDK only when asked for

        key = settings.critic_api_key.get_secret_value() if settings.critic_api_key else None
        api = OpenAICompatCritic(
            settings.critic_endpoint,
            settings.critic_api_model,
            api_key=key,
            timeout_s=settings.critic_timeout_s,
            max_retries=settings.critic_max_retries,
            max_concurrency=settings.critic_max_concurrency,
        )
        return api, f"OpenAI-compatible critic {settings.critic_api_model} at {settings.critic_endpoint}"
    raise ValueError(f"unknown critic {name!r}; available: {', '.join(CRITICS)}")
