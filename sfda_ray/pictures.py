"""PNG pictures of a scoring run and of evaluations (logged to MLflow by the tuner)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402
from PIL import Image  # noqa: E402

from sfda_ray import storage  # noqa: E402
from sfda_ray.data.io import load_image  # noqa: E402
from sfda_ray.data.labels import colorize  # noqa: E402
from sfda_ray.method.selection import Selection  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def score_histogram(table: pa.Table, selection: Selection) -> bytes:
    """Histogram of image scores with the selection cut (V to the right of it)."""
    ok = table.filter(pc.is_null(table["error"]))
    scores = ok["score"].to_numpy(zero_copy_only=False)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(scores, bins=40, color="#4c72b0")
    ax.axvline(
        selection.score_cut,
        color="#c44e52",
        linestyle="--",
        label=f"cut {selection.score_cut:.3f}: {len(selection.virtual)} virtual source, "
        f"{len(selection.target)} target",
    )
    ax.set_xlabel("image score: mean(1 - normalised entropy)")
    ax.set_ylabel("images")
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def overlay(image: np.ndarray, label: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """Colour-coded train-id label blended over an RGB image (resized to the label)."""
    if image.shape[:2] != label.shape:
        image = np.asarray(Image.fromarray(image).resize(label.shape[::-1], Image.BILINEAR))
    return ((1 - alpha) * image + alpha * colorize(label)).astype(np.uint8)


def selection_grid(table: pa.Table, selection: Selection, per_side: int = 4) -> bytes:
    """Top row: most confident virtual-source images; bottom row: least confident target
    images; each with its pseudo-label overlaid."""
    rows = {
        r["image_id"]: r
        for r in table.select(["image_id", "image_path", "pseudo_label_path"]).to_pylist()
    }
    picks = [selection.virtual[:per_side], selection.target[::-1][:per_side]]
    tiles = []
    for ids in picks:
        row = []
        for image_id in ids:
            r = rows[image_id]
            label = np.asarray(Image.open(io.BytesIO(storage.read_bytes(r["pseudo_label_path"]))))
            row.append(overlay(load_image(r["image_path"]), label))
        tiles.append(row)
    return tile_grid(tiles)


# Widest tile a picture keeps: 4x4 Cityscapes frames at their own 2048 would make a
# 4096x8192 PNG (tens of MB, seconds to encode) for every trial's MLflow run.
MAX_TILE_WIDTH = 512


def tile_grid(tiles: Sequence[Sequence[np.ndarray]]) -> bytes:
    """PNG of RGB tiles in rows, each at the first tile's size (frames may differ in
    size), at most ``MAX_TILE_WIDTH`` wide; short or empty rows (no virtual-source image,
    say) are padded with black."""
    h, w = next(t for row in tiles for t in row).shape[:2]
    if w > MAX_TILE_WIDTH:
        h, w = max(1, round(h * MAX_TILE_WIDTH / w)), MAX_TILE_WIDTH

    def fitted(tile: np.ndarray) -> np.ndarray:
        if tile.shape[:2] == (h, w):
            return tile
        return np.asarray(Image.fromarray(tile).resize((w, h), Image.BILINEAR))

    columns = max(len(r) for r in tiles)
    blank = np.zeros((h, w, 3), np.uint8)
    grid = np.concatenate(
        [
            np.concatenate([fitted(t) for t in r] + [blank] * (columns - len(r)), axis=1)
            for r in tiles
        ],
        axis=0,
    )
    buf = io.BytesIO()
    Image.fromarray(grid).save(buf, format="PNG")
    return buf.getvalue()


def per_class_bars(per_class: dict[str, float | None], title: str) -> bytes:
    """IoU per class; a class with no pixel anywhere (None) is marked n/a, not drawn as 0."""
    names = list(per_class)
    values = [v if v is not None else 0.0 for v in per_class.values()]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.bar(range(len(names)), values, color="#55a868")
    for x, v in enumerate(per_class.values()):
        if v is None:
            ax.text(x, 1, "n/a", ha="center", va="bottom", rotation=90, fontsize=7, color="0.4")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def confusion_image(cm: np.ndarray, class_names: Sequence[str], classes: Sequence[int]) -> bytes:
    """Row-normalised confusion matrix (rows: ground truth) over the evaluated classes."""
    sub = np.asarray(cm)[np.ix_(classes, classes)].astype(np.float64)
    sub = sub / np.maximum(sub.sum(1, keepdims=True), 1)
    names = [class_names[c] for c in classes]
    fig, ax = plt.subplots(figsize=(5, 4.5))
    ax.imshow(sub, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    return _png(fig)
