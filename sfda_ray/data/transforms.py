"""Joint image/label transforms (torchvision.transforms.v2) and the two input normalisations.

Labels travel as ``tv_tensors.Mask``, so v2 resizes them with nearest neighbour and pads
them with the ignore index, keeping every pixel aligned with the image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from sfda_ray.config import NORMALIZATIONS
from sfda_ray.data.labels import IGNORE_INDEX

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# AdaptSegNet/ADVENT (Caffe-style) checkpoints expect BGR 0..255 minus this BGR mean.
CAFFE_MEAN_BGR = (104.00698793, 116.66876762, 122.67891434)

# transform(image, label=None) -> (image tensor, label tensor or None)
SegTransform = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range`` (aspect ratio kept)."""

    def __init__(self, scale_range: tuple[float, float]):
        super().__init__()
        self.scale_range = scale_range

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * torch.rand(()).item()
        return {"size": [max(1, round(height * scale)), max(1, round(width * scale))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.resize(inpt, params["size"])  # Masks get nearest neighbour


def _check_normalization(normalization: str) -> None:
    if normalization not in NORMALIZATIONS:
        raise ValueError(
            f"unknown normalization {normalization!r}; expected one of {NORMALIZATIONS}"
        )


def build_transform(
    train: bool,
    size: tuple[int, int] | None,
    scale_range: tuple[float, float] = (0.75, 1.25),
    crop: tuple[int, int] | None = None,
    hflip: bool = True,
    normalization: str = "imagenet",
) -> SegTransform:
    """``transform(image, label=None) -> (float 3xHxW, long HxW or None)``.

    ``image`` is uint8 HxWx3 RGB, ``label`` uint8 HxW train ids; sizes are (H, W).
    Random scale, crop and flip only apply when ``train``.
    """
    _check_normalization(normalization)
    ops: list[v2.Transform] = []
    if size is not None:
        ops.append(v2.Resize(size))
    if train:
        ops.append(RandomScale(scale_range))
        if crop is not None:
            fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
            ops.append(v2.RandomCrop(crop, pad_if_needed=True, fill=fill))
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
    if normalization == "imagenet":
        ops.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
        ops.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    else:  # caffe_bgr: normalise in RGB order, then swap channels to BGR below
        ops.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=False))
        ops.append(v2.Normalize(CAFFE_MEAN_BGR[::-1], (1.0, 1.0, 1.0)))
    pipeline = v2.Compose(ops)

    def transform(
        image: np.ndarray, label: np.ndarray | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        img = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        if label is None:
            out_img, out_label = pipeline(img), None
        else:
            out_img, mask = pipeline(img, tv_tensors.Mask(torch.from_numpy(label)))
            out_label = mask.as_subclass(torch.Tensor).long()
        out_img = out_img.as_subclass(torch.Tensor)
        if normalization == "caffe_bgr":
            out_img = out_img.flip(0)
        return out_img.contiguous(), out_label

    return transform


def denormalize(image: torch.Tensor, normalization: str) -> np.ndarray:
    """Undo ``build_transform``'s normalisation: uint8 HxWx3 RGB, for pictures."""
    _check_normalization(normalization)
    x = image.detach().cpu().float()
    if normalization == "imagenet":
        std, mean = torch.tensor(IMAGENET_STD), torch.tensor(IMAGENET_MEAN)
        x = (x * std.view(3, 1, 1) + mean.view(3, 1, 1)) * 255.0
    else:
        x = (x + torch.tensor(CAFFE_MEAN_BGR).view(3, 1, 1)).flip(0)
    return x.round().clamp(0, 255).byte().permute(1, 2, 0).numpy()


def normalize_batch(images: torch.Tensor, normalization: str) -> torch.Tensor:
    """uint8 NxHxWx3 RGB batch -> normalised float Nx3xHxW, as ``build_transform`` does.

    For pipelines that move compact uint8 images and normalise on the device.
    """
    _check_normalization(normalization)
    x = images.permute(0, 3, 1, 2).float()
    if normalization == "imagenet":
        mean = x.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = x.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((x / 255.0 - mean) / std).contiguous()
    return (x.flip(1) - x.new_tensor(CAFFE_MEAN_BGR).view(1, 3, 1, 1)).contiguous()
