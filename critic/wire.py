"""The JSON wire format of critic requests and answers (the ``critic`` Celery queue).

A request is the payload of :func:`pairs_to_json`; an answer carries one
:func:`verdict_to_json` per pair. Images travel as base64 JPEG (default; small, lossy) or PNG
(lossless), each distinct image once; numpy vectors as base64 float32 bytes with their shape,
the room's region vectors (hundreds of rows, shared by a search's pairs) once per search.
Used by both sides: :class:`workers.critic_client.QueuedCritic` (client) and the
``mars.critic_score`` task of :mod:`workers.critic` (worker), which also share the task's name
and queue (:data:`TASK_NAME`, :data:`QUEUE`).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image

from critic.protocol import CriticPair, Verdict

#: Payload format version (bumped on incompatible changes of :func:`pairs_to_json`).
PAYLOAD_VERSION = 2
#: The Celery task that scores one request (routed to :data:`QUEUE` by ``workers.app``).
TASK_NAME = "mars.critic_score"
#: The Celery queue the critic worker consumes.
QUEUE = "critic"


def image_to_b64(image: Image.Image, fmt: str = "JPEG", quality: int = 95) -> str:
    """``image`` encoded as ``fmt`` (``"JPEG"``, lossy, ``quality`` 1..95; or ``"PNG"``, lossless),
    base64 text. JPEG gets RGB (or L) pixels: other modes are converted to RGB first."""
    buf = io.BytesIO()
    if fmt.upper() == "JPEG":
        img = image if image.mode in ("RGB", "L") else image.convert("RGB")
        img.save(buf, format="JPEG", quality=quality)
    else:
        image.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def image_from_b64(text: str) -> Image.Image:
    """The image encoded by :func:`image_to_b64`, decoded (pixels loaded).

    Raises:
        PIL.UnidentifiedImageError: the bytes are not an image.
    """
    image = Image.open(io.BytesIO(base64.b64decode(text)))
    image.load()
    return image


def array_to_json(array: np.ndarray) -> dict[str, Any]:
    """``array`` as ``{"dtype": "float32", "shape": [...], "b64": <C-order float32 bytes>}``."""
    a = np.asarray(array, dtype=np.float32)
    return {"dtype": "float32", "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def array_from_json(d: Mapping[str, Any]) -> np.ndarray:
    """The float32 array of :func:`array_to_json` (a writable copy, its original shape).

    Raises:
        ValueError: the byte length does not match the shape.
    """
    return np.frombuffer(base64.b64decode(d["b64"]), dtype=np.float32).reshape(d["shape"]).copy()


def _optional(convert: Callable[[Any], Any], value: Any) -> Any:
    """``convert(value)``, or None for None."""
    return None if value is None else convert(value)


def pairs_to_json(pairs: Sequence[CriticPair], image_format: str = "JPEG", jpeg_quality: int = 95) -> dict[str, Any]:
    """The JSON-able payload of ``pairs``: ``{"v": 2, "images": [b64, ...], "regions": [...], "pairs": [...]}``.

    Every field of :class:`CriticPair` is kept. Images are encoded once each (the room photo,
    shared by all the pairs of a search, is sent once) and pairs refer to them by index in
    ``images``; so are the room's region vectors (by index in ``regions``); other numpy vectors become :func:`array_to_json` dicts (float32, with shape).
    ``image_format="JPEG"`` (quality ``jpeg_quality``) is small but lossy, so a VLM sees slightly
    different pixels than in process; ``"PNG"`` is exact and larger.
    """
    images: list[str] = []
    regions: list[dict[str, Any]] = []
    index: dict[tuple[str, int], int] = {}

    def ref(image: Image.Image) -> int:
        if ("image", id(image)) not in index:
            index["image", id(image)] = len(images)
            images.append(image_to_b64(image, image_format, jpeg_quality))
        return index["image", id(image)]

    def ref_regions(array: np.ndarray) -> int:
        if ("regions", id(array)) not in index:
            index["regions", id(array)] = len(regions)
            regions.append(array_to_json(array))
        return index["regions", id(array)]

    out = [
        {
            "query_text": p.query_text,
            "room_image": _optional(ref, p.room_image),
            "product_id": p.product_id,
            "product_text": p.product_text,
            "product_image": _optional(ref, p.product_image),
            "product_class": p.product_class,
            "product_type": p.product_type,
            "fused_rank": p.fused_rank,
            "room_regions": _optional(ref_regions, p.room_regions),
            "query_vector": _optional(array_to_json, p.query_vector),
            "product_vectors": {k: array_to_json(v) for k, v in p.product_vectors.items()},
        }
        for p in pairs
    ]
    return {"v": PAYLOAD_VERSION, "images": images, "regions": regions, "pairs": out}


def pairs_from_json(payload: Mapping[str, Any]) -> list[CriticPair]:
    """The pairs of a :func:`pairs_to_json` payload (pairs that shared an image share it again).

    Raises:
        ValueError: an unknown payload version.
        PIL.UnidentifiedImageError: an image that does not decode.
    """
    if payload.get("v") != PAYLOAD_VERSION:
        raise ValueError(f"critic payload version {payload.get('v')!r}; this worker reads {PAYLOAD_VERSION}")
    images = [image_from_b64(text) for text in payload["images"]]
    regions = [array_from_json(d) for d in payload["regions"]]
    return [
        CriticPair(
            query_text=d["query_text"],
            room_image=_optional(images.__getitem__, d["room_image"]),
            product_id=d["product_id"],
            product_text=d["product_text"],
            product_image=_optional(images.__getitem__, d["product_image"]),
            product_class=d["product_class"],
            product_type=d["product_type"],
            fused_rank=d["fused_rank"],
            room_regions=_optional(regions.__getitem__, d["room_regions"]),
            query_vector=_optional(array_from_json, d["query_vector"]),
            product_vectors={k: array_from_json(v) for k, v in d["product_vectors"].items()},
        )
        for d in payload["pairs"]
    ]


def verdict_to_json(v: Verdict) -> dict[str, Any]:
    """``{"score", "rationale", "backend", "latency_s"}`` of ``v`` (score in [0, 1], latency in s)."""
    return {"score": v.score, "rationale": v.rationale, "backend": v.backend, "latency_s": v.latency_s}


def verdict_from_json(d: Mapping[str, Any]) -> Verdict:
    """The :class:`Verdict` of :func:`verdict_to_json`.

    Raises:
        ValueError: the score is outside [0, 1].
    """
    return Verdict(float(d["score"]), str(d["rationale"]), str(d["backend"]), float(d["latency_s"]))
