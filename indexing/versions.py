"""Versioned names behind an alias, shared by the server backends' reindex: the live name is an
alias over ``<name>_v1``, ``<name>_v2``, ... (Qdrant "Collection aliases" and OpenSearch
"Index aliases" docs: build the new version, then move the alias in one step)."""

from __future__ import annotations

import re
from collections.abc import Iterable


def versions_of(name: str, existing: Iterable[str]) -> list[str]:
    """The ``<name>_v<N>`` names among ``existing``, oldest (lowest N) first."""
    pattern = re.compile(rf"{re.escape(name)}_v(\d+)")
    numbered = [(int(m.group(1)), n) for n in existing if (m := pattern.fullmatch(n))]
    return [n for _, n in sorted(numbered)]


def next_version(name: str, versions: list[str]) -> str:
    """The name after the newest of ``versions`` (as :func:`versions_of` orders them); ``<name>_v1`` first."""
    last = int(versions[-1].rsplit("_v", 1)[1]) if versions else 0
    return f"{name}_v{last + 1}"
