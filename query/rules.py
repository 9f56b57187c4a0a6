"""Merchandising rules in the search funnel: synonyms, boosts, buries and pins.

The rules live in the catalog (:class:`catalog.models.MerchRule`, written through
:mod:`catalog.rules` and ``/v1/rules``); this module holds the pure functions the funnel
(:mod:`query.funnel`) applies them with, and the small cache it reads them from.

Where they act, in funnel order:

1. **Scope, after the plan.** The category lock is resolved first, from the query text as
   typed; then the active rules whose scope fits this search are chosen (:func:`in_scope`).
   A rule's ``category`` is matched against the *search's lock*, not against products: a
   rule scoped to a class (``sofa``) applies to searches locked to that class or to one of its
   types (``sofa/three-seat-sofa``), a rule scoped to a type only to searches locked to that
   type; a search without a lock gets no category-scoped rule. ``query_pattern`` is a phrase
   that must appear in the query text as whole words, case-insensitively (:func:`contains_phrase`:
   token comparison, never a regular expression from users, so no ReDoS). A rule with neither
   applies to every search. The lock is decided before any rule so that rules can be scoped by
   it; a synonym rewrites wording, it does not change the lock (category synonyms do that).
2. **Synonyms, before BM25 and the text vector.** Each in-scope ``synonym`` replaces its term,
   as whole words and case-insensitively, by its replacement in the query text
   (:func:`rewrite`); the room context is appended after. Rules apply to the text as typed,
   never to each other's output (no chains, no loops), longer terms first. To *expand* rather
   than replace, put the term in the replacement (``couch`` → ``couch sofa``).
3. **Boosts and buries, after fusion.** Each in-scope ``boost``/``bury`` multiplies the fused
   RRF score of its product, or of every product whose ``attributes["brand"]`` equals its brand
   (case-insensitively), by its ``factor`` (> 1 boost, 0..1 bury); several rules multiply; the
   fused list is re-sorted by the new score, ties keeping the fused order (:func:`adjust`). RRF
   scores are flat (Σ w/(60 + rank)): an item at fused rank r in every list moves to about
   r' with 60 + r' = (60 + r) / factor, so x1.5 takes rank 50 to about 13 and rank 30 to the top,
   x0.5 sends rank 1 to about 62.
4. **Pins, last.** Each in-scope ``pin`` puts its product at its 1-based position
   (:func:`place_pins`): out of its fused place, or, when retrieval did not return it, inserted
   if it is in the catalog and within the search's lock. Two pins on one position: the older
   rule (lower id) gets it, the other the next free position; one product pinned twice keeps the
   smaller position. A position past the end of the list puts the product last.

Steps 3 and 4 run on the whole fused list (``MARS_RETRIEVAL_DEPTH`` deep), before the cut to
``top_k`` and to the critic's top N: a boosted product far down can still reach the results and
the critic scores what will be shown. In ``--mode full`` the critic re-orders the others and
every pinned product is put back at its position: a pin is a business decision that the critic
does not overrule. Each result's provenance lists the rules that touched it, e.g. ``"pinned at
#1 by rule 7"`` or ``"boosted x1.5 by rule 3 (brand IKEA)"``, and the response lists the
synonyms applied.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from catalog.rules import WORD, RuleKind, words
from query.fusion import Fused

def contains_phrase(text: str | None, phrase: str) -> bool:
    """True when the words of ``phrase`` appear consecutively among the words of ``text``
    (whole words, case-insensitive: "Couch" matches "a grey couch," but not "couches");
    False for a phrase without words. O(len(text) · len(phrase)) word comparisons."""
    hay, needle = words(text), words(phrase)
    n = len(needle)
    return n > 0 and any(hay[i : i + n] == needle for i in range(len(hay) - n + 1))


@dataclass(frozen=True)
class Rule:
    """An immutable snapshot of one active :class:`catalog.models.MerchRule` (see the module
    docstring for what each kind does); the fields a kind does not use are None."""

    id: int
    kind: RuleKind
    product_id: str | None = None
    brand: str | None = None
    position: int | None = None
    factor: float | None = None
    term: str | None = None
    replacement: str | None = None
    category: str | None = None
    query_pattern: str | None = None

    @classmethod
    def from_row(cls, row: Any) -> "Rule":
        """The snapshot of a catalog row (any object with the :class:`Rule` field names)."""
        return cls(**{name: getattr(row, name) for name in cls.__dataclass_fields__})


def in_scope(rules: Iterable[Rule], lock_keys: Collection[str], text: str | None) -> list[Rule]:
    """The ``rules`` that apply to one search, in their order.

    Args:
        rules: active rules.
        lock_keys: the search's lock key and, for a type lock, its class key; empty when no
            lock applied.
        text: the query text as typed (without the room context), or None.
    """
    return [
        r for r in rules
        if (r.category is None or r.category in lock_keys)
        and (r.query_pattern is None or contains_phrase(text, r.query_pattern))
    ]


def rewrite(text: str | None, synonyms: Sequence[Rule]) -> tuple[str | None, list[str]]:
    """``text`` with the terms of ``synonyms`` replaced (whole words, case-insensitive), and
    one note per rule applied, e.g. ``"'couch' → 'sofa' by rule 5"``.

    Scanning left to right, at each word the longest matching term wins (older rule on equal
    length); replaced text is not scanned again. Characters between words are kept.
    """
    if not text or not synonyms:
        return text, []
    spans = [(m.group().casefold(), m.start(), m.end()) for m in WORD.finditer(text)]
    tokens = [s[0] for s in spans]
    candidates = sorted(((words(r.term), r) for r in synonyms), key=lambda c: (-len(c[0]), c[1].id))
    parts: list[str] = []
    applied: dict[int, Rule] = {}
    done, i = 0, 0
    while i < len(spans):
        for term, rule in candidates:
            n = len(term)
            if n and tokens[i : i + n] == term:
                parts += [text[done : spans[i][1]], rule.replacement or ""]
                done = spans[i + n - 1][2]
                applied.setdefault(rule.id, rule)
                i += n
                break
        else:
            i += 1
    parts.append(text[done:])
    notes = [f"{r.term!r} → {r.replacement!r} by rule {r.id}" for r in sorted(applied.values(), key=lambda r: r.id)]
    return "".join(parts), notes


@dataclass
class Ranked:
    """One entry of the merchandised list.

    ``fused`` is the entry of the fused list (for a pinned product that retrieval did not
    return, a stand-in with score 0 ranked just after the whole fused list, and ``inserted``
    True); ``score`` the fused score times the boost/bury factors; ``slot`` the 1-based
    position a pin fixed (None when not pinned); ``notes`` what the rules did, for provenance.
    """

    fused: Fused
    score: float
    inserted: bool = False
    slot: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        """The product id."""
        return self.fused.id


def adjust(fused: Sequence[Fused], rules: Iterable[Rule], brands: Mapping[str, str]) -> list[Ranked]:
    """The fused list with the ``boost``/``bury`` rules of ``rules`` applied: scores multiplied
    (in rule order), then sorted by score, best first, ties in fused order.

    Args:
        fused: the fused list, best first.
        rules: in-scope rules (other kinds are ignored).
        brands: product id → brand, case-folded, for the ids of ``fused`` that have one.
    """
    ranked = [Ranked(f, f.score) for f in fused]
    for rule in rules:
        if rule.kind not in ("boost", "bury") or rule.factor is None:
            continue
        brand = rule.brand.casefold() if rule.brand else None
        note = f"{'boosted' if rule.kind == 'boost' else 'buried'} x{rule.factor:g} by rule {rule.id}"
        note += f" (brand {rule.brand})" if brand else ""
        for r in ranked:
            if r.id == rule.product_id or (brand is not None and brands.get(r.id) == brand):
                r.score *= rule.factor
                r.notes.append(note)
    return sorted(ranked, key=lambda r: -r.score)  # stable: ties keep the fused order


def pins_of(rules: Iterable[Rule]) -> list[Rule]:
    """The ``pin`` rules of ``rules`` in placing order (position, then rule id), one per
    product (the first in that order)."""
    first: dict[str, Rule] = {}
    for r in sorted((r for r in rules if r.kind == "pin" and r.product_id and r.position), key=lambda r: (r.position, r.id)):
        first.setdefault(r.product_id, r)  # type: ignore[arg-type]
    return list(first.values())


def place_pins(ids: Sequence[str], pins: Sequence[tuple[str, int]]) -> list[str]:
    """``ids`` re-ordered so that each pinned id stands at its 1-based position.

    Args:
        ids: the list, best first; pinned ids not in it are ignored.
        pins: (id, position) in placing order: a position already taken goes to the next free
            one; positions past the end put the id last (in placing order).

    Returns:
        The same ids; the unpinned ones keep their relative order.
    """
    present = set(ids)
    slots: dict[int, str] = {}
    for pid, position in pins:
        if pid not in present:
            continue
        present.discard(pid)  # placed once
        slot = max(position, 1) - 1
        while slot in slots:
            slot += 1
        slots[slot] = pid
    placed = set(slots.values())
    rest = iter([i for i in ids if i not in placed])
    pending = sorted(slots.items())
    out: list[str] = []
    while len(out) < len(ids):
        if pending and pending[0][0] <= len(out):
            out.append(pending.pop(0)[1])
        else:
            nxt = next(rest, None)
            out.append(nxt if nxt is not None else pending.pop(0)[1])
    return out


def merchandise(
    fused: Sequence[Fused], rules: Sequence[Rule], brands: Mapping[str, str], insertable: Collection[str]
) -> list[Ranked]:
    """Apply in-scope boosts, buries and pins to the fused list (steps 3 and 4 of the module
    docstring).

    Args:
        fused: the fused list, best first.
        rules: the rules in scope of this search (synonyms are ignored here).
        brands: product id → case-folded brand for the ids of ``fused`` (see :func:`adjust`).
        insertable: pinned product ids that retrieval did not return but that exist in the
            catalog within the search's lock; other missing pinned products are left out.

    Returns:
        The merchandised list, best first, with ``slot`` set on the pinned entries.
    """
    ranked = adjust(fused, rules, brands)
    by_id = {r.id: r for r in ranked}
    pins = [p for p in pins_of(rules) if p.product_id in by_id or p.product_id in insertable]
    for pin in pins:
        pid: str = pin.product_id  # type: ignore[assignment]  # pins_of keeps pins with a product
        entry = by_id.get(pid)
        if entry is None:  # not retrieved: a stand-in ranked just after the whole fused list
            entry = by_id[pid] = Ranked(Fused(pid, 0.0, rank=len(fused) + 1), 0.0, inserted=True)
            ranked.append(entry)
        entry.notes.append(f"pinned at #{pin.position} by rule {pin.id}"
                           + (" (inserted: retrieval did not return it)" if entry.inserted else ""))
    order = place_pins([r.id for r in ranked], [(p.product_id, p.position) for p in pins])  # type: ignore[misc]
    pinned = {p.product_id for p in pins}
    out = [by_id[i] for i in order]
    for slot, entry in enumerate(out, start=1):
        if entry.id in pinned:
            entry.slot = slot
    return out


class RuleCache:
    """The active rules, loaded from the catalog on first use and kept for ``ttl_s`` seconds;
    :meth:`invalidate` (called by every rule write of this process) drops them at once. The TTL
    bounds how long rule writes of *other* processes (another API replica, ``mars`` CLI) take to
    show. Thread-safe; a load that started before an invalidation is not kept.

    Args:
        load: reads the active rules from the catalog (may raise; nothing is cached then).
        ttl_s: seconds a load stays valid (0: every call loads).
    """

    def __init__(self, load: Callable[[], Iterable[Rule]], ttl_s: float) -> None:
        self._load, self.ttl_s = load, ttl_s
        self._lock = threading.Lock()
        self._rules: tuple[Rule, ...] | None = None
        self._expires = 0.0
        self._generation = 0

    def __call__(self) -> tuple[Rule, ...]:
        """The active rules, in id order."""
        with self._lock:
            if self._rules is not None and time.monotonic() < self._expires:
                return self._rules
            generation = self._generation
        rules = tuple(self._load())
        with self._lock:
            if generation == self._generation:
                self._rules, self._expires = rules, time.monotonic() + self.ttl_s
        return rules

    def invalidate(self) -> None:
        """Forget the loaded rules: the next search reads the catalog again."""
        with self._lock:
            self._rules, self._generation = None, self._generation + 1
