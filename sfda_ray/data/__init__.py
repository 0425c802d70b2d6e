"""Datasets, label mappings, manifests and transforms.

The torch-based names load lazily, so manifest and label tools stay quick to import.
"""

from importlib import import_module

from sfda_ray.data.io import BadInputError, image_size, load_image, load_label
from sfda_ray.data.labels import CLASS_NAMES, EVAL_SUBSETS, IGNORE_INDEX, NUM_CLASSES, PALETTE
from sfda_ray.data.manifest import MANIFEST_SCHEMA, read_manifest, summarize, write_manifest
from sfda_ray.data.readers import build_manifest, scan_dataset

_LAZY = {
    "SegmentationDataset": "sfda_ray.data.dataset",
    "collate_skip_bad": "sfda_ray.data.dataset",
    "build_transform": "sfda_ray.data.transforms",
    "denormalize": "sfda_ray.data.transforms",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BadInputError",
    "CLASS_NAMES",
    "EVAL_SUBSETS",
    "IGNORE_INDEX",
    "MANIFEST_SCHEMA",
    "NUM_CLASSES",
    "PALETTE",
    "build_manifest",
    "image_size",
    "load_image",
    "load_label",
    "read_manifest",
    "scan_dataset",
    "summarize",
    "write_manifest",
    *_LAZY,
]
