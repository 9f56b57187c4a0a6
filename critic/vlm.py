"""Qwen2-VL as the stage-3 critic (Wang et al., "Qwen2-VL", arXiv:2409.12191).

Two paths over the prompts of :mod:`critic.prompt`:

* fast: one forward pass per pair (batched); ``score = P(yes) / (P(yes) + P(no))`` from the
  next-token logits after the yes/no question, the pointwise relevance read-out of monoT5
  (Nogueira et al., "Document Ranking with a Pretrained Sequence-to-Sequence Model",
  arXiv:2003.06713);
* full: greedy ``generate`` of ``{"score": x, "rationale": "..."}`` for the first
  ``rationale_top_k`` pairs (the funnel passes them in fused order), one repair round when
  the JSON is invalid, then :class:`~critic.prompt.CriticAnswerError` (from :meth:`~QwenVLCritic.answers`;
  :meth:`~QwenVLCritic.score`, the :class:`~critic.protocol.Critic` method, raises
  :class:`~critic.protocol.CriticUnavailable` instead: the request cannot be judged).

Inputs are built without ``Qwen2VLProcessor`` (it needs torchvision for its video
processor): the tokenizer renders the chat, ``Qwen2VLImageProcessorPil`` gives
``pixel_values`` / ``image_grid_thw``, and each ``<|image_pad|>`` is expanded here to
``prod(grid_thw) // merge_size**2`` tokens. Batches are LEFT padded; the 3-D M-RoPE
position ids come from the model's own ``get_rope_index`` given the attention mask, so a
padded row gets the positions it would get alone.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from critic.prompt import (
    IMAGE_PAD, JSON_QUESTION, YES_NO_QUESTION, CriticAnswer, CriticAnswerError, Prompt, build_prompt,
    parse_answer, render_chat, repair_prompt, unreadable_answer,
)
from critic.protocol import CriticPair, CriticUnavailable, Verdict


class QwenVLCritic:
    """A Qwen2-VL checkpoint (optionally with a LoRA adapter, optionally 4-bit) as a :class:`Critic`.

    Args:
        model: a local directory with the model, tokenizer and ``preprocessor_config.json``,
            or a Hugging Face id already in the local cache (never downloaded).
        adapter: a local PEFT LoRA adapter directory trained on ``model``, or None.
        load_in_4bit: NF4 weights via bitsandbytes (needs CUDA and the ``bitsandbytes`` extra).
        batch_size: pairs per forward / generate call.
        rationale_top_k: how many leading pairs get a generated score and rationale (full
            path); 0 scores every pair by the fast path.
        max_new_tokens: generation budget of one JSON answer.
        device: torch device; default ``cuda`` when available, else ``cpu``.
        dtype: weight / activation dtype; default bfloat16 on CUDA, float32 on CPU.

    Construction only checks the options; :meth:`warm_up` (or the first :meth:`score`) loads.

    Raises:
        ValueError: a batch size below 1 or a negative ``rationale_top_k``.
        RuntimeError: ``load_in_4bit`` without CUDA or without bitsandbytes installed.
    """

    name = "qwen2-vl"
    uses_images = True

    def __init__(
        self,
        model: str | Path,
        *,
        adapter: str | Path | None = None,
        load_in_4bit: bool = False,
        batch_size: int = 4,
        rationale_top_k: int = 5,
        max_new_tokens: int = 96,
        device: str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if rationale_top_k < 0:
            raise ValueError(f"rationale_top_k must be >= 0, got {rationale_top_k}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if load_in_4bit:
            missing = []
            if self.device.type != "cuda":
                cuda = torch.cuda.is_available()
                missing.append(f"a CUDA device (this critic is on {self.device}; CUDA available: {cuda})")
            if importlib.util.find_spec("bitsandbytes") is None:
                missing.append("the bitsandbytes package (install the optional extra: pip install bitsandbytes)")
            if missing:
                raise RuntimeError("4-bit loading of the Qwen2-VL critic needs " + " and ".join(missing))
        self.model_ref = str(model)
        self.adapter = str(adapter) if adapter is not None else None
        self.load_in_4bit = load_in_4bit
        self.batch_size = batch_size
        self.rationale_top_k = rationale_top_k
        self.max_new_tokens = max_new_tokens
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model: Any = None
        self.tokenizer: Any = None
        self.image_processor: Any = None

    # ------------------------------------------------------------------ loading

    def warm_up(self) -> None:
        """Load tokenizer, image processor, model and adapter (once; later calls do nothing).

        Raises:
            FileNotFoundError: ``adapter`` is not a local directory (adapters are never downloaded).
            OSError: no Qwen2-VL model, tokenizer or preprocessor config at ``model``.
            ValueError: the tokenizer has no pad token (left padding needs one).
        """
        if self.model is not None:
            return
        if self.adapter is not None and not Path(self.adapter).is_dir():
            raise FileNotFoundError(
                f"no LoRA adapter directory at {self.adapter!r} (adapters load from local directories only)"
            )
        from transformers import AutoTokenizer, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

        kwargs: dict[str, Any] = {"local_files_only": True, "dtype": self.dtype}
        if self.load_in_4bit:
            from transformers import BitsAndBytesConfig

            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=self.dtype,
            )
            kwargs["device_map"] = {"": self.device.index or 0}
        try:
            tokenizer = AutoTokenizer.from_pretrained(self.model_ref, local_files_only=True)
            image_processor = Qwen2VLImageProcessorPil.from_pretrained(self.model_ref, local_files_only=True)
            model = Qwen2VLForConditionalGeneration.from_pretrained(self.model_ref, **kwargs)
        except OSError as e:
            raise OSError(
                f"cannot load Qwen2-VL from {self.model_ref!r} (a local directory or an id already in the "
                f"Hugging Face cache; downloads are off): {e}"
            ) from e
        if not self.load_in_4bit:
            model.to(self.device)
        if self.adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, self.adapter, is_trainable=False)
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            raise ValueError(f"the tokenizer at {self.model_ref!r} has no pad token; left padding needs one")
        self.tokenizer, self.image_processor, self.model = tokenizer, image_processor, model.eval()

    @property
    def _qwen(self) -> Any:
        """The ``Qwen2VLForConditionalGeneration`` (under the PEFT wrapper, if any)."""
        return self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model

    def first_token_id(self, word: str) -> int:
        """The id of the first token of ``word`` (no leading space), e.g. of ``"yes"``."""
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if not ids:
            raise ValueError(f"the tokenizer gives no tokens for {word!r}")
        return ids[0]

    def end_of_turn_id(self) -> int | None:
        """The id of ``<|im_end|>`` (ChatML's end of a turn: where an answer stops), else the
        tokenizer's eos id; None when it has neither."""
        tok = self.tokenizer
        im_end = tok.convert_tokens_to_ids("<|im_end|>")
        return im_end if im_end is not None and im_end != tok.unk_token_id else tok.eos_token_id

    # ------------------------------------------------------------------ inputs

    def render(self, prompt: Prompt) -> str:
        """The chat text of ``prompt``: the tokenizer's chat template when it has one, else
        :func:`critic.prompt.render_chat`; one ``<|image_pad|>`` per image (not expanded)."""
        self.warm_up()
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(prompt.messages, tokenize=False, add_generation_prompt=True)
        return render_chat(prompt.messages, self._image_token())

    def _image_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(self._qwen.config.image_token_id) or IMAGE_PAD

    def expand(self, prompts: Sequence[Prompt]) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The rendered chat text of each prompt with every ``<|image_pad|>`` expanded to its
        image's ``prod(grid_thw) // merge_size**2`` tokens, and the image processor's output
        for all images in row order (``pixel_values`` float32 (sum of patches, 3 * 2 * 14 * 14),
        ``image_grid_thw`` int64 (n_images, 3); an empty dict when no prompt has images).

        Shared by :meth:`encode` (inference) and :func:`training.sft.training_batch` (SFT).

        Raises:
            ValueError: the rendered text does not hold one image placeholder per image.
        """
        self.warm_up()
        image_token = self._image_token()
        merge = self.image_processor.merge_size
        texts = []
        grids = iter(())
        all_images = [im for p in prompts for im in p.images]
        vision: dict[str, torch.Tensor] = {}
        if all_images:
            # Each distinct image once (the room photo is in every prompt of a search), then
            # the per-image outputs concatenated in row order, as one processor call lays them out.
            distinct = {id(im): im for im in all_images}
            done = {key: self.image_processor(images=[im], return_tensors="pt") for key, im in distinct.items()}
            vision = {name: torch.cat([done[id(im)][name] for im in all_images]) for name in ("pixel_values", "image_grid_thw")}
            grids = iter(vision["image_grid_thw"].tolist())
        for prompt in prompts:
            pieces = self.render(prompt).split(image_token)
            if len(pieces) != len(prompt.images) + 1:
                raise ValueError(f"prompt has {len(pieces) - 1} image placeholders for {len(prompt.images)} images")
            text = pieces[0]
            for piece in pieces[1:]:
                t, h, w = next(grids)
                text += image_token * (t * h * w // merge**2) + piece
            texts.append(text)
        return texts, vision

    def model_inputs(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor]:
        """The model inputs of token ids (B, L) from :meth:`expand`'s texts, left padded, with
        their ``attention_mask`` (B, L) and :meth:`expand`'s ``vision`` output: adds
        ``mm_token_type_ids`` int32 (B, L) (1 on image tokens), the vision tensors (pixels in
        the model's dtype), and ``position_ids`` int64 (3, B, L) M-RoPE (temporal, height,
        width) positions, 0 on padding; everything on the critic's device."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        inputs["mm_token_type_ids"] = (input_ids == self._qwen.config.image_token_id).int()
        if vision:
            inputs["pixel_values"] = vision["pixel_values"].to(self.dtype)
            inputs["image_grid_thw"] = vision["image_grid_thw"]
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        # The model derives M-RoPE positions itself only when images are present; text-only
        # batches would get 0..L-1 regardless of padding. get_rope_index handles both and
        # skips masked (left-pad) positions.
        inputs["position_ids"], _ = self._qwen.model.get_rope_index(
            inputs["input_ids"], inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=inputs["attention_mask"],
        )
        return inputs

    def encode(self, prompts: Sequence[Prompt]) -> dict[str, torch.Tensor]:
        """Model inputs of a left-padded batch of ``prompts`` (B rows, L tokens):

        ``input_ids`` / ``attention_mask`` int64 (B, L); ``mm_token_type_ids`` int32 (B, L)
        (1 on image tokens); ``position_ids`` int64 (3, B, L) M-RoPE (temporal, height,
        width) positions, 0 on padding; and, when any prompt has images, ``pixel_values``
        float (sum of patches, 3 * 2 * 14 * 14) and ``image_grid_thw`` int64 (n_images, 3),
        images in row order.

        Raises:
            ValueError: the rendered text does not hold one image placeholder per image.
        """
        texts, vision = self.expand(prompts)
        batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        return self.model_inputs(batch["input_ids"], batch["attention_mask"], vision)

    # ------------------------------------------------------------------ scoring

    @torch.inference_mode()
    def yes_probabilities(self, pairs: Sequence[CriticPair]) -> np.ndarray:
        """Fast path: float64 (n,) ``P(yes) / (P(yes) + P(no))`` of each pair, i.e.
        ``sigmoid(logit_yes - logit_no)`` at the last prompt position, in batches of ``batch_size``."""
        self.warm_up()
        yes, no = self.first_token_id("yes"), self.first_token_id("no")
        out = np.empty(len(pairs), dtype=np.float64)
        for start in range(0, len(pairs), self.batch_size):
            chunk = pairs[start:start + self.batch_size]
            inputs = self.encode([build_prompt(p, YES_NO_QUESTION) for p in chunk])
            logits = self.model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1].double()
            out[start:start + len(chunk)] = torch.sigmoid(logits[:, yes] - logits[:, no]).cpu().numpy()
        return out

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Prompt]) -> list[str]:
        """Greedy continuations of ``prompts`` (at most ``max_new_tokens`` tokens each, special
        tokens dropped), in batches of ``batch_size``."""
        self.warm_up()
        from transformers import GenerationConfig

        tok = self.tokenizer
        # Stop at the end of the assistant turn (<|im_end|>) or the tokenizer's eos.
        eos = sorted({i for i in (tok.eos_token_id, self.end_of_turn_id()) if i is not None})
        config = GenerationConfig(do_sample=False, max_new_tokens=self.max_new_tokens, eos_token_id=eos,
                                  pad_token_id=tok.pad_token_id)
        texts: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            inputs = self.encode(prompts[start:start + self.batch_size])
            inputs.pop("position_ids")  # generate derives them per step from the rope deltas
            ids = self.model.generate(**inputs, generation_config=config)
            texts += tok.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return texts

    def answers_or_errors(self, pairs: Sequence[CriticPair]) -> list[CriticAnswer | CriticAnswerError]:
        """Full path without raising: each pair's validated JSON answer after at most one repair
        round, or, for a pair whose answer is still invalid, the :class:`CriticAnswerError` that
        names its product id, the reason and the output (what the distillation labeller records)."""
        prompts = [build_prompt(p, JSON_QUESTION) for p in pairs]
        outputs = self.generate(prompts)
        results = [_parse_or_error(text) for text in outputs]
        retry = [i for i, r in enumerate(results) if isinstance(r, CriticAnswerError)]
        repairs = [repair_prompt(prompts[i], outputs[i], results[i].reason) for i in retry]
        repaired = self.generate(repairs) if repairs else []
        for i, text in zip(retry, repaired):
            try:
                results[i] = parse_answer(text)
            except CriticAnswerError as e:
                error = CriticAnswerError(
                    f"product {pairs[i].product_id}: the Qwen2-VL critic gave no valid JSON answer after one "
                    f"repair retry: {e.reason}; output {text[:200]!r}", e.reason,
                )
                error.__cause__ = e
                results[i] = error
        return results

    def answers(self, pairs: Sequence[CriticPair]) -> list[CriticAnswer]:
        """Full path: the validated JSON answer of each pair, after at most one repair round.

        Raises:
            CriticAnswerError: the first pair whose answer is still invalid after the repair
                round; the message names its product id, the reason and the output.
        """
        results = self.answers_or_errors(pairs)
        for result in results:
            if isinstance(result, CriticAnswerError):
                raise result
        return results  # type: ignore[return-value]  # no error left

    def score(self, pairs: Sequence[CriticPair]) -> list[Verdict]:
        """One :class:`Verdict` per pair, in order.

        The first ``rationale_top_k`` pairs are scored by the full path (generated score and
        rationale); the rest by the fast path, with a rationale that gives P(yes). Every
        verdict's ``latency_s`` is the wall time of this call, in seconds.

        Raises:
            CriticUnavailable: a top-k pair's answer stayed invalid after the repair round, so
                the request cannot be judged (chained from the
                :class:`~critic.prompt.CriticAnswerError` that names the product, the reason
                and the output; :meth:`answers` raises that error itself). The fast path reads
                logits and has no answer to misread.
        """
        t0 = time.perf_counter()
        k = min(self.rationale_top_k, len(pairs))
        try:
            full = self.answers(pairs[:k]) if k else []
        except CriticAnswerError as exc:
            raise self.unavailable(exc) from exc
        fast = self.yes_probabilities(pairs[k:]) if k < len(pairs) else np.empty(0)
        return self.verdicts(full, fast, time.perf_counter() - t0)

    def unavailable(self, error: CriticAnswerError) -> CriticUnavailable:
        """The :class:`~critic.protocol.CriticUnavailable` that :meth:`score` raises (``from
        error``) when a full-path answer stayed invalid after its repair round; the queued
        critic's batcher (:mod:`critic.batching`), which calls :meth:`answers` itself, raises
        the same. The one-line message names this critic's model and quotes ``error``."""
        return unreadable_answer(f"the Qwen2-VL critic ({self.model_ref})", error)

    def verdicts(self, answers: Sequence[CriticAnswer], yes: Sequence[float], latency_s: float) -> list[Verdict]:
        """The verdicts of full-path ``answers`` followed by those of fast-path P(yes) values
        ``yes`` (rationale ``"P(yes)=0.73 (...)"``), each with ``latency_s`` (seconds). Shared by
        :meth:`score` and the queued critic worker, which calls :meth:`answers` and
        :meth:`yes_probabilities` over the pairs of several requests at once."""
        note = f"no rationale: outside the top {self.rationale_top_k}" if self.rationale_top_k else "fast path"
        return [Verdict(a.score, a.rationale, self.name, latency_s) for a in answers] + [
            Verdict(float(p), f"P(yes)={p:.2f} ({note})", self.name, latency_s) for p in yes
        ]


def _parse_or_error(text: str) -> CriticAnswer | CriticAnswerError:
    """The answer in ``text``, or the error that says why it is invalid (to repair)."""
    try:
        return parse_answer(text)
    except CriticAnswerError as e:
        return e
