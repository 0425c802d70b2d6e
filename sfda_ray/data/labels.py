"""Class definitions and raw-id -> train-id mappings for the supported label formats.

Cityscapes names, colours and the id -> trainId table come from ``cityscapesscripts``
(the official definitions); GTA5 labels use the same ids. SYNTHIA uses the community
mapping shared by AdaptSegNet, ADVENT and the SFDA papers.
"""

from __future__ import annotations

import numpy as np
from cityscapesscripts.helpers.labels import labels as _CS_LABELS

NUM_CLASSES = 19
IGNORE_INDEX = 255

_TRAIN_LABELS = sorted(
    (lab for lab in _CS_LABELS if 0 <= lab.trainId < NUM_CLASSES), key=lambda lab: lab.trainId
)
CLASS_NAMES: tuple[str, ...] = tuple(lab.name for lab in _TRAIN_LABELS)
PALETTE: np.ndarray = np.array([lab.color for lab in _TRAIN_LABELS], dtype=np.uint8)

# SYNTHIA-RAND-CITYSCAPES class id -> train id; the remaining ids 0..22 are ignored.
SYNTHIA_TO_TRAIN: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7,
    6: 8, 1: 10, 10: 11, 17: 12, 8: 13, 19: 15, 12: 17, 11: 18,
}  # fmt: skip

LABEL_FORMATS = ("cityscapes_ids", "synthia", "train_ids")

# Raw ids a label file of each format may contain; anything else is a corrupt file.
VALID_IDS: dict[str, frozenset[int]] = {
    "cityscapes_ids": frozenset(lab.id for lab in _CS_LABELS if lab.id >= 0),
    "synthia": frozenset(range(23)),
    "train_ids": frozenset([*range(NUM_CLASSES), IGNORE_INDEX]),
}

_SYNTHIA16 = tuple(c for c in range(NUM_CLASSES) if c not in (9, 14, 16))
EVAL_SUBSETS: dict[str, tuple[int, ...]] = {
    "cityscapes19": tuple(range(NUM_CLASSES)),
    "synthia16": _SYNTHIA16,
    "synthia13": tuple(c for c in _SYNTHIA16 if c not in (3, 4, 5)),
}


def check_format(label_format: str) -> None:
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"unknown label format {label_format!r}; expected one of {LABEL_FORMATS}")


def label_lut(label_format: str) -> np.ndarray:
    """uint8 table of 256 entries mapping a raw id to its train id (255 = ignore)."""
    check_format(label_format)
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    if label_format == "cityscapes_ids":
        for lab in _CS_LABELS:
            if 0 <= lab.id and 0 <= lab.trainId < NUM_CLASSES:
                lut[lab.id] = lab.trainId
    elif label_format == "synthia":
        for raw, train in SYNTHIA_TO_TRAIN.items():
            lut[raw] = train
    else:
        lut[:NUM_CLASSES] = np.arange(NUM_CLASSES)
    return lut


def describe_valid(label_format: str) -> str:
    """Valid raw ids as compact ranges, e.g. ``"0..18, 255"``, for error messages."""
    runs: list[list[int]] = []
    for i in sorted(VALID_IDS[label_format]):
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ", ".join(f"{a}..{b}" if b > a else str(a) for a, b in runs)


def colorize(label: np.ndarray) -> np.ndarray:
    """RGB uint8 picture of a train-id map; ignore (and any id >= 19) is black."""
    colours = np.zeros((256, 3), dtype=np.uint8)
    colours[:NUM_CLASSES] = PALETTE
    return colours[label.astype(np.uint8)]
