"""Evaluation of a segmentation model on a labelled split: confusion matrix and IoU."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from sfda_ray.data.catalog import DatasetRef, open_dataset
from sfda_ray.data.labels import CLASS_NAMES
from sfda_ray.data.loaders import eval_loader, image_loader, images_of
from sfda_ray.method.baselines import adapt_batchnorm
from sfda_ray.metrics import confusion_matrix, segmentation_report
from sfda_ray.models.checkpoint import load_model
from sfda_ray.models.execution import Execution, resolve_device


@torch.no_grad()
def confusion_on(
    model: nn.Module,
    loader: DataLoader,
    num_classes: int,
    execution: Execution | None = None,
    observe: Callable[[torch.Tensor], None] | None = None,
) -> tuple[np.ndarray, Counter]:
    """Accumulated confusion matrix over ``loader`` and its skipped images by reason.

    ``model`` is on ``execution``'s device (default: fp32 on the CPU). ``observe`` sees
    each batch's fp32 logits at model resolution, so label-free statistics come from the
    same forward pass; batches without labels (an image loader) only feed ``observe``.
    """
    exe = execution or Execution(torch.device("cpu"))
    model.eval()
    cm = np.zeros((num_classes, num_classes), np.int64)
    skipped = Counter()
    for batch in loader:
        skipped.update(batch["skipped_reasons"])
        if "image" not in batch:
            continue
        label = batch.get("label")
        with exe.autocast():
            logits = model(exe.to_device(batch["image"]))
        logits = logits.float()
        if observe is not None:
            observe(logits)
        if label is None:
            continue
        label = label.to(exe.device)
        # One image at a time: a batch of logits at Cityscapes' label size is over 1 GB.
        for one, one_label in zip(logits, label, strict=True):
            if one.shape[-2:] != one_label.shape:
                one = F.interpolate(
                    one[None], size=one_label.shape, mode="bilinear", align_corners=False
                )[0]
            cm += confusion_matrix(one.argmax(0), one_label, num_classes)
    return cm, skipped


def evaluate_model(
    model: nn.Module,
    ref: DatasetRef,
    split: str,
    normalization: str,
    size: tuple[int, int] | None = None,
    batch_size: int = 8,
    num_workers: int = 1,
    device: str = "cpu",
) -> dict:
    """mIoU report of ``model`` on ``split``; the model is moved to ``device`` and run in
    fp32 there, so a GPU gives the same figures as the CPU, only sooner."""
    ref.check_split(split, "split")
    table = ref.labelled(split)
    if table is None:
        raise ValueError(
            f"dataset {ref.name}: no image of split {split!r} has a label; evaluation needs labels"
        )
    loader = eval_loader(table, size, normalization, batch_size, num_workers)
    num_classes = len(CLASS_NAMES)
    execution = Execution(resolve_device(device))
    execution.prepare(model)
    cm, skipped = confusion_on(model, loader, num_classes, execution)
    report = segmentation_report(cm, CLASS_NAMES, ref.eval_subsets)
    # Headline mIoU over the dataset's evaluation classes (e.g. the synthetic subset).
    first = next(iter(ref.eval_subsets))
    report["miou"] = report["subsets"][first]
    report["eval_classes"] = first
    report["per_class"] = {
        CLASS_NAMES[c]: report["per_class"][CLASS_NAMES[c]] for c in ref.eval_subsets[first]
    }
    report["images"] = len(loader.dataset) - sum(skipped.values())
    # The split's images left out when the dataset was scanned (the manifest's `error`
    # says why), and those without a label, count as skipped too.
    skipped.update(
        {"left out at scan": ref.skipped_in(split), "no label": ref.unlabelled_in(split)}
    )
    report["skipped_reasons"] = {reason: n for reason, n in skipped.items() if n}
    report["skipped"] = sum(report["skipped_reasons"].values())
    report["dataset"] = ref.name
    report["split"] = split
    return report


def evaluate_checkpoint(
    checkpoint: str,
    data: str,
    domain: str = "target",
    split: str = "val",
    size: tuple[int, int] | None = None,
    batch_size: int = 8,
    eval_classes: list[str] | None = None,
    device: str = "cpu",
) -> dict:
    """``eval_classes`` (names of class subsets) overrides the dataset's own, e.g. to score
    Cityscapes over SYNTHIA's 16 and 13 classes. ``device``: see
    ``models.execution.resolve_device``."""
    model, meta = load_model(checkpoint, num_classes=len(CLASS_NAMES))
    ref = open_dataset(data, domain)
    if eval_classes:
        ref = ref.with_eval_classes(eval_classes)
    report = evaluate_model(
        model, ref, split, meta["normalization"], size, batch_size, device=device
    )
    report["checkpoint"] = str(checkpoint)
    return report


def adabn_on_split(
    model: nn.Module,
    table: pa.Table,
    normalization: str,
    size: tuple[int, int] | None = None,
    max_batches: int = 30,
    device: str = "cpu",
) -> nn.Module:
    """AdaBN with the project's one recipe: up to ``max_batches`` shuffled batches of 16
    unaugmented images of ``table`` (seeded, so reruns give the same statistics), run on
    ``device``; the model comes back on the CPU."""
    dev = resolve_device(device)
    loader = image_loader(table, size, normalization, batch_size=16, shuffle=True, num_workers=0)
    adapt_batchnorm(model.to(dev), images_of(loader), max_batches=max_batches, device=dev)
    return model.cpu()
