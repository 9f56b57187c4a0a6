"""The ranked lists ``mars tune`` collects once per benchmark query (:class:`QueryLists`) and
their JSON-lines file (:func:`save_lists`, :func:`load_lists`; ``mars tune --save-lists`` /
``--from-lists``), plus the query shapes whose weights are tuned (:data:`SHAPES`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

#: Query shapes and the settings field holding their weights.
SHAPES: dict[str, str] = {"photo": "weights_photo", "text": "weights_text"}


@dataclass
class QueryLists:
    """One benchmark query's retrieved lists, without weights applied.

    Attributes:
        id, task: the query's id and task.
        shape: ``"photo"`` or ``"text"`` (:func:`query.funnel.query_shape`): which weights it uses.
        group: the cross-validation group (the room id; the query id when it has no room).
        lists: list name -> product ids, best first, in the funnel's order of lists.
        relevant: the judged relevant product ids.
    """

    id: str
    task: str
    shape: str
    group: str
    lists: dict[str, list[str]]
    relevant: list[str]


def save_lists(path: Path, runs: Sequence[QueryLists]) -> None:
    """Write retrieved lists as JSON lines (one :class:`QueryLists` per line)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for run in runs:
            fh.write(json.dumps(asdict(run)) + "\n")


def load_lists(path: Path) -> list[QueryLists]:
    """Read lists written by :func:`save_lists`."""
    with path.open(encoding="utf-8") as fh:
        return [QueryLists(**json.loads(line)) for line in fh if line.strip()]


__all__ = ["QueryLists", "SHAPES", "load_lists", "save_lists"]
