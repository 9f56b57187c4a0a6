"""Stage 3: the critic re-ranks the top of the fused list (``--mode full``).

:class:`CriticStage` builds each pair's :class:`critic.protocol.CriticPair` from what the
funnel already has (the room's region vectors, the query text's vector, each product's
stored vectors, taxonomy class and type, fused rank; product photos only for a critic that
reads images), calls the critic, and re-orders the top ``top_n`` by its scores. Whatever
the backend, a :class:`critic.protocol.CriticUnavailable` (a timeout, a transport error, an
answer it could not read) keeps the fused order and the response says why.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from PIL import Image

from critic.protocol import Critic, CriticPair, CriticUnavailable
from ingestion.remote import is_remote
from query.fusion import Fused
from query.retrievers import image_vectors
from query.rules import Ranked, place_pins
from query.schemas import CriticResult, CriticStatus

if TYPE_CHECKING:
    from catalog.locking import Taxonomy
    from catalog.models import Product
    from indexing.vector_store import VectorStore
    from query.artifacts import Trained
    from query.query_vectors import QueryVectors


def critic_order(ids: Sequence[str], scores: Mapping[str, float]) -> list[str]:
    """``ids`` (fused order) re-ordered for ``--mode full``: ids with a critic score first,
    highest score first, then the unscored ones; ties keep their fused order (stable sort)."""
    return sorted(ids, key=lambda i: (i not in scores, -scores.get(i, 0.0)))


def product_photo(p: Product) -> Image.Image | None:
    """The product's stored photo for an image-reading critic; None when it has none or it is
    a URL (the query path never downloads).

    Raises:
        OSError: a local file that no longer decodes.
    """
    if not p.image or is_remote(p.image):
        return None
    with Image.open(p.image) as img:
        return img.convert("RGB")


def product_text(p: Product) -> str:
    """What the critic reads of a product: type, colour, title and description, joined by ". "."""
    return ". ".join(part for part in (p.type, p.colour, p.title, p.text) if part)


@dataclass
class CriticOutcome:
    """What the stage did to one query: the re-ordered list, the critic's verdict per product id
    and the status the response reports."""

    ranked: list[Ranked]
    status: CriticStatus
    verdicts: dict[str, CriticResult] = field(default_factory=dict)


class CriticStage:
    """The critic and what it needs to build its pairs.

    Args:
        critic: the stage-3 critic (any :class:`critic.protocol.Critic`), or None when none is configured.
        detail: the one-line note in plain words (no file paths) that mode-full responses carry
            (:func:`mars.wiring.critic_note`).
        top_n: how many fused results it re-scores.
        vectors: returns the vector store queries use (None while nothing is indexed).
        query_vectors: the query encodings (shared with the retrievers, so nothing is encoded twice).
        taxonomy: returns the category tree (class and type of each product).
    """

    def __init__(self, critic: Critic | None, detail: str, top_n: int, vectors: Callable[[], VectorStore | None],
                 query_vectors: QueryVectors, taxonomy: Callable[[], Taxonomy]) -> None:
        self.critic, self.detail, self.top_n = critic, detail, top_n
        self.vectors, self.query_vectors, self.taxonomy = vectors, query_vectors, taxonomy

    @property
    def name(self) -> str:
        """The backend's name, or "none"."""
        return self.critic.name if self.critic is not None else "none"

    def pairs(self, text: str | None, image: Image.Image | None, head: Sequence[Fused],
              products: Mapping[str, Product], trained: Trained) -> list[CriticPair]:
        """The critic's input for the fused ``head``. With a whitening and a room photo, the room
        regions and the products' ``image`` vectors are passed whitened, as the image list
        compared them. Products missing from ``products`` (deleted meanwhile) are skipped."""
        head = [f for f in head if f.id in products]
        store = self.vectors()
        stored = store.fetch([f.id for f in head]) if store is not None else {}
        qv = self.query_vectors
        regions = qv.region_vectors(image) if image is not None and store is not None and "image" in store.dims else None
        white = trained.whitening
        if white is not None and regions is not None:  # the critic compares in the space the image list ranked in
            regions = qv.whitened_regions(image, white)  # type: ignore[arg-type]
            whitened = image_vectors(stored, white)
            stored = {i: replace(p, vectors={**p.vectors, "image": whitened[i]}) if i in whitened else p
                      for i, p in stored.items()}
        qvec = qv.text_vector(text)[0] if text and store is not None and "text" in store.dims else None
        categories = self.taxonomy().categories
        photos = {f.id: product_photo(products[f.id]) for f in head} if self.critic is not None and self.critic.uses_images else {}
        out = []
        for f in head:
            point = stored.get(f.id)
            levels = {categories[c].level: c for c in reversed(point.category_ids if point else []) if c in categories}
            out.append(CriticPair(
                query_text=text, room_image=image, product_id=f.id, product_text=product_text(products[f.id]),
                product_image=photos.get(f.id), product_class=levels.get("class"), product_type=levels.get("type"),
                fused_rank=f.rank, room_regions=regions, query_vector=qvec,
                product_vectors=point.vectors if point else {},
            ))
        return out

    def skipped(self, mode: str) -> CriticStatus:
        """The status of a query the critic does not see: mode ≠ full ("skipped", no detail: the
        critic is not part of such a search), or mode full without a critic ("not configured",
        with the plain note on how to set one up)."""
        if mode != "full":
            return CriticStatus(backend=self.name, status="skipped")
        return CriticStatus(backend="none", status="not configured", detail=self.detail)

    def rerank(self, text: str | None, image: Image.Image | None, keep: list[Ranked],
               products: Mapping[str, Product], trained: Trained) -> CriticOutcome:
        """Score the first ``top_n`` of ``keep`` and re-order ``keep`` by the scores (scored first,
        best first; pinned products keep their slots). A :class:`CriticUnavailable` leaves
        ``keep`` as it is, with status ``unavailable`` and its reason first in the detail.

        Raises:
            whatever the critic raises besides :class:`CriticUnavailable` (a bug, not an outage).
        """
        if self.critic is None:
            return CriticOutcome(keep, self.skipped("full"))
        pairs = self.pairs(text, image, [x.fused for x in keep[: self.top_n]], products, trained)
        try:
            scored = self.critic.score(pairs)
        except CriticUnavailable as exc:  # a timeout, a transport error, an unreadable answer: the fused order stands
            detail = "; ".join(d for d in (str(exc), self.detail) if d)
            return CriticOutcome(keep, CriticStatus(backend=self.critic.name, status="unavailable", detail=detail))
        verdicts = {pair.product_id: CriticResult(score=v.score, rationale=v.rationale) for pair, v in zip(pairs, scored)}
        by_id = {x.id: x for x in keep}
        order = critic_order(list(by_id), {i: v.score for i, v in verdicts.items()})
        ranked = [by_id[i] for i in place_pins(order, [(x.id, x.slot) for x in keep if x.slot is not None])]
        status = CriticStatus(backend=self.critic.name, status="scored", scored=len(verdicts), detail=self.detail)
        return CriticOutcome(ranked, status, verdicts)
