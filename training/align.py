"""``mars train align``: LiT-style projection heads that put the frozen offline encoders'
text and image vectors into one space (:mod:`indexing.aligned`).

Data: the catalog's own products that have an image vector. Each product gives one image
(its stored ``image`` vector, e.g. EfficientNet-Lite0, 1280-d) and :data:`VIEWS` short texts
built from its own fields (colour, type, title), encoded once by the index's text encoder
(e.g. MiniLM, 384-d); each training step pairs every image with one of its views at random.
No qrels or queries are read.

Loss: the SigLIP pairwise sigmoid loss (Zhai et al., "Sigmoid Loss for Language Image
Pre-Training", ICCV 2023, eq. 1) with a learnable logit scale ``t`` (initialised to
``log 10``) and bias ``b`` (``-10``), as in that paper: for a batch of ``n`` pairs,
``L = -1/n Σ_i Σ_j log σ(z_ij (t' x_i·y_j + b))`` with ``t' = exp(t)``. ``z_ij = 1`` on the
diagonal and also for two products of the same (type, colour) or with identical texts — the
catalog has many such twins, and calling them negatives would teach the heads to tell apart
what no text can — else ``-1``.

Validation: ``holdout`` of the products (seeded) are left out of a first fit; each held-out
product's "<colour> <type>" view is a query against the whole catalog's aligned image
vectors, relevant = the products with that (type, colour); Recall@1/5/10 and MRR@10 are
reported. The heads that are installed are then fitted on every product.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from catalog.models import Product
from evaluation.metrics import mrr_at_k, recall_at_k
from indexing.aligned import TOWERS, AlignHeads
from indexing.encoders import TextEncoder
from indexing.vector_store import VectorStore

#: The texts each product contributes, from its own catalog fields.
VIEWS: tuple[str, ...] = ("{colour} {type}", "{title} {type}", "{type}", "{colour} {title} {type}")


@dataclass
class AlignConfig:
    """Training settings of ``mars train align``.

    ``dim``: size of the shared space; ``hidden``: hidden width of each head; ``epochs``,
    ``batch_size`` (pairs per step; the sigmoid loss needs no large batch, ICCV 2023 §4),
    ``lr`` (AdamW), ``weight_decay``; ``holdout``: share of products held out for the reported
    validation (0 skips validation); ``seed``.
    """

    dim: int = 256
    hidden: int = 1024
    epochs: int = 100
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    holdout: float = 0.1
    seed: int = 0


@dataclass
class AlignData:
    """The training pairs: ``ids`` (n,), ``images`` float32 (n, image_dim), ``views`` float32
    (n, len(VIEWS), text_dim), ``texts`` (n lists of len(VIEWS) strings) and ``keys`` (n
    (type, colour) pairs, lower-cased)."""

    ids: list[str]
    images: np.ndarray
    views: np.ndarray
    texts: list[list[str]]
    keys: list[tuple[str, str]]


@dataclass
class AlignReport:
    """What ``mars train align`` did: products used, validation metrics of the held-out fit
    (empty when ``holdout`` is 0), the final fit's last loss, learned logit scale/bias,
    points rewritten and seconds."""

    products: int
    config: dict[str, Any]
    validation: dict[str, float] = field(default_factory=dict)
    held_out: int = 0
    final_loss: float = float("nan")
    logit_scale: float = float("nan")
    logit_bias: float = float("nan")
    points: int = 0
    seconds: float = 0.0


def view_texts(title: str, type_: str, colour: str) -> list[str]:
    """The :data:`VIEWS` of one product, whitespace-collapsed (an empty field just drops out)."""
    fields = {"title": title or "", "type": type_ or "", "colour": colour or ""}
    return [" ".join(v.format(**fields).split()) for v in VIEWS]


def load_align_data(session: Session, store: VectorStore, text_encoder: TextEncoder) -> AlignData:
    """The catalog's products that have a stored ``image`` vector, with their encoded views.

    Raises:
        ValueError: fewer than 2 products have an image vector.
    """
    products = {p.id: p for p in session.execute(select(Product)).scalars()}
    points = store.fetch(sorted(products))
    ids = [pid for pid in sorted(points) if "image" in points[pid].vectors]
    if len(ids) < 2:
        raise ValueError(f"alignment needs products with photos; the index has {len(ids)} with an image vector")
    texts = [view_texts(products[i].title, products[i].type, products[i].colour) for i in ids]
    unique = sorted({t for views in texts for t in views})
    encoded = text_encoder.encode_texts(unique)
    row = {t: k for k, t in enumerate(unique)}
    views = np.stack([encoded[[row[t] for t in views]] for views in texts]).astype(np.float32)
    keys = [((products[i].type or "").strip().lower(), (products[i].colour or "").strip().lower()) for i in ids]
    images = np.stack([points[i].vectors["image"] for i in ids]).astype(np.float32)
    return AlignData(ids, images, views, texts, keys)


def _head(d_in: int, hidden: int, dim: int) -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(d_in, hidden), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(hidden, dim))


def fit_heads(
    data: AlignData,
    rows: Sequence[int],
    config: AlignConfig,
    encoders: tuple[str, str],
    on_epoch: Callable[[int, float], None] | None = None,
) -> tuple[AlignHeads, float, float, float]:
    """Fit both heads on the products at ``rows`` of ``data`` with the sigmoid loss.

    Returns:
        ``(heads, last epoch's mean loss, logit scale exp(t), logit bias b)``.

    Raises:
        ValueError: fewer than 2 rows.
    """
    if len(rows) < 2:
        raise ValueError("alignment needs at least 2 training products")
    gen = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    heads = {"image": _head(data.images.shape[1], config.hidden, config.dim),
             "text": _head(data.views.shape[2], config.hidden, config.dim)}
    t = torch.nn.Parameter(torch.tensor(float(np.log(10.0))))
    b = torch.nn.Parameter(torch.tensor(-10.0))
    params = [p for h in heads.values() for p in h.parameters()] + [t, b]
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    images = torch.from_numpy(data.images)
    views = torch.from_numpy(data.views)
    index = torch.tensor(list(rows))
    # twins (positives off the diagonal): the same (type, colour), or the same view text
    key_index = {k: i for i, k in enumerate(sorted(set(data.keys)))}
    key_id = torch.tensor([key_index[k] for k in data.keys], dtype=torch.int64)
    text_index = {t: i for i, t in enumerate(sorted({t for views in data.texts for t in views}))}
    text_id = torch.tensor([[text_index[t] for t in views] for views in data.texts], dtype=torch.int64)
    loss_value = float("nan")
    for epoch in range(config.epochs):
        order = index[torch.randperm(len(index), generator=gen)]
        total, steps = 0.0, 0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            pick = torch.randint(0, views.shape[1], (len(batch),), generator=gen)
            zi = torch.nn.functional.normalize(heads["image"](images[batch]), dim=-1)
            zt = torch.nn.functional.normalize(heads["text"](views[batch, pick]), dim=-1)
            logits = zi @ zt.T * t.exp() + b
            texts = text_id[batch, pick]
            positive = (key_id[batch][:, None] == key_id[batch][None, :]) | (texts[:, None] == texts[None, :])
            labels = positive.float() * 2 - 1
            loss = -torch.nn.functional.logsigmoid(labels * logits).sum() / len(batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, steps = total + float(loss.detach()), steps + 1
        loss_value = total / steps
        if on_epoch is not None:
            on_epoch(epoch, loss_value)
    tensors = {
        f"{tower}.{name}": p.detach().numpy().copy()
        for tower in TOWERS
        for name, p in heads[tower].state_dict().items()
    }
    scale, bias = float(t.exp().detach()), float(b.detach())
    return AlignHeads(tensors, encoders[0], encoders[1], {"logit_scale": scale, "logit_bias": bias}), loss_value, scale, bias


def validation_metrics(heads: AlignHeads, data: AlignData, held: Sequence[int], ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """Text→image retrieval of the held-out products against the whole catalog.

    Each row in ``held`` queries with its ``"{colour} {type}"`` view (view 0); the gallery is
    every product's aligned image vector; relevant = products with the same (type, colour).

    Returns:
        ``{"recall@1": ..., "recall@5": ..., "recall@10": ..., "mrr@10": ...}`` (means over
        the held-out queries), plus ``"queries"``.
    """
    gallery = heads.image(data.images)
    queries = heads.text(data.views[list(held), 0])
    scores = queries @ gallery.T
    depth = max(max(ks), 10)
    out = {f"recall@{k}": 0.0 for k in ks} | {"mrr@10": 0.0}
    by_key: dict[tuple[str, str], set[int]] = {}
    for j, key in enumerate(data.keys):
        by_key.setdefault(key, set()).add(j)
    for row, qi in enumerate(held):
        relevant = by_key[data.keys[qi]]
        top = np.argsort(-scores[row], kind="stable")[:depth].tolist()
        for k in ks:
            out[f"recall@{k}"] += recall_at_k(top, relevant, k)
        out["mrr@10"] += mrr_at_k(top, relevant, 10)
    n = max(len(held), 1)
    return {k: round(v / n, 4) for k, v in out.items()} | {"queries": float(len(held))}


def train_align(
    engine: Any,
    config: AlignConfig,
    on_epoch: Callable[[str, int, float], None] | None = None,
    install: bool = True,
) -> AlignReport:
    """Train the heads on ``engine``'s catalog and index (:class:`mars.engine.Engine`), report the
    held-out validation, fit again on every product and (``install``) rebuild the collection
    with the ``aligned`` vector (:meth:`mars.engine.Engine.install_aligned`).

    ``on_epoch(phase, epoch, loss)`` is called after each epoch, ``phase`` being
    ``"validation fit"`` or ``"final fit"``.

    Raises:
        RuntimeError: nothing is indexed yet.
        ValueError: too few products with photos.
    """
    t0 = time.perf_counter()
    store = engine.vector_store()
    if store is None:
        raise RuntimeError("nothing is indexed yet: run `mars ingest` before `mars train align`")
    _, text_encoder = engine.encoders()
    with engine.sessions() as session:
        data = load_align_data(session, store, text_encoder)
    encoders = (engine.settings.image_encoder, engine.settings.text_encoder)
    report = AlignReport(products=len(data.ids), config=asdict(config))
    if config.holdout > 0:
        rng = np.random.default_rng(config.seed)
        perm = rng.permutation(len(data.ids))
        n_held = max(1, int(round(len(data.ids) * config.holdout)))
        held, train = sorted(perm[:n_held].tolist()), sorted(perm[n_held:].tolist())
        heads, *_ = fit_heads(data, train, config, encoders,
                              (lambda e, loss: on_epoch("validation fit", e, loss)) if on_epoch else None)
        report.validation = validation_metrics(heads, data, held)
        report.held_out = len(held)
    heads, report.final_loss, report.logit_scale, report.logit_bias = fit_heads(
        data, range(len(data.ids)), config, encoders, (lambda e, loss: on_epoch("final fit", e, loss)) if on_epoch else None
    )
    heads.meta.update({"products": len(data.ids), "validation": report.validation, "config": asdict(config)})
    if install:
        report.points = engine.install_aligned(heads)
    report.seconds = round(time.perf_counter() - t0, 1)
    return report
