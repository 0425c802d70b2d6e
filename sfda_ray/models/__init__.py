"""Segmentation models, the discriminator, and checkpoint IO."""

from __future__ import annotations

from sfda_ray.models.checkpoint import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    file_fingerprint,
    load_checkpoint,
    load_model,
    load_weights,
    save_checkpoint,
)
from sfda_ray.models.deeplabv2 import (
    MODEL_NAMES,
    DeepLabV2,
    build_model,
    set_mc_dropout,
)
from sfda_ray.models.discriminator import FCDiscriminator

__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_NAMES",
    "CheckpointError",
    "DeepLabV2",
    "FCDiscriminator",
    "build_model",
    "file_fingerprint",
    "load_checkpoint",
    "load_model",
    "load_weights",
    "save_checkpoint",
    "set_mc_dropout",
]
