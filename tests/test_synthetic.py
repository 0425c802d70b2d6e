import hashlib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sfda_ray.cli import main
from sfda_ray.data.catalog import open_dataset
from sfda_ray.data.synthetic import (
    BUILDING,
    CAR,
    CLASSES,
    VEGETATION,
    BenchmarkSpec,
    generate,
    load_benchmark_info,
    render_sample,
)

SMALL = [
    "--height",
    "48",
    "--width",
    "96",
    "--source-train",
    "6",
    "--source-val",
    "3",
    "--target-train",
    "6",
    "--target-val",
    "3",
]


def digests(root, pattern):
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob(pattern))
    }


def test_same_seed_gives_identical_files(tmp_path):
    assert main(["synth", "--out", str(tmp_path / "a"), "--seed", "0", *SMALL]) == 0
    assert main(["synth", "--out", str(tmp_path / "b"), "--seed", "0", *SMALL]) == 0
    assert main(["synth", "--out", str(tmp_path / "c"), "--seed", "1", *SMALL]) == 0
    a = digests(tmp_path / "a", "*_labelIds.png")
    assert len(a) == 18
    assert a == digests(tmp_path / "b", "*_labelIds.png")
    assert digests(tmp_path / "a", "*_leftImg8bit.png") == digests(
        tmp_path / "b", "*_leftImg8bit.png"
    )
    assert a != digests(tmp_path / "c", "*_labelIds.png")


def test_rewriting_a_benchmark_leaves_none_of_the_earlier_images(tmp_path):
    out = str(tmp_path / "bench")
    assert main(["synth", "--out", out, *SMALL, "--target-train", "6"]) == 0
    (tmp_path / "bench" / "notes.txt").write_text("mine")  # not the benchmark's: kept
    assert main(["synth", "--out", out, *SMALL, "--target-train", "2", "--height", "40"]) == 0
    target = open_dataset(out, "target").manifest
    assert target.num_rows == 2 + 3  # train and val
    assert set(target["height"].to_pylist()) == {40}
    assert len(list((tmp_path / "bench" / "target").rglob("*.png"))) == 2 * (2 + 3)
    assert (tmp_path / "bench" / "notes.txt").read_text() == "mine"


def test_a_benchmark_is_reused_only_for_its_own_settings(tmp_path):
    from sfda_ray.data.synthetic import ensure_benchmark

    spec = BenchmarkSpec(seed=0, height=48, width=96, source_train=2, source_val=1,
                         target_train=2, target_val=1)  # fmt: skip
    ensure_benchmark(tmp_path, spec)
    stamp = (tmp_path / "benchmark.json").stat().st_mtime_ns
    assert ensure_benchmark(tmp_path, spec)["images"] == {"source": 3, "target": 3}
    assert (tmp_path / "benchmark.json").stat().st_mtime_ns == stamp  # not written again
    with pytest.raises(ValueError, match=r"other settings: shift 1.0 \(asked: 0.5\)"):
        ensure_benchmark(tmp_path, BenchmarkSpec(**{**asdict(spec), "shift": 0.5}))


def test_relative_out_gives_a_benchmark_usable_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["synth", "--out", "bench", "--seed", "0", *SMALL]) == 0
    monkeypatch.chdir(tmp_path / "bench")
    paths = open_dataset(tmp_path / "bench", "target").manifest["image_path"].to_pylist()
    assert paths and all(Path(p).is_absolute() and Path(p).is_file() for p in paths)


def test_layout_manifests_and_preview(tmp_path):
    info = generate(
        tmp_path,
        BenchmarkSpec(
            height=48, width=96, source_train=4, source_val=2, target_train=5, target_val=3
        ),
    )
    assert load_benchmark_info(tmp_path)["class_ids"] == list(CLASSES)
    assert info["images"] == {"source": 6, "target": 8}
    # Real Cityscapes layout and encoding: 8-bit label ids, one file per image.
    label = tmp_path / "target/gtFine/val/real/real_000002_000019_gtFine_labelIds.png"
    assert Image.open(label).mode == "L"
    assert set(np.unique(np.asarray(Image.open(label)))) <= {7, 8, 11, 17, 20, 21, 23, 24, 26}
    table = pq.read_table(tmp_path / "target/manifest.parquet")
    assert table.num_rows == 8
    assert sorted(table["split"].to_pylist()) == ["train"] * 5 + ["val"] * 3
    assert all((tmp_path / "target").as_posix() in p for p in table["image_path"].to_pylist())
    ref = open_dataset(tmp_path, "source")
    assert ref.split("val").num_rows == 2 and ref.eval_subsets == {"synthetic": CLASSES}
    preview = Image.open(tmp_path / "preview.png")
    assert preview.size == (4 * 96, 4 * 48)


def test_shift_changes_appearance_and_class_frequencies():
    def stats(domain, shift):
        fractions, pixels = np.zeros(19), []
        for i in range(40):
            image, label = render_sample(3, domain, "train", i, 64, 128, shift)
            fractions += np.bincount(label.ravel(), minlength=19)[:19] / label.size
            pixels.append(image.reshape(-1, 3).mean(0))
        return fractions / 40, np.mean(pixels, 0)

    src_frac, src_rgb = stats("source", 1.0)
    tgt_frac, tgt_rgb = stats("target", 1.0)
    # Label shift: fewer buildings, more vegetation and cars in the target.
    assert tgt_frac[BUILDING] < 0.7 * src_frac[BUILDING]
    assert tgt_frac[VEGETATION] > 1.3 * src_frac[VEGETATION]
    assert tgt_frac[CAR] > 1.3 * src_frac[CAR]
    # Appearance shift: a darker target.
    assert tgt_rgb.mean() < src_rgb.mean() - 10
    # shift=0 renders the target like the source (same layout statistics, no degradation).
    zero_frac, zero_rgb = stats("target", 0.0)
    assert np.abs(zero_frac - src_frac).sum() < 0.15
    assert abs(zero_rgb.mean() - src_rgb.mean()) < 5


def test_bad_spec_and_missing_benchmark(tmp_path):
    with pytest.raises(ValueError, match="shift: 1.5 is out of range"):
        generate(tmp_path / "x", BenchmarkSpec(shift=1.5))
    with pytest.raises(FileNotFoundError, match="not a synthetic benchmark directory"):
        load_benchmark_info(tmp_path)
    assert main(["synth", "--out", str(tmp_path / "y"), "--shift", "2"]) == 2
    with pytest.raises(ValueError, match="target_train and target_val are both 0: the target"):
        generate(tmp_path / "z", BenchmarkSpec(target_train=0, target_val=0))
    assert not (tmp_path / "z").exists()  # refused before writing anything


def test_a_directory_of_other_files_is_never_overwritten(tmp_path, capsys):
    """The generator deletes images of an earlier benchmark from its folders: in a folder
    that is not a benchmark, those would be the user's."""
    theirs = tmp_path / "data" / "leftImg8bit" / "val" / "mine.png"
    theirs.parent.mkdir(parents=True)
    theirs.write_bytes(b"a photo")
    assert main(["synth", "--out", str(tmp_path / "data")]) == 2
    assert "holds leftImg8bit and no benchmark.json" in capsys.readouterr().err
    assert theirs.read_bytes() == b"a photo"
    # A benchmark whose writing was cut short (no benchmark.json yet) is written again.
    tiny = ["--height", "32", "--width", "32", "--source-train", "2", "--source-val", "1"]
    tiny += ["--target-train", "2", "--target-val", "1"]
    cut = tmp_path / "cut" / "target" / "leftImg8bit" / "val" / "real" / "x_leftImg8bit.png"
    cut.parent.mkdir(parents=True)
    cut.write_bytes(b"half an image")
    assert main(["synth", "--out", str(tmp_path / "cut"), *tiny]) == 0
    assert not cut.exists() and load_benchmark_info(tmp_path / "cut")["images"]["target"] == 3
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "benchmark.json").write_text('{"format": ')  # a write cut short
    with pytest.raises(ValueError, match=r"half/benchmark.json: not valid JSON"):
        load_benchmark_info(tmp_path / "half")


def test_ctrl_c_ends_a_command_in_one_line_with_code_130(tmp_path):
    """Ctrl-C, as a terminal sends it, while `sfda-ray synth` writes images."""
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "bench"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sfda_ray.cli", "synth", "--out", str(out)]
        + ["--target-train", "100000"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 60
        while not list(out.rglob("*.png")):  # generating, past the imports
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline, "no image generated in 60 s"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()  # a no-op once it has exited; else it would generate on and on
    assert proc.returncode == 130
    assert stderr.endswith("sfda-ray: interrupted\n") and "Traceback" not in stderr
