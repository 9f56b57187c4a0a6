"""Cross-validation folds by group, shared by ``mars tune`` (:mod:`evaluation.tune`) and the
cross-fitting by room (:mod:`training.room_folds`): a group (a room id, or a query id for a
query without a room) always falls in the same fold, on every run and machine.
"""

from __future__ import annotations

import zlib


def cv_fold(group: str, folds: int = 2) -> int:
    """The fold of a cross-validation group: CRC-32 of its UTF-8 bytes modulo ``folds`` (stable across runs)."""
    return zlib.crc32(group.encode("utf-8")) % folds


__all__ = ["cv_fold"]
