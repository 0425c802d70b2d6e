"""Cheap source-free baselines that need no losses."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def adapt_batchnorm(
    model: nn.Module,
    images: Iterable[torch.Tensor],
    max_batches: int = 100,
    device: str | torch.device = "cpu",
) -> int:
    """AdaBN: replace every BatchNorm's running statistics by those of the target images.

    Statistics are re-estimated from scratch as a cumulative average (``momentum=None``),
    with no gradient step. Frozen-BN models are handled too: their BN layers are put in
    training mode only for this pass. Returns the number of batches used.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("model has no BatchNorm layers; AdaBN does not apply")
    saved = [(m.momentum, m.training) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    used = 0
    try:
        for batch in images:
            if used >= max_batches:
                break
            model(batch.to(device))
            used += 1
    finally:
        for m, (momentum, training) in zip(bns, saved, strict=True):
            m.momentum = momentum
            m.train(training)
    if used == 0:
        raise ValueError("AdaBN got no target images")
    model.eval()
    return used
