"""Tiny dataset trees in the real on-disk layouts and encodings, written as real files.

Plain functions (not pytest fixtures) so test modules import exactly what they use.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

H, W = 16, 32  # every fixture image is 32 wide and 16 high

# Official Cityscapes labelId -> trainId, typed out as an oracle independent of the code.
CITYSCAPES_TO_TRAIN = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip
SYNTHIA_TO_TRAIN = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7,
    6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}  # fmt: skip


def all_ids_label(num_ids: int, h: int = H, w: int = W) -> np.ndarray:
    """A map in which every raw id 0..num_ids-1 appears."""
    return (np.arange(h * w) % num_ids).reshape(h, w).astype(np.uint8)


def expected_train_ids(raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
    return np.vectorize(lambda i: table.get(int(i), 255))(raw).astype(np.uint8)


def random_rgb(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_png(path: Path, array: np.ndarray) -> Path:
    """8-bit PNG via Pillow: HxW -> mode L, HxWx3 -> RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_synthia_label(path: Path, class_ids: np.ndarray, channels: int = 3) -> Path:
    """16-bit SYNTHIA label: class id in R, a nonzero instance id in G (cv2 writes BGR)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((*class_ids.shape, channels), dtype=np.uint16)
    arr[:, :, 2] = class_ids  # R
    arr[:, :, 1] = 1000 + np.arange(class_ids.size).reshape(class_ids.shape)  # G: instance
    if channels == 4:
        arr[:, :, 3] = 65535
    assert cv2.imwrite(str(path), arr)
    return path


def truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def make_gta5(root: Path, n: int = 3) -> dict[str, np.ndarray]:
    """root/images/0000k.png + root/labels/0000k.png (Cityscapes ids); returns raw labels."""
    labels = {}
    for k in range(n):
        name = f"{k:05d}.png"
        write_png(root / "images" / name, random_rgb(k))
        labels[name] = np.roll(all_ids_label(34), k)
        write_png(root / "labels" / name, labels[name])
    return labels


def make_synthia(root: Path, n: int = 3) -> dict[str, np.ndarray]:
    """root/RGB/000000k.png + root/GT/LABELS/000000k.png (16-bit); returns raw class ids."""
    labels = {}
    for k in range(n):
        name = f"{k:07d}.png"
        write_png(root / "RGB" / name, random_rgb(k))
        labels[name] = np.roll(all_ids_label(23), k)
        write_synthia_label(root / "GT" / "LABELS" / name, labels[name])
    return labels


def make_cityscapes(
    root: Path, images: dict[str, list[str]], unlabelled: tuple[str, ...] = ()
) -> None:
    """``images`` maps split -> ["city/name", ...]; names in ``unlabelled`` get no gtFine."""
    for split, names in images.items():
        for k, rel in enumerate(names):
            write_png(root / "leftImg8bit" / split / f"{rel}_leftImg8bit.png", random_rgb(k))
            if rel not in unlabelled:
                label_path = root / "gtFine" / split / f"{rel}_gtFine_labelIds.png"
                write_png(label_path, all_ids_label(34))


def cityscapes_yaml(tmp: Path, unlabelled: tuple[str, ...] = ()) -> Path:
    """A Cityscapes tree of one train and one val frame at ``TMP/cs``, and ``TMP/cs.yaml``
    naming it (``unlabelled`` as for ``make_cityscapes``)."""
    make_cityscapes(tmp / "cs", {"train": ["a/a_0_19"], "val": ["b/b_0_19"]}, unlabelled)
    (tmp / "cs.yaml").write_text(f"data: {{kind: cityscapes, root: {tmp / 'cs'}}}\n")
    return tmp / "cs.yaml"
