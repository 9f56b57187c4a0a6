"""Merchandising rules in the catalog (table ``merch_rules``): checks, reads and writes.

What each kind means and where the funnel applies it is :mod:`query.rules`; the HTTP side is
:mod:`query.routes.rules` (``/v1/rules``). Every write here commits; the caller then drops the
engine's rule cache (:meth:`mars.engine.Engine.refresh_rules`).

A rule's fields, by kind (:func:`check_rule` enforces this; the unused fields must be empty):

========  ==========================================================================
pin       ``product_id`` (in the catalog) and ``position`` (1..:data:`MAX_POSITION`)
boost     ``product_id`` (in the catalog) or ``brand``, and ``factor`` > 1 (≤ :data:`MAX_FACTOR`)
bury      ``product_id`` (in the catalog) or ``brand``, and 0 < ``factor`` < 1
synonym   ``term`` and ``replacement`` (each with at least one word)
========  ==========================================================================

Every kind may carry a scope: ``category`` (an existing category key) and ``query_pattern``
(a phrase with at least one word).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, get_args

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, aliased

from catalog.models import Category, MerchRule, Product, ProductCategory, iso_or_none, utcnow

#: A rule's kind.
RuleKind = Literal["pin", "boost", "bury", "synonym"]

#: Every rule kind.
RULE_KINDS: tuple[str, ...] = get_args(RuleKind)

#: A word: a run of Unicode letters, digits or underscores (a fixed pattern, linear time; rules never
#: carry a user's regular expression).
WORD = re.compile(r"\w+")


def words(text: str | None) -> list[str]:
    """The case-folded words of ``text`` (runs of letters, digits, ``_``); [] for None."""
    return [w.casefold() for w in WORD.findall(text or "")]


#: The writable fields of a rule (besides ``kind``, fixed at creation).
RULE_FIELDS: tuple[str, ...] = (
    "product_id", "brand", "position", "factor", "term", "replacement", "category", "query_pattern", "active",
)

#: The fields each kind uses (the scope fields and ``active`` are allowed for every kind).
KIND_FIELDS: dict[str, frozenset[str]] = {
    "pin": frozenset({"product_id", "position"}),
    "boost": frozenset({"product_id", "brand", "factor"}),
    "bury": frozenset({"product_id", "brand", "factor"}),
    "synonym": frozenset({"term", "replacement"}),
}

#: Largest pin position (the API's largest ``top_k``).
MAX_POSITION = 1000

#: Largest boost factor.
MAX_FACTOR = 100.0


class RuleError(ValueError):
    """A rule that cannot be stored as given; the message says which field and why."""


def _clean(values: Mapping[str, Any]) -> dict[str, Any]:
    """``values`` restricted to :data:`RULE_FIELDS` + ``kind``, strings stripped, blanks as None.

    Raises:
        RuleError: a string with a NUL character (PostgreSQL refuses them in text).
    """
    out = {}
    for name in ("kind", *RULE_FIELDS):
        value = values.get(name)
        if isinstance(value, str):
            if "\x00" in value:
                raise RuleError(f"{name} must not contain NUL characters")
            value = value.strip() or None
        out[name] = value
    return out


def check_rule(session: Session, values: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a whole rule (``kind`` and the :data:`RULE_FIELDS`) against its kind and the
    catalog.

    Returns:
        The values to store: strings stripped, blanks as None, ``active`` True when unset.

    Raises:
        RuleError: an unknown kind; a field the kind needs is missing, or one it does not use
            is set; position, factor, term or pattern out of range; ``product_id`` not in the
            catalog; ``category`` not a category key.
    """
    v = _clean(values)
    kind = v["kind"]
    if kind not in RULE_KINDS:
        raise RuleError(f"unknown rule kind {kind!r}; kinds are {', '.join(RULE_KINDS)}")
    others = {n for used in KIND_FIELDS.values() for n in used} - KIND_FIELDS[kind]
    unused = sorted(n for n in others if v[n] is not None)
    if unused:
        raise RuleError(f"a {kind} rule does not use {', '.join(unused)}")
    if kind == "pin":
        if v["product_id"] is None or v["position"] is None:
            raise RuleError("a pin needs product_id and position")
        if not 1 <= v["position"] <= MAX_POSITION:
            raise RuleError(f"position must be 1..{MAX_POSITION} (1-based), got {v['position']}")
    elif kind in ("boost", "bury"):
        if (v["product_id"] is None) == (v["brand"] is None):
            raise RuleError(f"a {kind} needs either product_id or brand (one of them)")
        factor = v["factor"]
        if factor is None:
            raise RuleError(f"a {kind} needs a factor (the fused score is multiplied by it)")
        if kind == "boost" and not 1 < factor <= MAX_FACTOR:
            raise RuleError(f"a boost's factor must be > 1 and ≤ {MAX_FACTOR:g}, got {factor:g}")
        if kind == "bury" and not 0 < factor < 1:
            raise RuleError(f"a bury's factor must be between 0 and 1 (exclusive), got {factor:g}")
    else:
        if v["term"] is None or v["replacement"] is None:
            raise RuleError("a synonym needs term and replacement")
        if not words(v["term"]) or not words(v["replacement"]):
            raise RuleError("a synonym's term and replacement must each contain a word")
    if v["query_pattern"] is not None and not words(v["query_pattern"]):
        raise RuleError("query_pattern must contain a word (it is matched as whole words, not as a regular expression)")
    if v["product_id"] is not None and session.get(Product, v["product_id"]) is None:
        raise RuleError(f"no product {v['product_id']!r} in the catalog")
    if v["category"] is not None and session.scalar(select(Category.id).where(Category.key == v["category"])) is None:
        raise RuleError(f"no category with key {v['category']!r} (GET /v1/categories lists them)")
    if v["active"] is None:
        v["active"] = True
    return v


def create_rule(session: Session, values: Mapping[str, Any], created_by: str | None = None) -> MerchRule:
    """Check (:func:`check_rule`), store and commit a rule; ``created_by`` names its author
    (the API key's name). Raises :class:`RuleError` as :func:`check_rule`."""
    row = MerchRule(**check_rule(session, values), created_by=created_by)
    session.add(row)
    session.commit()
    return row


def update_rule(session: Session, rule_id: int, changes: Mapping[str, Any]) -> MerchRule | None:
    """Apply ``changes`` (a subset of :data:`RULE_FIELDS`; None clears a field) to rule
    ``rule_id``, check the result as a whole and commit; None if there is no such rule.

    Raises:
        RuleError: a change to ``kind`` or an unknown field, or the changed rule fails
            :func:`check_rule` (nothing is written then).
    """
    unknown = sorted(set(changes) - set(RULE_FIELDS))
    if unknown:
        raise RuleError(f"cannot change {', '.join(unknown)} (a rule's kind is fixed: delete it and create another)")
    row = session.get(MerchRule, rule_id)
    if row is None:
        return None
    values = check_rule(session, {**{n: getattr(row, n) for n in ("kind", *RULE_FIELDS)}, **changes})
    for name in RULE_FIELDS:
        setattr(row, name, values[name])
    row.updated_at = utcnow()
    session.commit()
    return row


def delete_rule(session: Session, rule_id: int) -> MerchRule | None:
    """Delete rule ``rule_id`` and commit; returns the deleted row, or None if there was none."""
    row = session.get(MerchRule, rule_id)
    if row is not None:
        session.delete(row)
        session.commit()
    return row


def get_rule(session: Session, rule_id: int) -> MerchRule | None:
    """Rule ``rule_id``, or None if there is no such rule."""
    return session.get(MerchRule, rule_id)


def list_rules(session: Session, active: bool | None = None, kind: str | None = None) -> list[MerchRule]:
    """The rules in id order (oldest first), optionally only active/inactive ones or one kind."""
    query = select(MerchRule).order_by(MerchRule.id)
    if active is not None:
        query = query.where(MerchRule.active.is_(active))
    if kind is not None:
        query = query.where(MerchRule.kind == kind)
    return list(session.scalars(query))


def brands_of(session: Session, product_ids: Sequence[str]) -> dict[str, str]:
    """Product id → ``attributes["brand"]`` case-folded, for the ids that have a brand (ABO
    listings carry one; the IKEA corpus has none). One query over the given ids."""
    if not product_ids:
        return {}
    rows = session.execute(
        select(Product.id, Product.attributes["brand"].as_string()).where(Product.id.in_(list(product_ids)))
    )
    return {pid: str(brand).strip().casefold() for pid, brand in rows if brand is not None and str(brand).strip()}


def products_within(session: Session, product_ids: Sequence[str], category: str | None) -> set[str]:
    """The ``product_ids`` that are in the catalog and, when ``category`` (a key) is given, under
    it: in that type leaf, or in a type leaf of that class. One query."""
    if not product_ids:
        return set()
    if category is None:
        return set(session.scalars(select(Product.id).where(Product.id.in_(list(product_ids)))))
    leaf, parent = aliased(Category), aliased(Category)
    query = (
        select(ProductCategory.product_id)
        .join(leaf, leaf.id == ProductCategory.category_id)
        .outerjoin(parent, parent.id == leaf.parent_id)
        .where(ProductCategory.product_id.in_(list(product_ids)), or_(leaf.key == category, parent.key == category))
    )
    return set(session.scalars(query))


def describe(row: MerchRule) -> dict[str, Any]:
    """A rule as JSON-ready data: its columns (timestamps as ISO 8601 UTC) and ``summary``, one
    sentence saying what it does and where."""
    data = {"id": row.id, "kind": row.kind, **{n: getattr(row, n) for n in RULE_FIELDS}, "created_by": row.created_by,
            "created_at": iso_or_none(row.created_at), "updated_at": iso_or_none(row.updated_at)}
    return {**data, "summary": summary(row)}


def summary(row: Any) -> str:
    """One sentence for a rule (any object with the rule fields), e.g. "pin 903.007.25 at #1
    when the lock is sofa and the query says 'couch'"."""
    target = f"brand {row.brand!r}" if row.brand else f"{row.product_id}"
    what = {
        "pin": lambda: f"pin {row.product_id} at #{row.position}",
        "boost": lambda: f"boost {target} x{row.factor:g}",
        "bury": lambda: f"bury {target} x{row.factor:g}",
        "synonym": lambda: f"search {row.term!r} as {row.replacement!r}",
    }[row.kind]()
    scope = [f"the lock is {row.category}"] if row.category else []
    scope += [f"the query says {row.query_pattern!r}"] if row.query_pattern else []
    where = f" when {' and '.join(scope)}" if scope else " on every search"
    return what + where + ("" if row.active else " (inactive)")
