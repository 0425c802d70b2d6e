"""DataLoaders over manifests: shuffled, augmented training batches and full-size evaluation."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset

from sfda_ray.config import DataConfig
from sfda_ray.data.dataset import SegmentationDataset, collate_skip_bad
from sfda_ray.data.io import BadInputError, load_image, load_label
from sfda_ray.data.transforms import build_transform

log = logging.getLogger(__name__)


def train_loader(
    table: pa.Table,
    data: DataConfig,
    batch_size: int,
    seed: int,
    normalization: str,
    pin_memory: bool = False,
) -> DataLoader:
    crop = data.crop or data.size or _common_size(table)  # batches need one size
    transform = build_transform(
        train=True,
        size=data.input_size,
        scale_range=(data.scale_min, data.scale_max),
        crop=tuple(crop),
        hflip=data.hflip,
        normalization=normalization,
    )
    return DataLoader(
        SegmentationDataset(table, transform),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=data.num_workers,
        collate_fn=collate_skip_bad,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=data.num_workers > 0,
        pin_memory=pin_memory,
    )


def _common_size(table: pa.Table) -> tuple[int, int]:
    sizes = Counter(zip(table["height"].to_pylist(), table["width"].to_pylist(), strict=True))
    return sizes.most_common(1)[0][0]


def forever(
    make: Callable[[int], Iterable[dict]],
    skipped: Counter | None = None,
    partial_first: bool = False,
) -> Iterator[dict]:
    """Endless stream of non-empty batches: pass ``e`` reads ``make(e)``, so a caller can
    reseed each pass or return the same (reshuffling) loader every time. Bad items (each
    logged with its reason) are counted in ``skipped["inputs"]``; a whole pass with no good
    item at all is an error, not an endless loop (``partial_first``: the first pass is the
    rest of one, which may hold no good item)."""
    epoch = 0
    while True:
        bad, good = 0, False
        for batch in make(epoch):
            bad += batch["num_skipped"]
            if skipped is not None:
                skipped["inputs"] += batch["num_skipped"]
            if "image" in batch:
                good = True
                yield batch
        if not good and not (partial_first and epoch == 0):
            raise ValueError(f"no usable item in a whole pass over the data ({bad} skipped)")
        epoch += 1


def image_loader(
    table: pa.Table,
    size: tuple[int, int] | None,
    normalization: str,
    batch_size: int = 8,
    num_workers: int = 1,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Unaugmented images only (labels are not read even where they exist)."""
    transform = build_transform(train=False, size=size, normalization=normalization)
    return DataLoader(
        SegmentationDataset(table, transform, with_labels=False),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        generator=torch.Generator().manual_seed(seed),
    )


def images_of(loader: DataLoader):
    """The image tensors of a loader's batches, skipping all-bad batches."""
    return (batch["image"] for batch in loader if "image" in batch)


class EvalDataset(Dataset):
    """Images resized to the model's input size, labels kept at full resolution.

    Predictions are upsampled to the label, as the Cityscapes benchmark scores them.
    """

    def __init__(self, table: pa.Table, size: tuple[int, int] | None, normalization: str):
        self.rows = table.select(["image_id", "image_path", "label_path", "label_format"])
        self.rows = self.rows.to_pylist()
        self.transform = build_transform(train=False, size=size, normalization=normalization)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict | None:
        row = self.rows[index]
        try:
            image, _ = self.transform(load_image(row["image_path"]), None)
            label = load_label(row["label_path"], row["label_format"])
        except BadInputError as e:
            log.warning("skipping %s", e)
            return None
        return {
            "image": image,
            "label": torch.from_numpy(label.astype(np.int64)),
            "image_id": row["image_id"],
            "index": index,
        }


def eval_loader(
    table: pa.Table,
    size: tuple[int, int] | None,
    normalization: str,
    batch_size: int = 8,
    num_workers: int = 1,
) -> DataLoader:
    missing = [
        r
        for r, p in zip(table["image_id"].to_pylist(), table["label_path"].to_pylist(), strict=True)
        if p is None
    ]
    if missing:
        raise ValueError(
            f"{len(missing)} image(s) have no label (first: {missing[0]}); evaluation needs labels"
        )
    # Labels stay at full resolution, so a batch holds one label size: datasets such as
    # GTA5 mix frame sizes. In table order within each size.
    by_size: dict[tuple[int, int], list[int]] = {}
    sizes = zip(table["height"].to_pylist(), table["width"].to_pylist(), strict=True)
    for index, hw in enumerate(sizes):
        by_size.setdefault(hw, []).append(index)
    batches = [
        group[i : i + batch_size]
        for group in by_size.values()
        for i in range(0, len(group), batch_size)
    ]
    return DataLoader(
        EvalDataset(table, size, normalization),
        batch_sampler=batches,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        # Its own generator: a loader without one draws its base seed from torch's global
        # RNG, so evaluating mid-run would change a training run's later augmentations.
        generator=torch.Generator(),
    )
