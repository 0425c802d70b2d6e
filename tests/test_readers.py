import logging
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from data_fixtures import (
    H,
    W,
    all_ids_label,
    make_cityscapes,
    make_gta5,
    make_synthia,
    random_rgb,
    truncate,
    write_png,
)

from sfda_ray.data.manifest import MANIFEST_SCHEMA, read_manifest, summarize, write_manifest
from sfda_ray.data.readers import build_manifest, scan_cityscapes, scan_gta5, scan_synthia


def test_scan_gta5(tmp_path):
    make_gta5(tmp_path, n=3)
    table = scan_gta5(tmp_path)
    assert table.schema == MANIFEST_SCHEMA
    rows = table.to_pylist()
    assert [r["image_id"] for r in rows] == ["images/00000", "images/00001", "images/00002"]
    assert rows[1]["image_path"] == str(tmp_path / "images" / "00001.png")
    assert rows[1]["label_path"] == str(tmp_path / "labels" / "00001.png")
    assert {(r["split"], r["dataset"], r["label_format"]) for r in rows} == {
        ("train", "gta5", "cityscapes_ids")
    }
    assert {(r["height"], r["width"], r["error"]) for r in rows} == {(H, W, None)}


def test_scan_synthia(tmp_path):
    make_synthia(tmp_path, n=2)
    rows = scan_synthia(tmp_path).to_pylist()
    assert [r["label_path"] for r in rows] == [
        str(tmp_path / "GT" / "LABELS" / f"{k:07d}.png") for k in range(2)
    ]
    assert {(r["dataset"], r["label_format"], r["error"]) for r in rows} == {
        ("synthia", "synthia", None)
    }


def test_scan_cityscapes_with_unlabelled_images(tmp_path):
    """Target images need no label: one without its label file (a split without gtFine,
    or an incomplete copy of it) is a usable, unlabelled row."""
    images = {
        "train": ["zurich/zurich_000001_000019", "aachen/aachen_000000_000019"],
        "val": ["lindau/lindau_000000_000019"],
    }
    make_cityscapes(tmp_path, images, unlabelled=("zurich/zurich_000001_000019",))
    make_cityscapes(
        tmp_path,
        {"test": ["berlin/berlin_000000_000019"]},
        unlabelled=("berlin/berlin_000000_000019",),
    )
    rows = scan_cityscapes(tmp_path, splits=("train", "val", "test")).to_pylist()
    assert [(r["split"], r["image_id"]) for r in rows] == [
        ("test", "leftImg8bit/test/berlin/berlin_000000_000019_leftImg8bit"),
        ("train", "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit"),
        ("train", "leftImg8bit/train/zurich/zurich_000001_000019_leftImg8bit"),
        ("val", "leftImg8bit/val/lindau/lindau_000000_000019_leftImg8bit"),
    ]
    test, aachen, zurich, lindau = rows
    assert aachen["label_path"] == str(
        tmp_path / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    )
    assert lindau["label_format"] == "cityscapes_ids"
    for unlabelled in (test, zurich):
        assert (unlabelled["label_path"], unlabelled["label_format"]) == (None, None)
    assert all(r["error"] is None for r in rows)
    assert [r["split"] for r in scan_cityscapes(tmp_path, splits=("val",)).to_pylist()] == ["val"]


def test_a_bad_cityscapes_label_leaves_its_image_unlabelled(tmp_path, caplog):
    """Adaptation never reads a target label: an unreadable or wrongly sized one costs the
    image its evaluation, not its place in the data (a source label costs the image)."""
    images = {"train": ["a/a_0_19"], "val": ["b/b_0_19", "b/b_1_19"]}
    make_cityscapes(tmp_path, images)
    small = tmp_path / "gtFine" / "val" / "b" / "b_1_19_gtFine_labelIds.png"
    write_png(small, all_ids_label(34, 8, 8))
    (tmp_path / "gtFine" / "train" / "a" / "a_0_19_gtFine_labelIds.png").write_bytes(b"no png")
    with caplog.at_level(logging.WARNING):
        rows = {r["image_id"].split("/")[-1]: r for r in scan_cityscapes(tmp_path).to_pylist()}
    assert all(r["error"] is None for r in rows.values())
    for unlabelled in ("a_0_19_leftImg8bit", "b_1_19_leftImg8bit"):
        assert (rows[unlabelled]["label_path"], rows[unlabelled]["label_format"]) == (None, None)
    assert rows["b_0_19_leftImg8bit"]["label_format"] == "cityscapes_ids"
    assert "2 label(s) unusable: their images are kept, unlabelled" in caplog.text
    assert "a_0_19_gtFine_labelIds.png: unreadable label" in caplog.text


def _gta5_with_bad_rows(root):
    make_gta5(root, n=2)  # 00000, 00001 stay good
    truncate(write_png(root / "images" / "trunc.png", random_rgb(0)), keep=20)
    (root / "images" / "empty.png").write_bytes(b"")
    (root / "images" / "text.png").write_text("definitely not a png")
    write_png(root / "images" / "size.png", random_rgb(0))
    write_png(root / "labels" / "size.png", random_rgb(0, H // 2, W // 2)[..., 0])
    write_png(root / "images" / "nolabel.png", random_rgb(0))
    for name in ("trunc", "empty", "text"):
        write_png(root / "labels" / f"{name}.png", random_rgb(0)[..., 0])


@pytest.mark.parametrize("kind", ["gta5", "synthia", "cityscapes"])
def test_relative_root_gives_absolute_paths(tmp_path, monkeypatch, kind):
    make = {
        "gta5": lambda root: make_gta5(root, n=2),
        "synthia": lambda root: make_synthia(root, n=2),
        "cityscapes": lambda root: make_cityscapes(
            root, {"train": ["a/a_000000_000019"], "val": ["b/b_000000_000019"]}
        ),
    }[kind]
    make(tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    build_manifest(kind, "data", "manifest.parquet")
    monkeypatch.chdir(tmp_path / "data")  # another working directory, as on a Ray worker
    rows = read_manifest(tmp_path / "manifest.parquet").to_pylist()
    assert rows and all(r["error"] is None for r in rows)
    for r in rows:
        for key in ("image_path", "label_path"):
            assert r[key].startswith(str(tmp_path / "data") + "/"), r[key]
            assert Path(r[key]).is_file()


def test_bad_rows_are_recorded_and_good_rows_survive(tmp_path):
    _gta5_with_bad_rows(tmp_path)
    table = scan_gta5(tmp_path)
    errors = {r["image_id"]: r["error"] for r in table.to_pylist()}
    assert errors["images/00000"] is None and errors["images/00001"] is None
    for name in ("trunc", "empty", "text"):
        assert errors[f"images/{name}"].startswith("unreadable image: ")
    assert errors["images/size"] == (
        f"label size mismatch: label {W // 2}x{H // 2} differs from image size {W}x{H}"
    )
    assert errors["images/nolabel"] == "missing label: file not found"
    assert summarize(table) == {
        "total": 7,
        "ok": 2,
        "skipped": 5,
        "reasons": {"unreadable image": 3, "label size mismatch": 1, "missing label": 1},
    }


def test_manifest_round_trip_lists_every_image(tmp_path):
    _gta5_with_bad_rows(tmp_path / "gta5")
    out = tmp_path / "out" / "gta5.parquet"
    summary = build_manifest("gta5", tmp_path / "gta5", out)
    assert (summary["total"], summary["ok"]) == (7, 2)
    assert pq.read_table(out).num_rows == 7  # bad rows are kept on disk
    everything = read_manifest(out, include_errors=True)
    assert everything.equals(scan_gta5(tmp_path / "gta5"))
    assert read_manifest(out)["image_id"].to_pylist() == ["images/00000", "images/00001"]
    assert read_manifest(out, split="val").num_rows == 0
    assert read_manifest(out.as_uri(), split="train").num_rows == 2


def test_scan_order_is_deterministic(tmp_path):
    make_cityscapes(tmp_path, {"val": ["b/b_1", "a/a_2", "a/a_1"]})
    first = scan_cityscapes(tmp_path, splits=("val",))
    assert first.equals(scan_cityscapes(tmp_path, splits=("val",)))
    assert first["image_id"].to_pylist() == sorted(first["image_id"].to_pylist())


def test_missing_root_names_the_path(tmp_path):
    for scan in (scan_gta5, scan_synthia, scan_cityscapes):
        with pytest.raises(FileNotFoundError, match=f"dataset root not found: {tmp_path}/nope"):
            scan(tmp_path / "nope")


def test_missing_or_empty_image_folder_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"directory not found: {tmp_path}/images"):
        scan_gta5(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no \\*.png images in {tmp_path}/images"):
        scan_gta5(tmp_path)
    write_png(tmp_path / "RGB" / "0000000.png", random_rgb(0))
    with pytest.raises(FileNotFoundError, match=f"directory not found: {tmp_path}/GT/LABELS"):
        scan_synthia(tmp_path)
    cs = tmp_path / "cs"
    cs.mkdir()
    with pytest.raises(
        FileNotFoundError,
        match=f"not found: {cs}/leftImg8bit/train or {cs}/leftImg8bit/val .*expected layout",
    ):
        scan_cityscapes(cs)
    make_cityscapes(cs, {"val": ["a/a_1"]})  # a copy of the val split alone: it is scanned
    assert scan_cityscapes(cs)["split"].to_pylist() == ["val"]


def test_read_manifest_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"manifest not found: {tmp_path}/m.parquet"):
        read_manifest(tmp_path / "m.parquet")
    pq.write_table(pa.table({"image_id": ["a"]}), tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"other.parquet: not a manifest, missing columns \['im"):
        read_manifest(tmp_path / "other.parquet")
    (tmp_path / "text.parquet").write_text("hello")
    with pytest.raises(ValueError, match="text.parquet: not a Parquet manifest"):
        read_manifest(tmp_path / "text.parquet")


def test_write_manifest_validates(tmp_path):
    with pytest.raises(ValueError, match="missing columns"):
        write_manifest(pa.table({"image_id": ["a"]}), tmp_path / "m.parquet")
    row = {"image_id": None, "image_path": "/a.png", "split": "train", "dataset": "gta5"}
    with pytest.raises(ValueError, match="'image_id' has 1 null"):
        write_manifest([row], tmp_path / "m.parquet")
    with pytest.raises(ValueError, match=r"needs its image's height and width; 1 have none"):
        write_manifest([{**row, "image_id": "a"}], tmp_path / "m.parquet")
    write_manifest([{**row, "image_id": "a", "height": 4, "width": 8}], tmp_path / "m.parquet")
    assert read_manifest(tmp_path / "m.parquet").to_pylist()[0]["height"] == 4
    assert not list(tmp_path.glob("*.tmp-*"))  # the temporary file was renamed away


def test_a_hand_made_manifest_is_checked_row_by_row(tmp_path):
    """What every stage relies on, checked when the manifest is read, naming the file."""
    row = {
        "image_id": "a", "image_path": "/a.png", "label_path": "/a_label.png",
        "label_format": "cityscapes_ids", "split": "val", "dataset": "cityscapes",
        "height": 16, "width": 32, "error": None,
    }  # fmt: skip
    cases = {
        "repeated": (
            [row, {**row, "image_path": "/b.png"}],
            r"image_id must be unique; 1 repeated, e.g. \['a'\]",
        ),
        "unsafe": ([{**row, "image_id": "../x"}], r"image_id must be a relative name without"),
        "format": (
            [{**row, "label_format": "gta5"}],
            r"label_format 'gta5' \(of /a_label.png\) is not one of",
        ),
        "no_format": ([{**row, "label_format": None}], r"label_format None \(of /a_label.png\)"),
        "height": ([{**row, "height": "big"}], r"column 'height' is not int32"),
        "unsized": (
            [{**row, "width": None}, {**row, "image_id": "b", "height": 0}],
            r"a usable row \(error null\) needs its image's height and width; 2 have none, "
            r"e.g. \['a', 'b'\]",
        ),
    }
    for name, (rows, message) in cases.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        with pytest.raises(ValueError, match=f"{name}.parquet: " + message):
            read_manifest(path)
    # A row that already carries an error is skipped, not judged.
    pq.write_table(
        pa.Table.from_pylist([{**row, "label_format": None, "error": "x: y"}]),
        tmp_path / "ok.parquet",
    )
    assert read_manifest(tmp_path / "ok.parquet").num_rows == 0
    # Empty text, as CSV exports write a missing value, is no value: not an error message.
    pq.write_table(
        pa.Table.from_pylist([{**row, "label_path": "", "label_format": "", "error": ""}]),
        tmp_path / "empty.parquet",
    )
    (read,) = read_manifest(tmp_path / "empty.parquet").to_pylist()
    assert (read["label_path"], read["label_format"], read["error"]) == (None, None, None)


def test_dataset_yaml_sets_evaluation_classes(tmp_path):
    from sfda_ray.data.catalog import open_dataset
    from sfda_ray.data.labels import EVAL_SUBSETS

    split_images = {"train": ["aachen/aachen_0_19"], "val": ["lindau/lindau_0_19"]}
    make_cityscapes(tmp_path / "cs", split_images)
    plain = tmp_path / "cityscapes.yaml"
    plain.write_text(f"data: {{kind: cityscapes, root: {tmp_path / 'cs'}}}\n")
    assert list(open_dataset(plain).eval_subsets) == ["cityscapes19"]
    synthia = tmp_path / "cityscapes_synthia.yaml"
    synthia.write_text(
        f"data: {{kind: cityscapes, root: {tmp_path / 'cs'}, "
        "eval_classes: [synthia16, synthia13]}\n"
    )
    ref = open_dataset(synthia)
    assert ref.eval_subsets == {n: EVAL_SUBSETS[n] for n in ("synthia16", "synthia13")}
    assert ref.manifest.num_rows == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data: {{kind: cityscapes, root: {tmp_path / 'cs'}, eval_classes: [all]}}\n")
    with pytest.raises(ValueError, match=r"bad.yaml: data.eval_classes: \['all'\]"):
        open_dataset(bad)


def test_dataset_yaml_relative_root_is_relative_to_the_yaml(tmp_path, monkeypatch):
    from sfda_ray.data.catalog import open_dataset

    make_cityscapes(
        tmp_path / "cs", {"train": ["aachen/aachen_0_19"], "val": ["lindau/lindau_0_19"]}
    )
    (tmp_path / "configs").mkdir()
    spec = tmp_path / "configs" / "cityscapes.yaml"
    spec.write_text("data: {kind: cityscapes, root: ../cs}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ref = open_dataset(spec)
    assert ref.manifest.num_rows == 2
    image = Path(ref.manifest["image_path"][0].as_py())
    assert image.is_absolute() and image.is_file()


def test_dataset_yaml_mistakes_are_named(tmp_path, caplog):
    from sfda_ray.data.catalog import open_dataset

    make_cityscapes(tmp_path / "cs", {"train": ["a/a_0_19"], "val": ["b/b_0_19"]})
    cases = {
        "typo.yaml": (
            "data: {kind: cityscapes, root: cs, eval_clases: [synthia16]}\n",
            "typo.yaml: data: unknown key(s) eval_clases",
        ),
        "kind.yaml": ("data: {kind: kitti, root: cs}\n", "kind.yaml: data.kind 'kitti' is not"),
        "list.yaml": ("- data\n", "list.yaml: expected a `data:` section"),
        "broken.yaml": ("data: {kind: [\n", "broken.yaml: not valid YAML"),
        "twice.yaml": ("data: {kind: cityscapes, root: cs, root: x}\n", "'root' a second time"),
        "number.yaml": ("data: {kind: cityscapes, root: 5}\n", "data.root 5 is not a path"),
        "notparquet.yaml": (
            "data: {kind: cityscapes, manifest: cs}\n",
            "data.manifest cs is not a .parquet manifest (a dataset folder goes in data.root)",
        ),
        # A real root left at data.kind's default, synthetic: the message says which.
        "unset.yaml": (
            "data: {kind: synthetic, root: cs}\n",
            "data.kind synthetic: " + str(tmp_path / "cs") + " is not a synthetic benchmark",
        ),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            open_dataset(tmp_path / name)
    # A whole config (its data: section has the config's other keys too) serves as one;
    # those other keys do not apply to --data, and the log says so.
    (tmp_path / "config.yaml").write_text(
        "data: {kind: cityscapes, root: cs, size: [16, 32], hflip: false}\nmodel: {}\n"
    )
    with caplog.at_level(logging.WARNING):
        assert open_dataset(tmp_path / "config.yaml").manifest.num_rows == 2
    assert caplog.text.count("config.yaml: data: hflip, size not applied") == 1
    open_dataset(tmp_path / "config.yaml")  # read again: said once
    assert caplog.text.count("not applied") == 1


def test_only_a_synthetic_benchmark_has_two_domains(tiny_benchmark, tmp_path):
    from sfda_ray.data.catalog import is_synthetic

    make_cityscapes(tmp_path / "cs", {"train": ["a/a_0_19"], "val": ["b/b_0_19"]})
    build_manifest("cityscapes", tmp_path / "cs", tmp_path / "cs.parquet")
    (tmp_path / "cs.yaml").write_text("data: {kind: cityscapes, root: cs}\n")
    (tmp_path / "bench.yaml").write_text(f"data: {{kind: synthetic, root: {tiny_benchmark}}}\n")
    assert is_synthetic(tiny_benchmark) and is_synthetic(tmp_path / "bench.yaml")
    for real in ("cs", "cs.parquet", "cs.yaml"):
        assert not is_synthetic(tmp_path / real), real


def test_a_partly_labelled_split_is_evaluated_on_its_labelled_images(tmp_path, caplog):
    """An incomplete copy of gtFine leaves some images without a label: those are left
    out of evaluation, counted and warned about once; a split of unusable images says
    why."""
    from sfda_ray.data.catalog import open_dataset
    from sfda_ray.dist.tune import has_labelled_val
    from sfda_ray.evaluate import evaluate_model
    from sfda_ray.models import build_model

    images = {"train": ["aachen/aachen_0_19"], "val": ["lindau/lindau_0_19", "lindau/lindau_1_19"]}
    make_cityscapes(tmp_path / "cs", images, unlabelled=("lindau/lindau_1_19",))
    table = scan_cityscapes(tmp_path / "cs")  # lindau_1's label is missing from gtFine
    write_manifest(table, tmp_path / "some.parquet")
    ref = open_dataset(tmp_path / "some.parquet")
    with caplog.at_level(logging.WARNING):
        val = ref.labelled("val")
        assert ref.labelled("val").num_rows == val.num_rows == 1
    assert val["image_id"].to_pylist() == ["leftImg8bit/val/lindau/lindau_0_19_leftImg8bit"]
    assert ref.unlabelled_in("val") == 1 and ref.unlabelled_in("train") == 0
    assert caplog.text.count("1 val image(s) have no label and are left out of evaluation") == 1
    assert "lindau_1_19" in caplog.text
    assert ref.labelled("test") is None
    assert has_labelled_val(str(tmp_path / "some.parquet"))

    model = build_model("deeplabv2_resnet18", 19, output_stride=16)
    report = evaluate_model(model.eval(), ref, "val", "imagenet", size=(32, 64), num_workers=0)
    assert (report["images"], report["skipped"]) == (1, 1)
    assert report["skipped_reasons"] == {"no label": 1}

    # No label at all: no evaluation; every image unusable: the first one's reason.
    table = table.set_column(2, "label_path", pa.nulls(table.num_rows, pa.string()))
    table = table.set_column(3, "label_format", pa.nulls(table.num_rows, pa.string()))
    write_manifest(table, tmp_path / "none.parquet")
    assert not has_labelled_val(str(tmp_path / "none.parquet"))
    errors = pa.array([None, "unreadable image: truncated", "unreadable image: truncated"])
    write_manifest(table.set_column(8, "error", errors), tmp_path / "bad.parquet")
    unusable = r"all 2 images of split 'val' were left out as unusable \(first: .*lindau_0_19"
    with pytest.raises(ValueError, match=unusable + r".*: unreadable image: truncated\)"):
        open_dataset(tmp_path / "bad.parquet").labelled("val")


def test_the_kind_of_a_bare_manifest_must_be_clear(tmp_path, caplog):
    """Which classes are evaluated comes from the manifest's kind: an unclear one is
    refused rather than guessed."""
    from sfda_ray.data.catalog import open_dataset

    row = {
        "image_id": "a", "image_path": "/a.png", "label_path": None, "label_format": None,
        "split": "val", "dataset": "cityscapes", "height": 16, "width": 32, "error": None,
    }  # fmt: skip
    mixed = [row, {**row, "image_id": "b", "dataset": "gta5"}]
    pq.write_table(pa.Table.from_pylist(mixed), tmp_path / "mixed.parquet")
    with pytest.raises(
        ValueError, match=r"mixed.parquet: the manifest mixes datasets \(cityscapes"
    ):
        open_dataset(tmp_path / "mixed.parquet")
    pq.write_table(pa.Table.from_pylist([{**row, "dataset": "synthetic"}]), tmp_path / "s.parquet")
    assert list(open_dataset(tmp_path / "s.parquet").eval_subsets) == ["cityscapes19"]
    assert "s.parquet: a synthetic benchmark's manifest is evaluated over all 19" in caplog.text
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "cs.parquet")
    assert list(open_dataset(tmp_path / "cs.parquet").eval_subsets) == ["cityscapes19"]


def test_relative_paths_in_a_manifest_are_relative_to_it(tmp_path, monkeypatch):
    """Trials and Ray Train workers each run in a working directory of their own."""
    row = {
        "image_id": "a", "image_path": "images/a.png", "label_path": "../labels/a.png",
        "label_format": "cityscapes_ids", "split": "val", "dataset": "cityscapes",
        "height": 16, "width": 32, "error": None,
    }  # fmt: skip
    absolute = {**row, "image_id": "b", "image_path": "/data/b.png", "label_path": None}
    (tmp_path / "set").mkdir()
    pq.write_table(pa.Table.from_pylist([row, absolute]), tmp_path / "set" / "m.parquet")
    monkeypatch.chdir(tmp_path)
    rows = read_manifest("set/m.parquet").to_pylist()
    assert rows[0]["image_path"] == str(tmp_path / "set" / "images" / "a.png")
    assert Path(rows[0]["label_path"]).resolve() == (tmp_path / "labels" / "a.png").resolve()
    assert (rows[1]["image_path"], rows[1]["label_path"]) == ("/data/b.png", None)
