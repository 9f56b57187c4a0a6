"""The load benchmark's cold mode (:mod:`evaluation.load_test` ``--cold``): pools of query
texts and room photos the server was never sent, each handed out once.

Texts come from the benchmark's own queries first, then from phrasings of catalog products'
colour, name, type and size; photos are deterministic perturbations (crop, resize, mirror) of
the dev room photos, JPEG-encoded before the timed phase, each with its own SHA-256 (the key of
the server's photo caches).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import random
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from evaluation.beir import load_queries


def text_body(text: str) -> dict[str, Any]:
    """The ``POST /v1/search`` body of a text-only hybrid query (as the warm phase's)."""
    return {"text": text, "mode": "hybrid", "top_k": 10}


def encode_body(body: dict[str, Any]) -> bytes:
    """``body`` as the JSON bytes ``httpx`` sends for ``json=body``."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


#: Shortest time in seconds a search with a new room photo is assumed to take: the default
#: photo pool of cold mode holds ``photo clients × seconds / MIN_NEW_PHOTO_S`` photos (one takes
#: ~0.4 s of CPU at 1408 px on 2 cores, so this leaves room for a faster machine).
MIN_NEW_PHOTO_S = 0.2
#: Most cold text queries per second assumed of the whole load: the cold text pool holds
#: ``seconds × MAX_COLD_TEXTS_PER_S`` texts (a cold text costs ~10 ms of server CPU on 2 cores,
#: so this leaves room for a much larger machine; a spent pool is reported).
MAX_COLD_TEXTS_PER_S = 2000
#: Colours named by at least this many catalog products are crossed with every product type in
#: the cold text pool ("yellow armchair").
FREQUENT_COLOUR_PRODUCTS = 3


def text_words(text: str) -> str:
    """``text`` lowercased, its words (letters, digits, ``_``) joined by single spaces: the form in
    which cold texts must differ from each other and from the warm ones ("Rug, flatwoven" and
    "rug flatwoven" are the same query)."""
    return " ".join(re.findall(r"\w+", text.lower()))


def cold_text_pool(ikea: Path, exclude: Iterable[str] = (), seed: int = 0, limit: int | None = None) -> list[str]:
    """Distinct, realistic query texts for cold mode (at most ``limit``), none equal to another or
    to a text of ``exclude`` by :func:`text_words`; realistic ones first, in four tiers, each
    shuffled with ``seed`` (a tier is made only when the ones before it fall short of ``limit``):

    1. the benchmark's own query texts (all tasks), each as a text-only query;
    2. phrasings of one catalog product's attributes: colour + type ("black-brown chest of 3
       drawers"), name + type ("MALM chest of 3 drawers"), type + size ("chest of 3 drawers
       80x78 cm"), colour + name + type, type "in" colour;
    3. each colour named by ≥ :data:`FREQUENT_COLOUR_PRODUCTS` products with each product type
       ("yellow armchair");
    4. tier 3 with each dev room category ("yellow armchair for the hallway").

    On the IKEA dev data tiers 1-3 hold ~77,000 texts and all four ~700,000 (~3 s to make).
    """
    queries = load_queries(ikea / "queries.jsonl")
    products = [json.loads(line) for line in (ikea / "corpus.jsonl").open(encoding="utf-8") if line.strip()]

    def colour(p: dict) -> str:
        return (p.get("color") or "").strip().lower().replace(",", " and ")

    def kind(p: dict) -> str:
        return (p.get("type") or "").strip().lower()

    def own_queries() -> list[str]:
        return [q.text for q in queries if q.text]

    def phrasings() -> list[str]:
        out = []
        for p in products:
            c, t, name, size = colour(p), kind(p), (p.get("title") or "").strip(), (p.get("size") or "").strip()
            if t:
                out += [f"{c} {t}" if c else "", f"{name} {t}" if name else "", f"{t} {size}" if size else "",
                        f"{c} {name} {t}" if c and name else "", f"{t} in {c}" if c else ""]
        return [text for text in out if text]

    def crossed() -> list[str]:
        counts: dict[str, int] = {}
        for p in products:
            if colour(p):
                counts[colour(p)] = counts.get(colour(p), 0) + 1
        colours = sorted(c for c, n in counts.items() if n >= FREQUENT_COLOUR_PRODUCTS)
        types = sorted({kind(p) for p in products if kind(p)})
        return [f"{c} {t}" for c in colours for t in types]

    def with_rooms() -> list[str]:
        rooms = sorted({q.room_category.lower() for q in queries if q.room_category})
        return [f"{text} for the {room}" for text in crossed() for room in rooms]

    seen = {text_words(text) for text in exclude}
    pool: list[str] = []
    rng = random.Random(seed)
    for tier in (own_queries, phrasings, crossed, with_rooms):
        texts = tier()
        rng.shuffle(texts)
        for text in texts:
            key = text_words(text)
            if key and key not in seen:
                seen.add(key)
                pool.append(text)
                if limit is not None and len(pool) >= limit:
                    return pool
    return pool


@dataclass(frozen=True)
class ColdPhoto:
    """One never-sent room-photo query of cold mode.

    Attributes:
        body: the ``POST /v1/search`` JSON body (:attr:`text` + base64 JPEG), encoded.
        text: the query text, one of the room's room-class or room-type texts.
        digest: ``"sha256:<hex>"`` of the JPEG bytes, the server's region-cache key.
        room: the dev room photo it was made from (file name).
        variant: ``(left, top, crop width, crop height, mirrored, width, height)`` in pixels:
            the crop of the room photo, whether it was mirrored and the size it was resized to.
    """

    body: bytes
    text: str
    digest: str
    room: str
    variant: tuple[int, int, int, int, bool, int, int]


def perturbed_jpeg(image: Any, rng: random.Random) -> tuple[bytes, tuple[int, int, int, int, bool, int, int]]:
    """A JPEG (quality 90) of a random perturbation of the PIL ``image``: a crop of 85-97 % of
    each side at a random offset, resized to 90-100 % of the image's size, mirrored with
    probability 1/2; its bytes and :attr:`ColdPhoto.variant`."""
    from PIL import Image

    w, h = image.size
    share = rng.uniform(0.85, 0.97)
    cw, ch = round(w * share), round(h * share)
    left, top = rng.randint(0, w - cw), rng.randint(0, h - ch)
    scale = rng.uniform(0.9, 1.0)
    size = (round(w * scale), round(h * scale))
    mirrored = rng.random() < 0.5
    out = image.crop((left, top, left + cw, top + ch)).resize(size, Image.Resampling.BILINEAR)
    if mirrored:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    buffer = io.BytesIO()
    out.save(buffer, "JPEG", quality=90)
    return buffer.getvalue(), (left, top, cw, ch, mirrored, *size)


def cold_photo_pool(ikea: Path, n: int, seed: int = 0, exclude_digests: Iterable[str] = ()) -> list[ColdPhoto]:
    """``n`` never-sent room-photo queries for cold mode: the dev room photos in an order
    shuffled with ``seed``, taken in turn, each time a new :func:`perturbed_jpeg` of the room
    photo with one of that room's room-class or room-type texts (random), mode ``hybrid``.
    No two share a perturbation (so no two share pixels), bytes or a digest, and none has a
    digest of ``exclude_digests`` (e.g. the originals the warm phase sends). Takes ~25 ms a photo
    (Pillow decode, resize, encode, base64)."""
    from PIL import Image

    texts: dict[Path, list[str]] = {}
    for q in load_queries(ikea / "queries.jsonl"):
        if q.task in ("room-class", "room-type") and q.image is not None and q.text:
            texts.setdefault(q.image, []).append(q.text)
    rooms = sorted(texts)
    rng = random.Random(seed)
    rng.shuffle(rooms)
    excluded = set(exclude_digests)
    by_room: dict[Path, list[int]] = {}
    for i in range(n):
        by_room.setdefault(rooms[i % len(rooms)], []).append(i)
    out: list[ColdPhoto | None] = [None] * n
    for room, slots in by_room.items():  # room by room: each photo decoded once
        with Image.open(room) as opened:
            image = opened.convert("RGB")
        made: set[tuple] = set()
        for i in slots:
            while True:
                data, variant = perturbed_jpeg(image, rng)
                digest = "sha256:" + hashlib.sha256(data).hexdigest()
                if variant not in made and digest not in excluded:
                    break
            made.add(variant)
            excluded.add(digest)
            text = rng.choice(texts[room])
            body = {"text": text, "image_base64": base64.b64encode(data).decode(), "mode": "hybrid", "top_k": 10}
            out[i] = ColdPhoto(encode_body(body), text, digest, room.name, variant)
    return [photo for photo in out if photo is not None]


T = TypeVar("T")


class Pool(Generic[T]):
    """Items handed out once each, in order (cold mode's never-sent texts or photos).

    Args:
        items: what to hand out.
    """

    def __init__(self, items: list[T]) -> None:
        self.items, self.taken = items, 0

    def take(self) -> T | None:
        """The next item, or None when every one has been taken."""
        if self.taken >= len(self.items):
            return None
        self.taken += 1
        return self.items[self.taken - 1]

    @property
    def sent(self) -> list[T]:
        """The items taken so far, in order."""
        return self.items[:self.taken]


@dataclass
class ColdLoad:
    """Cold mode's load: the never-sent texts and photos and how many clients send photos.

    Attributes:
        texts: query texts, each sent once as a text-only hybrid query (:func:`cold_text_pool`).
        photos: room-photo queries, each sent once (:func:`cold_photo_pool`).
        photo_clients: clients of the cold phase that send photos; the others send texts.
        seed: the seed the pools were drawn with (reported).
        photo_pool_s: seconds it took to make the photo pool (reported).
        other_texts: the texts of the warm phase and of the photo pool as :func:`text_words` (to
            check that no cold text was one of them)
        warm_digests: the warm phase's photo digests (to check no cold photo was one).
    """

    texts: Pool[str]
    photos: Pool[ColdPhoto]
    photo_clients: int
    seed: int = 0
    photo_pool_s: float = 0.0
    other_texts: set[str] = field(default_factory=set)
    warm_digests: set[str] = field(default_factory=set)


def warm_inputs(bodies: list[dict[str, Any]]) -> tuple[set[str], set[str]]:
    """The texts (as :func:`text_words`) and photo digests (``"sha256:<hex>"`` of the bytes) that
    the warm phase sends with ``bodies``."""
    texts = {text_words(b["text"]) for b in bodies if b.get("text")}
    digests = {"sha256:" + hashlib.sha256(base64.b64decode(photo)).hexdigest()
               for photo in {b["image_base64"] for b in bodies if b.get("image_base64")}}
    return texts, digests


def make_cold_pools(ikea: Path, bodies: list[dict[str, Any]], photos: int, photo_clients: int, seed: int = 0,
                    texts: int | None = None) -> ColdLoad:
    """Cold mode's load beside the warm ``bodies``: ``photos`` new room-photo queries
    (:func:`cold_photo_pool`, none with a warm photo) and at most ``texts`` new texts
    (:func:`cold_text_pool`, none a warm text or a text of those photo queries, which the server
    caches too), ``photo_clients`` clients sending the photos."""
    _, warm_digests = warm_inputs(bodies)
    t0 = time.perf_counter()
    photo_pool = cold_photo_pool(ikea, photos, seed, warm_digests)
    photo_pool_s = time.perf_counter() - t0
    sent_texts = [b["text"] for b in bodies if b.get("text")] + [p.text for p in photo_pool]
    text_pool = cold_text_pool(ikea, sent_texts, seed, limit=texts)
    return ColdLoad(Pool(text_pool), Pool(photo_pool), photo_clients, seed, photo_pool_s,
                    {text_words(t) for t in sent_texts}, warm_digests)
