"""Build the critic the settings name (``MARS_CRITIC``)."""

from __future__ import annotations

from pathlib import Path

from critic.learned import LearnedCritic
from critic.protocol import Critic

CRITICS: tuple[str, ...] = ("none", "learned")


def build_critic(name: str, checkpoint: Path) -> tuple[Critic | None, str]:
    """The critic named ``name`` and a one-line note for responses.

    ``"none"`` gives ``(None, "MARS_CRITIC=none")``; ``"learned"`` loads ``checkpoint`` and,
    when it does not exist yet, gives ``(None, "<how to train one>")`` so search keeps working
    and ``--mode full`` says why nothing was re-scored.

    Raises:
        ValueError: an unknown name, or a file that is not a learned-critic checkpoint.
    """
    if name == "none":
        return None, "MARS_CRITIC=none"
    if name == "learned":
        if not checkpoint.exists():
            return None, f"no learned-critic checkpoint at {checkpoint}; train one with `mars train critic`"
        critic = LearnedCritic.load(checkpoint)
        return critic, f"learned critic from {checkpoint} ({critic.meta.get('pairs', '?')} training pairs)"
    raise ValueError(f"unknown critic {name!r}; available: {', '.join(CRITICS)}")
