"""Map-style dataset over a manifest that skips bad files instead of failing the job."""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from torch.utils.data import Dataset, default_collate

from sfda_ray.data.io import BadInputError, load_image, load_label
from sfda_ray.data.manifest import error_reason, read_manifest
from sfda_ray.data.transforms import SegTransform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """What a dataset returns for an item whose file it cannot use."""

    path: str
    reason: str  # BadInputError.reason: what is wrong with it


def skip(error: BadInputError) -> Skipped:
    """The item of a bad file, logged with its path and reason."""
    log.warning("skipping %s", error)
    return Skipped(error.path, error.reason)


class SegmentationDataset(Dataset):
    """Items are ``{"image", "label" (if labelled and with_labels), "image_id", "index"}``.

    A file that turns out to be bad when decoded yields a ``Skipped`` (logged with its path
    and reason); pair the dataset with ``collate_skip_bad`` to drop and count those items.
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

    def __getitem__(self, index: int) -> dict[str, Any] | Skipped:
        row = self.rows[index]
        use_label = self.with_labels and row["label_path"] is not None
        try:
            image = load_image(row["image_path"])
            label = load_label(row["label_path"], row["label_format"]) if use_label else None
            check_sizes(row, image, label)
        except BadInputError as e:
            return skip(e)
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
            f"image size changed: {iw}x{ih} differs from the manifest's "
            f"{row['width']}x{row['height']} "
            "(the file changed since the dataset was scanned; rescan it)"
        )
        raise BadInputError(row["image_path"], reason)
    if label is not None and label.shape != (ih, iw):
        lh, lw = label.shape
        reason = f"label size mismatch: label {lw}x{lh} differs from image size {iw}x{ih}"
        raise BadInputError(row["label_path"], reason)


def collate_skip_bad(batch: list[dict[str, Any] | Skipped]) -> dict[str, Any]:
    """Default-collate the good items; count the bad ones in ``"num_skipped"`` and, by
    reason, in ``"skipped_reasons"``.

    If every item was bad the batch holds only those two (no ``"image"`` key), so loops
    should check ``"image" in batch`` before using it.
    """
    good = [item for item in batch if not isinstance(item, Skipped)]
    bad = [item for item in batch if isinstance(item, Skipped)]
    out = default_collate(good) if good else {}
    out["num_skipped"] = len(bad)
    out["skipped_reasons"] = dict(Counter(error_reason(item.reason) for item in bad))
    return out
