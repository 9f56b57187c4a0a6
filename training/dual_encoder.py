"""``mars train encoder``: LoRA fine-tune of a transformers SigLIP or CLIP dual encoder on the
catalog's own (product photo, product text) pairs.

The pieces, one module each: the pairs and their split (:mod:`training.pair_data`), the model,
its LoRA wrapping and training-time forward (:mod:`training.dual_model`), the SigLIP sigmoid and
CLIP InfoNCE losses (:mod:`training.contrastive_loss`), the held-out Recall@K / MRR
(:mod:`training.retrieval_metrics`), saving and the reload check (:mod:`training.encoder_export`).
This module holds the options, the training loop and the protocol.

Protocol (:func:`train_dual_encoder`): a seeded share ``holdout`` of the products is held out
(:func:`~training.pair_data.holdout_split`); text->image Recall@1/5/10
(:func:`~training.retrieval_metrics.retrieval_metrics`) and the loss on the held-out products are
measured before and after training; the LoRA weights are merged (``merge_and_unload``) and the
plain model, tokenizer and image processor are written with ``save_pretrained`` to ``out``, plus
``mars_training.json`` (the report). The written directory is then loaded back through
:func:`mars.registry.load_encoders` and must reproduce the trained model's vectors
(``reload_check`` in the report).
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.contrastive_loss import CLIP_MAX_LOGIT_SCALE, contrastive_loss, positive_mask
from training.dual_model import PairEncoder, add_lora, load_base, logit_scale_bias, resolve_device, trainable_parameter_names
from training.encoder_export import reload_check, save_merged, write_report
from training.pair_data import PairData, PairItem, collect_pairs, holdout_split, sample_items
from training.retrieval_metrics import group_relevant, retrieval_metrics


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


def train_dual_encoder(base: str | Path, out: str | Path, data: PairData, config: DualEncoderConfig | None = None,
                       on_step: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """Fine-tune the SigLIP / CLIP in ``base`` on ``data`` and save the merged model to ``out``.

    Steps: sample ``max_items`` products (seeded), hold out ``holdout`` of them
    (:func:`~training.pair_data.holdout_split`), measure held-out text->image recall and loss
    (:func:`evaluate_pairs`), wrap the model with LoRA (:func:`~training.dual_model.add_lora`), train
    (:func:`fit_pairs`), measure again, merge the adapters into the weights
    (``merge_and_unload``), ``save_pretrained`` model + tokenizer + image processor to ``out``
    (:func:`~training.encoder_export.save_merged`), write ``out/mars_training.json`` and check the
    reload (:func:`~training.encoder_export.reload_check`).

    Returns:
        The report: ``model_type``, ``base``, ``out``, ``config``, ``data`` (counts),
        ``train`` / ``held_out`` sizes, ``trainable_parameters`` (count) and
        ``trainable_tensors`` (names), ``before`` / ``after`` (held-out metrics, None without a
        held-out part), ``logit_scale_bias`` (``before`` / ``after`` values), ``steps``,
        ``loss_first`` / ``loss_last`` (first and last training-step loss), ``history``,
        ``reload_check``, ``usage`` (the settings that use the output), ``seconds``.

    Raises:
        EncoderConfigError: ``base`` is not a SigLIP / CLIP directory (:func:`~training.dual_model.load_base`).
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
    items = sample_items(list(data.items), config.max_items, config.seed)
    train_idx, held_idx = holdout_split(len(items), config.holdout, config.seed)
    train_items, held_items = [items[i] for i in train_idx], [items[i] for i in held_idx]
    if len(train_items) < 2:
        raise ValueError(f"need at least 2 training pairs, got {len(train_items)} of {len(items)} (lower --holdout)")
    model = add_lora(encoder_base.model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout).to(device)
    encoder = PairEncoder(model, encoder_base, device)
    trainable = trainable_parameter_names(model)
    n_trainable = int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    before_scale = logit_scale_bias(encoder.inner)
    before = evaluate_pairs(encoder, held_items, config.batch_size) if held_items else None
    state = fit_pairs(encoder, train_items, config, on_step)
    after = evaluate_pairs(encoder, held_items, config.batch_size) if held_items else None
    after_scale = logit_scale_bias(encoder.inner)
    merged = save_merged(model, encoder_base, out)
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
    write_report(out, report)
    return report


#: ``collect_pairs`` is re-exported: ``mars train encoder`` imports it from here.
__all__ = ["DualEncoderConfig", "TrainState", "collect_pairs", "evaluate_pairs", "fit_pairs", "train_dual_encoder"]
