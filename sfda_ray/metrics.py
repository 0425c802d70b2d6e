"""Confusion matrix and IoU for semantic segmentation (percentages, as papers report)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _as_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    # A copy of an array: torch takes no negative strides, and warns on read-only arrays.
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, np.int64))


def confusion_matrix(
    pred: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    num_classes: int,
    ignore_index: int = 255,
) -> np.ndarray:
    """[C, C] int64 counts, rows = ground truth, columns = prediction.

    Counted where ``pred`` is: a GPU prediction is not copied to the CPU to be counted
    (~35 ms a 1024x2048 label there, with the GPU waiting). Pixels whose target is
    ``ignore_index`` are left out; any other label or prediction outside [0, C) is an
    error rather than silently dropped.
    """
    if tuple(pred.shape) != tuple(target.shape):
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    # int64 before comparing: in a uint8 target, ignore_index -1 would match 255.
    pred = _as_tensor(pred).flatten().long()
    target = _as_tensor(target).to(pred.device).flatten().long()
    keep = target != ignore_index
    pred, target = pred[keep], target[keep]
    for name, values in (("target", target), ("pred", pred)):
        if values.numel() and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(
                f"{name} has values outside [0, {num_classes}) other than {ignore_index}"
            )
    counts = torch.bincount(target * num_classes + pred, minlength=num_classes**2)
    return counts.reshape(num_classes, num_classes).cpu().numpy()


def iou_per_class(cm: np.ndarray) -> np.ndarray:
    """IoU per class in [0, 1]; nan where a class is in neither ground truth nor prediction."""
    tp = np.diag(cm).astype(np.float64)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray, classes: Sequence[int] | None = None) -> float:
    """Mean IoU in percent over ``classes`` (all by default), skipping nan classes."""
    iou = iou_per_class(cm)
    if classes is not None:
        iou = iou[list(classes)]
    if np.isnan(iou).all():
        return float("nan")
    return float(np.nanmean(iou) * 100)


def _percent_or_none(value: float) -> float | None:
    # None rather than nan so the report is valid JSON.
    return None if np.isnan(value) else float(value)


def segmentation_report(
    cm: np.ndarray,
    class_names: Sequence[str],
    subsets: dict[str, Sequence[int]] | None = None,
) -> dict:
    """mIoU, per-class IoU, pixel accuracy (all percent) and subset mIoUs, JSON-ready.

    ``subsets`` maps a name to class indices, e.g. SYNTHIA's 16- and 13-class protocols.
    Undefined values (no pixels) are None.
    """
    if len(class_names) != cm.shape[0]:
        raise ValueError(f"{len(class_names)} class names for a {cm.shape[0]}-class matrix")
    total = cm.sum()
    accuracy = np.trace(cm) / total * 100 if total else float("nan")
    return {
        "miou": _percent_or_none(mean_iou(cm)),
        "per_class": {
            name: _percent_or_none(iou * 100)
            for name, iou in zip(class_names, iou_per_class(cm), strict=True)
        },
        "pixel_accuracy": _percent_or_none(accuracy),
        "subsets": {
            name: _percent_or_none(mean_iou(cm, classes))
            for name, classes in (subsets or {}).items()
        },
        "confusion_matrix": cm.tolist(),
    }
