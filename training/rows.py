"""The JSONL rows of the teacher -> student distillation pipeline, and their critic inputs.

One row per (room query, product) pair, one JSON object a line (UTF-8):

* ``mars train mine`` writes **pair rows**: ``query_id``, ``task``, ``room_id``,
  ``room_category``, ``query`` (the request text), ``room_image`` (absolute path of the room
  photo), ``product_id``, ``product_text`` (what the critic reads: type, colour, title,
  description), ``product_image`` (absolute path, or null), ``product_class`` and
  ``target_class`` (taxonomy class keys, or null), ``fused_rank`` / ``image_rank`` (1-based
  ranks in the hybrid funnel's fused and image lists, or null), ``relevant`` (judged relevant
  for this query by the qrels), ``in_room`` (staged anywhere in the room), ``kind`` (:data:`training.mine_pairs.KINDS`) and ``reason``;
* ``mars train label`` writes **label rows**: a pair row plus the teacher's ``score`` (float in
  [0, 1]) and ``rationale`` and their provenance (:mod:`training.label`).

Rows are keyed by (``query_id``, ``product_id``) (:func:`row_key`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import IO, Any

from PIL import Image
from pydantic import ValidationError

from critic.prompt import CriticAnswer
from critic.protocol import CriticPair

#: The keys every pair row has (label rows add theirs).
PAIR_FIELDS: tuple[str, ...] = (
    "query_id", "task", "room_id", "room_category", "query", "room_image", "product_id", "product_text",
    "product_image", "product_class", "target_class", "fused_rank", "image_rank", "relevant", "in_room", "kind",
    "reason",
)


def row_key(row: dict[str, Any]) -> tuple[str, str]:
    """The identity of a row: ``(query_id, product_id)``."""
    return str(row["query_id"]), str(row["product_id"])


def read_jsonl(path: Path, required: Iterable[str] = ("query_id", "product_id")) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one per non-blank line, in file order.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a line that is not a JSON object with the ``required`` keys (the message
            names ``path:line``).
    """
    rows = []
    with Path(path).open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not valid JSON ({e.msg})") from e
            missing = [k for k in required if not isinstance(row, dict) or k not in row]
            if missing:
                raise ValueError(f"{path}:{number}: a row needs the keys {', '.join(missing)}")
            rows.append(row)
    return rows


def write_rows(fh: IO[str], rows: Iterable[dict[str, Any]]) -> None:
    """Append ``rows`` to the open text file ``fh`` as JSON lines and flush it."""
    for row in rows:
        fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    fh.flush()


def trim_partial_line(path: Path) -> bool:
    """Cut a last line without its newline (a write interrupted mid-row) off ``path``, so
    appending resumes on a clean line. Returns True when something was cut; a missing file
    is left alone."""
    if not path.exists():
        return False
    data = path.read_bytes()
    if not data or data.endswith(b"\n"):
        return False
    path.write_bytes(data[: data.rfind(b"\n") + 1])
    return True


def label_answer(row: dict[str, Any]) -> CriticAnswer:
    """The teacher's answer of a label row (``score``, ``rationale``), validated.

    Raises:
        ValueError: missing keys, a score outside [0, 1] or a rationale that is empty or too long.
    """
    try:
        return CriticAnswer.model_validate({"score": row.get("score"), "rationale": row.get("rationale")})
    except ValidationError as e:
        reason = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise ValueError(f"label of {row_key(row)} is not a valid critic answer: {reason}") from e


def answer_json(answer: CriticAnswer) -> str:
    """The JSON text of ``answer`` as the critic must generate it: ``{"score": x, "rationale": "..."}``."""
    return json.dumps({"score": answer.score, "rationale": answer.rationale}, ensure_ascii=False)


class RowImages:
    """Opens the photos that rows name, as RGB PIL images, and keeps them (a room photo is
    shared by every pair of its queries, so it is decoded once and the prompts of one room
    hold the same image object).

    Raises (from ``__call__``): FileNotFoundError for a missing file, PIL's
    ``UnidentifiedImageError`` / OSError for one that does not decode.
    """

    def __init__(self, max_cached: int = 256) -> None:
        self.max_cached = max_cached
        self._cache: dict[str, Image.Image] = {}

    def __call__(self, path: str | None) -> Image.Image | None:
        """The photo at ``path`` (RGB), or None when ``path`` is None."""
        if path is None:
            return None
        if path not in self._cache:
            if len(self._cache) >= self.max_cached:
                self._cache.pop(next(iter(self._cache)))
            with Image.open(path) as img:
                self._cache[path] = img.convert("RGB")
        return self._cache[path]


def row_pair(row: dict[str, Any], images: RowImages) -> CriticPair:
    """The :class:`~critic.protocol.CriticPair` a VLM critic judges for ``row``: request text,
    room photo, product id, text and photo (no vectors: VLM critics read pixels and text).

    Raises:
        KeyError: a row without ``product_id`` or ``product_text``.
        FileNotFoundError / OSError: a photo the row names is missing or does not decode.
    """
    return CriticPair(
        query_text=row.get("query"),
        room_image=images(row.get("room_image")),
        product_id=str(row["product_id"]),
        product_text=row["product_text"],
        product_image=images(row.get("product_image")),
        product_class=row.get("product_class"),
        fused_rank=row.get("fused_rank"),
    )
