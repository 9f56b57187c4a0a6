"""Taxonomy built from product types: each type is a leaf under a coarse class named by
its head noun, with plural/singular synonyms.

The head noun follows the rule the IKEA benchmark (Tautkute et al., FedCSIS 2017, as
converted in ``../shared/data/ikea``) uses for its room-class task: drop everything after
the first comma ("Rug, flatwoven" -> "Rug"), then everything from the first "with",
"and", "of" or "for" ("Chest of 3 drawers" -> "Chest"), then take the last word
("Three-seat sofa" -> "sofa"), keeping the word before it when the last word only names
a part or a covering of something else ("Pendant lamp shade" -> "lamp shade",
"Cushion cover" -> "cushion cover"). Plurals are singularised with ``inflect``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import inflect

#: Last words that do not name the object on their own: "lamp shade" is not a shade of
#: anything, a "bed frame" is not a picture frame.
PART_HEADS = frozenset({"cover", "shade", "frame", "unit"})

_FUNCTION_WORDS = frozenset({"a", "an", "the", "in", "on", "at", "to", "w"})
_CLAUSE = re.compile(r"\s+(?:with|and|of|for)\s+", re.IGNORECASE)
_NON_WORD = re.compile(r"[^0-9a-z\-]+")


@lru_cache(maxsize=1)
def _inflect() -> inflect.engine:
    """The ``inflect`` engine, imported on first use (importing it takes seconds: the funnel and
    the app factory import this module)."""
    import inflect

    return inflect.engine()


def normalize(text: str) -> str:
    """Lower-case ``text`` and turn every run of characters other than letters, digits and
    hyphens into one space ("Rug, flatwoven" -> "rug flatwoven")."""
    return _NON_WORD.sub(" ", text.lower()).strip()


def singular(word: str) -> str:
    """Singular of an English noun (``inflect``), or the word itself if already singular."""
    result = _inflect().singular_noun(word)
    return result if isinstance(result, str) and result else word


def plural(phrase: str) -> str:
    """Plural of a noun phrase: its last word is pluralised ("lamp shade" -> "lamp shades")."""
    words = phrase.split(" ")
    words[-1] = _inflect().plural_noun(words[-1])
    return " ".join(words)


def head_noun(product_type: str) -> str:
    """The class a product type belongs to, lower-case and singular.

    Examples: "Rug, flatwoven" -> "rug"; "Three-seat sofa" -> "sofa";
    "Quilt cover and 4 pillowcases" -> "quilt cover"; "Curtains, 1 pair" -> "curtain".

    Raises:
        ValueError: if ``product_type`` has no word in it.
    """
    core = product_type.split(",", 1)[0]
    core = _CLAUSE.split(core, maxsplit=1)[0]
    words = normalize(core).split()
    while words and (words[-1] in _FUNCTION_WORDS or sum(ch.isalpha() for ch in words[-1]) < 2):
        words.pop()  # "Fridge A+" -> "fridge", "Shelving unit in,outdoor" -> "shelving unit"
    if not words:
        raise ValueError(f"product type {product_type!r} has no head noun")
    head = [singular(words[-1])]
    if head[0] in PART_HEADS and len(words) >= 2:
        head.insert(0, words[-2])
    return " ".join(head)


def slug(text: str) -> str:
    """URL-safe key fragment: normalised words joined by hyphens ("Rug, flatwoven" -> "rug-flatwoven")."""
    return "-".join(normalize(text).replace("-", " ").split()) or "unnamed"


@dataclass(frozen=True)
class TypePlacement:
    """Where a product type sits in the tree: its class and leaf keys, names and synonyms."""

    class_key: str
    class_name: str
    class_synonyms: tuple[str, ...]
    type_key: str
    type_name: str
    type_synonyms: tuple[str, ...]


def place_type(product_type: str) -> TypePlacement:
    """Compute the class and leaf of ``product_type`` (see the module docstring for the rule).

    Synonyms are normalised phrases: the class's plural ("rugs"), and the leaf's name with
    its last word pluralised when that word is a noun the leaf ends on ("pendant lamps").

    Raises:
        ValueError: if ``product_type`` has no head noun.
    """
    cls = head_noun(product_type)
    leaf_phrase = normalize(product_type)
    cls_syn = tuple(sorted({plural(cls)} - {cls}))
    leaf_syn = {leaf_phrase}
    if "," not in product_type and not _CLAUSE.search(product_type):
        leaf_syn.add(plural(leaf_phrase))
    return TypePlacement(
        class_key=slug(cls),
        class_name=cls,
        class_synonyms=cls_syn,
        type_key=f"{slug(cls)}/{slug(product_type)}",
        type_name=product_type.strip(),
        type_synonyms=tuple(sorted(leaf_syn)),
    )
