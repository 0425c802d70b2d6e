"""Datasets of the adaptation: virtual-source images with their stored pseudo-labels, and
target images alone. Both return images in [0, 1]; the step normalises them after its
photometric augmentation.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from sfda_ray import storage
from sfda_ray.data.dataset import Skipped, skip
from sfda_ray.data.io import BadInputError, load_image
from sfda_ray.data.labels import IGNORE_INDEX
from sfda_ray.data.transforms import RandomScale


def _geometric(size: tuple[int, int], scale_range: tuple[float, float], hflip: bool):
    fill = {tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}
    ops = [RandomScale(scale_range), v2.RandomCrop(size, pad_if_needed=True, fill=fill)]
    if hflip:
        ops.append(v2.RandomHorizontalFlip())
    return v2.Compose(ops)


def load_map(path: str) -> np.ndarray:
    try:
        return np.array(Image.open(io.BytesIO(storage.read_bytes(path))))
    except (OSError, ValueError) as e:
        raise BadInputError(path, f"unreadable score map: {e}") from e


class AdaptationDataset(Dataset):
    """Rows of a scores table; with ``thresholds`` also the pseudo-label and its weights.

    Pseudo-label pixels below their class's confidence threshold become 255 (ignored);
    ``weight`` is the source model's confidence in [0, 1]. Images are resized to the
    maps' size (the size they were scored at) and augmented jointly with them; ``valid``
    is False on the padding a crop adds to an image scaled below the crop size.
    """

    def __init__(
        self,
        rows: list[dict],
        size: tuple[int, int],
        thresholds: np.ndarray | None = None,
        scale_range: tuple[float, float] = (0.75, 1.25),
        hflip: bool = True,
    ):
        self.rows = rows
        self.size = size
        self.thresholds = None if thresholds is None else (np.asarray(thresholds) * 255)
        self.transform = _geometric(size, scale_range, hflip)

    def __len__(self) -> int:
        return len(self.rows)

    def _map(self, path: str) -> np.ndarray:
        """A score map at the dataset's size: one scored at another (native) size is
        resized as its image is, by nearest neighbour."""
        array = load_map(path)
        if array.ndim != 2:
            raise BadInputError(path, f"a score map has one channel, not shape {array.shape}")
        if array.shape != tuple(self.size):
            array = np.array(Image.fromarray(array).resize(self.size[::-1], Image.NEAREST))
        return array

    def __getitem__(self, index: int) -> dict | Skipped:
        row = self.rows[index]
        try:
            image = load_image(row["image_path"])
            if image.shape[:2] != self.size:
                image = np.array(Image.fromarray(image).resize(self.size[::-1], Image.BILINEAR))
            img = tv_tensors.Image(torch.from_numpy(image).permute(2, 0, 1))
            # Which pixels are image, not the padding of a crop larger than the scaled image.
            inside = tv_tensors.Mask(torch.ones(self.size, dtype=torch.uint8))
            if self.thresholds is None:
                img, inside = self.transform(img, inside)
                return {"image": img.float() / 255.0, "valid": inside == 1}
            label = self._map(row["pseudo_label_path"])
            conf = self._map(row["confidence_path"])
            if label.max() >= len(self.thresholds):
                raise BadInputError(
                    row["pseudo_label_path"],
                    f"pseudo-label {label.max()} outside the {len(self.thresholds)} classes",
                )
        except BadInputError as e:
            return skip(e)
        label = np.where(conf >= self.thresholds[label], label, IGNORE_INDEX).astype(np.uint8)
        img, label_t, conf_t, inside = self.transform(
            img,
            tv_tensors.Mask(torch.from_numpy(label)),
            tv_tensors.Mask(torch.from_numpy(conf)),
            inside,
        )
        return {
            "image": img.float() / 255.0,
            "label": label_t.long(),
            "weight": conf_t.float() / 255.0,
            "valid": inside == 1,
        }


def rare_class_sampling_weights(class_hists: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Per-image sampling weight: its pixels' mean class weight alpha (>= a floor).

    Images rich in classes that are scarce in the virtual source are drawn more often.
    """
    hist = class_hists.astype(np.float64)
    mean_alpha = (hist * alpha[None, :]).sum(1) / np.maximum(hist.sum(1), 1)
    return np.maximum(mean_alpha, 0.1 * mean_alpha.max())
