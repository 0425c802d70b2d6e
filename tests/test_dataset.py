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
    random_rgb,
    truncate,
    write_png,
)
from PIL import Image
from torch.utils.data import DataLoader

from sfda_ray.data.dataset import SegmentationDataset, collate_skip_bad
from sfda_ray.data.loaders import eval_loader, image_loader
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
    assert items[1].path == str(tmp_path / "images" / "00001.png")
    assert items[1].reason.startswith("corrupt or truncated image")
    assert items[3].path == str(tmp_path / "labels" / "00003.png")
    assert "unknown label ids [99]" in items[3].reason
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


def _gta5_of_two_sizes(root):
    """6 frames, 2 and 4 of them larger (GTA5 mixes frame sizes)."""
    labels = make_gta5(root, n=6)
    for k in (1, 4):
        write_png(root / "images" / f"{k:05d}.png", random_rgb(k, 24, 40))
        write_png(root / "labels" / f"{k:05d}.png", all_ids_label(34, 24, 40))
    return labels


def _ids(loader):
    return [batch["image_id"] for batch in loader]


def test_native_size_image_batches_hold_one_size_and_reshuffle(tmp_path):
    _gta5_of_two_sizes(tmp_path)
    table = scan_gta5(tmp_path)

    def loader(seed):
        return image_loader(table, None, "imagenet", batch_size=3, shuffle=True, seed=seed)

    batches = list(loader(0))
    assert len(batches) == len(loader(0)) == 3  # 4 small frames in 2 batches, 2 large in 1
    assert sorted(i for b in batches for i in b["image_id"]) == table["image_id"].to_pylist()
    large = ("images/00001", "images/00004")
    for b in batches:
        (is_large,) = {i in large for i in b["image_id"]}
        assert b["image"].shape[-2:] == ((24, 40) if is_large else (H, W))
    orders = [_ids(loader(0)), _ids(loader(0)), _ids(loader(1))]
    assert orders[0] == orders[1] != orders[2]  # seeded, and the seed matters
    passes = loader(0)
    assert _ids(passes) != _ids(passes)  # a fresh order on the next pass
    # Unshuffled: table order within each size.
    assert _ids(image_loader(table, None, "imagenet", batch_size=3, num_workers=0)) == [
        ["images/00000", "images/00002", "images/00003"],
        ["images/00005"],
        ["images/00001", "images/00004"],
    ]


def test_a_frame_that_changed_since_the_scan_is_skipped_not_a_collate_error(tmp_path, caplog):
    make_gta5(tmp_path, n=3)
    table = scan_gta5(tmp_path)
    write_png(tmp_path / "images" / "00001.png", random_rgb(1, 24, 40))  # replaced after it
    write_png(tmp_path / "labels" / "00002.png", all_ids_label(34, 24, 40))
    with caplog.at_level(logging.WARNING):
        images = list(image_loader(table, None, "imagenet", batch_size=3, num_workers=0))
        evaluated = list(eval_loader(table, None, "imagenet", batch_size=3, num_workers=0))
    assert [b["image_id"] for b in images] == [["images/00000", "images/00002"]]
    assert [b["image_id"] for b in evaluated] == [["images/00000"]]
    assert images[0]["num_skipped"] == 1 and evaluated[0]["num_skipped"] == 2
    image = tmp_path / "images" / "00001.png"
    assert f"skipping {image}: image size changed: 40x24 differs from the manifest's {W}x{H}" in (
        caplog.text
    )
    assert f"{tmp_path / 'labels' / '00002.png'}: label size mismatch: label 40x24" in caplog.text
    assert images[0]["skipped_reasons"] == {"image size changed": 1}
    assert evaluated[0]["skipped_reasons"] == {"image size changed": 1, "label size mismatch": 1}
    assert evaluated[0]["label"].dtype == torch.uint8  # an eighth of int64's shared memory


def test_all_bad_batch_has_no_image():
    from sfda_ray.data.dataset import Skipped

    bad = [Skipped("a.png", "empty file"), Skipped("b.png", "file not found")] * 2
    batch = collate_skip_bad(bad[:3])
    assert batch == {"num_skipped": 3, "skipped_reasons": {"empty file": 2, "file not found": 1}}


def test_forever_reads_a_fresh_pass_each_time_and_skips_empty_batches():
    from sfda_ray.data.loaders import forever

    passes = []

    def make(epoch):  # as collate_skip_bad makes them: every batch counts its bad items
        passes.append(epoch)
        return [
            {"image": (epoch, 0), "num_skipped": 1, "skipped_reasons": {"empty file": 1}},
            {"num_skipped": 4, "skipped_reasons": {"empty file": 3, "file not found": 1}},
            {"image": (epoch, 1), "num_skipped": 0, "skipped_reasons": {}},
        ]

    skipped = Counter()
    batches = forever(make, skipped)
    assert [next(batches)["image"] for _ in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert passes == [0, 1, 2]
    # Two whole passes and the first batch of a third.
    assert skipped == {"empty file": 4 + 4 + 1, "file not found": 1 + 1}
    unreadable = {"num_skipped": 3, "skipped_reasons": {"empty file": 3}}
    nothing = forever(lambda epoch: [unreadable, unreadable])
    with pytest.raises(ValueError, match=r"no usable item in a whole pass .*\(6 skipped\)"):
        next(nothing)
