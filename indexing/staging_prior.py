"""Staging prior: which products a catalog's staged rooms show, by room type (``mars train
prior``).

A room's title ("a cosy space for coffee and conversation") says little about the products
in it, but the room type does: some products are staged in many living rooms, others in
kitchens. From judged room queries (room id, room type, the products shown), the prior
counts, for each product, the rooms of each type that show it. For a query with a room type
(``SearchQuery.room``) the funnel's ``prior`` list ranks the products by the rooms of that
type that show them, then by all the rooms that show them, then by id: a popularity prior
per room type, the non-personalised baseline of recommender systems.

It is fused like any list (weighted RRF, weight ``prior``); the shipped weights use it for
text-only queries (a room title) and not for photo queries, where it lowered room-class and
room-type. On the IKEA dev rooms, leaving each room out of its own counts (its products
counted from the other 122 rooms, as a new room's would be), fusing it with weight 2 lifted
room-title nDCG@10 from 0.0384 to 0.0884 and Success@10 from 0.252 to 0.529; with weight 0.25
in photo queries room-class fell from 0.4004 to 0.3816 (``evaluation/tune.py`` lists, probe).

Stored as JSON at :func:`staging_prior_path` (``<MARS_HOME>/index/staging_prior.json``),
written atomically.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from mars.checkpoints import SavedCheckpoint, WatchedCheckpoint, file_digest

log = logging.getLogger("mars.staging_prior")

FORMAT = "mars-staging-prior/1"


class StagingPriorError(ValueError):
    """A file that is not a usable staging prior."""


class StagedHit(NamedTuple):
    """One product of the ``prior`` list: its id and the rooms of the query's room type that
    show it (an int as a float, like the other lists' scores)."""

    id: str
    score: float


def staging_prior_path(home: Path) -> Path:
    """Where the staging prior of the index under ``home`` (``MARS_HOME``) is stored."""
    return Path(home) / "index" / "staging_prior.json"


def room_type_key(room: str) -> str:
    """The form room types are compared in: lower case, single spaces ("Living  Room" ->
    "living room")."""
    return " ".join(room.lower().split())


@dataclass
class StagingPrior(SavedCheckpoint):
    """Rooms per room type and, per product, the rooms of each type that show it.

    Attributes:
        rooms: room type key (:func:`room_type_key`) -> judged rooms of that type.
        counts: product id -> room type key -> rooms of that type that show the product.
        room_ids: the ids of the rooms counted.
        digest: first 12 hex digits of the file's sha256 (set by :meth:`load`, or by
            :meth:`~mars.checkpoints.SavedCheckpoint.fingerprinted` for one built in memory).
    """

    rooms: dict[str, int]
    counts: dict[str, dict[str, int]]
    room_ids: frozenset[str] = frozenset()
    digest: str | None = None
    _totals: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._totals = {p: sum(by_room.values()) for p, by_room in self.counts.items()}

    @classmethod
    def fit(cls, staged: Iterable[tuple[str, str, Iterable[str]]]) -> "StagingPrior":
        """Count from ``(room id, room type, product ids shown)`` rows; a room given in several
        rows (one per judged query) counts once per product.

        Raises:
            ValueError: a row has an empty room id or room type, or a room id comes with two
                room types.
        """
        shown: dict[str, set[str]] = defaultdict(set)
        types: dict[str, str] = {}
        for room_id, room_type, products in staged:
            key = room_type_key(room_type or "")
            if not room_id or not key:
                raise ValueError(f"a staged room needs a room id and a room type, got {room_id!r}, {room_type!r}")
            if types.setdefault(room_id, key) != key:
                raise ValueError(f"room {room_id!r} is given as both {types[room_id]!r} and {key!r}")
            shown[room_id].update(products)
        rooms: dict[str, int] = defaultdict(int)
        counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for room_id, products in shown.items():
            rooms[types[room_id]] += 1
            for product in products:
                counts[product][types[room_id]] += 1
        return cls(dict(rooms), {p: dict(by_room) for p, by_room in counts.items()}, frozenset(shown))

    @classmethod
    def from_judgments(cls, queries: Iterable, qrels: Mapping[str, Iterable[str]]) -> "StagingPrior":
        """:meth:`fit` on judged room queries: objects with ``id``, ``room_id`` and
        ``room_category`` (e.g. :class:`evaluation.beir.BenchmarkQuery`); queries without a
        room id, a room type or judgments are skipped.

        Raises:
            ValueError: no query is left, or :meth:`fit`'s checks.
        """
        staged = [(q.room_id, q.room_category, qrels[q.id]) for q in queries if q.room_id and q.room_category and qrels.get(q.id)]
        if not staged:
            raise ValueError("no query has a room_id, a room_category and judgments")
        return cls.fit(staged)

    def ranked(self, room: str) -> list[StagedHit]:
        """Every product any judged room shows, for a query about a ``room`` room type: by the
        rooms of that type that show it, then all rooms that show it, then id. Scores are the
        first count (0 for a room type the prior has not seen: the order is then overall
        popularity)."""
        key = room_type_key(room)
        return [
            StagedHit(p, float(self.counts[p].get(key, 0)))
            for p in sorted(self.counts, key=lambda p: (-self.counts[p].get(key, 0), -self._totals[p], p))
        ]

    def to_bytes(self) -> bytes:
        """The prior as the JSON bytes :meth:`save` writes (sorted keys: deterministic)."""
        doc = {"format": FORMAT, "rooms": self.rooms, "counts": self.counts, "room_ids": sorted(self.room_ids)}
        return json.dumps(doc, sort_keys=True).encode("utf-8")

    @classmethod
    def load(cls, path: Path) -> "StagingPrior":
        """Read a prior written by :meth:`save`.

        Raises:
            FileNotFoundError: no file at ``path`` (run ``mars train prior``).
            StagingPriorError: the file is not a staging prior.
        """
        data = Path(path).read_bytes()
        try:
            doc = json.loads(data)
            if doc.get("format") != FORMAT:
                raise StagingPriorError(f"{path} is not a staging prior (format {doc.get('format')!r}, expected {FORMAT!r})")
            rooms = {str(k): int(v) for k, v in doc["rooms"].items()}
            counts = {str(p): {str(k): int(v) for k, v in by_room.items()} for p, by_room in doc["counts"].items()}
            room_ids = frozenset(str(r) for r in doc.get("room_ids", []))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            if isinstance(exc, StagingPriorError):
                raise
            raise StagingPriorError(f"{path} is not a usable staging prior: {exc!r}") from exc
        return cls(rooms, counts, room_ids, file_digest(data))


def StagingPriorFile(path: Path) -> WatchedCheckpoint[StagingPrior]:  # noqa: N802 - a class-like factory
    """The staging prior at ``path``, loaded on first call and re-read when the file changes;
    calling it returns the :class:`StagingPrior`, or None when there is no usable file (logged
    once per file version): the funnel then has no ``prior`` list."""
    return WatchedCheckpoint(path, StagingPrior.load, StagingPriorError, lambda _prior: None, log, "staging prior")


__all__ = ["FORMAT", "StagedHit", "StagingPrior", "StagingPriorError", "StagingPriorFile", "room_type_key",
           "staging_prior_path"]
