"""Losses of the adaptation, on plain tensors.

Shapes: logits ``[B, C, H, W]``, labels ``[B, H, W]`` (255 = ignore), pixel weights
``[B, H, W]``, class weights ``[C]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from sfda_ray.data.labels import IGNORE_INDEX
from sfda_ray.method.scoring import normalized_entropy


def weighted_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    pixel_weight: torch.Tensor | None = None,
    class_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sum of w * alpha_y * CE over kept pixels, divided by the sum of those weights.

    Dividing by the weights (not the pixel count) keeps the loss scale, so weights shift
    emphasis between pixels without acting as a learning-rate change. Returns 0 (with a
    gradient path) when no pixel is kept.
    """
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE_INDEX, reduction="none")
    valid = target != IGNORE_INDEX
    weight = valid.to(ce.dtype)
    if pixel_weight is not None:
        weight = weight * pixel_weight
    if class_weight is not None:
        weight = weight * class_weight[target.clamp_max(class_weight.numel() - 1)]
    total = weight.sum()
    if total <= 0:
        return logits.sum() * 0.0
    return (ce * weight).sum() / total


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None, dims: tuple) -> torch.Tensor:
    """Mean over ``dims`` of ``values`` ([B, ..., H, W]) at the pixels ``mask`` ([B, H, W])
    keeps; every pixel without a mask."""
    if mask is None:
        return values.mean(dim=dims)
    m = mask.to(values.dtype)
    if values.dim() == 4:
        m = m[:, None]
    return (values * m).sum(dim=dims) / m.sum(dim=dims).clamp_min(1e-8)


def entropy_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean normalised entropy of the prediction (TENT / ADVENT MinEnt), over the pixels
    ``mask`` keeps (not a crop's padding)."""
    return _masked_mean(normalized_entropy(logits.softmax(1)), mask, (0, 1, 2))


def prior_kl(
    logits: torch.Tensor, prior: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """KL(prior || mean predicted class distribution of the batch, over the pixels ``mask``
    keeps); 0 when they match."""
    mean_pred = _masked_mean(logits.softmax(1), mask, (0, 2, 3)).clamp_min(1e-8)
    p = prior.clamp_min(0)
    terms = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-12)) - torch.log(mean_pred)), 0.0)
    return terms.sum()


def discriminator_input(logits: torch.Tensor, mode: str) -> torch.Tensor:
    """What the output-space discriminator sees: the softmax, or ADVENT's weighted
    self-information map ``-p log p / log C`` (one channel per class)."""
    prob = logits.softmax(1)
    if mode == "softmax":
        return prob
    if mode == "entropy":
        return -prob * torch.log(prob.clamp_min(1e-12)) / math.log(prob.shape[1])
    raise ValueError(f"unknown discriminator input {mode!r}; allowed: softmax, entropy")


def weighted_bce(
    d_out: torch.Tensor, label: float, pixel_weight: torch.Tensor | None = None
) -> torch.Tensor:
    """BCE of a discriminator map against a constant domain label, optionally weighted.

    ``pixel_weight`` is at image resolution; it is average-pooled to the map's size.
    """
    target = torch.full_like(d_out, label)
    loss = F.binary_cross_entropy_with_logits(d_out, target, reduction="none")
    if pixel_weight is None:
        return loss.mean()
    w = F.adaptive_avg_pool2d(pixel_weight[:, None].to(loss.dtype), d_out.shape[-2:])
    return (loss * w).sum() / w.sum().clamp_min(1e-8)
