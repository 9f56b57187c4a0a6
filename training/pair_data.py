"""The (product photo, product text) pairs ``mars train encoder`` trains on
(:mod:`training.dual_encoder`), read from the catalog, and their seeded sample and hold-out split.

Data (:func:`collect_pairs`): every catalog product with a LOCAL photo (an existing file; http(s)
URLs and missing files are counted and left out) and a non-empty :func:`pair_text`. The text
side is a short description, lower-cased colour and type, then the title:
``"<colour> <type>, <title>"`` (e.g. ``"stainless steel wall shelf, GRUNDTAL"``); parts that
are empty are dropped (``"pendant lamp, MELODI"``, ``"VASEN"``). The free-text description is
not used: it rarely describes what the photo shows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select


@dataclass(frozen=True)
class PairItem:
    """One training pair: a product's ``image`` (local file path) and its :func:`pair_text`."""

    product_id: str
    text: str
    image: str


@dataclass
class PairData:
    """The catalog's usable pairs, sorted by product id, and what was left out.

    Attributes:
        items: the pairs.
        products: products in the catalog.
        without_image: products with no photo at all.
        remote_image: products whose photo is an http(s) URL (not read by training).
        missing_file: products whose photo path is not an existing file.
        without_text: products whose type, colour and title are all empty.
    """

    items: list[PairItem]
    products: int = 0
    without_image: int = 0
    remote_image: int = 0
    missing_file: int = 0
    without_text: int = 0

    def counts(self) -> dict[str, int]:
        """The counts as a JSON-ready dict (``pairs`` and the left-out reasons)."""
        return {"products": self.products, "pairs": len(self.items), "without_image": self.without_image,
                "remote_image": self.remote_image, "missing_file": self.missing_file,
                "without_text": self.without_text}


def pair_text(type_: str, colour: str, title: str) -> str:
    """The text side of a product's pair: ``"<colour> <type>, <title>"``.

    Colour and type are stripped and lower-cased (a query-like phrase, "white armchair"); the
    title (the product name, e.g. "POÄNG") is kept as written. Empty parts are dropped with
    their separator; all empty gives ``""``.

    >>> pair_text("Wall shelf", "Stainless steel", "GRUNDTAL")
    'stainless steel wall shelf, GRUNDTAL'
    >>> pair_text("Pendant lamp", "", "MELODI")
    'pendant lamp, MELODI'
    """
    title = (title or "").strip()
    return ", ".join(part for part in (colour_type(type_, colour), title) if part)


def colour_type(type_: str, colour: str) -> str:
    """``"<colour> <type>"`` lower-cased, empty parts dropped: the short query-like text of a
    product (the benchmark's text-to-image queries look like this).

    >>> colour_type("Wall shelf", "Stainless steel")
    'stainless steel wall shelf'
    """
    return " ".join(part.strip().lower() for part in (colour, type_) if part and part.strip())


def _is_url(path: str) -> bool:
    return path.lower().startswith(("http://", "https://"))


def collect_pairs(session) -> PairData:  # noqa: ANN001 - sqlalchemy Session
    """Read every product of the catalog behind ``session`` and keep those with a local photo
    (an existing file) and a non-empty :func:`pair_text`; sorted by product id.

    Relative image paths are taken relative to the working directory (as ingestion does).
    Reads only the ``products`` table (no store, no owner lock needed).
    """
    from catalog.models import Product

    rows = session.execute(
        select(Product.id, Product.title, Product.type, Product.colour, Product.image).order_by(Product.id)
    ).all()
    data = PairData(items=[], products=len(rows))
    for pid, title, type_, colour, image in rows:
        if not image:
            data.without_image += 1
            continue
        if _is_url(image):
            data.remote_image += 1
            continue
        if not Path(image).is_file():
            data.missing_file += 1
            continue
        text = pair_text(type_ or "", colour or "", title or "")
        if not text:
            data.without_text += 1
            continue
        data.items.append(PairItem(pid, text, str(image)))
    return data


def holdout_split(n: int, holdout: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Indices ``(train, held_out)`` (each sorted) of ``n`` items, holding out
    ``round(holdout * n)`` of them chosen with ``random.Random(seed)``; at least one item is held
    out when ``holdout > 0`` and ``n >= 2``, and at least one stays in training.

    Raises:
        ValueError: ``holdout`` outside [0, 1).
    """
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"holdout must be in [0, 1), got {holdout}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = round(holdout * n)
    if holdout > 0 and n >= 2:
        k = min(max(k, 1), n - 1)
    return sorted(order[k:]), sorted(order[:k])


def sample_items(items: list[PairItem], max_items: int | None, seed: int) -> list[PairItem]:
    """At most ``max_items`` of ``items``: all of them (the same list) when there are no more,
    else a ``random.Random(seed)`` sample of that size kept in input order."""
    if max_items is None or len(items) <= max_items:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), max_items))
    return [items[i] for i in keep]


__all__ = ["PairData", "PairItem", "collect_pairs", "colour_type", "holdout_split", "pair_text", "sample_items"]
