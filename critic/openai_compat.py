"""A critic behind an OpenAI-compatible chat-completions endpoint (e.g. vLLM serving Qwen2.5-VL-7B).

Each pair becomes one ``POST {base_url}/chat/completions`` request carrying the prompt of
:func:`critic.prompt.build_prompt` with :data:`~critic.prompt.JSON_QUESTION`; the answer must be
``{"score": x, "rationale": "..."}`` (:class:`~critic.prompt.CriticAnswer`), with one repair round
(:func:`~critic.prompt.repair_prompt`) when it is not. The pairs of one search are independent
requests, sent concurrently. Besides :meth:`OpenAICompatCritic.score` (the :class:`Critic`
protocol), :meth:`OpenAICompatCritic.answers` gives the validated answers themselves: this
backend is the teacher whose scores and rationales a smaller critic is distilled from.

Message format (OpenAI chat completions API reference,
https://platform.openai.com/docs/api-reference/chat/create, and the vision guide,
https://platform.openai.com/docs/guides/images-vision): a user message's ``content`` is a list
of parts, ``{"type": "text", "text": ...}`` or ``{"type": "image_url", "image_url": {"url":
"data:image/jpeg;base64,..."}}``. vLLM's OpenAI-compatible server accepts the same format for
vision-language models (https://docs.vllm.ai/en/latest/serving/openai_compatible_server.html).

Prefix caching: the prompt puts the room photo and the request first, and each distinct image is
JPEG-encoded once per batch, so the 20 requests of one search start with byte-identical parts. A
server with automatic prefix caching (vLLM,
https://docs.vllm.ai/en/latest/features/automatic_prefix_caching.html; image inputs take part in
the block hashes) then computes the room photo's KV cache once and reuses it.

Transport errors are left to the official ``openai`` SDK: it retries connection errors,
timeouts, 408, 409, 429 and 5xx answers ``max_retries`` times with exponential backoff (and
honours ``Retry-After``), then raises its own exception (``openai.APITimeoutError``,
``openai.APIConnectionError``, ``openai.APIStatusError`` and subclasses), to which this module
adds a note naming the product, endpoint and model. :meth:`OpenAICompatCritic.answers` (the
teacher's labels) raises those and :class:`~critic.prompt.CriticAnswerError` as they are;
:meth:`OpenAICompatCritic.score` (the :class:`~critic.protocol.Critic` method the funnel calls)
turns every one of them into :class:`~critic.protocol.CriticUnavailable` with a one-line reason
that names the endpoint, so a search keeps its fused order and says why.
"""

from __future__ import annotations

import base64
import io
import json
import math
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
from openai.types.chat import ChatCompletion
from PIL import Image

from critic.prompt import (
    JSON_QUESTION, CriticAnswer, CriticAnswerError, Prompt, build_prompt, one_line, parse_answer, repair_prompt,
    unreadable_answer,
)
from critic.protocol import CriticPair, CriticUnavailable, Verdict

#: JPEG quality of the images sent as data URLs.
JPEG_QUALITY = 90
#: ``api_key`` sent when none is given: vLLM accepts any key unless started with ``--api-key``.
DEFAULT_API_KEY = "EMPTY"


def image_data_url(image: Image.Image, quality: int = JPEG_QUALITY) -> str:
    """``image`` as a ``data:image/jpeg;base64,...`` URL (the ``image_url.url`` of a content part).

    Modes JPEG cannot hold are converted to RGB; transparent pixels are composited on white
    (product photos are often cut-outs). Encoding is deterministic: the same image gives the
    same URL, which a server's prefix cache relies on.

    Args:
        image: any PIL image.
        quality: JPEG quality, 1..95.

    Returns:
        The data URL (str), about 4/3 of the JPEG's size in bytes.
    """
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    elif image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def to_openai_messages(prompt: Prompt, urls: Mapping[int, str] | None = None) -> list[dict[str, Any]]:
    """``prompt`` (Hugging Face content parts, :mod:`critic.prompt`) as chat-completions messages.

    Each ``{"type": "image"}`` part becomes ``{"type": "image_url", "image_url": {"url": <data
    URL>}}`` for the next image of ``prompt.images`` (order kept, so the room photo stays first);
    text parts become ``{"type": "text", "text": ...}``. User messages keep a list of parts;
    assistant messages (the invalid answer of a repair round) become a plain string, the form
    every server accepts.

    Args:
        prompt: the chat and its images.
        urls: data URLs already encoded, keyed by ``id(image)``; an image not in it is encoded
            here (:func:`image_data_url`).

    Returns:
        A list of ``{"role": ..., "content": ...}`` dicts, one per message of ``prompt``.

    Raises:
        ValueError: the image parts and ``prompt.images`` differ in number, or a part of an
            unknown type.
    """
    images = iter(prompt.images)
    n_image_parts = 0
    out: list[dict[str, Any]] = []
    for message in prompt.messages:
        content = message["content"]
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        parts: list[dict[str, Any]] = []
        for part in content:
            if part["type"] == "text":
                parts.append({"type": "text", "text": part["text"]})
            elif part["type"] == "image":
                n_image_parts += 1
                image = next(images, None)
                if image is None:
                    raise ValueError(f"prompt has more image parts than its {len(prompt.images)} images")
                url = urls.get(id(image)) if urls else None
                parts.append({"type": "image_url", "image_url": {"url": url or image_data_url(image)}})
            else:
                raise ValueError(f"unknown content part type {part['type']!r}")
        if message["role"] == "assistant":
            if any(p["type"] != "text" for p in parts):
                raise ValueError("an assistant message may only hold text parts")
            out.append({"role": "assistant", "content": "".join(p["text"] for p in parts)})
        else:
            out.append({"role": message["role"], "content": parts})
    if n_image_parts != len(prompt.images):
        raise ValueError(f"prompt has {n_image_parts} image parts for {len(prompt.images)} images")
    return out


def _retried_status(status: int) -> bool:
    """Whether the ``openai`` SDK retries an answer with this HTTP status by default (408, 409,
    429, 5xx; ``openai._base_client.BaseClient._should_retry``, which also obeys a server's
    ``x-should-retry`` header and a too-long ``Retry-After``)."""
    return status in (408, 409, 429) or status >= 500


def _positive_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class OpenAICompatCritic:
    """A vision-language model behind an OpenAI-compatible ``/chat/completions`` endpoint as a
    :class:`~critic.protocol.Critic` (and as the teacher for distillation: :meth:`answers`).

    Args:
        base_url: the API root including its version path, e.g. ``http://localhost:8000/v1``
            for ``vllm serve``; requests go to ``{base_url}/chat/completions``.
        model: the served model name (vLLM: the ``--served-model-name`` or model path), e.g.
            ``Qwen/Qwen2.5-VL-7B-Instruct``.
        api_key: bearer token; None sends :data:`DEFAULT_API_KEY` ("EMPTY", what vLLM expects
            without ``--api-key``). ``OPENAI_API_KEY`` is deliberately not read, so an OpenAI key
            is never sent to a self-hosted endpoint by accident.
        timeout_s: seconds allowed for each network operation of one attempt (connect, write,
            each read, pool wait), > 0.
        max_retries: retries of one request by the SDK after a connection error, a timeout or a
            408/409/429/5xx answer (exponential backoff from 0.5 s, capped at 8 s, or the
            server's ``Retry-After``), >= 0.
        max_concurrency: requests in flight at once, >= 1.
        max_tokens: generation budget of one answer in tokens, >= 1.
        json_mode: send ``response_format={"type": "json_object"}`` (constrained JSON output);
            off by default, as not every server supports it.

    Construction opens no connection.

    Raises:
        ValueError: an empty or non-HTTP(S) ``base_url``, an empty ``model`` or ``api_key``, a
            non-positive or non-finite ``timeout_s``, or an integer option out of range.
    """

    name = "openai"
    uses_images = True

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        timeout_s: float = 30,
        max_retries: int = 2,
        max_concurrency: int = 8,
        max_tokens: int = 128,
        json_mode: bool = False,
    ) -> None:
        if not isinstance(base_url, str) or not base_url.strip():
            raise ValueError("base_url must be a non-empty URL such as http://localhost:8000/v1")
        base_url = base_url.strip()
        if not base_url.lower().startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        if not isinstance(model, str) or not model.strip():
            raise ValueError("model must be the served model's name (non-empty), e.g. Qwen/Qwen2.5-VL-7B-Instruct")
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            raise ValueError("api_key must be a non-empty string, or None for the vLLM default 'EMPTY'")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not (
            math.isfinite(timeout_s) and timeout_s > 0
        ):
            raise ValueError(f"timeout_s must be a finite number of seconds > 0, got {timeout_s!r}")
        if not isinstance(json_mode, bool):
            raise ValueError(f"json_mode must be True or False, got {json_mode!r}")
        self.base_url = base_url
        self.model = model.strip()
        self.timeout_s = float(timeout_s)
        self.max_retries = _positive_int("max_retries", max_retries, 0)
        self.max_concurrency = _positive_int("max_concurrency", max_concurrency, 1)
        self.max_tokens = _positive_int("max_tokens", max_tokens, 1)
        self.json_mode = json_mode
        self.backend = f"openai:{self.model}"
        self.client = openai.OpenAI(
            base_url=self.base_url,
            api_key=api_key if api_key is not None else DEFAULT_API_KEY,
            timeout=self.timeout_s,
            max_retries=self.max_retries,
        )

    def __repr__(self) -> str:
        return f"OpenAICompatCritic(base_url={self.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        """Close the HTTP connections of the underlying client (later calls reopen none; build a
        new critic instead)."""
        self.client.close()

    def __enter__(self) -> OpenAICompatCritic:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ requests

    def complete(self, messages: list[dict[str, Any]]) -> tuple[str, str | None]:
        """One chat completion (SDK retries included): the answer text and its ``finish_reason``.

        Args:
            messages: chat-completions messages (:func:`to_openai_messages`).

        Returns:
            ``(content, finish_reason)``; content is "" when the server sent none.

        Raises:
            openai.APIError: after the SDK's retries (``APITimeoutError``, ``APIConnectionError``,
                ``APIStatusError`` subclasses such as ``NotFoundError`` for a wrong
                ``base_url``/``model``).
            CriticAnswerError: a 2xx response that is not a chat completion: a body that is not
                JSON, not the completion's shape (e.g. an HTML page), without choices, or whose
                message content is not text.
        """
        kwargs: dict[str, Any] = {}
        if self.json_mode:
            kwargs["response_format"] = {"type": "json_object"}
        try:
            completion = self.client.chat.completions.create(
                model=self.model, messages=messages, temperature=0, max_tokens=self.max_tokens, **kwargs,
            )
        except json.JSONDecodeError as e:  # a JSON content type whose body does not decode (the SDK lets it through)
            raise CriticAnswerError(f"the server's response body is not JSON ({e})", "response body is not JSON") from e
        if not isinstance(completion, ChatCompletion):  # the SDK returns a non-JSON body (e.g. text/html) as it is
            raise CriticAnswerError(f"the server's response is not a chat completion: {str(completion)[:120]!r}",
                                    "response is not a chat completion")
        if not completion.choices:
            raise CriticAnswerError("the server returned a completion without choices", "no choices")
        choice = completion.choices[0]
        content = choice.message.content if choice.message is not None else None
        if content is not None and not isinstance(content, str):
            raise CriticAnswerError(f"the completion's message content is not text: {content!r:.120}",
                                    "message content is not text")
        return content or "", choice.finish_reason

    def _answer(self, pair: CriticPair, prompt: Prompt, urls: Mapping[int, str]) -> CriticAnswer:
        """The validated answer for one pair: one request, plus one repair request if invalid."""

        def call(messages: list[dict[str, Any]]) -> tuple[str, str | None]:
            try:
                return self.complete(messages)
            except CriticAnswerError as e:
                raise CriticAnswerError(
                    f"product {pair.product_id}: {e} ({self.model} at {self.base_url})", e.reason,
                ) from e

        try:
            text, finish = call(to_openai_messages(prompt, urls))
            try:
                return parse_answer(text)
            except CriticAnswerError as e:
                reason = e.reason
                if finish == "length":
                    reason += f" (the answer was cut at max_tokens={self.max_tokens})"
            text, finish = call(to_openai_messages(repair_prompt(prompt, text, reason), urls))
            try:
                return parse_answer(text)
            except CriticAnswerError as e:
                cut = f"; cut at max_tokens={self.max_tokens}" if finish == "length" else ""
                raise CriticAnswerError(
                    f"product {pair.product_id}: the OpenAI-compatible critic ({self.model} at {self.base_url}) "
                    f"gave no valid JSON answer after one repair retry: {e.reason}{cut}; output {text[:200]!r}",
                    e.reason,
                ) from e
        except openai.OpenAIError as e:
            e.add_note(f"while judging product {pair.product_id} with {self.model} at {self.base_url}")
            raise

    def answers(self, pairs: Sequence[CriticPair]) -> list[CriticAnswer]:
        """The validated :class:`~critic.prompt.CriticAnswer` (score in [0, 1] and rationale) of
        each pair, in input order: the teacher's labels for distillation.

        The pairs are sent concurrently (at most ``max_concurrency`` requests in flight), each
        with ``temperature=0`` and ``max_tokens``; an invalid answer gets one repair request.
        Each distinct image is JPEG-encoded once for the whole batch.

        Raises:
            CriticAnswerError: a pair whose answer is still invalid after the repair round (the
                message names its product id, the reason and the output).
            openai.APIError: a request that failed after the SDK's retries (a note names the
                product). After the first failure no further request is sent (those in flight
                finish); the first failure in input order is raised.
        """
        if not pairs:
            return []
        prompts = [build_prompt(p, JSON_QUESTION) for p in pairs]
        urls: dict[int, str] = {}
        for prompt in prompts:
            for image in prompt.images:
                if id(image) not in urls:
                    urls[id(image)] = image_data_url(image)
        failed = threading.Event()

        def answer(pair: CriticPair, prompt: Prompt) -> CriticAnswer | None:
            if failed.is_set():  # an earlier request failed: send no more (a stalled endpoint costs one wave)
                return None
            try:
                return self._answer(pair, prompt, urls)
            except BaseException:
                failed.set()
                raise

        pool = ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(pairs)),
                                  thread_name_prefix="openai-critic")
        try:
            futures = [pool.submit(answer, pair, prompt) for pair, prompt in zip(pairs, prompts)]
            # The pool starts requests in input order, so a skipped one (None) always comes after
            # the failed one whose result() raises first.
            return [f.result() for f in futures]  # type: ignore[misc]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def score(self, pairs: Sequence[CriticPair]) -> list[Verdict]:
        """One :class:`~critic.protocol.Verdict` per pair, in input order: the model's score and
        rationale, ``backend="openai:<model>"`` and ``latency_s`` = wall time of the whole batch
        in seconds (the same for every verdict).

        Raises:
            CriticUnavailable: the endpoint could not judge the pairs; the one-line message names
                the endpoint, the model and what happened, and the exception is chained from
                the cause: no answer within ``timeout_s`` (``openai.APITimeoutError``), no
                connection (``openai.APIConnectionError``), an error status such as 5xx after
                ``max_retries`` retries (``openai.APIStatusError``), another SDK error, or an
                answer that is not valid JSON for :class:`~critic.prompt.CriticAnswer` after the
                repair round (:class:`~critic.prompt.CriticAnswerError`).
        """
        t0 = time.perf_counter()
        where = f"the OpenAI-compatible critic at {self.base_url} ({self.model})"
        try:
            answers = self.answers(pairs)
        except CriticAnswerError as exc:
            raise unreadable_answer(where, exc) from exc
        except openai.APITimeoutError as exc:
            raise CriticUnavailable(one_line(
                f"{where} timed out: no answer within timeout_s={self.timeout_s:g} s "
                f"({self.max_retries} retries)"
            )) from exc
        except openai.APIConnectionError as exc:
            cause = f" ({exc.__cause__})" if exc.__cause__ is not None else ""
            raise CriticUnavailable(one_line(
                f"{where} could not be reached ({self.max_retries} retries): {exc}{cause}", limit=300,
            )) from exc
        except openai.APIStatusError as exc:
            retried = f" (up to {self.max_retries} retries)" if _retried_status(exc.status_code) else ""
            raise CriticUnavailable(one_line(
                f"{where} answered HTTP {exc.status_code}{retried}: {exc}", limit=300,
            )) from exc
        except openai.OpenAIError as exc:
            raise CriticUnavailable(one_line(f"{where} failed: {type(exc).__name__}: {exc}", limit=300)) from exc
        latency = time.perf_counter() - t0
        return [Verdict(a.score, a.rationale, self.backend, latency) for a in answers]
