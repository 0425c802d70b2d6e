"""The decode stage of scoring's Ray Data pipeline: manifest rows in, image arrays out.

It imports no torch, so the CPU workers that run it start in about a second and stay
small; only the scoring actors load torch and the model.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from sfda_ray.data.io import BadInputError, load_image, load_label

NO_IMAGE = np.zeros((0, 0, 3), np.uint8)
NO_LABEL = np.zeros((0, 0), np.uint8)


def decode_batch(batch: dict[str, np.ndarray], size: tuple[int, int] | None) -> dict:
    """Ray Data task: read and resize images; read labels where present (evaluation only).

    An unreadable image marks its row with an error (the row is skipped, not dropped); an
    unreadable label only leaves that image out of the evaluation numbers. Every row gets
    an array of its column's rank and dtype, empty where there is nothing (``NO_IMAGE``,
    ``NO_LABEL``): Ray Data joins blocks into batches, and a column that is a tensor in one
    block cannot join one of Python objects or nulls in another.
    """
    images, labels, errors, eval_errors = [], [], [], []
    for path, label_path, label_format in zip(
        batch["image_path"], batch["label_path"], batch["label_format"], strict=True
    ):
        image, label, error, eval_error = NO_IMAGE, NO_LABEL, None, None
        try:
            image = load_image(path)
            if size is not None and image.shape[:2] != tuple(size):
                image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.BILINEAR))
        except BadInputError as e:
            error = f"unreadable image: {e}"
        # A column with no label at all reaches here as NaN, not None.
        if error is None and isinstance(label_path, str) and label_path:
            try:
                label = load_label(label_path, label_format)
            except BadInputError as e:
                eval_error = f"bad label: {e}"
        images.append(image)
        labels.append(label)
        errors.append(error)
        eval_errors.append(eval_error)
    out = dict(batch)
    out["image"] = _column(images)
    out["label"] = _column(labels)
    out["error"] = _objects(errors)
    out["eval_error"] = _objects(eval_errors)
    return out


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """One (B, ...) array when every row's array has the same shape; else one array per
    row. Either way a tensor column to Ray (fixed or variable shape), moved between
    processes without per-row pickling."""
    if len({a.shape for a in arrays}) == 1:
        return np.stack(arrays)
    return _objects(arrays)


def _objects(values: list) -> np.ndarray:
    """A 1-D object array, even when every value is an array of the same shape."""
    out = np.empty(len(values), dtype=object)
    for i, value in enumerate(values):
        out[i] = value
    return out
