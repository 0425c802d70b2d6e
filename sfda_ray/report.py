"""Files that describe one adaptation: what the tuner logs to MLflow for each trial.

Plain PyTorch and matplotlib; the files are returned as ``{name: bytes}`` so the caller
decides where they go (a trial's storage, then MLflow).
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from sfda_ray.config import Config
from sfda_ray.data.catalog import open_dataset
from sfda_ray.data.io import BadInputError, load_image, load_label
from sfda_ray.data.labels import CLASS_NAMES
from sfda_ray.data.loaders import image_loader
from sfda_ray.data.scores import scored_rows
from sfda_ray.evaluate import evaluate_model
from sfda_ray.method.selection import select
from sfda_ray.models.checkpoint import load_model
from sfda_ray.models.execution import resolve_device
from sfda_ray.pictures import (
    confusion_image,
    overlay,
    per_class_bars,
    score_histogram,
    tile_grid,
)

log = logging.getLogger(__name__)


def selection_files(scores: str, cfg: Config) -> dict[str, bytes]:
    """The score histogram with this configuration's selection cut."""
    table = scored_rows(scores)
    selection = select(table, cfg.select, cfg.model.num_classes)
    return {"score_histogram.png": score_histogram(table, selection)}


def evaluation_files(
    source_checkpoint: str,
    adapted_checkpoint: str,
    data: str,
    size: tuple[int, int] | None = None,
    device: str = "cpu",
    overlay_images: int = 4,
) -> dict[str, bytes]:
    """Per-class IoU (CSV, chart), confusion matrix and before/after overlays.

    Evaluation needs target-val labels (used for reporting only); without them only the
    overlays, on the first target images, are written. ``size`` is the model input (H, W),
    as in the adaptation; None keeps the native size.
    """
    ref = open_dataset(data, "target")
    adapted, meta = load_model(adapted_checkpoint, num_classes=len(CLASS_NAMES))
    norm = meta["normalization"]
    files: dict[str, bytes] = {}
    val = ref.labelled("val")
    if val is not None:
        report = evaluate_model(adapted, ref, "val", norm, size, num_workers=0, device=device)
        classes = next(iter(ref.eval_subsets.values()))
        rows = ["class,iou"] + [
            f"{name},{'' if iou is None else f'{iou:.2f}'}"
            for name, iou in report["per_class"].items()
        ]
        files["per_class_iou.csv"] = ("\n".join(rows) + "\n").encode()
        miou = "-" if report["miou"] is None else f"{report['miou']:.1f}%"  # None: no pixels
        files["per_class_iou.png"] = per_class_bars(report["per_class"], f"target val, mIoU {miou}")
        files["confusion_matrix.png"] = confusion_image(
            np.asarray(report["confusion_matrix"]), CLASS_NAMES, classes
        )
        files["evaluation.json"] = (json.dumps(report, indent=2) + "\n").encode()
    shown = (
        (val if val is not None else ref.split("train"))
        .sort_by("image_id")
        .slice(0, overlay_images)
    )
    source, _ = load_model(source_checkpoint, num_classes=len(CLASS_NAMES))
    overlays = prediction_overlays(source, adapted, shown, norm, size, device)
    if overlays is not None:
        files["overlays.png"] = overlays
    return files


@torch.no_grad()
def _predict(
    model: torch.nn.Module,
    table: pa.Table,
    normalization: str,
    size: tuple[int, int] | None,
    device: torch.device,
) -> dict[str, np.ndarray]:
    """Argmax maps by image id (images that fail to decode are skipped by the loader)."""
    model.eval().to(device)
    preds = {}
    for batch in image_loader(table, size, normalization, batch_size=4, num_workers=0):
        if "image" in batch:
            out = model(batch["image"].to(device)).argmax(1).to(torch.uint8).cpu().numpy()
            preds.update(zip(batch["image_id"], out, strict=True))
    return preds


def prediction_overlays(
    source: torch.nn.Module,
    adapted: torch.nn.Module,
    table: pa.Table,
    normalization: str,
    size: tuple[int, int] | None = None,
    device: str = "cpu",
) -> bytes | None:
    """One row per image: the image, the source model's prediction, the adapted model's
    prediction (run at ``size``, shown at the image's), and the ground truth if known and
    readable. None when no image could be read."""
    tiles = []
    dev = resolve_device(device)
    before = _predict(source, table, normalization, size, dev)
    after = _predict(adapted, table, normalization, size, dev)
    for row in table.to_pylist():
        if row["image_id"] not in before:
            continue
        image = load_image(row["image_path"])
        maps = [before[row["image_id"]], after[row["image_id"]]]
        if row.get("label_path"):
            try:
                maps.append(load_label(row["label_path"], row["label_format"]))
            except BadInputError as e:  # the evaluation has skipped and counted it
                log.warning("overlays: no ground truth for %s", e)
        tiles.append([image] + [overlay(image, _resize_label(m, image.shape[:2])) for m in maps])
    if not tiles:
        log.warning("overlays: none of the %d images shown could be read", table.num_rows)
        return None
    return tile_grid(tiles)


def _resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    if label.shape == size:
        return label
    t = torch.from_numpy(label)[None, None].float()
    return F.interpolate(t, size=size, mode="nearest")[0, 0].to(torch.uint8).numpy()
