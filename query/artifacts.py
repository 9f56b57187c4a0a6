"""The trained pieces the funnel and ingestion read, as one value.

:class:`Artifacts` holds each piece as a zero-argument callable returning the current one or
None while it is not trained: in a running engine these are
:class:`mars.checkpoints.WatchedCheckpoint` files under ``MARS_HOME`` (a model trained while
``mars serve`` runs is picked up), and :meth:`Artifacts.with_values` swaps some for fixed
in-memory values (cross-fitting builds funnels that way: :mod:`training.room_folds`).
:meth:`Artifacts.current` takes a :class:`Trained` snapshot once per query, so every list and
the critic of one query see the same versions.

| piece | trained by | used by |
|---|---|---|
| ``aligned`` (:class:`indexing.aligned.AlignHeads`) | ``mars train align`` | the ``aligned`` list, ingestion |
| ``whitening`` (:class:`indexing.whitening.Whitening`) | ``mars train whitening`` | the ``image`` list, the critic |
| ``prior`` (:class:`indexing.staging_prior.StagingPrior`) | ``mars train prior`` | the ``prior`` list |
| ``category_head`` (:class:`catalog.category_head.CategoryHead`) | ``mars train category-head`` | ingestion |
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from catalog.category_head import CategoryHead
    from indexing.aligned import AlignHeads
    from indexing.staging_prior import StagingPrior
    from indexing.whitening import Whitening
    from mars.settings import Settings


def _untrained() -> None:
    return None


@dataclass(frozen=True)
class Trained:
    """The trained pieces one query reads (None: not trained)."""

    aligned: AlignHeads | None = None
    whitening: Whitening | None = None
    prior: StagingPrior | None = None


@dataclass(frozen=True)
class Artifacts:
    """The trained pieces as callables returning the current value or None (see the module doc)."""

    aligned: Callable[[], AlignHeads | None] = _untrained
    whitening: Callable[[], Whitening | None] = _untrained
    prior: Callable[[], StagingPrior | None] = _untrained
    category_head: Callable[[], CategoryHead | None] = _untrained

    @classmethod
    def watched(cls, settings: Settings, home: Path) -> "Artifacts":
        """The checkpoint files of ``home`` (and ``settings.category_head``), each re-read when it
        changes and ignored, with a logged reason, when it does not fit the settings' encoders."""
        from catalog.category_head import CategoryHeadFile, category_head_path
        from indexing.aligned import AlignHeadsFile, heads_path
        from indexing.staging_prior import StagingPriorFile, staging_prior_path
        from indexing.whitening import WhiteningFile, whitening_path

        return cls(
            aligned=AlignHeadsFile(heads_path(home), settings.image_encoder, settings.text_encoder),
            whitening=WhiteningFile(whitening_path(home), settings.image_encoder),
            prior=StagingPriorFile(staging_prior_path(home)),
            category_head=CategoryHeadFile(category_head_path(settings), settings.image_encoder),
        )

    def with_values(self, **values: Any) -> "Artifacts":
        """These artifacts with the named pieces fixed to ``values`` (a value or None), e.g.
        ``with_values(whitening=refitted)``; the others stay as they are. A value that was not
        read from a file gets a digest of its bytes (``fingerprinted()``), so the cached results
        of different versions never mix, as for files.

        Raises:
            TypeError: a name that is not a piece.
        """
        fixed = {name: value.fingerprinted() if value is not None else None for name, value in values.items()}
        return replace(self, **{name: (lambda v=value: v) for name, value in fixed.items()})

    def current(self) -> Trained:
        """One snapshot of the pieces a query reads."""
        return Trained(aligned=self.aligned(), whitening=self.whitening(), prior=self.prior())
