"""Category-lock accuracy: the share of room-class and room-type queries whose lock is
exactly the class or type they ask for, and the misses.

The asked category is the last ``::`` part of the query id, the IKEA benchmark's convention
(``<room>::class::lamp``, ``<room>::type::rug-flatwoven``; ``../shared/data/ikea/README.md``):
a class is matched against the class key (``lamp``), a type against the slug after the
class in the type key (``rug/rug-flatwoven`` → ``rug-flatwoven``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from catalog.locking import Taxonomy
from evaluation.beir import BenchmarkQuery

#: Tasks whose queries ask for one category, and the lock level each must reach.
LOCK_TASKS: dict[str, str] = {"room-class": "class", "room-type": "type"}


def asked_category(query: BenchmarkQuery) -> str:
    """The category ``query`` asks for: the last ``::`` part of its id."""
    return query.id.rsplit("::", 1)[-1]


def lock_accuracy(taxonomy: Taxonomy, queries: Sequence[BenchmarkQuery]) -> dict[str, Any]:
    """Resolve the lock of every room-class / room-type query from its text alone (as the
    funnel does, no explicit category) and compare it with the asked category.

    Returns ``{task: {"queries": n, "exact": k, "accuracy": k / n, "misses": [{"id", "text",
    "asked", "locked", "reason"}, ...]}}`` for the tasks present (accuracy in [0, 1]).
    """
    out: dict[str, Any] = {}
    for q in queries:
        level = LOCK_TASKS.get(q.task)
        if level is None:
            continue
        lock = taxonomy.resolve(q.text, None, from_text=True)
        key = lock.key or ""
        got = key if level == "class" else key.rsplit("/", 1)[-1]
        row = out.setdefault(q.task, {"queries": 0, "exact": 0, "misses": []})
        row["queries"] += 1
        if lock.applied and lock.level == level and got == asked_category(q):
            row["exact"] += 1
        else:
            row["misses"].append({"id": q.id, "text": q.text, "asked": asked_category(q),
                                  "locked": key or None, "reason": lock.reason})
    for row in out.values():
        row["accuracy"] = row["exact"] / row["queries"]
    return dict(sorted(out.items()))
