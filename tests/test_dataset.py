import logging
from collections import Counter

import numpy as np
import pytest
import torch
from data_fixtures import (
    CITYSCAPES_TO_TRAIN,
    SYNTHIA_TO_TRAIN,
    H,
    W,
    all_ids_label,
    expected_train_ids,
    make_cityscapes,
    make_gta5,
    make_synthia,
    truncate,
)
from PIL import Image
from torch.utils.data import DataLoader

from sfda_ray.data.dataset import SegmentationDataset, collate_skip_bad
from sfda_ray.data.manifest import write_manifest
from sfda_ray.data.readers import scan_cityscapes, scan_dataset, scan_gta5
from sfda_ray.data.transforms import build_transform

EVAL = build_transform(False, None)


def gta5_with_decode_errors(root):
    """4 images whose headers are fine; 2 fail only when decoded."""
    labels = make_gta5(root, n=4)
    trunc = root / "images" / "00001.png"
    truncate(trunc, keep=trunc.stat().st_size // 2)  # pixel data cut, header intact
    bad = labels["00003.png"].copy()
    bad[0, 0] = 99
    Image.fromarray(bad).save(root / "labels" / "00003.png")
    return labels


def test_items_and_skipped_bad_files(tmp_path, caplog):
    labels = gta5_with_decode_errors(tmp_path)
    write_manifest(scan_gta5(tmp_path), tmp_path / "m.parquet")
    ds = SegmentationDataset(tmp_path / "m.parquet", EVAL)
    assert len(ds) == 4  # scan could not see these problems
    with caplog.at_level(logging.WARNING):
        items = [ds[i] for i in range(len(ds))]
    assert items[1] is None and items[3] is None
    assert str(tmp_path / "images" / "00001.png") in caplog.text
    assert "unknown label ids [99]" in caplog.text
    item = items[2]
    assert (item["image_id"], item["index"]) == ("images/00002", 2)
    assert item["image"].shape == (3, H, W)
    expected = expected_train_ids(labels["00002.png"], CITYSCAPES_TO_TRAIN)
    np.testing.assert_array_equal(item["label"].numpy(), expected)


def _cityscapes_tree(root):
    make_cityscapes(root, {"train": ["a/a_000000_000019"], "val": ["b/b_000000_000019"]})
    return {"train": all_ids_label(34), "val": all_ids_label(34)}


@pytest.mark.parametrize(
    "kind, make, table",
    [
        ("gta5", lambda root: make_gta5(root, n=2), CITYSCAPES_TO_TRAIN),
        ("synthia", lambda root: make_synthia(root, n=2), SYNTHIA_TO_TRAIN),
        ("cityscapes", _cityscapes_tree, CITYSCAPES_TO_TRAIN),
    ],
)
def test_every_layout_reaches_train_ids_through_the_dataset(tmp_path, kind, make, table):
    """Real on-disk layout and encoding -> manifest -> dataset item: every raw id mapped."""
    raw = list(make(tmp_path).values())
    ds = SegmentationDataset(scan_dataset(kind, tmp_path), EVAL)
    assert len(ds) == len(raw)
    for i, labels in enumerate(raw):
        got = ds[i]["label"].numpy()
        np.testing.assert_array_equal(got, expected_train_ids(labels, table))
    assert 255 in got and got[got != 255].max() == 18  # ignored and mapped ids both present


def test_rows_with_scan_errors_are_left_out(tmp_path):
    make_gta5(tmp_path, n=2)
    (tmp_path / "images" / "empty.png").write_bytes(b"")
    table = scan_gta5(tmp_path)
    assert table.num_rows == 3
    assert len(SegmentationDataset(table, EVAL)) == 2


def test_without_labels(tmp_path):
    make_gta5(tmp_path, n=1)
    assert "label" not in SegmentationDataset(scan_gta5(tmp_path), EVAL, with_labels=False)[0]
    make_cityscapes(tmp_path / "cs", {"train": ["a/a_1"]}, unlabelled=("a/a_1",))
    item = SegmentationDataset(scan_cityscapes(tmp_path / "cs", ("train",)), EVAL)[0]
    assert "label" not in item and item["image"].shape == (3, H, W)


def test_loader_counts_skipped_items(tmp_path):
    gta5_with_decode_errors(tmp_path)
    loader = DataLoader(
        SegmentationDataset(scan_gta5(tmp_path), EVAL),
        batch_size=2,
        num_workers=2,
        collate_fn=collate_skip_bad,
    )
    batches = list(loader)
    assert [b["num_skipped"] for b in batches] == [1, 1]
    assert [b["index"].tolist() for b in batches] == [[0], [2]]
    assert batches[0]["image"].shape == (1, 3, H, W)
    assert batches[0]["label"].dtype == torch.int64
    assert batches[1]["image_id"] == ["images/00002"]


def test_all_bad_batch_has_no_image():
    batch = collate_skip_bad([None, None, None])
    assert batch == {"num_skipped": 3}


def test_forever_reads_a_fresh_pass_each_time_and_skips_empty_batches():
    from sfda_ray.data.loaders import forever

    passes = []

    def make(epoch):  # as collate_skip_bad makes them: every batch counts its bad items
        passes.append(epoch)
        return [
            {"image": (epoch, 0), "num_skipped": 1},
            {"num_skipped": 4},
            {"image": (epoch, 1), "num_skipped": 0},
        ]

    skipped = Counter()
    batches = forever(make, skipped)
    assert [next(batches)["image"] for _ in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert passes == [0, 1, 2]
    assert skipped["inputs"] == 5 + 5 + 1  # two whole passes and the first batch of a third
    nothing = forever(lambda epoch: [{"num_skipped": 3}, {"num_skipped": 2}])
    with pytest.raises(ValueError, match=r"no usable item in a whole pass .*\(5 skipped\)"):
        next(nothing)
