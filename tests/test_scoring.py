import dataclasses
import functools
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from sfda_ray.cli import main
from sfda_ray.config import Config, PerfConfig, SelectConfig
from sfda_ray.data.catalog import open_dataset
from sfda_ray.data.io import load_image, load_label
from sfda_ray.data.manifest import write_manifest
from sfda_ray.data.transforms import normalize_batch
from sfda_ray.dist.scoring import ScoringOptions, score_dataset
from sfda_ray.method.scoring import class_confidence_histogram, score_images
from sfda_ray.method.selection import select, selection_quality
from sfda_ray.models.checkpoint import load_model


@pytest.fixture(scope="module")
def scored(tiny_scores):
    return tiny_scores


def test_ray_pipeline_equals_plain_core(scored, tiny_benchmark, tiny_source_ckpt):
    out, summary = scored
    assert summary["scored"] == 24 and summary["skipped"] == 0
    # 5 batches of 5: a start-up time, and a rate over the batches after the first.
    assert 0 < summary["startup_seconds"] <= summary["seconds"]
    assert summary["steady_images_per_s"] > 0
    table = pq.read_table(out / "scores.parquet")
    assert table.num_rows == 24
    assert sorted(table["image_id"].to_pylist()) == sorted(
        open_dataset(tiny_benchmark, "target").split("train")["image_id"].to_pylist()
    )
    # Scoring used the source model with target BatchNorm statistics (AdaBN), saved next
    # to the table; the plain core gets the very same model.
    assert summary["checkpoint"] == str(out / "source_adabn.pt")
    assert summary["source_checkpoint"] == str(tiny_source_ckpt)
    model, meta = load_model(summary["checkpoint"])
    for row in table.to_pylist():
        image = torch.from_numpy(load_image(row["image_path"]))[None]
        plain = score_images(model, normalize_batch(image, meta["normalization"]))
        assert row["score"] == pytest.approx(plain.score[0].item(), abs=1e-5)
        assert row["mean_confidence"] == pytest.approx(plain.mean_confidence[0].item(), abs=1e-5)
        label = np.asarray(Image.open(row["pseudo_label_path"]))
        conf = np.asarray(Image.open(row["confidence_path"]))
        # Same model, same pixels; batching changes float rounding only (8-bit maps may
        # differ by one level at a rounding edge).
        np.testing.assert_array_equal(label, plain.label[0].numpy())
        conf_diff = np.abs(conf.astype(int) - plain.confidence[0].numpy().astype(int))
        assert conf_diff.max() <= 1 and (conf_diff > 0).mean() < 0.001
        assert row["class_hist"] == plain.class_hist[0].tolist()
        expected_hist = class_confidence_histogram(plain.label[0], plain.confidence[0], 19)
        assert np.abs(np.array(row["class_conf_hist"]) - expected_hist.numpy()).sum() <= 4
        assert sum(row["class_hist"]) == 48 * 96
        # Target labels exist on the benchmark: evaluation columns are filled, and
        # accuracy is taken over the labelled (not void) pixels.
        assert 0.0 <= row["eval_miou"] <= 100.0
        gt = load_label(row["label_path"], row["label_format"])
        assert sum(row["eval_labelled_hist"]) == (gt != 255).sum()
        correct, labelled = np.array(row["eval_correct_hist"]), np.array(row["eval_labelled_hist"])
        assert (correct <= labelled).all() and labelled.sum() <= sum(row["class_hist"])
        assert row["node_id"] and row["error"] is None
    # Quality figures describe the configured selection (class-balanced by default).
    configured = selection_quality(table, select(table, SelectConfig()))
    for key in ("kept_pixel_accuracy", "score_miou_spearman"):
        assert summary[f"quality_{key}"] == pytest.approx(configured[key])
    assert json.loads((out / "summary.json").read_text())["scored"] == 24


def test_rerun_scores_nothing_new(scored, tiny_benchmark, tiny_source_ckpt):
    out, first = scored
    before = pq.read_table(out / "scores.parquet").sort_by("image_id")
    again = score_dataset(
        str(tiny_source_ckpt), str(tiny_benchmark), str(out), ScoringOptions(batch_size=5, actors=1)
    )
    assert again["scored_this_run"] == 0 and again["scored"] == 24
    after = pq.read_table(out / "scores.parquet").sort_by("image_id")
    assert after["score"].to_pylist() == before["score"].to_pylist()


def test_rerun_at_another_size_scores_again(scored, tiny_benchmark, tiny_source_ckpt, tmp_path):
    """A scores directory reused with another data.size: the maps and the AdaBN statistics
    are made again at that size, not taken from the earlier run."""
    first_out, first = scored
    out = tmp_path / "scores"
    shutil.copytree(first_out, out)  # its rows still name the maps under first_out
    copied_maps = sorted((out / "maps").rglob("*.png"))
    options = ScoringOptions(batch_size=8, actors=1, size=(32, 64))
    resized = score_dataset(str(tiny_source_ckpt), str(tiny_benchmark), str(out), options)
    assert resized["scored_this_run"] == 24 and resized["scored"] == 24
    # The replaced maps are deleted from this directory, and only from it.
    assert resized["superseded_maps_removed"] == len(copied_maps) > 0
    assert not any(p.exists() for p in copied_maps)
    for row in pq.read_table(first_out / "scores.parquet").to_pylist():
        assert Path(row["pseudo_label_path"]).is_file() and Path(row["confidence_path"]).is_file()
    assert resized["checkpoint_fingerprint"] != first["checkpoint_fingerprint"]
    assert load_model(resized["checkpoint"])[1]["adabn_recipe"]["size"] == [32, 64]
    for row in pq.read_table(out / "scores.parquet").to_pylist():
        assert np.asarray(Image.open(row["pseudo_label_path"])).shape == (32, 64)
        assert sum(row["class_hist"]) == 32 * 64
    again = score_dataset(str(tiny_source_ckpt), str(tiny_benchmark), str(out), options)
    assert again["scored_this_run"] == 0
    assert again["checkpoint_fingerprint"] == resized["checkpoint_fingerprint"]


def test_switching_sizes_back_and_forth_never_reuses_the_other_sizes_maps(
    ray_session, tiny_benchmark, tiny_source_ckpt, tmp_path
):
    """Without AdaBN the scoring model stays the same, so only the size tells the runs
    apart: native, then 32x64, then native again re-scores each time. The target is the
    source-free setting proper, without a label anywhere (Ray Data hands an all-null label
    column to the decoder as NaN)."""
    table = pq.read_table(tiny_benchmark / "target" / "manifest.parquet")
    rows = [
        dict(r, label_path=None, label_format=None)
        for r in table.filter(pa.compute.equal(table["split"], "train")).slice(0, 6).to_pylist()
    ]
    write_manifest(rows, tmp_path / "m.parquet")
    data, out = str(tmp_path / "m.parquet"), str(tmp_path / "scores")
    for run, (size, shape) in enumerate([(None, (48, 96)), ((32, 64), (32, 64)), (None, (48, 96))]):
        options = ScoringOptions(batch_size=6, actors=1, adabn=False, size=size)
        summary = score_dataset(str(tiny_source_ckpt), data, out, options)
        assert summary["scored_this_run"] == summary["scored"] == 6 and summary["skipped"] == 0
        listed = set()
        for row in pq.read_table(tmp_path / "scores" / "scores.parquet").to_pylist():
            assert row["error"] is None and row["eval_miou"] is None and row["score"] > 0
            assert np.asarray(Image.open(row["pseudo_label_path"])).shape == shape
            assert np.asarray(Image.open(row["confidence_path"])).shape == shape
            listed |= {row["pseudo_label_path"], row["confidence_path"]}
        # The maps of the replaced rows (label and confidence of 6 images) are gone.
        assert summary["superseded_maps_removed"] == (12 if run else 0)
        assert {str(p) for p in (tmp_path / "scores" / "maps").rglob("*.png")} == listed
    assert score_dataset(str(tiny_source_ckpt), data, out, options)["scored_this_run"] == 0


def test_bad_images_are_recorded_and_skipped(
    ray_session, tiny_benchmark, tiny_source_ckpt, tmp_path
):
    """Bad images, and a partly labelled split, in blocks that Ray Data splits and joins
    into the scorers' batches (9 rows in 2 blocks, batches of 4): every batch's columns
    must join whatever its rows hold."""
    table = pq.read_table(tiny_benchmark / "target" / "manifest.parquet")
    table = table.filter(pa.compute.equal(table["split"], "train")).slice(0, 7)
    good = table.to_pylist()
    good[1].update(label_path=None, label_format=None)  # an image without its label file
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(open(good[0]["image_path"], "rb").read()[:300])
    broken_label = tmp_path / "broken_label.png"
    broken_label.write_bytes(open(good[2]["label_path"], "rb").read()[:60])
    good[2].update(label_path=str(broken_label))  # scored, but left out of the quality figures
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    bad = [dict(good[0], image_id=f"bad/{p.stem}", image_path=str(p)) for p in (truncated, empty)]
    manifest = tmp_path / "manifest.parquet"
    write_manifest(good[:5] + bad[:1] + good[5:] + bad[1:], manifest)
    out = tmp_path / "scores"
    summary = score_dataset(
        str(tiny_source_ckpt),
        str(manifest),
        f"file://{out}",
        ScoringOptions(batch_size=4, actors=1, adabn=False),
    )
    assert summary["scored"] == 7 and summary["skipped"] == 2
    assert summary["checkpoint"] == summary["source_checkpoint"]  # AdaBN off: source as is
    assert summary["skipped_reasons"] == {"unreadable image": 2}
    assert summary["label_errors"] == 1
    assert summary["first_label_error"].startswith(f"bad label: {broken_label}: ")
    rows = {r["image_id"]: r for r in pq.read_table(out / "scores.parquet").to_pylist()}
    assert len(rows) == 9
    assert "truncated.png" in rows["bad/truncated"]["error"]
    assert "empty file" in rows["bad/empty"]["error"]
    assert rows["bad/empty"]["score"] is None
    # Pseudo-labels are evaluated where a label exists, and only there.
    evaluated = {i for i, r in rows.items() if r["eval_miou"] is not None}
    assert evaluated == {r["image_id"] for r in good} - {good[1]["image_id"], good[2]["image_id"]}

    # The truncated file repaired: a rerun that must keep the selection (the main job
    # resuming a sweep) leaves the failed images as they were; a plain rerun retries them.
    truncated.write_bytes(open(good[0]["image_path"], "rb").read())
    rerun = functools.partial(
        score_dataset,
        str(tiny_source_ckpt),
        str(manifest),
        f"file://{out}",
        ScoringOptions(batch_size=4, actors=1, adabn=False),
    )
    kept = rerun(retry_failed=False)
    assert (kept["scored"], kept["skipped"], kept["scored_this_run"]) == (7, 2, 0)
    retried = rerun()
    assert (retried["scored"], retried["skipped"], retried["scored_this_run"]) == (8, 1, 2)


def test_score_command_writes_table_and_pictures(
    ray_session, tiny_benchmark, tiny_source_ckpt, tmp_path, capsys
):
    import warnings

    out = tmp_path / "scores"
    args = ["score", "--checkpoint", str(tiny_source_ckpt), "--data", str(tiny_benchmark)]
    args += ["--out", str(out), "--actors", "1", "--batch-size", "8"]
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        assert main(args) == 0
    # The remote arg that keeps decoding a stage of its own warns in Ray 2.60: not here.
    assert not [w for w in warned if "ray_remote_args" in str(w.message)]
    printed = capsys.readouterr().out
    assert "scored 24 images, skipped 0" in printed and "kept_pixel_accuracy" in printed
    for name in ("score_histogram.png", "selection_grid.png"):
        with Image.open(io.BytesIO((out / name).read_bytes())) as picture:
            assert picture.format == "PNG" and picture.size[0] > 100


def test_mc_dropout_scores_uncertainty_and_needs_dropout(tiny_source_ckpt, tmp_path):
    from sfda_ray.models import build_model

    torch.manual_seed(0)
    model = build_model("deeplabv2_resnet18", 19, mc_dropout=0.5).eval()
    images = torch.randn(2, 3, 32, 64)
    plain, mc = score_images(model, images), score_images(model, images, mc_passes=4)
    assert plain.uncertainty is None and mc.uncertainty.shape == (2, 32, 64)
    assert mc.uncertainty.float().mean() > 0 and (mc.mc_score < 1).all()
    # A model without dropout has no epistemic uncertainty to measure: refused up front.
    options = ScoringOptions(mc_passes=4)
    with pytest.raises(
        ValueError, match=r"score.mc_passes 4 needs a model with dropout; .*source.pt"
    ):
        score_dataset(str(tiny_source_ckpt), str(tmp_path), str(tmp_path / "scores"), options)


def test_the_scoring_settings_reach_its_datasets_and_leave_the_driver_as_it_was(ray_session):
    """A dataset keeps the copy of the driver's DataContext made when it is created:
    settings changed afterwards would not reach it (the first scoring of a process ran
    without them), and left set they would reach every later Ray Data job."""
    import ray

    from sfda_ray.dist.scoring import scoring_context

    ctx = ray.data.DataContext.get_current()
    before = (ctx.wait_for_min_actors_s, ctx.max_consecutive_actor_init_deaths)
    options = ctx.execution_options
    with scoring_context():
        ds = ray.data.from_items([{"a": 1}]).map_batches(lambda batch: batch)
    assert ds.context.wait_for_min_actors_s >= 600
    assert ds.context.max_consecutive_actor_init_deaths >= 3
    assert ds.context.execution_options.actor_locality_enabled is False
    assert (ctx.wait_for_min_actors_s, ctx.max_consecutive_actor_init_deaths) == before
    assert ctx.execution_options is options and options.actor_locality_enabled is not False
    assert ds.take_all() == [{"a": 1}]


def test_scoring_options_default_to_the_configs_score_section():
    """Scoring from Python and scoring from a config mean the same defaults."""
    configured = ScoringOptions.from_config(Config())
    plain = ScoringOptions()
    differ = {
        f.name
        for f in dataclasses.fields(ScoringOptions)
        if getattr(plain, f.name) != getattr(configured, f.name)
    }
    # size and perf: None means the native size and the default execution settings.
    assert differ <= {"size", "perf"}, differ
    assert configured.perf == PerfConfig() and configured.size is None
