"""Scanners for the on-disk layouts of GTA5, SYNTHIA-RAND-CITYSCAPES and Cityscapes.

They only read file headers (sizes), so a 25k-image dataset scans in seconds. Rows with a
problem keep their place in the manifest with ``error`` set; decoding problems (unknown
ids, truncated pixel data) surface later as ``BadInputError`` from ``io``.
"""

from __future__ import annotations

import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from sfda_ray import storage
from sfda_ray.data.io import BadInputError, image_size
from sfda_ray.data.manifest import summarize, to_manifest_table, write_manifest

GTA5_LAYOUT = "images/*.png with labels/*.png of the same names"
SYNTHIA_LAYOUT = "RGB/*.png with GT/LABELS/*.png of the same names"
log = logging.getLogger(__name__)

CITYSCAPES_LAYOUT = (
    "leftImg8bit/<split>/<city>/<name>_leftImg8bit.png, "
    "optionally gtFine/<split>/<city>/<name>_gtFine_labelIds.png"
)


def _require_dir(directory: str, layout: str) -> tuple[pafs.FileSystem, str]:
    fs, p = storage.resolve(directory)
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"directory not found: {directory} (expected layout: {layout})")
    return fs, p


def _list_files(directory: str, suffix: str, layout: str, recursive: bool = False) -> list[str]:
    """Sorted paths relative to ``directory`` of the files ending in ``suffix``."""
    fs, p = _require_dir(directory, layout)
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=recursive))
    return sorted(
        i.path[len(p) :].lstrip("/") for i in infos if i.is_file and i.path.endswith(suffix)
    )


def _list_images(directory: str, suffix: str, layout: str, recursive: bool = False) -> list[str]:
    files = _list_files(directory, suffix, layout, recursive)
    if not files:
        raise FileNotFoundError(f"no *{suffix} images in {directory} (expected layout: {layout})")
    return files


def _check_root(root: str, layout: str) -> None:
    if not storage.exists(root):
        raise FileNotFoundError(f"dataset root not found: {root} (expected layout: {layout})")


def _size_str(hw: tuple[int, int]) -> str:
    return f"{hw[1]}x{hw[0]}"  # width x height, as image sizes are usually written


def _validate(row: dict[str, Any], labels_required: bool) -> dict[str, Any]:
    """Fill height/width/error from the headers of the image and its label (if any). A
    label problem is the row's error where labels are required (source data); elsewhere
    the image stays, unlabelled, and the problem is kept in ``label_problem``."""
    try:
        hw = image_size(row["image_path"])
    except BadInputError as e:
        return {**row, "error": f"unreadable image: {e.reason}"}
    row = {**row, "height": hw[0], "width": hw[1], "error": None}
    if row["label_path"] is None:
        return row
    try:
        label_hw = image_size(row["label_path"])
    except BadInputError as e:
        reason = "missing label" if e.reason == "file not found" else "unreadable label"
        problem = f"{reason}: {e.reason}"
    else:
        if label_hw == hw:
            return row
        problem = (
            f"label size mismatch: label {_size_str(label_hw)} "
            f"differs from image size {_size_str(hw)}"
        )
    if labels_required:
        return {**row, "error": problem}
    return {
        **row,
        "label_path": None,
        "label_format": None,
        "label_problem": f"{row['label_path']}: {problem}",
    }


def _build(rows: list[dict[str, Any]], labels_required: bool = True) -> pa.Table:
    # Header reads are I/O bound (especially on object stores): overlap them with threads.
    with ThreadPoolExecutor(max_workers=16) as pool:
        rows = list(pool.map(functools.partial(_validate, labels_required=labels_required), rows))
    problems = [r["label_problem"] for r in rows if r.get("label_problem")]
    if problems:
        log.warning(
            "%d label(s) unusable: their images are kept, unlabelled (evaluation leaves them "
            "out); first: %s",
            len(problems),
            problems[0],
        )
    return to_manifest_table(sorted(rows, key=lambda r: (r["split"], r["image_id"])))


def _paired_rows(
    root: str, image_dir: str, label_dir: str, layout: str, dataset: str, label_format: str
) -> list[dict[str, Any]]:
    """Rows for a flat image folder whose labels share the file names (GTA5, SYNTHIA).

    Every row names its expected label file; a missing one becomes that row's error.
    """
    _check_root(root, layout)
    images = _list_images(storage.join(root, image_dir), ".png", layout)
    _require_dir(storage.join(root, label_dir), layout)
    return [
        {
            "image_id": f"{image_dir}/{name[: -len('.png')]}",
            "image_path": storage.join(root, image_dir, name),
            "label_path": storage.join(root, label_dir, name),
            "label_format": label_format,
            "split": "train",
            "dataset": dataset,
        }
        for name in images
    ]


def scan_gta5(root: str | os.PathLike) -> pa.Table:
    """GTA5: every image is a training image; labels hold Cityscapes label ids."""
    rows = _paired_rows(str(root), "images", "labels", GTA5_LAYOUT, "gta5", "cityscapes_ids")
    return _build(rows)


def scan_synthia(root: str | os.PathLike) -> pa.Table:
    """SYNTHIA-RAND-CITYSCAPES: 16-bit labels with the class id in the first channel."""
    rows = _paired_rows(str(root), "RGB", "GT/LABELS", SYNTHIA_LAYOUT, "synthia", "synthia")
    return _build(rows)


def scan_cityscapes(
    root: str | os.PathLike, splits: tuple[str, ...] = ("train", "val")
) -> pa.Table:
    """Cityscapes images of those of the given splits that the root has (a copy of the val
    split alone serves evaluation); labels are optional (unlabelled target data)."""
    root = str(root)
    _check_root(root, CITYSCAPES_LAYOUT)
    present = [sp for sp in splits if storage.exists(storage.join(root, "leftImg8bit", sp))]
    if not present:
        wanted = " or ".join(storage.join(root, "leftImg8bit", sp) for sp in splits)
        raise FileNotFoundError(
            f"directory not found: {wanted} (expected layout: {CITYSCAPES_LAYOUT})"
        )
    rows = []
    for split in present:
        image_dir = storage.join(root, "leftImg8bit", split)
        images = _list_images(image_dir, "_leftImg8bit.png", CITYSCAPES_LAYOUT, recursive=True)
        label_dir = storage.join(root, "gtFine", split)
        # An image without its label stays usable (target images need none); evaluation
        # leaves it out and says so (DatasetRef.labelled).
        labels = (
            set(_list_files(label_dir, "_gtFine_labelIds.png", CITYSCAPES_LAYOUT, recursive=True))
            if storage.exists(label_dir)
            else set()
        )
        for rel in images:
            label_rel = rel.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
            has_label = label_rel in labels
            rows.append(
                {
                    "image_id": f"leftImg8bit/{split}/{rel[: -len('.png')]}",
                    "image_path": storage.join(image_dir, rel),
                    "label_path": storage.join(label_dir, label_rel) if has_label else None,
                    "label_format": "cityscapes_ids" if has_label else None,
                    "split": split,
                    "dataset": "cityscapes",
                }
            )
    # Target images need no label: a bad one leaves its image unlabelled, not unusable.
    return _build(rows, labels_required=False)


SCANNERS = {"gta5": scan_gta5, "synthia": scan_synthia, "cityscapes": scan_cityscapes}


def scan_dataset(kind: str, root: str | os.PathLike, **kwargs: Any) -> pa.Table:
    if kind == "synthetic":  # data.kind's default, so likely left unset for a real root
        raise ValueError(
            f"data.kind synthetic: {root} is not a synthetic benchmark (no benchmark.json); "
            f"for a real dataset set data.kind to one of {', '.join(sorted(SCANNERS))}"
        )
    if kind not in SCANNERS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {sorted(SCANNERS)}")
    return SCANNERS[kind](root, **kwargs)


def build_manifest(
    kind: str, root: str | os.PathLike, out_path: str | os.PathLike, **kwargs: Any
) -> dict[str, Any]:
    """Scan a dataset, write its manifest and return the summary of usable/skipped rows."""
    table = scan_dataset(kind, root, **kwargs)
    write_manifest(table, out_path)
    return summarize(table)
