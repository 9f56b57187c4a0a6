"""Category lock: which category a query is restricted to, and why.

A lock comes from an explicit category in the request (a key, name or synonym) or is
resolved from the query text: the longest category phrase that appears before the first
preposition or relative pronoun and ends its noun phrase ("a chair *for* this yard":
"chair" is the head noun, "yard" only says where it goes; in "a cosy base camp" the
word "base" modifies "camp" and locks nothing). When one phrase names both a class and a type ("chair"
is the class and also the type "Chair"), an indefinite article or a plural asks for the
class ("a chair", "chairs": any chair), while the bare catalog type name asks for that
type ("chair", as the catalog lists it); the reason says so, so the user can rephrase.
An unknown category, or one with no products, gives no lock, never an empty result.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from catalog.models import Category, CategorySynonym, ProductCategory
from catalog.taxonomy import normalize

#: Words after which a mention describes the setting, not the thing asked for.
#: Words that may follow the head noun of a noun phrase ("a chair *with* armrests").
FOLLOWER_WORDS = frozenset({"with", "and", "or", "without"})

#: Words before a noun that ask for any member of a class.
INDEFINITE_WORDS = frozenset({"a", "an", "any", "some"})

BOUNDARY_WORDS = frozenset(
    {"for", "in", "to", "by", "on", "at", "from", "that", "which", "who", "near", "under", "beside", "into", "inside"}
)


@dataclass(frozen=True)
class CategoryInfo:
    """A category as the lock sees it; ``products`` counts products under it (a class counts its leaves)."""

    key: str
    name: str
    level: str
    parent_key: str | None
    products: int


@dataclass(frozen=True)
class CategoryLock:
    """The lock applied to one query.

    ``applied`` is False when nothing restricts the query; ``source`` is "request", "text"
    or "none"; ``reason`` is one human-readable sentence.
    """

    applied: bool
    source: str
    reason: str
    key: str | None = None
    name: str | None = None
    level: str | None = None

    def as_dict(self) -> dict:
        """JSON-ready form used by the API and ``--json`` output."""
        return {
            "applied": self.applied,
            "source": self.source,
            "key": self.key,
            "name": self.name,
            "level": self.level,
            "reason": self.reason,
        }


@dataclass
class Taxonomy:
    """In-memory snapshot of the category tree used to resolve locks (rebuilt after ingest)."""

    categories: dict[str, CategoryInfo] = field(default_factory=dict)
    phrases: dict[str, list[str]] = field(default_factory=dict)  # normalised phrase -> category keys
    max_phrase_words: int = 1

    @classmethod
    def load(cls, session: Session) -> "Taxonomy":
        """Read categories, synonyms and product counts from the catalog."""
        direct = dict(
            session.execute(
                select(ProductCategory.category_id, func.count()).group_by(ProductCategory.category_id)
            ).all()
        )
        rows = session.execute(select(Category)).scalars().all()
        by_id = {c.id: c for c in rows}
        counts: dict[int, int] = defaultdict(int)
        for cat in rows:
            n = direct.get(cat.id, 0)
            counts[cat.id] += n
            if cat.parent_id is not None:
                counts[cat.parent_id] += n
        tax = cls()
        for cat in rows:
            parent = by_id.get(cat.parent_id) if cat.parent_id is not None else None
            tax.categories[cat.key] = CategoryInfo(
                key=cat.key,
                name=cat.name,
                level=cat.level,
                parent_key=parent.key if parent else None,
                products=counts[cat.id],
            )
            tax._add_phrase(normalize(cat.name), cat.key)
        for cat_id, phrase in session.execute(select(CategorySynonym.category_id, CategorySynonym.phrase)).all():
            tax._add_phrase(normalize(phrase), by_id[cat_id].key)
        return tax

    def _add_phrase(self, phrase: str, key: str) -> None:
        if not phrase:
            return
        keys = self.phrases.setdefault(phrase, [])
        if key not in keys:
            keys.append(key)
        self.max_phrase_words = max(self.max_phrase_words, len(phrase.split()))

    def _pick(self, keys: list[str], prefer: str = "class") -> CategoryInfo | None:
        """Among categories sharing a phrase, prefer the ``prefer`` level, then more products."""
        infos = [self.categories[k] for k in keys if self.categories[k].products > 0]
        if not infos:
            return None
        return sorted(infos, key=lambda c: (c.level != prefer, -c.products, c.key))[0]

    def find(self, category: str) -> CategoryInfo | None:
        """A category by key, name or synonym (case-insensitive); None if unknown or empty."""
        if category in self.categories:
            return self._pick([category])
        return self._pick(self.phrases.get(normalize(category), []))

    def resolve(self, text: str | None, category: str | None = None, from_text: bool = True) -> CategoryLock:
        """The lock for a query (see the module docstring for the rules).

        Args:
            text: the query text, or None.
            category: an explicit category key, name or synonym from the request, or None.
            from_text: resolve a lock from the text when no category is given; False for
                queries that describe a whole room rather than ask for one kind of product
                ("storage that makes room for living": every product of such a room fits).
        """
        if category:
            info = self.find(category)
            if info is None:
                return CategoryLock(False, "request", f"unknown or empty category {category!r}: no lock applied")
            return CategoryLock(
                True, "request", f"category {category!r} given in the request", info.key, info.name, info.level
            )
        if not from_text:
            return CategoryLock(False, "none", "locking from the text is off for this query and no category was given")
        if not text:
            return CategoryLock(False, "none", "no query text and no category: no lock applied")
        words = normalize(text).split()
        best: tuple[int, int, str, CategoryInfo] | None = None  # (-length, start, phrase, info)
        for start in range(len(words)):
            for length in range(min(self.max_phrase_words, len(words) - start), 0, -1):
                phrase = " ".join(words[start : start + length])
                info = self._pick(self.phrases.get(phrase, []))
                end = start + length
                head_final = end == len(words) or words[end] in BOUNDARY_WORDS | FOLLOWER_WORDS
                if info is not None and head_final:
                    candidate = (-length, start, phrase, info)
                    if best is None or candidate[:2] < best[:2]:
                        best = candidate
                    break
            if words[start] in BOUNDARY_WORDS:
                break  # mentions after "for", "in", ... describe the setting
        if best is None:
            return CategoryLock(False, "text", "no category named before the first preposition: no lock applied")
        neg_length, start, phrase, info = best
        reason = f"{phrase!r} in the query names the {info.level} {info.name!r}"
        levels = {self.categories[k].level for k in self.phrases[phrase] if self.categories[k].products > 0}
        if levels == {"class", "type"}:
            plural = phrase not in {normalize(self.categories[k].name) for k in self.phrases[phrase]}
            indefinite = start > 0 and words[start - 1] in INDEFINITE_WORDS
            if not (plural or indefinite):
                info = self._pick(self.phrases[phrase], prefer="type")
                reason = (f"{phrase!r} is the catalog name of the type {info.name!r} (say 'a {phrase}' or the "
                          "plural for the whole class)")
            else:
                reason += f" ({'plural' if plural else 'indefinite article'}: the whole class, not only the type)"
        return CategoryLock(True, "text", reason, info.key, info.name, info.level)
