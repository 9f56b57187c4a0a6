"""``mars train label``: the teacher critic's score and rationale for each mined pair.

Teachers (both give :class:`~critic.prompt.CriticAnswer` JSON for the prompt of
:func:`critic.prompt.build_prompt` with :data:`~critic.prompt.JSON_QUESTION`, one repair round
included):

* ``openai`` — :meth:`critic.openai_compat.OpenAICompatCritic.answers`, a large VLM behind an
  OpenAI-compatible endpoint (``MARS_CRITIC_ENDPOINT``, ``MARS_CRITIC_API_MODEL``,
  ``MARS_CRITIC_API_KEY``), e.g. vLLM serving Qwen2.5-VL-7B;
* ``vlm`` — :meth:`critic.vlm.QwenVLCritic.answers`, a local Qwen2-VL (``MARS_CRITIC_MODEL``,
  optionally ``MARS_CRITIC_ADAPTER``) on its full JSON path for every pair.

Labelling is resumable: rows whose (query_id, product_id) is already in the output (or in its
rejected file) are skipped, each batch is appended and flushed as soon as it is answered, and a
row cut off by a crash is trimmed before appending. A pair whose answer stays invalid after the
repair round is written to the rejected file with the reason, never silently dropped. Every
label carries its provenance: teacher, model, prompt version, time and latency.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from PIL import Image

from critic.prompt import JSON_QUESTION, CriticAnswer, CriticAnswerError, build_prompt, repair_prompt
from critic.protocol import CriticPair
from training.rows import RowImages, read_jsonl, row_key, row_pair, trim_partial_line, write_rows

TEACHERS: tuple[str, ...] = ("openai", "vlm")


def prompt_version() -> str:
    """A short fingerprint (first 12 hex digits of a SHA-256) of every fixed text the teacher
    reads: the prompt skeleton of :func:`~critic.prompt.build_prompt` with
    :data:`~critic.prompt.JSON_QUESTION` and the follow-up of :func:`~critic.prompt.repair_prompt`.
    It changes whenever a prompt text changes, so labels from different prompts can be told apart."""
    blank = Image.new("RGB", (1, 1))
    pair = CriticPair("<request>", blank, "<id>", "<product>", blank)
    prompt = build_prompt(pair, JSON_QUESTION)
    texts = repair_prompt(prompt, "<answer>", "<reason>").messages
    return hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()[:12]


def rejected_path(out: Path) -> Path:
    """Where the pairs a teacher could not label go: ``labels.jsonl`` -> ``labels.rejected.jsonl``."""
    return out.with_name(f"{out.stem if out.suffix == '.jsonl' else out.name}.rejected.jsonl")


def build_teacher(name: str, settings: Any, *, batch_size: int = 4, max_new_tokens: int = 128,
                  device: str | None = None) -> tuple[Any, str]:
    """The teacher critic ``name`` (:data:`TEACHERS`) from ``settings`` and a description of its model.

    ``openai``: an :class:`~critic.openai_compat.OpenAICompatCritic` on ``critic_endpoint`` /
    ``critic_api_model`` / ``critic_api_key`` (timeouts, retries and concurrency from the
    settings too). ``vlm``: a :class:`~critic.vlm.QwenVLCritic` on ``critic_model`` (+
    ``critic_adapter``, ``critic_4bit``) with ``rationale_top_k = batch_size``, so every pair gets
    a generated score and rationale.

    Raises:
        ValueError: an unknown teacher, or the settings it needs are missing.
        RuntimeError: ``critic_4bit`` without CUDA or bitsandbytes.
    """
    if name == "openai":
        if not settings.critic_endpoint or not settings.critic_api_model:
            raise ValueError("the openai teacher needs MARS_CRITIC_ENDPOINT (e.g. http://localhost:8000/v1) and "
                             "MARS_CRITIC_API_MODEL (the served model name)")
        from critic.openai_compat import OpenAICompatCritic

        key = settings.critic_api_key.get_secret_value() if settings.critic_api_key else None
        teacher = OpenAICompatCritic(
            settings.critic_endpoint, settings.critic_api_model, api_key=key, timeout_s=settings.critic_timeout_s,
            max_retries=settings.critic_max_retries, max_concurrency=settings.critic_max_concurrency,
            max_tokens=max_new_tokens,
        )
        return teacher, f"{settings.critic_api_model} at {settings.critic_endpoint}"
    if name == "vlm":
        if not settings.critic_model:
            raise ValueError("the vlm teacher needs MARS_CRITIC_MODEL (a local Qwen2-VL directory)")
        from critic.vlm import QwenVLCritic

        teacher = QwenVLCritic(settings.critic_model, adapter=settings.critic_adapter, load_in_4bit=settings.critic_4bit,
                               batch_size=batch_size, rationale_top_k=batch_size, max_new_tokens=max_new_tokens,
                               device=device)
        adapter = f" + LoRA {settings.critic_adapter}" if settings.critic_adapter else ""
        return teacher, f"{settings.critic_model}{adapter}"
    raise ValueError(f"unknown teacher {name!r}; use one of {', '.join(TEACHERS)}")


def teacher_answers(teacher: Any, pairs: Sequence[CriticPair]) -> list[tuple[CriticAnswer | CriticAnswerError, float]]:
    """Each pair's validated answer from the teacher, or the
    :class:`~critic.prompt.CriticAnswerError` that says why it stayed invalid after the repair
    round, with the wall time in seconds of the call that produced it.

    A teacher with ``answers_or_errors`` (:class:`~critic.vlm.QwenVLCritic`) answers the batch in
    one go. Otherwise (:class:`~critic.openai_compat.OpenAICompatCritic`) the batch goes to
    ``answers``; when an answer in it stays invalid (``answers`` raises for the whole batch),
    each pair is asked again alone, so one bad answer rejects one pair only.

    Raises:
        Whatever else the teacher raises (e.g. ``openai.APIError`` after its retries).
    """
    t0 = time.perf_counter()
    if hasattr(teacher, "answers_or_errors"):
        results = teacher.answers_or_errors(list(pairs))
        latency = time.perf_counter() - t0
        return [(r, latency) for r in results]
    try:
        answers = teacher.answers(list(pairs))
        latency = time.perf_counter() - t0
        return [(a, latency) for a in answers]
    except CriticAnswerError as e:
        if len(pairs) == 1:
            return [(e, time.perf_counter() - t0)]
    out: list[tuple[CriticAnswer | CriticAnswerError, float]] = []
    for pair in pairs:
        t0 = time.perf_counter()
        try:
            result: CriticAnswer | CriticAnswerError = teacher.answers([pair])[0]
        except CriticAnswerError as e:
            result = e
        out.append((result, time.perf_counter() - t0))
    return out


@dataclass
class LabelReport:
    """What one ``label`` run did: ``pairs`` in the input, ``skipped`` (already labelled or
    rejected earlier), ``labelled`` and ``rejected`` now, wall ``seconds``, and the two files."""

    pairs: int
    skipped: int
    labelled: int
    rejected: int
    seconds: float
    out: str
    rejected_out: str

    def as_dict(self) -> dict[str, Any]:
        """The report as a JSON-ready dict."""
        return asdict(self)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def label_pairs(
    teacher: Any,
    rows: Sequence[dict[str, Any]],
    out: Path,
    *,
    teacher_name: str,
    teacher_model: str,
    batch_size: int = 8,
    retry_rejected: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> LabelReport:
    """Label the pair ``rows`` with ``teacher`` into ``out`` (JSONL, appended) and
    :func:`rejected_path` (``out``), ``batch_size`` pairs per teacher call.

    Each label row is the pair row plus ``score`` (float in [0, 1]), ``rationale`` (str, at most
    200 characters), ``teacher`` (``teacher_name``), ``teacher_model``, ``prompt_version``
    (:func:`prompt_version`), ``labelled_at`` (ISO-8601 UTC) and ``latency_s`` (seconds of the
    teacher call that answered it). A rejected row is the pair row plus ``error`` (the reason),
    ``detail`` (the full message) and the same provenance.

    Args:
        teacher: an object with ``answers(pairs) -> list[CriticAnswer]`` (:func:`build_teacher`).
        rows: pair rows (:mod:`training.rows`); rows with a key seen earlier in ``rows`` are
            skipped as duplicates.
        out: the labels file; rows whose key is already in it are skipped (resume).
        teacher_name / teacher_model: provenance written on every row.
        batch_size: pairs per teacher call (>= 1).
        retry_rejected: ask again for the pairs in the rejected file (default: skip them).
        on_batch: called with the number of rows handled after each batch (progress).

    Raises:
        ValueError: ``batch_size`` < 1, or a row of ``out`` that is not a label row.
        Whatever the teacher raises besides invalid answers (what was answered before is saved).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t_start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    rejected_out = rejected_path(out)
    for path in (out, rejected_out):
        trim_partial_line(path)
    done = {row_key(r) for r in read_jsonl(out)} if out.exists() else set()
    if rejected_out.exists() and not retry_rejected:
        done |= {row_key(r) for r in read_jsonl(rejected_out)}
    todo, seen = [], set(done)
    for row in rows:
        if row_key(row) not in seen:
            seen.add(row_key(row))
            todo.append(row)
    provenance = {"teacher": teacher_name, "teacher_model": teacher_model, "prompt_version": prompt_version()}
    images = RowImages()
    labelled = rejected = 0
    with out.open("a", encoding="utf-8") as good, rejected_out.open("a", encoding="utf-8") as bad:
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            pairs, asked, failed = [], [], []
            for row in batch:
                try:
                    pairs.append(row_pair(row, images))
                    asked.append(row)
                except (KeyError, OSError) as e:  # a photo that is gone or does not decode, a broken row
                    failed.append({**row, "error": f"cannot build the prompt: {e.__class__.__name__}: {e}",
                                   "detail": str(e), **provenance, "labelled_at": _now(), "latency_s": None})
            answered = teacher_answers(teacher, pairs) if pairs else []
            labels = []
            for row, (answer, latency) in zip(asked, answered):
                stamp = {**provenance, "labelled_at": _now(), "latency_s": round(latency, 4)}
                if isinstance(answer, CriticAnswerError):
                    failed.append({**row, "error": answer.reason, "detail": str(answer), **stamp})
                    continue
                checked = CriticAnswer.model_validate(answer.model_dump())  # every label is re-validated on write
                labels.append({**row, "score": checked.score, "rationale": checked.rationale, **stamp})
            write_rows(good, labels)
            write_rows(bad, failed)
            labelled += len(labels)
            rejected += len(failed)
            if on_batch:
                on_batch(len(batch))
    return LabelReport(len(rows), len(rows) - len(todo), labelled, rejected, round(time.perf_counter() - t_start, 3),
                       str(out), str(rejected_out))
