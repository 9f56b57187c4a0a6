"""The contrastive losses of ``mars train encoder`` (:mod:`training.dual_encoder`), on the
``B x B`` logits of a batch (rows texts, columns images,
``logits[i, j] = exp(logit_scale) * <t_i, x_j> (+ logit_bias)`` with unit vectors):

* SigLIP: the pairwise sigmoid loss of Zhai et al., "Sigmoid Loss for Language Image
  Pre-Training" (ICCV 2023, arXiv:2303.15343), ``-1/B * sum_ij log sigmoid(z_ij * logits_ij)``
  with ``z_ij = +1`` for a positive pair and ``-1`` otherwise (transformers'
  ``SiglipModel(return_loss=True)`` and big_vision's normalisation);
* CLIP: the symmetric InfoNCE of Radford et al., "Learning Transferable Visual Models From
  Natural Language Supervision" (ICML 2021, arXiv:2103.00020): the mean of the text->image and
  image->text cross-entropies with the diagonal as targets; ``logit_scale`` is clamped to
  ``ln 100`` (:data:`CLIP_MAX_LOGIT_SCALE`) after every step, as in the paper.

Duplicates: products whose pair texts are identical (:func:`positive_mask`) are not negatives
of each other. SigLIP labels them positive (``z = +1``); InfoNCE removes them from each other's
softmax (their logits are set to ``-inf``; the diagonal stays the target).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: CLIP's maximum temperature (Radford et al. 2021: logits scaled by at most 100).
CLIP_MAX_LOGIT_SCALE = math.log(100.0)


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


__all__ = ["CLIP_MAX_LOGIT_SCALE", "clip_loss", "contrastive_loss", "positive_mask", "siglip_loss"]
