"""Real faults against the Ray layer: a bad-input corpus among good files, a killed
scoring actor, a killed training worker, an unwritable output location, a full disk."""

import errno
import io
import logging
import os
import shutil
import signal
import subprocess
import threading
import time

import numpy as np
import psutil
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from data_fixtures import all_ids_label, random_rgb, truncate, write_png
from PIL import Image

from sfda_ray import storage
from sfda_ray.adaptation import load_state
from sfda_ray.config import ConfigError, apply_overrides, load_config
from sfda_ray.dist.scoring import ScoringOptions, score_dataset
from sfda_ray.dist.train import run_adapt
from sfda_ray.models.checkpoint import DivergedError, load_checkpoint

H, W = 48, 96


def _pair(root, split, name, image=None, label=None):
    city = name.split("_")[0]
    img = root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png"
    lab = root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png"
    write_png(img, random_rgb(len(name), H, W) if image is None else image)
    write_png(lab, all_ids_label(34, H, W) if label is None else label)
    return img, lab


def _bad_input_corpus(root):
    """Cityscapes: 4 good train images and one of each kind of bad input; one val image."""
    for k in range(4):
        _pair(root, "train", f"good_00000{k}_000019")
    img, _ = _pair(root, "train", "truncated_000000_000019")
    truncate(img, img.stat().st_size // 2)  # header intact: fails only when decoded
    img, _ = _pair(root, "train", "zerobyte_000000_000019")
    img.write_bytes(b"")
    img, _ = _pair(root, "train", "notimage_000000_000019")
    img.write_text("this is not a PNG")
    img, _ = _pair(root, "train", "sixteenbit_000000_000019")
    write_png(img, (np.arange(H * W).reshape(H, W) * 13).astype(np.uint16))
    img, _ = _pair(root, "train", "cmyk_000000_000019")
    buf = io.BytesIO()  # a CMYK JPEG under the dataset's .png name
    Image.fromarray(random_rgb(5, H, W)).convert("CMYK").save(buf, format="JPEG")
    img.write_bytes(buf.getvalue())
    _pair(root, "train", "sizemismatch_000000_000019", label=all_ids_label(34, H // 2, W))
    _pair(root, "train", "badids_000000_000019", label=np.full((H, W), 250, np.uint8))
    _pair(root, "val", "valcity_000000_000019")
    yaml_path = root / "dataset.yaml"
    yaml_path.write_text(f"data: {{kind: cityscapes, root: {root}}}\n")
    return yaml_path


@pytest.mark.slow
def test_bad_input_corpus_is_skipped_and_counted(ray_session, tiny_source_ckpt, tmp_path):
    data = _bad_input_corpus(tmp_path / "cityscapes")
    out = tmp_path / "scores"
    summary = score_dataset(
        str(tiny_source_ckpt), str(data), str(out), ScoringOptions(batch_size=4, actors=1)
    )
    # Zero-byte and non-image files are caught by the manifest scan; a label of the wrong
    # size leaves its image unlabelled (a target image needs none).
    assert summary["manifest_skipped"] == 2
    # The truncated PNG fails when decoded: kept as a row with its error, and counted.
    assert summary["skipped"] == 1
    assert summary["skipped_reasons"] == {"unreadable image": 1}
    # Good, 16-bit, CMYK, bad-label and mis-sized-label images are scored, each exactly once.
    table = pq.read_table(out / "scores.parquet")
    ok = [
        i
        for i, e in zip(table["image_id"].to_pylist(), table["error"].to_pylist(), strict=True)
        if e is None
    ]
    assert len(ok) == len(set(ok)) == summary["scored"] == 8
    names = " ".join(ok)
    assert "sixteenbit" in names and "cmyk" in names and "badids" in names
    assert "sizemismatch" in names
    # A label that fails to decode (ids outside Cityscapes') only leaves the quality figures.
    assert summary["label_errors"] == 1 and "badids" in summary["first_label_error"]
    bad = table.filter(pc.is_valid(table["error"]))
    assert "truncated" in bad["image_id"][0].as_py()
    assert str(tmp_path) in bad["error"][0].as_py()  # the error names the file


def _processes(marker: str) -> list[psutil.Process]:
    """This session's Ray worker processes (descendants of this test process, which
    started the local cluster) whose title (Ray sets it as the command line) has
    ``marker``; another Ray session on the same machine is never touched."""
    found = []
    for p in psutil.Process().children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                found.append(p)
        except psutil.Error:  # gone meanwhile
            continue
    return found


@pytest.mark.slow
def test_killed_scoring_actor_loses_and_duplicates_nothing(
    ray_session, tiny_benchmark, tiny_source_ckpt, tmp_path
):
    out = tmp_path / "scores"
    killed = []

    def kill_first_scorer():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for proc in _processes("MapBatches(Scorer)"):
                proc.kill()
                killed.append(proc.pid)
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_first_scorer)
    killer.start()
    summary = score_dataset(
        str(tiny_source_ckpt),
        str(tiny_benchmark),
        str(out),
        ScoringOptions(batch_size=2, actors=1, adabn=False),
    )
    killer.join()
    assert killed, "no scoring actor was found to kill"
    ids = pq.read_table(out / "scores.parquet")["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 24  # every target-train image, exactly once
    assert summary["scored"] == 24 and summary["skipped"] == 0


@pytest.mark.slow
def test_killed_worker_of_a_ddp_run_resumes_from_its_checkpoint(
    ray_session, tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    """A 2-worker (DDP) Ray Train run loses a worker after its first checkpoint: the group
    restarts from that checkpoint and finishes. (A rerun of a finished or killed run
    resuming from its directory is the main-job test's business.)"""
    scores, _ = tiny_scores

    cfg = load_config(
        None,
        {
            "adapt.iterations": 8,
            "adapt.batch_size": 2,
            "adapt.eval_every": 4,
            "adapt.checkpoint_every": 4,
            "adapt.threads": 1,
        },
    )
    inputs = (str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    run = tmp_path / "faulty"
    killed = []

    # Ray Train's controller writes this snapshot when it registers a reported checkpoint;
    # a checkpoint on disk but not yet registered would (rightly) not be resumed from.
    snapshot = run / "ray" / "adapt" / "checkpoint_manager_snapshot.json"

    def kill_after_first_checkpoint():
        deadline = time.time() + 300
        while time.time() < deadline:
            if snapshot.exists() and "checkpoint_" in snapshot.read_text():
                for proc in _processes("RayTrainWorker")[:1]:
                    proc.kill()
                    killed.append(proc.pid)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_after_first_checkpoint)
    killer.start()
    faulty = run_adapt(cfg, *inputs, str(run), workers=2, max_failures=2)
    killer.join()
    assert killed, "no training worker was killed"
    assert faulty["iteration"] == 8 and faulty["train_workers"] == 2
    assert faulty["resumed_from"] in (4, 8)  # the restarted group continued from a checkpoint
    assert np.isfinite(faulty["val_miou"])
    checkpoints = [p for p in run.glob("ray/adapt/checkpoint_*") if p.is_dir()]
    assert checkpoints
    for checkpoint in checkpoints:  # none lost or corrupted: each loads
        state = load_state(str(checkpoint / "state.pt"))
        assert state["iteration"] in (4, 8)
    assert load_checkpoint(str(run / "final.pt"))["meta"]["iteration"] == 8

    # Rerunning into the same directory would resume that run: with another setting it is
    # refused before Ray Train starts, and the finished run is left as it was.
    final = (run / "final.pt").read_bytes()
    other = apply_overrides(cfg, {"adapt.lr": 0.01, "adapt.log_every": 1})
    with pytest.raises(ConfigError, match=r"faulty holds an adaptation run .*\(adapt.lr differ\)"):
        run_adapt(other, *inputs, str(run), workers=2)
    assert (run / "final.pt").read_bytes() == final


def test_unwritable_output_fails_before_work(tiny_benchmark, tiny_source_ckpt, tmp_path):
    blocker = tmp_path / "results"
    blocker.write_text("a file where the output directory should be")
    with pytest.raises(OSError, match=r"output location .*results/scores is not writable"):
        score_dataset(str(tiny_source_ckpt), str(tiny_benchmark), str(blocker / "scores"))
    assert blocker.read_text().startswith("a file")  # what was there is untouched


def test_source_training_into_a_folder_that_takes_no_file_fails_before_training(
    tiny_benchmark, tmp_path, caplog
):
    from conftest import tiny_config

    from sfda_ray.train_source import train_source

    caplog.set_level(logging.INFO, logger="sfda_ray.train_source")
    blocker = tmp_path / "models"
    blocker.write_text("a file where the checkpoint's folder should be")
    with pytest.raises(OSError, match=r"output location .*models is not writable"):
        train_source(tiny_config(), str(tiny_benchmark), str(blocker / "source.pt"))
    assert "iter " not in caplog.text  # not one step was taken, so none was lost
    assert blocker.read_text().startswith("a file")


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs) mounted for the test; skipped where mounting is not
    permitted (it needs CAP_SYS_ADMIN, which CI's container has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {proc.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(disk) -> None:
    """Write zeros to ``disk`` until it is full (ENOSPC)."""
    with open(disk / "filler", "wb", buffering=0) as f:  # unbuffered: nothing left to flush
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise


def test_full_disk_is_refused_before_work(tiny_benchmark, tiny_source_ckpt, small_disk):
    earlier = small_disk / "earlier.json"
    earlier.write_text('{"miou": 42.0}')
    # The AdaBN model alone (~45 MB) cannot fit on a 4 MiB disk: refused before scoring.
    with pytest.raises(OSError, match=r"disk/scores has .* MiB free; scoring 24 images needs"):
        score_dataset(str(tiny_source_ckpt), str(tiny_benchmark), str(small_disk / "scores"))
    # Adaptation checkpoints (about ten model sizes): refused before Ray Train starts.
    with pytest.raises(OSError, match=r"disk/run has .* MiB free; the adaptation's checkpoints"):
        run_adapt(load_config(), str(tiny_source_ckpt), "unused", "unused", str(small_disk / "run"))
    assert earlier.read_text() == '{"miou": 42.0}'
    assert not list(small_disk.rglob("*.tmp-*"))


def test_disk_filling_up_mid_run_keeps_earlier_results(
    ray_session, tiny_benchmark, tiny_source_ckpt, tiny_scores, small_disk
):
    earlier = small_disk / "earlier" / "scores.parquet"
    earlier.parent.mkdir()
    shutil.copy(tiny_scores[0] / "scores.parquet", earlier)
    before = earlier.read_bytes()
    # An overwrite on a full disk: a clear error naming the file, the old version intact.
    _fill(small_disk)
    assert shutil.disk_usage(small_disk).free < 8192
    with pytest.raises(OSError, match=r"no space left on device writing .*earlier/scores"):
        storage.atomic_write_bytes(earlier, b"x" * 1_000_000)
    assert earlier.read_bytes() == before
    (small_disk / "filler").unlink()

    # The disk fills (another process, say) while maps are being written.
    out = small_disk / "scores"
    filled = threading.Event()

    def fill_once_maps_appear():
        while not filled.is_set():
            if list(out.rglob("*_label.png")):
                _fill(small_disk)
                filled.set()
            time.sleep(0.01)

    filler = threading.Thread(target=fill_once_maps_appear, daemon=True)
    filler.start()
    options = ScoringOptions(batch_size=2, actors=1, adabn=False)
    try:
        with pytest.raises(OSError, match=r"no space left on device writing .*scores/maps"):
            score_dataset(str(tiny_source_ckpt), str(tiny_benchmark), str(out), options)
    finally:
        filled.set()
        filler.join()
    assert shutil.disk_usage(small_disk).free < 8192  # the disk really was full
    assert earlier.read_bytes() == before
    assert not list(small_disk.rglob("*.tmp-*"))  # no half-written file left behind
    # Space freed, the same command finishes the job: every image exactly once.
    (small_disk / "filler").unlink()
    summary = score_dataset(str(tiny_source_ckpt), str(tiny_benchmark), str(out), options)
    ids = pq.read_table(out / "scores.parquet")["image_id"].to_pylist()
    assert summary["scored"] == len(ids) == len(set(ids)) == 24


def test_ctrl_c_during_an_adaptation_is_an_interruption(
    ray_session, tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    """Ray Train's own SIGINT handler aborts the run and raises SystemExit: the command
    must see an interruption (exit 130, how to resume), with no final model, and get its
    own Ctrl-C handling back."""
    scores, _ = tiny_scores
    cfg = load_config(
        None,
        {
            "adapt.iterations": 400,
            "adapt.batch_size": 2,
            "adapt.eval_every": 200,
            "adapt.checkpoint_every": 2,
            "adapt.threads": 1,
        },
    )
    run = tmp_path / "interrupted"
    sent = []

    earlier = {p.pid for p in _processes("RayTrainWorker")}

    def ctrl_c_once_training():  # once fit has started this run's worker
        deadline = time.time() + 300
        while time.time() < deadline:
            if {p.pid for p in _processes("RayTrainWorker")} - earlier:
                os.kill(os.getpid(), signal.SIGINT)
                sent.append(True)
                return
            time.sleep(0.1)

    before = signal.getsignal(signal.SIGINT)
    sender = threading.Thread(target=ctrl_c_once_training)
    sender.start()
    with pytest.raises(KeyboardInterrupt):
        run_adapt(cfg, str(tiny_source_ckpt), str(scores), str(tiny_benchmark), str(run))
    sender.join()
    assert sent
    assert not (run / "final.pt").exists()
    assert signal.getsignal(signal.SIGINT) is before


def test_a_diverged_adaptation_stops_without_retries(
    ray_session, tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    """Ray Train retries whatever a worker raises, and a run that diverged would diverge
    again from its last checkpoint: it stops at once, with the reason and no final model."""
    scores, _ = tiny_scores
    cfg = load_config(
        None,
        {
            "adapt.lr": 1e12,
            "adapt.iterations": 6,
            "adapt.batch_size": 2,
            "adapt.eval_every": 3,
            "adapt.checkpoint_every": 3,
            "adapt.threads": 1,
        },
    )
    run = tmp_path / "diverged"
    inputs = (str(tiny_source_ckpt), str(scores), str(tiny_benchmark), str(run))
    with pytest.raises(DivergedError, match=r"adaptation diverged (at|by) iteration \d"):
        run_adapt(cfg, *inputs, max_failures=2)
    assert not (run / "final.pt").exists()
