"""DataLoaders over manifests: shuffled, augmented training batches and full-size evaluation."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator

import pyarrow as pa
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sfda_ray.config import DataConfig
from sfda_ray.data.dataset import SegmentationDataset, Skipped, check_sizes, collate_skip_bad, skip
from sfda_ray.data.io import BadInputError, load_image, load_label
from sfda_ray.data.transforms import build_transform


def train_loader(
    table: pa.Table,
    data: DataConfig,
    batch_size: int,
    seed: int,
    normalization: str,
    num_workers: int = 0,
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
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
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
    logged) are counted by reason in ``skipped``; a whole pass with no good
    item at all is an error, not an endless loop (``partial_first``: the first pass is the
    rest of one, which may hold no good item)."""
    epoch = 0
    while True:
        bad, good = 0, False
        for batch in make(epoch):
            bad += batch["num_skipped"]
            if skipped is not None:
                skipped.update(batch["skipped_reasons"])
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
    """Unaugmented images only (labels are not read even where they exist). At native size
    (``size=None``) each batch holds one frame size."""
    dataset = SegmentationDataset(
        table,
        build_transform(train=False, size=size, normalization=normalization),
        with_labels=False,
    )
    generator = torch.Generator().manual_seed(seed)
    if size is None:
        batches = SizeBatches(dataset.sizes, batch_size, generator if shuffle else None)
        batching = {"batch_sampler": batches}
    else:
        batching = {"batch_size": batch_size, "shuffle": shuffle}
    return DataLoader(
        dataset,
        **batching,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        generator=generator,
    )


class SizeBatches(Sampler[list[int]]):
    """Batches of indices whose frames share one size, for loaders that keep frames at
    their native size: datasets such as GTA5 mix sizes, and a batch needs one. Without a
    generator, in index order within each size; with one, shuffled afresh on every pass."""

    def __init__(
        self,
        sizes: list[tuple[int, int]],
        batch_size: int,
        generator: torch.Generator | None = None,
    ):
        self.sizes, self.batch_size, self.generator = sizes, batch_size, generator

    def _batches(self, order: Iterable[int]) -> list[list[int]]:
        by_size: dict[tuple[int, int], list[int]] = {}
        for index in order:
            by_size.setdefault(self.sizes[index], []).append(index)
        return [
            group[i : i + self.batch_size]
            for group in by_size.values()
            for i in range(0, len(group), self.batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        if self.generator is None:
            return iter(self._batches(range(len(self.sizes))))
        batches = self._batches(torch.randperm(len(self.sizes), generator=self.generator).tolist())
        return iter([batches[i] for i in torch.randperm(len(batches), generator=self.generator)])

    def __len__(self) -> int:
        return sum(-(-n // self.batch_size) for n in Counter(self.sizes).values())


def images_of(loader: DataLoader) -> Iterator[torch.Tensor]:
    """The image tensors of a loader's batches, skipping all-bad batches."""
    return (batch["image"] for batch in loader if "image" in batch)


class EvalDataset(Dataset):
    """Images resized to the model's input size, labels kept at full resolution.

    Predictions are upsampled to the label, as the Cityscapes benchmark scores them.
    """

    def __init__(self, table: pa.Table, size: tuple[int, int] | None, normalization: str):
        columns = ["image_id", "image_path", "label_path", "label_format", "height", "width"]
        self.rows = table.select(columns).to_pylist()
        self.sizes = [(r["height"], r["width"]) for r in self.rows]
        self.transform = build_transform(train=False, size=size, normalization=normalization)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict | Skipped:
        row = self.rows[index]
        try:
            image = load_image(row["image_path"])
            label = load_label(row["label_path"], row["label_format"])
            check_sizes(row, image, label)
        except BadInputError as e:
            return skip(e)
        image, _ = self.transform(image, None)
        return {
            "image": image,
            # uint8 train ids: a 1024x2048 label is 2 MB, not 16 MB, in the loader's
            # shared memory (a container's /dev/shm is 64 MB by default).
            "label": torch.from_numpy(label),
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
    dataset = EvalDataset(table, size, normalization)
    return DataLoader(
        dataset,
        # Labels stay at full resolution, so a batch holds one label size.
        batch_sampler=SizeBatches(dataset.sizes, batch_size),
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        # Its own generator: a loader without one draws its base seed from torch's global
        # RNG, so evaluating mid-run would change a training run's later augmentations.
        generator=torch.Generator(),
    )
