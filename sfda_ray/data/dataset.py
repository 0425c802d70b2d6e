"""Map-style dataset over a manifest that skips bad files instead of failing the job."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch.utils.data import Dataset, default_collate

from sfda_ray.data.io import BadInputError, load_image, load_label
from sfda_ray.data.manifest import read_manifest
from sfda_ray.data.transforms import SegTransform

log = logging.getLogger(__name__)


class SegmentationDataset(Dataset):
    """Items are ``{"image", "label" (if labelled and with_labels), "image_id", "index"}``.

    A file that turns out to be bad when decoded yields ``None`` (logged with its path and
    reason); pair the dataset with ``collate_skip_bad`` to drop and count those items.
    """

    def __init__(
        self,
        manifest: pa.Table | str | os.PathLike,
        transform: SegTransform,
        with_labels: bool = True,
    ):
        if not isinstance(manifest, pa.Table):
            manifest = read_manifest(manifest)
        # Rows already flagged at scan time can never load.
        manifest = manifest.filter(pc.is_null(manifest["error"]))
        columns = ["image_id", "image_path", "label_path", "label_format", "height", "width"]
        self.rows = manifest.select(columns).to_pylist()
        self.sizes = [(r["height"], r["width"]) for r in self.rows]
        self.transform = transform
        self.with_labels = with_labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        row = self.rows[index]
        use_label = self.with_labels and row["label_path"] is not None
        try:
            image = load_image(row["image_path"])
            label = load_label(row["label_path"], row["label_format"]) if use_label else None
            check_sizes(row, image, label)
        except BadInputError as e:
            log.warning("skipping %s: %s", e.path, e.reason)
            return None
        image, label = self.transform(image, label)
        item = {"image": image, "image_id": row["image_id"], "index": index}
        if label is not None:
            item["label"] = label
        return item


def check_sizes(row: dict[str, Any], image: np.ndarray, label: np.ndarray | None) -> None:
    """The decoded image has the size its manifest row records (batches of native-size
    frames are grouped by that size) and its label, if any, the image's size."""
    ih, iw = image.shape[:2]
    if (ih, iw) != (row["height"], row["width"]):
        reason = (
            f"image size {iw}x{ih} differs from the manifest's {row['width']}x{row['height']} "
            "(the file changed since the dataset was scanned; rescan it)"
        )
        raise BadInputError(row["image_path"], reason)
    if label is not None and label.shape != (ih, iw):
        lh, lw = label.shape
        reason = f"label size {lw}x{lh} differs from image size {iw}x{ih}"
        raise BadInputError(row["label_path"], reason)


def collate_skip_bad(batch: list[dict[str, Any] | None]) -> dict[str, Any]:
    """Default-collate the good items and count the bad ones in ``"num_skipped"``.

    If every item was bad the batch holds only ``"num_skipped"`` (no ``"image"`` key), so
    loops should check ``"image" in batch`` before using it.
    """
    good = [item for item in batch if item is not None]
    out = default_collate(good) if good else {}
    out["num_skipped"] = len(batch) - len(good)
    return out
