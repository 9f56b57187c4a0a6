"""Prompts for the VLM critic and the JSON answer it must give.

A prompt is a chat in the Hugging Face content-part format (``{"type": "image"}`` /
``{"type": "text", "text": ...}``) plus the images in the order of their image parts. The
room photo and the query come FIRST, so the 20 prompts of one search share a prefix that a
prefix cache (e.g. vLLM's automatic prefix caching) can reuse; the product photo, the product
text and the question follow.

Two questions: the fast path asks for "yes"/"no" and reads P(yes) from one forward pass; the
full path asks for ``{"score": x, "rationale": "..."}``, validated by :class:`CriticAnswer`
(:func:`parse_answer`), with one repair round (:func:`repair_prompt`) when it is invalid.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from critic.protocol import CriticPair, CriticUnavailable

YES_NO_QUESTION = "Does this product fit this room and request? Answer yes or no."
JSON_QUESTION = (
    "Does this product fit this room and request? Answer with JSON only: "
    '{"score": x, "rationale": "..."} where x is a number from 0 (does not fit) to 1 (fits well) '
    "and the rationale is one sentence of at most 200 characters."
)
#: The most characters a rationale may have.
MAX_RATIONALE_CHARS = 200
#: Qwen2-VL's image placeholder, expanded to one token per merged patch before tokenising.
IMAGE_PAD = "<|image_pad|>"


class CriticAnswerError(ValueError):
    """Generated text that is not a valid :class:`CriticAnswer`; ``reason`` says why.

    Raised by the answer-level methods (``answers``, :func:`parse_answer`) that distillation
    and labelling use; a critic's ``score`` turns it into
    :class:`~critic.protocol.CriticUnavailable` (:func:`unreadable_answer`)."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


def unreadable_answer(backend: str, error: CriticAnswerError) -> CriticUnavailable:
    """The :class:`~critic.protocol.CriticUnavailable` a critic's ``score`` raises (``from
    error``) when an answer stayed invalid after its repair round: the request cannot be judged.

    Args:
        backend: what the reader should know the critic by, e.g. ``"qwen2-vl"`` or
            ``"the OpenAI-compatible critic at http://host:8000/v1 (model)"``.
        error: the answer's error (its message names the product, the reason and the output).

    Returns:
        The exception to raise; its message is one line.
    """
    return CriticUnavailable(one_line(f"{backend} gave no readable answer: {error}"))


def one_line(text: str, limit: int = 500) -> str:
    """``text`` with every run of whitespace (line breaks included) as one space, cut to at
    most ``limit`` characters (an ellipsis marks a cut): a response detail or rationale line."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


class CriticAnswer(BaseModel):
    """The full-path answer: ``score`` in [0, 1] (float) and a non-empty one-line ``rationale``
    of at most :data:`MAX_RATIONALE_CHARS` characters (surrounding whitespace stripped, line
    breaks and other whitespace runs inside it read as one space). Extra keys are ignored."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)

    score: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    rationale: str = Field(min_length=1, max_length=MAX_RATIONALE_CHARS)

    @field_validator("rationale", mode="before")
    @classmethod
    def _one_line(cls, value: object) -> object:
        """A rationale is one line: whitespace runs (``\\n`` included) become one space."""
        return " ".join(value.split()) if isinstance(value, str) else value


@dataclass(frozen=True)
class Prompt:
    """A chat and its images: ``messages`` in the content-part format, ``images`` (PIL) in the
    order of the ``{"type": "image"}`` parts."""

    messages: list[dict]
    images: list[Image.Image]


def _text(text: str) -> dict:
    return {"type": "text", "text": text}


def build_prompt(pair: CriticPair, question: str = YES_NO_QUESTION) -> Prompt:
    """The one-turn user prompt for ``pair``: room photo, request, product photo, product text,
    then ``question`` (:data:`YES_NO_QUESTION` or :data:`JSON_QUESTION`).

    A missing room photo, query or product photo is left out (text says so), never an error.
    """
    content: list[dict] = []
    images: list[Image.Image] = []
    if pair.room_image is not None:
        content += [_text("Room photo:\n"), {"type": "image"}, _text("\n")]
        images.append(pair.room_image)
    query = (pair.query_text or "").strip()
    content.append(_text(f"Request: {query}\n" if query else "Request: (none; judge the fit with the room)\n"))
    if pair.product_image is not None:
        content += [_text("Product photo:\n"), {"type": "image"}, _text("\n")]
        images.append(pair.product_image)
    content.append(_text(f"Product: {pair.product_text.strip()}\n{question}"))
    return Prompt([{"role": "user", "content": content}], images)


def repair_prompt(prompt: Prompt, bad_output: str, reason: str) -> Prompt:
    """``prompt`` continued with the invalid answer and a request for valid JSON only."""
    follow_up = (
        f"That answer is not valid: {reason}. Reply again with valid JSON only, exactly "
        '{"score": x, "rationale": "..."}, with x from 0 to 1 and a rationale of at most '
        f"{MAX_RATIONALE_CHARS} characters."
    )
    return Prompt(
        prompt.messages + [{"role": "assistant", "content": [_text(bad_output)]},
                           {"role": "user", "content": [_text(follow_up)]}],
        prompt.images,
    )


def render_chat(messages: Sequence[dict], image_token: str = IMAGE_PAD) -> str:
    """The Qwen2-VL chat format (ChatML) of ``messages`` with the assistant turn opened:
    ``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>...<|im_end|>\\n<|im_start|>assistant\\n``.

    Used when the tokenizer has no chat template of its own; each image is one
    ``image_token``, which the critic expands to the image's number of merged patches.
    """
    out = []
    for message in messages:
        parts = message["content"]
        if isinstance(parts, str):
            parts = [_text(parts)]
        body = "".join(
            f"<|vision_start|>{image_token}<|vision_end|>" if p["type"] == "image" else p["text"] for p in parts
        )
        out.append(f"<|im_start|>{message['role']}\n{body}<|im_end|>\n")
    return "".join(out) + "<|im_start|>assistant\n"


def extract_json_object(text: str) -> dict:
    """The first JSON object (``{...}``) in ``text``, e.g. in prose or a code fence.

    Raises:
        CriticAnswerError: ``text`` holds no decodable JSON object.
    """
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    raise CriticAnswerError(f"no JSON object in the answer {text[:120]!r}", "no JSON object found")


def parse_answer(text: str) -> CriticAnswer:
    """The :class:`CriticAnswer` in generated ``text`` (its first JSON object).

    Raises:
        CriticAnswerError: no JSON object, or one that fails validation; ``reason`` names the
            failing fields (e.g. ``score: Input should be less than or equal to 1``).
    """
    obj = extract_json_object(text)
    try:
        return CriticAnswer.model_validate(obj)
    except ValidationError as e:
        reason = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'answer'}: {err['msg']}" for err in e.errors())
        raise CriticAnswerError(f"invalid critic answer {json.dumps(obj)[:120]}: {reason}", reason) from e
