"""Scoring target images with the frozen source model.

Per pixel: softmax ``p``, normalised entropy ``H = -sum p log p / log C``, confidence
``c = max p`` and pseudo-label ``argmax p``. Per image: the score ``mean(1 - H)``, the
mean confidence, the class histogram of the pseudo-label and the class-wise mean
confidence. With MC-dropout (T stochastic passes) ``p`` is the mean over passes and
the uncertainty is the mutual information between prediction and weights, normalised
like ``H``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn

from sfda_ray.models.deeplabv2 import set_mc_dropout


def normalized_entropy(prob: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Entropy of ``prob`` along ``dim`` divided by log(C): 0 for one-hot, 1 for uniform."""
    c = prob.shape[dim]
    return -(prob * torch.log(prob.clamp_min(1e-12))).sum(dim) / math.log(c)


@dataclass
class ImageScores:
    """Scores of a batch of B images at the model's input resolution (H, W)."""

    score: torch.Tensor  # [B] mean of 1 - H
    mean_confidence: torch.Tensor  # [B]
    class_hist: torch.Tensor  # [B, C] pixel counts of the pseudo-label
    class_confidence: torch.Tensor  # [B, C] mean confidence per pseudo-label class, nan if absent
    label: torch.Tensor  # [B, H, W] uint8 pseudo-label
    confidence: torch.Tensor  # [B, H, W] uint8, round(255 * c)
    uncertainty: torch.Tensor | None = None  # [B, H, W] uint8 mutual information (MC-dropout)
    mc_score: torch.Tensor | None = None  # [B] mean of 1 - normalised mutual information

    def to(self, device: torch.device | str) -> ImageScores:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return ImageScores(**{k: v if v is None else v.to(device) for k, v in moved.items()})


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def score_images(model: nn.Module, images: torch.Tensor, mc_passes: int = 0) -> ImageScores:
    """Score a batch of normalised images; ``mc_passes`` > 1 turns on MC-dropout."""
    model.eval()
    if mc_passes > 1:
        set_mc_dropout(model, True)
        try:
            passes = torch.stack([model(images).float().softmax(1) for _ in range(mc_passes)])
        finally:
            set_mc_dropout(model, False)
        prob = passes.mean(0)
        expected_entropy = normalized_entropy(passes, dim=2).mean(0)
        mutual_info = (normalized_entropy(prob) - expected_entropy).clamp_min(0)
    else:
        prob = model(images).float().softmax(1)
        mutual_info = None
    b, c = prob.shape[:2]
    entropy = normalized_entropy(prob)
    conf, label = prob.max(1)
    flat_label = label.flatten(1)
    hist = torch.zeros(b, c, dtype=torch.float64, device=prob.device)
    hist.scatter_add_(1, flat_label, torch.ones_like(flat_label, dtype=torch.float64))
    conf_sum = torch.zeros_like(hist).scatter_add_(1, flat_label, conf.flatten(1).double())
    class_conf = torch.where(hist > 0, conf_sum / hist.clamp_min(1), torch.nan)
    return ImageScores(
        score=(1 - entropy).flatten(1).mean(1),
        mean_confidence=conf.flatten(1).mean(1),
        class_hist=hist.long(),
        class_confidence=class_conf.float(),
        label=label.to(torch.uint8),
        confidence=to_uint8(conf),
        uncertainty=None if mutual_info is None else to_uint8(mutual_info),
        mc_score=None if mutual_info is None else (1 - mutual_info).flatten(1).mean(1),
    )


CONFIDENCE_BINS = 20


def confidence_bin(confidence_u8: torch.Tensor, bins: int = CONFIDENCE_BINS) -> torch.Tensor:
    """Bin index of 8-bit confidences (round(255 c)): bin ``i`` holds u8 / 255 in
    [i/bins, (i+1)/bins), so a pixel is in a bin at or above ``i`` exactly when the
    threshold test ``u8 >= 255 * i / bins`` keeps it."""
    return (confidence_u8.long() * bins // 255).clamp_max(bins - 1)


def class_confidence_histogram(
    label: torch.Tensor,
    confidence_u8: torch.Tensor,
    num_classes: int,
    mask: torch.Tensor | None = None,
    bins: int = CONFIDENCE_BINS,
) -> torch.Tensor:
    """Pixel counts per (pseudo-label class, confidence bin), flattened to ``[C * bins]``.

    Kept in the scores table, it lets selection compute per-class confidence quantiles
    (class-balanced thresholds) and kept-pixel priors for any threshold without reading
    a single map again. ``mask`` restricts the count (e.g. to correctly labelled pixels).
    """
    index = label.long().flatten() * bins + confidence_bin(confidence_u8).flatten()
    if mask is not None:
        index = index[mask.flatten()]
    return torch.bincount(index, minlength=num_classes * bins)
