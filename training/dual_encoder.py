"""``mars train encoder``: LoRA fine-tune of a transformers SigLIP or CLIP dual encoder on the
catalog's own (product photo, product text) pairs.

Model (:func:`load_base`, :func:`add_lora`): a local ``SiglipModel`` or ``CLIPModel`` directory
(``save_pretrained`` layout with tokenizer and image processor, exactly what
``MARS_IMAGE_ENCODER=hf:<dir>`` loads: :class:`indexing.hf_encoder.HFDualEncoder`), kind detected
from ``config.model_type``. LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language
Models", arXiv:2106.09685; peft ``LoraConfig`` / ``get_peft_model``) is put on the ``q_proj`` and
``v_proj`` linear layers of every attention block of BOTH towers (:data:`TARGET_MODULES`); every
other weight is frozen except the temperature ``logit_scale`` and, for SigLIP, the bias
``logit_bias``. Weights are trained and saved in float32.

Loss (:func:`contrastive_loss`), on the ``B x B`` logits of a batch (rows texts, columns images,
``logits[i, j] = exp(logit_scale) * <t_i, x_j> (+ logit_bias)`` with unit vectors):

* SigLIP: the pairwise sigmoid loss of Zhai et al., "Sigmoid Loss for Language Image
  Pre-Training" (ICCV 2023, arXiv:2303.15343), ``-1/B * sum_ij log sigmoid(z_ij * logits_ij)``
  with ``z_ij = +1`` for a positive pair and ``-1`` otherwise (transformers'
  ``SiglipModel(return_loss=True)`` and big_vision's normalisation);
* CLIP: the symmetric InfoNCE of Radford et al., "Learning Transferable Visual Models From
  Natural Language Supervision" (ICML 2021, arXiv:2103.00020): the mean of the text->image and
  image->text cross-entropies with the diagonal as targets; ``logit_scale`` is clamped to
  ``ln 100`` after every step, as in the paper.

Duplicates: products whose pair texts are identical (:func:`positive_mask`) are not negatives
of each other. SigLIP labels them positive (``z = +1``); InfoNCE removes them from each other's
softmax (their logits are set to ``-inf``; the diagonal stays the target).

Data (:func:`collect_pairs`): every catalog product with a LOCAL photo (an existing file; http(s)
URLs and missing files are counted and left out) and a non-empty :func:`pair_text`. The text
side is a short description, lower-cased colour and type, then the title:
``"<colour> <type>, <title>"`` (e.g. ``"stainless steel wall shelf, GRUNDTAL"``); parts that
are empty are dropped (``"pendant lamp, MELODI"``, ``"VASEN"``). The free-text description is
not used: it rarely describes what the photo shows.

Protocol (:func:`train_dual_encoder`): a seeded share ``holdout`` of the products is held out
(:func:`holdout_split`); text->image Recall@1/5/10 (:func:`retrieval_metrics`) and the loss on
the held-out products are measured before and after training; the LoRA weights are merged
(``merge_and_unload``) and the plain model, tokenizer and image processor are written with
``save_pretrained`` to ``out``, plus ``mars_training.json`` (the report). The written directory
is then loaded back through :func:`mars.registry.load_encoders` and must reproduce the
trained model's vectors (``reload_check`` in the report).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import select

from indexing.encoders import l2_normalize
from indexing.hf_encoder import HFDualEncoder
from mars.registry import load_encoders

#: LoRA targets: the query and value projections of every attention block, in the text and
#: the vision tower (transformers names them ``q_proj`` / ``v_proj`` in SigLIP and CLIP).
TARGET_MODULES: tuple[str, ...] = ("q_proj", "v_proj")
#: Model types :func:`load_base` accepts (``config.model_type``).
KINDS: tuple[str, ...] = ("siglip", "clip")
#: CLIP's maximum temperature (Radford et al. 2021: logits scaled by at most 100).
CLIP_MAX_LOGIT_SCALE = math.log(100.0)
#: Cut-offs of the held-out recall.
RECALL_KS: tuple[int, ...] = (1, 5, 10)
#: The report written beside the saved model.
REPORT_FILE = "mars_training.json"


# --------------------------------------------------------------------------- data


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


def group_relevant(query_keys: Sequence[str], doc_keys: Sequence[set[str] | str]) -> tuple[list[str], list[set[int]]]:
    """De-duplicate queries and find their relevant documents.

    Args:
        query_keys: query texts, one per item (duplicates allowed).
        doc_keys: per document, the query text (or set of texts) it answers.

    Returns:
        ``(queries, relevant)``: the distinct query texts in first-seen order and, for each,
        the indices of the documents that answer it.
    """
    by_key: dict[str, set[int]] = defaultdict(set)
    for j, keys in enumerate(doc_keys):
        for key in ([keys] if isinstance(keys, str) else keys):
            by_key[key].add(j)
    queries = list(dict.fromkeys(query_keys))
    return queries, [by_key.get(q, set()) for q in queries]


def retrieval_metrics(sim: np.ndarray, relevant: Sequence[set[int]], ks: Sequence[int] = RECALL_KS) -> dict[str, float | int]:
    """Recall@K and MRR of ranking documents by ``sim``.

    Args:
        sim: float ``(q, d)`` similarities of each query to each document (higher is better).
        relevant: per query, the indices of its relevant documents (a query with several
            products of the identical text has several).
        ks: cut-offs.

    Returns:
        ``{"queries": q, "documents": d, "R@k": ..., "MRR": ...}``. ``R@k`` is the share of
        queries with at least one relevant document among the ``k`` highest (ties broken by
        document index); ``MRR`` the mean of ``1 / rank`` of the first relevant document (0 when
        none). Queries without a relevant document count as misses. All 0.0 for no queries.
    """
    sim = np.asarray(sim, dtype=np.float64)
    q, d = sim.shape if sim.ndim == 2 else (0, 0)
    out: dict[str, float | int] = {"queries": int(q), "documents": int(d)}
    if q == 0:
        out.update({f"R@{k}": 0.0 for k in ks})
        out["MRR"] = 0.0
        return out
    order = np.argsort(-sim, axis=1, kind="stable")
    first = np.full(q, np.inf)
    for i, rel in enumerate(relevant):
        if rel:
            hits = np.flatnonzero(np.isin(order[i], list(rel)))
            first[i] = hits[0] + 1 if len(hits) else np.inf
    for k in ks:
        out[f"R@{k}"] = float(np.mean(first <= k))
    out["MRR"] = float(np.mean(np.where(np.isfinite(first), 1.0 / first, 0.0)))
    return out


# --------------------------------------------------------------------------- model


@dataclass
class DualEncoderConfig:
    """Training options of :func:`train_dual_encoder`.

    Attributes:
        epochs: passes over the training pairs (ignored when ``max_steps`` is set).
        max_steps: optimizer steps in all, or None.
        batch_size: pairs per step (the ``B`` of the ``B x B`` logits; in-batch negatives).
        lr: AdamW learning rate (constant after ``warmup_steps`` of linear warm-up), LoRA
            weights and logit scale/bias alike.
        weight_decay: AdamW weight decay on the LoRA matrices (never on scale/bias).
        warmup_steps: linear warm-up steps.
        lora_r / lora_alpha / lora_dropout: LoRA rank, scale numerator (update scale alpha/r)
            and dropout on the adapter input.
        holdout: share of the products held out for the before/after metrics (0: none).
        max_items: use at most this many products (a seeded sample, before the split), or all.
        seed: sample, split, batch order, LoRA initialisation and dropout.
        max_grad_norm: gradient clipping (L2 norm over the trainable parameters).
        device: ``"cpu"``, ``"cuda"``, ... or ``"auto"`` (CUDA when available).
    """

    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    holdout: float = 0.1
    max_items: int | None = None
    seed: int = 0
    max_grad_norm: float = 1.0
    device: str = "auto"

    def __post_init__(self) -> None:
        bad = [f"{k}={v}" for k, v in {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                                         "lora_r": self.lora_r, "lora_alpha": self.lora_alpha}.items() if not v > 0]
        if self.max_steps is not None and self.max_steps < 1:
            bad.append(f"max_steps={self.max_steps}")
        if self.max_items is not None and self.max_items < 2:
            bad.append(f"max_items={self.max_items} (at least 2)")
        if not 0.0 <= self.lora_dropout < 1.0:
            bad.append(f"lora_dropout={self.lora_dropout} (in [0, 1))")
        if not 0.0 <= self.holdout < 1.0:
            bad.append(f"holdout={self.holdout} (in [0, 1))")
        if self.warmup_steps < 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            bad.append("warmup_steps, weight_decay >= 0 and max_grad_norm > 0")
        if bad:
            raise ValueError(f"invalid encoder training options: {', '.join(bad)}")


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


def positive_mask(texts: Sequence[str]) -> torch.Tensor:
    """Bool ``(B, B)``: ``[i, j]`` is True when pair ``i``'s text equals pair ``j``'s (the
    diagonal included): those image/text combinations are positives, not negatives."""
    ids: dict[str, int] = {}
    keys = torch.tensor([ids.setdefault(t, len(ids)) for t in texts])
    return keys[:, None] == keys[None, :]


def siglip_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Pairwise sigmoid loss (Zhai et al. 2023, eq. 1): ``-1/B * sum_ij log sigmoid(z_ij * logits_ij)``
    with ``z = +1`` where ``positive`` and ``-1`` elsewhere.

    Args:
        logits: float ``(B, B)`` ``exp(t) * <text_i, image_j> + b``.
        positive: bool ``(B, B)`` (:func:`positive_mask`; the identity without duplicates).

    Returns:
        A scalar tensor (nats). Equals transformers' ``SiglipModel(return_loss=True).loss``
        when ``positive`` is the identity.
    """
    z = positive.to(logits.dtype) * 2.0 - 1.0
    return -torch.nn.functional.logsigmoid(z * logits).sum() / logits.shape[0]


def clip_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (Radford et al. 2021): mean of the cross-entropy of each text over the
    images (rows) and of each image over the texts (columns), the diagonal being the target.
    Off-diagonal positives (identical texts) are removed from the softmax (``-inf``).

    Args:
        logits: float ``(B, B)`` ``exp(t) * <text_i, image_j>``.
        positive: bool ``(B, B)`` (:func:`positive_mask`).

    Returns:
        A scalar tensor (nats). Equals transformers' ``CLIPModel(return_loss=True).loss`` when
        ``positive`` is the identity.
    """
    eye = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
    masked = logits.masked_fill(positive.to(logits.device) & ~eye, float("-inf"))
    target = torch.arange(logits.shape[0], device=logits.device)
    return (torch.nn.functional.cross_entropy(masked, target) + torch.nn.functional.cross_entropy(masked.T, target)) / 2


def contrastive_loss(kind: str, logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """:func:`siglip_loss` for ``kind == "siglip"``, :func:`clip_loss` for ``"clip"``."""
    return siglip_loss(logits, positive) if kind == "siglip" else clip_loss(logits, positive)


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


def evaluate_pairs(encoder: PairEncoder, items: Sequence[PairItem], batch_size: int) -> dict[str, Any]:
    """Held-out metrics of ``items`` (the model is put in eval mode and left there).

    Returns:
        ``{"text_to_image": retrieval_metrics(...), "loss": mean batch loss}``: text->image
        retrieval over all of ``items``' photos, one query per distinct text, relevant = the
        photos of the products with that text; ``loss`` is :func:`contrastive_loss` averaged
        over consecutive batches of ``batch_size`` (batches of one pair are skipped; None when
        there is none). Empty ``items`` give zeros and a None loss.
    """
    encoder.model.eval()
    if not items:
        return {"text_to_image": retrieval_metrics(np.zeros((0, 0)), []), "loss": None}
    t, x = encoder.embed(items, batch_size)
    queries, relevant = group_relevant([it.text for it in items], [it.text for it in items])
    first = {q: i for i, q in reversed(list(enumerate(it.text for it in items)))}
    sim = (t[[first[q] for q in queries]] @ x.T).numpy()
    losses = []
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            if len(chunk) < 2:
                continue
            logits = encoder.logits(t[start : start + len(chunk)].to(encoder.device), x[start : start + len(chunk)].to(encoder.device))
            losses.append(float(contrastive_loss(encoder.kind, logits, positive_mask([it.text for it in chunk]).to(encoder.device))))
    return {"text_to_image": retrieval_metrics(sim, relevant), "loss": float(np.mean(losses)) if losses else None}


def _scale_bias(inner: Any) -> dict[str, float]:
    out = {"logit_scale": float(inner.logit_scale.detach().reshape(-1)[0])}
    if getattr(inner, "logit_bias", None) is not None:
        out["logit_bias"] = float(inner.logit_bias.detach().reshape(-1)[0])
    return out


@dataclass
class TrainState:
    """What a fit did: one ``{"step", "loss", ...}`` per step (:func:`fit_pairs` adds ``lr``
    and ``epoch``); ``steps`` is their number."""

    history: list[dict[str, float]] = field(default_factory=list)

    @property
    def steps(self) -> int:
        """Steps taken."""
        return len(self.history)


def _batch_starts(n: int, batch_size: int) -> list[int]:
    """Start offsets of the batches of ``n`` items; a last batch of one joins the previous one."""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < 2:
        starts.pop()
    return starts


def fit_pairs(encoder: PairEncoder, items: Sequence[PairItem], config: DualEncoderConfig,
              on_step: Callable[[int, int, float], None] | None = None) -> TrainState:
    """Train the trainable parameters of ``encoder.model`` on ``items`` with AdamW.

    Each epoch shuffles ``items`` with ``random.Random(seed + epoch)`` and cuts it into batches
    of ``batch_size`` (a last batch of one pair is merged into the previous batch); training
    stops after ``epochs`` passes (a fraction counts steps) or ``max_steps`` steps. After each
    step CLIP's ``logit_scale`` is clamped to [0, ln 100]. ``on_step(step, total, loss)`` is
    called after every step.

    Raises:
        ValueError: fewer than 2 training pairs.
    """
    if len(items) < 2:
        raise ValueError(f"need at least 2 training pairs, got {len(items)}")
    total = config.max_steps or max(1, math.ceil(config.epochs * len(_batch_starts(len(items), config.batch_size))))
    params = [p for p in encoder.model.parameters() if p.requires_grad]
    scale_ids = {id(encoder.inner.logit_scale), id(getattr(encoder.inner, "logit_bias", None))}
    groups = [{"params": [p for p in params if id(p) not in scale_ids], "weight_decay": config.weight_decay},
              {"params": [p for p in params if id(p) in scale_ids], "weight_decay": 0.0}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (config.warmup_steps + 1)))
    state = TrainState()
    encoder.model.train()
    epoch = 0
    while state.steps < total:
        order = list(range(len(items)))
        random.Random(config.seed + epoch).shuffle(order)
        bounds = _batch_starts(len(order), config.batch_size)
        for b, start in enumerate(bounds):
            if state.steps >= total:
                break
            end = bounds[b + 1] if b + 1 < len(bounds) else len(order)
            loss = encoder.loss([items[i] for i in order[start:end]])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            opt.step()
            sched.step()
            if encoder.kind == "clip":
                with torch.no_grad():
                    encoder.inner.logit_scale.clamp_(0.0, CLIP_MAX_LOGIT_SCALE)
            value = float(loss.detach())
            state.history.append({"step": state.steps + 1, "loss": round(value, 6), "lr": opt.param_groups[0]["lr"],
                                  "epoch": round(epoch + (b + 1) / len(bounds), 4)})
            if on_step is not None:
                on_step(state.steps, total, value)
        epoch += 1
    return state


def _sample(items: list[PairItem], max_items: int | None, seed: int) -> list[PairItem]:
    if max_items is None or len(items) <= max_items:
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), max_items))
    return [items[i] for i in keep]


def reload_check(out: Path, merged: Any, base: HFDualEncoder, items: Sequence[PairItem]) -> dict[str, Any]:
    """Load ``out`` through :func:`mars.registry.load_encoders` (``hf:<out>`` on both sides)
    and compare its vectors of up to 4 of ``items`` with those of ``merged`` (the in-memory
    merged model, on CPU).

    Returns:
        ``{"spec": "hf:<out>", "dim": ..., "max_abs_diff": ...}``.

    Raises:
        RuntimeError: the reloaded model's vectors differ by more than 1e-4 (a broken save).
    """
    from PIL import Image

    probe = list(items[:4])
    image_enc, text_enc = load_encoders(f"hf:{out}", f"hf:{out}")
    images = []
    for it in probe:
        with Image.open(it.image) as img:
            images.append(img.convert("RGB"))
    loaded_t = text_enc.encode_texts([it.text for it in probe])
    loaded_x = image_enc.encode_images(images)
    enc = PairEncoder(merged, base, torch.device("cpu"))
    with torch.no_grad():
        ref_t, ref_x = enc.embed(probe, len(probe) or 1)
    diff = max(float(np.abs(loaded_t - l2_normalize(ref_t.numpy())).max(initial=0.0)),
               float(np.abs(loaded_x - l2_normalize(ref_x.numpy())).max(initial=0.0)))
    if diff > 1e-4:
        raise RuntimeError(f"the model saved to {out} does not reproduce the trained vectors (max |diff| {diff:.2e})")
    return {"spec": f"hf:{out}", "dim": int(text_enc.dim), "max_abs_diff": diff}


def train_dual_encoder(base: str | Path, out: str | Path, data: PairData, config: DualEncoderConfig | None = None,
                       on_step: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """Fine-tune the SigLIP / CLIP in ``base`` on ``data`` and save the merged model to ``out``.

    Steps: sample ``max_items`` products (seeded), hold out ``holdout`` of them
    (:func:`holdout_split`), measure held-out text->image recall and loss
    (:func:`evaluate_pairs`), wrap the model with LoRA (:func:`add_lora`), train
    (:func:`fit_pairs`), measure again, merge the adapters into the weights
    (``merge_and_unload``), ``save_pretrained`` model + tokenizer + image processor to ``out``,
    write ``out/mars_training.json`` and check the reload (:func:`reload_check`).

    Returns:
        The report: ``model_type``, ``base``, ``out``, ``config``, ``data`` (counts),
        ``train`` / ``held_out`` sizes, ``trainable_parameters`` (count) and
        ``trainable_tensors`` (names), ``before`` / ``after`` (held-out metrics, None without a
        held-out part), ``logit_scale_bias`` (``before`` / ``after`` values), ``steps``,
        ``loss_first`` / ``loss_last`` (first and last training-step loss), ``history``,
        ``reload_check``, ``usage`` (the settings that use the output), ``seconds``.

    Raises:
        EncoderConfigError: ``base`` is not a SigLIP / CLIP directory (:func:`load_base`).
        ValueError: no usable pairs (catalog without local photos), fewer than 2 training
            pairs, ``out`` is ``base``, or an unreadable photo.
        RuntimeError: the saved model does not reload to the same vectors.
    """
    t0 = time.perf_counter()
    config = config or DualEncoderConfig()
    base, out = Path(base), Path(out)
    if not data.items:
        c = data.counts()
        raise ValueError(f"no (photo, text) pairs to train on: of {c['products']} products, {c['without_image']} have no "
                         f"photo, {c['remote_image']} a URL photo, {c['missing_file']} a photo path that is not a file and "
                         f"{c['without_text']} no type, colour or title; ingest a catalog with local product photos first")
    if out.resolve() == base.resolve():
        raise ValueError(f"--out must differ from --base ({base}): the base model is not overwritten")
    device = resolve_device(config.device)
    encoder_base = load_base(base)
    torch.manual_seed(config.seed)
    items = _sample(list(data.items), config.max_items, config.seed)
    train_idx, held_idx = holdout_split(len(items), config.holdout, config.seed)
    train_items, held_items = [items[i] for i in train_idx], [items[i] for i in held_idx]
    if len(train_items) < 2:
        raise ValueError(f"need at least 2 training pairs, got {len(train_items)} of {len(items)} (lower --holdout)")
    model = add_lora(encoder_base.model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout).to(device)
    encoder = PairEncoder(model, encoder_base, device)
    trainable = trainable_parameter_names(model)
    n_trainable = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    before_scale = _scale_bias(encoder.inner)
    before = evaluate_pairs(encoder, held_items, config.batch_size) if held_items else None
    state = fit_pairs(encoder, train_items, config, on_step)
    after = evaluate_pairs(encoder, held_items, config.batch_size) if held_items else None
    after_scale = _scale_bias(encoder.inner)
    merged = model.merge_and_unload().cpu().eval()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    encoder_base.tokenizer.save_pretrained(out)
    encoder_base.processor.save_pretrained(out)
    report: dict[str, Any] = {
        "model_type": encoder.kind, "base": str(base), "out": str(out), "config": asdict(config),
        "data": data.counts(), "pair_text": "<colour> <type>, <title>", "train": len(train_items), "held_out": len(held_items),
        "trainable_parameters": n_trainable,
        "trainable_tensors": trainable, "before": before, "after": after,
        "logit_scale_bias": {"before": before_scale, "after": after_scale}, "steps": state.steps,
        "loss_first": state.history[0]["loss"] if state.history else None,
        "loss_last": state.history[-1]["loss"] if state.history else None, "history": state.history,
        "usage": {"MARS_IMAGE_ENCODER": f"hf:{out}", "MARS_TEXT_ENCODER": f"hf:{out}"},
    }
    report["reload_check"] = reload_check(out, merged, encoder_base, held_items or train_items)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


__all__ = ["CLIP_MAX_LOGIT_SCALE", "DualEncoderConfig", "KINDS", "PairData", "PairEncoder", "PairItem", "RECALL_KS",
           "REPORT_FILE", "TARGET_MODULES", "TrainState", "add_lora", "clip_loss", "collect_pairs", "contrastive_loss",
           "colour_type", "evaluate_pairs", "fit_pairs", "group_relevant", "holdout_split", "load_base", "model_kind", "pair_text",
           "positive_mask", "reload_check", "resolve_device", "retrieval_metrics", "siglip_loss",
           "train_dual_encoder", "trainable_parameter_names"]
