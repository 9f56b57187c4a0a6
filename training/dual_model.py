"""The trainable SigLIP / CLIP of ``mars train encoder`` (:mod:`training.dual_encoder`): the
base model, its LoRA wrapping and the training-time forward (:class:`PairEncoder`).

Model (:func:`load_base`, :func:`add_lora`): a local ``SiglipModel`` or ``CLIPModel`` directory
(``save_pretrained`` layout with tokenizer and image processor, exactly what
``MARS_IMAGE_ENCODER=hf:<dir>`` loads: :class:`indexing.hf_encoder.HFDualEncoder`), kind detected
from ``config.model_type``. LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv:2106.09685; peft ``LoraConfig`` / ``get_peft_model``) is put on the ``q_proj`` and
``v_proj`` linear layers of every attention block of BOTH towers (:data:`TARGET_MODULES`); every
other weight is frozen except the temperature ``logit_scale`` and, for SigLIP, the bias
``logit_bias``. Weights are trained and saved in float32.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from indexing.hf_encoder import HFDualEncoder
from training.contrastive_loss import contrastive_loss, positive_mask
from training.pair_data import PairItem

#: LoRA targets: the query and value projections of every attention block, in the text and
#: the vision tower (transformers names them ``q_proj`` / ``v_proj`` in SigLIP and CLIP).
TARGET_MODULES: tuple[str, ...] = ("q_proj", "v_proj")
#: Model types :func:`load_base` accepts (``config.model_type``).
KINDS: tuple[str, ...] = ("siglip", "clip")


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; anything else as given to ``torch.device``.

    Raises:
        ValueError: an unknown device string, or a CUDA device on a machine without CUDA.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {device!r}: use auto, cpu or cuda[:N]") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but this machine has no CUDA device (use --device cpu)")
    return resolved


def load_base(base: str | Path) -> HFDualEncoder:
    """Load a local SigLIP / CLIP directory exactly as ``MARS_*_ENCODER=hf:<dir>`` does
    (:class:`indexing.hf_encoder.HFDualEncoder`: model, tokenizer, PIL image processor), with the
    model cast to float32 for training.

    Raises:
        EncoderConfigError: what :class:`~indexing.hf_encoder.HFDualEncoder` refuses (no such
            directory, no ``config.json``, another architecture than ``siglip`` / ``clip``, a
            SigLIP tokenizer without a usable ``model_max_length``).
    """
    encoder = HFDualEncoder(str(base))
    encoder.model.float()
    return encoder


def model_kind(model: Any) -> str:
    """``"siglip"`` or ``"clip"`` from ``model.config.model_type``."""
    return str(model.config.model_type)


def add_lora(model: Any, *, r: int = 8, alpha: int = 16, dropout: float = 0.05) -> Any:
    """Wrap ``model`` (a ``SiglipModel`` / ``CLIPModel``) in a peft ``PeftModel`` with LoRA on
    :data:`TARGET_MODULES` of both towers, then unfreeze ``logit_scale`` (and ``logit_bias``
    when the model has one: SigLIP). The LoRA ``B`` matrices start at zero, so the wrapped
    model computes exactly what ``model`` did.

    Raises:
        ValueError: the model has no ``q_proj`` / ``v_proj`` layers in one of its towers.
    """
    from peft import LoraConfig, get_peft_model

    names = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in TARGET_MODULES]
    for tower in ("text_model", "vision_model"):
        if not any(n.startswith(tower + ".") for n in names):
            raise ValueError(f"no {'/'.join(TARGET_MODULES)} layers found in the {tower} of this "
                             f"{model_kind(model)} model")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(TARGET_MODULES), bias="none")
    peft_model = get_peft_model(model, config)
    inner = peft_model.get_base_model()
    inner.logit_scale.requires_grad_(True)
    if getattr(inner, "logit_bias", None) is not None:
        inner.logit_bias.requires_grad_(True)
    return peft_model


def trainable_parameter_names(model: Any) -> list[str]:
    """Names of the parameters with ``requires_grad`` (sorted)."""
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def logit_scale_bias(inner: Any) -> dict[str, float]:
    """The model's current ``{"logit_scale": ...}`` (the log temperature, as stored) and, when
    it has one (SigLIP), ``"logit_bias"``, as Python floats."""
    out = {"logit_scale": float(inner.logit_scale.detach().reshape(-1)[0])}
    if getattr(inner, "logit_bias", None) is not None:
        out["logit_bias"] = float(inner.logit_bias.detach().reshape(-1)[0])
    return out


class PairEncoder:
    """The training-time forward of a (LoRA-wrapped) SigLIP / CLIP: texts and images to unit
    vectors with gradients, tokenised and pre-processed exactly as
    :class:`indexing.hf_encoder.HFDualEncoder` does at search time (SigLIP texts padded to
    ``model_max_length`` without an attention mask; CLIP texts padded to the batch's longest
    with one).

    Args:
        model: the model (peft-wrapped or plain) whose towers are called.
        base: the :class:`HFDualEncoder` it came from (tokenizer, image processor, padding).
        device: where tensors go.
    """

    def __init__(self, model: Any, base: HFDualEncoder, device: torch.device) -> None:
        self.model = model
        self.inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base = base
        self.device = device
        self.kind = model_kind(self.inner)

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit text vectors, float32 ``(n, dim)`` on ``device``."""
        batch = self.base.tokenizer(list(texts), padding=self.base.padding, truncation=True, return_tensors="pt")
        kwargs = {"input_ids": batch["input_ids"].to(self.device)}
        if "attention_mask" in batch and self.base.padding is True:
            kwargs["attention_mask"] = batch["attention_mask"].to(self.device)
        out = HFDualEncoder._features(self.inner.get_text_features(**kwargs))
        return torch.nn.functional.normalize(out, dim=-1)

    def pixel_values(self, paths: Sequence[str]) -> torch.Tensor:
        """The image processor's float32 ``(n, 3, H, W)`` for the photos at ``paths`` (RGB).

        Raises:
            ValueError: a photo cannot be read.
        """
        from PIL import Image

        images = []
        for path in paths:
            try:
                with Image.open(path) as img:
                    images.append(img.convert("RGB"))
            except OSError as exc:
                raise ValueError(f"cannot read the image {path}: {exc}") from exc
        return self.base.processor(images=images, return_tensors="pt")["pixel_values"]

    def images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Unit image vectors, float32 ``(n, dim)`` on ``device``."""
        out = HFDualEncoder._features(self.inner.get_image_features(pixel_values=pixel_values.to(self.device)))
        return torch.nn.functional.normalize(out, dim=-1)

    def logits(self, text_vecs: torch.Tensor, image_vecs: torch.Tensor) -> torch.Tensor:
        """``(n_texts, n_images)`` ``exp(logit_scale) * text @ image.T`` (``+ logit_bias`` for SigLIP)."""
        out = text_vecs @ image_vecs.T * self.inner.logit_scale.exp()
        if self.kind == "siglip":
            out = out + self.inner.logit_bias
        return out

    def loss(self, items: Sequence[PairItem]) -> torch.Tensor:
        """:func:`contrastive_loss` of one batch of pairs (duplicates of text are positives)."""
        logits = self.logits(self.texts([it.text for it in items]), self.images(self.pixel_values([it.image for it in items])))
        return contrastive_loss(self.kind, logits, positive_mask([it.text for it in items]).to(self.device))

    @torch.no_grad()
    def embed(self, items: Sequence[PairItem], batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Text and image unit vectors of ``items`` (eval mode is the caller's), float32 on CPU."""
        texts, images = [], []
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            texts.append(self.texts([it.text for it in chunk]).float().cpu())
            images.append(self.images(self.pixel_values([it.image for it in chunk])).float().cpu())
        return torch.cat(texts), torch.cat(images)


__all__ = ["KINDS", "PairEncoder", "TARGET_MODULES", "add_lora", "load_base", "logit_scale_bias", "model_kind",
           "resolve_device", "trainable_parameter_names"]
