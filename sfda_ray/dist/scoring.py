"""Scoring target images on Ray Data: decode in tasks, score in an actor pool.

Layout of a scores directory ``OUT`` (local path or ``s3://``/``gs://``/``file://`` URI):

- ``OUT/parts/*.parquet``  rows as they stream in, each part written atomically; a killed
  run keeps every finished part and a rerun skips those images (same fingerprint:
  scoring model, size, MC-dropout passes, image), so a rerun with another size re-scores;
- ``OUT/maps/<image_id>_<fingerprint>_{label,conf,unc}.png``  8-bit pseudo-label,
  confidence and (MC-dropout) uncertainty maps at the model's input resolution; the maps
  of an image scored again with other settings are deleted once the new table is written;
- ``OUT/scores.parquet``  the consolidated table, one row per image, written last;
- ``OUT/summary.json``  counts, skip reasons, throughput and virtual-source quality.

The table, parts and maps are written by the driver (actors return PNG bytes). The
checkpoint, and ``OUT/source_adabn.pt`` (made in a GPU task when scoring uses GPUs), are
read by path on every node: on a multi-node cluster ``OUT`` and the checkpoint live on
shared storage (a bucket or a shared mount), as adaptation's reads of the maps need too.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import torch
from PIL import Image

from sfda_ray import storage
from sfda_ray.config import Config, PerfConfig, ScoreConfig, SelectConfig
from sfda_ray.data.catalog import open_dataset
from sfda_ray.data.decode import decode_batch
from sfda_ray.data.labels import CLASS_NAMES, IGNORE_INDEX
from sfda_ray.data.manifest import error_reason
from sfda_ray.data.scores import ADABN_FILE, MAP_SUFFIXES, map_name, scored_rows
from sfda_ray.data.transforms import normalize_batch
from sfda_ray.dist.runtime import on_gpus
from sfda_ray.evaluate import adabn_on_split
from sfda_ray.method.scoring import ImageScores, class_confidence_histogram, score_images
from sfda_ray.method.selection import select, selection_quality
from sfda_ray.metrics import confusion_matrix, iou_per_class
from sfda_ray.models.checkpoint import (
    file_fingerprint,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from sfda_ray.models.execution import Execution, resolve_device

log = logging.getLogger(__name__)

SCORES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("image_path", pa.string()),
        ("label_path", pa.string()),
        ("label_format", pa.string()),
        ("split", pa.string()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("fingerprint", pa.string()),
        ("score", pa.float32()),
        ("mean_confidence", pa.float32()),
        ("class_hist", pa.list_(pa.int64())),
        ("class_confidence", pa.list_(pa.float32())),
        ("class_conf_hist", pa.list_(pa.int64())),
        ("pseudo_label_path", pa.string()),
        ("confidence_path", pa.string()),
        ("uncertainty_path", pa.string()),
        ("mc_score", pa.float32()),
        # Evaluation only (target labels, when present); never read by adaptation.
        ("eval_miou", pa.float32()),
        ("eval_correct_hist", pa.list_(pa.int64())),
        ("eval_labelled_hist", pa.list_(pa.int64())),  # pixels with a label (not void)
        ("eval_error", pa.string()),
        ("node_id", pa.string()),
        ("error", pa.string()),
    ]
)


# The manifest columns of a scores row: known on the driver before scoring.
MANIFEST_COLUMNS = (
    "image_id",
    "image_path",
    "label_path",
    "label_format",
    "split",
    "height",
    "width",
    "fingerprint",
)
# PNG bytes an actor returns -> the scores column holding the written file, its suffix.
MAP_COLUMNS = {f"{suffix}_png": (column, suffix) for column, suffix in MAP_SUFFIXES.items()}
MAP_PATHS = list(MAP_SUFFIXES)
DRIVER_IO_THREADS = 16  # files the driver reads or writes at once (maps, parts)
# What a scoring actor returns per image: ids, numbers and the maps as PNG bytes.
ACTOR_SCHEMA = pa.schema(
    [
        f
        for f in SCORES_SCHEMA
        if f.name in ("image_id", "fingerprint")
        or (f.name not in MANIFEST_COLUMNS and f.name not in MAP_PATHS)
    ]
    + [pa.field(name, pa.binary()) for name in MAP_COLUMNS]
)


@dataclass
class ScoringOptions:
    """A ``ScoreConfig`` with what else scoring needs; the defaults are the config's."""

    size: tuple[int, int] | None = None  # model input (H, W); None keeps native size
    batch_size: int = ScoreConfig.batch_size
    actors: int | None = ScoreConfig.actors  # None: one per GPU, else the CPUs less one
    gpus_per_actor: float | None = ScoreConfig.gpus_per_actor  # None: 1 if there are GPUs
    threads_per_actor: int | None = ScoreConfig.threads_per_actor  # None: CPUs shared
    mc_passes: int = ScoreConfig.mc_passes
    # Score with the source model after AdaBN on the target split (see adabn_checkpoint).
    adabn: bool = ScoreConfig.adabn
    split: str = ScoreConfig.split
    domain: str = "target"
    perf: PerfConfig | None = None  # precision, memory format, compile (None: the defaults)
    # The selection the summary's quality figures describe.
    select: SelectConfig = field(default_factory=SelectConfig)
    num_classes: int = 19

    @classmethod
    def from_config(cls, cfg: Config, domain: str = "target") -> ScoringOptions:
        """Options from a ``Config`` (its ``score`` section and the input size)."""
        return cls(
            size=cfg.data.input_size,
            batch_size=cfg.score.batch_size,
            actors=cfg.score.actors,
            gpus_per_actor=cfg.score.gpus_per_actor,
            threads_per_actor=cfg.score.threads_per_actor,
            mc_passes=cfg.score.mc_passes,
            adabn=cfg.score.adabn,
            split=cfg.score.split,
            domain=domain,
            perf=cfg.perf,
            select=cfg.select,
            num_classes=cfg.model.num_classes,
        )


# Raised when what a row holds changes meaning, so older rows are scored again (2: the
# confidence bins line up with the thresholds, 2026-11-29).
SCORES_VERSION = 2


def _row_fingerprint(checkpoint_fp: str, opts: ScoringOptions, row: dict) -> str:
    """What decides an image's scores: the scoring model, the size it scores at, the
    MC-dropout passes, and the image (and the scores' version)."""
    size = "x".join(map(str, opts.size)) if opts.size else "native"
    key = f"v{SCORES_VERSION}|{checkpoint_fp}|{size}|mc{opts.mc_passes}|{_image_key(row)}"
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _image_key(row: dict) -> str:
    """An image as scoring knows it: id, path and dimensions (not its content)."""
    return f"{row['image_id']}|{row['image_path']}|{row['height']}x{row['width']}"


def encode_png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


class Scorer:
    """Ray Data actor: the source model, loaded once, scoring batches of decoded images."""

    def __init__(
        self,
        checkpoint: str,
        mc_passes: int,
        threads: int,
        perf: PerfConfig | None = None,
        device: str = "auto",
    ):
        torch.set_num_threads(threads)
        self.exe = Execution.resolve(perf, resolve_device(device))
        model, meta = load_model(checkpoint, num_classes=len(CLASS_NAMES))
        self.model = self.exe.compiled(self.exe.prepare(model).eval())
        self.normalization = meta["normalization"]
        self.num_classes = meta["num_classes"]
        self.mc_passes = mc_passes
        # PNG encoding of the maps (~50-140 ms a 512x1024 image here, most of a scorer's
        # time after the forward pass) releases the GIL: one map per thread. Only the
        # encoding: torch work in these threads would each start its own intra-op team.
        self.encoders = ThreadPoolExecutor(threads)
        # Outside Ray (a plain loop over the same code) there is no node to name.
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else None

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["image_id"])
        rows = [score_row_template(batch, i, self.node_id) for i in range(n)]
        by_shape: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            if row["error"] is None:
                by_shape.setdefault(batch["image"][i].shape, []).append(i)
        encoding = []  # (row, column, future PNG bytes)
        for idx in by_shape.values():
            images = torch.from_numpy(np.stack([batch["image"][i] for i in idx]))
            # uint8 over the bus, normalised on the device.
            x = normalize_batch(self.exe.to_device(images), self.normalization)
            with self.exe.autocast():
                scores = score_images(self.model, x, self.mc_passes)
            scores = scores.to("cpu")  # one copy of the batch, not one per image and map
            for j, i in enumerate(idx):
                gt = batch["label"][i]
                gt = gt if gt.size else None  # an empty map: no label to evaluate against
                row, maps = image_row(scores, j, self.num_classes, gt)
                rows[i].update(row)
                encoding += [(i, key, self.encoders.submit(encode_png, m)) for key, m in maps]
        for i, key, png in encoding:
            rows[i][key] = png.result()
        # An explicit schema: Ray's type inference would turn missing values into NaN.
        return pa.Table.from_pylist(rows, schema=ACTOR_SCHEMA)


def _text(value) -> str | None:
    """Strings survive Ray's block conversion; missing values may come back as NaN."""
    return value if isinstance(value, str) else None


def score_row_template(batch: dict, i: int, node_id: str) -> dict:
    row = dict.fromkeys(ACTOR_SCHEMA.names)
    row.update(
        image_id=batch["image_id"][i],
        fingerprint=batch["fingerprint"][i],
        node_id=node_id,
        error=_text(batch["error"][i]),
        eval_error=_text(batch["eval_error"][i]),
    )
    return row


def image_row(
    scores: ImageScores, j: int, num_classes: int, gt: np.ndarray | None
) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    """Table values of image ``j`` of a scored batch (on the CPU), and its maps to encode
    as PNG into the table's ``*_png`` columns."""
    label, conf = scores.label[j], scores.confidence[j]
    row = {
        "score": float(scores.score[j]),
        "mean_confidence": float(scores.mean_confidence[j]),
        "class_hist": scores.class_hist[j].tolist(),
        "class_confidence": scores.class_confidence[j].tolist(),
        "class_conf_hist": class_confidence_histogram(label, conf, num_classes).tolist(),
    }
    maps = [("label_png", label.numpy()), ("conf_png", conf.numpy())]
    if scores.uncertainty is not None:
        maps.append(("unc_png", scores.uncertainty[j].numpy()))
        row["mc_score"] = float(scores.mc_score[j])
    if gt is not None:
        row.update(evaluate_pseudo_label(label, conf, gt, num_classes))
    return row, maps


def evaluate_pseudo_label(
    label: torch.Tensor, conf: torch.Tensor, gt: np.ndarray, num_classes: int
) -> dict:
    """Per-image mIoU of the pseudo-label, and its correct and its labelled (not void)
    pixels per (class, confidence bin): accuracy is correct over labelled pixels."""
    gt_t = torch.from_numpy(gt.copy())  # Ray hands over read-only arrays
    if gt_t.shape != label.shape:  # maps are at model resolution; compare at that size
        gt_t = torch.nn.functional.interpolate(
            gt_t[None, None].float(), size=label.shape, mode="nearest"
        )[0, 0].to(torch.uint8)
    valid = gt_t != IGNORE_INDEX
    correct = (label == gt_t) & valid
    cm = confusion_matrix(label[valid], gt_t[valid], num_classes)
    iou = iou_per_class(cm)
    return {
        "eval_miou": float(np.nanmean(iou) * 100) if np.isfinite(iou).any() else None,
        "eval_correct_hist": class_confidence_histogram(
            label, conf, num_classes, mask=correct
        ).tolist(),
        "eval_labelled_hist": class_confidence_histogram(
            label, conf, num_classes, mask=valid
        ).tolist(),
    }


# --- driver -----------------------------------------------------------------------------


def adabn_checkpoint(
    checkpoint: str,
    manifest: pa.Table,
    out: str,
    size: tuple[int, int] | None,
    max_batches: int = 30,
    device: str = "cpu",
) -> str:
    """The source model with BatchNorm statistics re-estimated on target images.

    Still the source model's weights, still source-free; its pseudo-labels are far better
    than the raw source model's under an appearance shift, and the adaptation starts
    from the same BN statistics, so the virtual source agrees with its initial student.
    Cached as ``OUT/source_adabn.pt`` for this source checkpoint and recipe (the images,
    their size, the number of batches).
    """
    path = storage.join(out, ADABN_FILE)
    source_fp = file_fingerprint(checkpoint)
    listing = "\n".join(map(_image_key, manifest.to_pylist()))
    recipe = {
        "size": list(size) if size else None,
        "max_batches": max_batches,
        "images": hashlib.sha256(listing.encode()).hexdigest()[:20],
    }
    if storage.exists(path):
        cached = load_checkpoint(path)["meta"]
        if cached.get("adabn_of") == source_fp and cached.get("adabn_recipe") == recipe:
            return path
    model, meta = load_model(checkpoint, num_classes=len(CLASS_NAMES))
    adabn_on_split(model, manifest, meta["normalization"], size, max_batches, device)
    save_checkpoint(path, model, {**meta, "adabn_of": source_fp, "adabn_recipe": recipe})
    return path


def _default_actors(gpus_per_actor: float) -> int:
    resources = ray.cluster_resources()
    if gpus_per_actor > 0:
        return max(1, int(resources.get("GPU", 0) / gpus_per_actor))
    # Leave a CPU for the decode tasks on small clusters.
    return max(1, int(resources.get("CPU", 1)) - 1)


def _read_parts(out: str) -> pa.Table | None:
    paths = storage.list_files(storage.join(out, "parts"), ".parquet")
    if not paths:
        return None
    # Concurrently (in a bucket each part is a request), kept in the order written.
    with ThreadPoolExecutor(DRIVER_IO_THREADS) as pool:
        return pa.concat_tables(pool.map(lambda p: storage.read_parquet(p, SCORES_SCHEMA), paths))


def _latest_per_image(table: pa.Table) -> pa.Table:
    """One row per image id: the last one written (a rerun may re-score failed images)."""
    ids = table["image_id"].to_pylist()
    last = {image_id: i for i, image_id in enumerate(ids)}
    return table.take(sorted(last.values()))


def score_dataset(
    checkpoint: str,
    data: str,
    out: str,
    options: ScoringOptions | None = None,
    retry_failed: bool = True,
) -> dict:
    """Score every image of a target split; returns the run summary (also in summary.json).

    Images already in ``OUT/parts`` with the same fingerprint (scoring model, size,
    MC-dropout passes, image) are not scored again, so an interrupted run resumes where
    it stopped. Images that failed are tried again unless ``retry_failed`` is False.
    """
    opts = options or ScoringOptions()
    # The model is checked here, before any work, rather than in every actor.
    _, meta = load_model(checkpoint, num_classes=len(CLASS_NAMES))
    if opts.mc_passes > 1 and not meta["arch"]["options"].get("mc_dropout"):
        raise ValueError(
            f"score.mc_passes {opts.mc_passes} needs a model with dropout; {checkpoint} "
            "was built with mc_dropout 0 (train it with model.mc_dropout > 0)"
        )
    ref = open_dataset(data, opts.domain)
    ref.check_split(opts.split, "score.split")
    manifest = ref.split(opts.split)
    rows = manifest.select(
        ["image_id", "image_path", "label_path", "label_format", "split", "height", "width"]
    ).to_pylist()
    previous = _read_parts(out)  # None when nothing was scored (or OUT does not exist)
    # Each image's latest row decides: an earlier run with other settings is superseded.
    kept = None
    if previous is not None:
        kept = latest = _latest_per_image(previous)
        succeeded = pc.is_null(latest["error"])
        if retry_failed:
            kept = latest.filter(succeeded)
        elif n_failed := pc.sum(pc.invert(succeeded)).as_py():  # None for no rows
            log.info("not scoring again the %d image(s) that failed before", n_failed)
    # Space for the maps of the images not scored yet (and the AdaBN model), before any
    # work: by image id, as the fingerprints need the AdaBN model.
    scored_ids = set(kept["image_id"].to_pylist()) if kept is not None else set()
    unscored = [r for r in rows if r["image_id"] not in scored_ids]
    needs = _maps_bytes(unscored, opts)
    if opts.adabn and not storage.exists(storage.join(out, ADABN_FILE)):
        needs += storage.file_size(checkpoint)
    storage.prepare_output(out, needs, f"scoring {len(unscored)} images")
    source_checkpoint = checkpoint
    if opts.adabn:
        gpus = scoring_gpus(opts)
        checkpoint = on_gpus(adabn_checkpoint, gpus, checkpoint, manifest, out, opts.size)
    checkpoint_fp = file_fingerprint(checkpoint)
    for row in rows:
        row["fingerprint"] = _row_fingerprint(checkpoint_fp, opts, row)
    done = set(kept["fingerprint"].to_pylist()) if kept is not None else set()
    todo = [r for r in rows if r["fingerprint"] not in done]
    if len(todo) > len(unscored):  # scored before, with another model, size or passes
        storage.check_free_space(out, _maps_bytes(todo, opts), f"scoring {len(todo)} images")
    log.info(
        "scoring %d images (%d already scored) with %s",
        len(todo),
        len(rows) - len(todo),
        checkpoint,
    )

    t0 = time.perf_counter()
    writer = ScoreWriter(out, todo)
    if todo:
        _run_pipeline(checkpoint, out, opts, writer)
    elapsed = time.perf_counter() - t0

    by_id = {r["image_id"]: r for r in rows}
    parts = _read_parts(out)
    latest = _latest_per_image(parts)
    table = latest.filter(pc.is_in(latest["image_id"], pa.array(list(by_id))))
    storage.write_parquet(table, storage.join(out, "scores.parquet"))
    removed = remove_superseded_maps(out, parts, latest)
    summary = summarize_scores(table, len(todo), elapsed, opts.select, opts.num_classes)
    summary.update(
        {
            # Until the first scored batch reached the driver (workers starting, models
            # loading), and the rate after it: what a long job runs at.
            "startup_seconds": writer.startup_seconds(t0),
            "steady_images_per_s": writer.steady_images_per_s(),
            "source_checkpoint": str(source_checkpoint),
            "checkpoint": str(checkpoint),
            "checkpoint_fingerprint": checkpoint_fp,
            "data": str(data),
            "data_fingerprint": ref.fingerprint,
            "manifest_skipped": ref.skipped_in(opts.split),
            "split": opts.split,
            "superseded_maps_removed": removed,
        }
    )
    storage.atomic_write_bytes(
        storage.join(out, "summary.json"), (json.dumps(summary, indent=2) + "\n").encode()
    )
    return summary


def _map_names(table: pa.Table) -> set[str]:
    return {
        map_name(row["image_id"], row["fingerprint"], suffix)
        for row in table.select(["image_id", "fingerprint", *MAP_PATHS]).to_pylist()
        for column, suffix in MAP_COLUMNS.values()
        if row[column]
    }


def remove_superseded_maps(out: str, parts: pa.Table, latest: pa.Table) -> int:
    """Delete the maps under ``OUT/maps`` of rows that a later row of the same image
    replaced (scored again with another model, size or passes): nothing reads them again,
    as each image's latest row decides. Returns how many were deleted; one that cannot be
    is left with a warning.

    Files are matched by name under this ``OUT``, not by the paths in the rows, which
    name where ``OUT`` was when they were written."""
    maps = storage.join(out, "maps")
    superseded = _map_names(parts) - _map_names(latest)
    if not superseded:  # the usual case: no listing of every map
        return 0
    stale = superseded & set(storage.list_names(maps))
    removed = 0
    for name in sorted(stale):
        try:
            storage.remove(storage.join(maps, name))
            removed += 1
        except OSError as e:
            log.warning("could not delete the superseded map %s: %s", name, e)
    if removed:
        log.info("deleted %d maps of images since scored again with other settings", removed)
    return removed


# PNG bytes per map pixel, generously: synthetic maps take 0.05 (labels) and 0.4
# (confidences); real scenes' confidence maps are noisier.
_PNG_BYTES_PER_PIXEL = {"label": 0.3, "conf": 0.7, "unc": 0.7}


def _maps_bytes(rows: list[dict], opts: ScoringOptions) -> int:
    """About what the maps of ``rows`` will take on disk."""
    per_pixel = _PNG_BYTES_PER_PIXEL["label"] + _PNG_BYTES_PER_PIXEL["conf"]
    if opts.mc_passes > 1:
        per_pixel += _PNG_BYTES_PER_PIXEL["unc"]
    if opts.size:
        pixels = len(rows) * opts.size[0] * opts.size[1]
    else:
        pixels = sum((r["height"] or 0) * (r["width"] or 0) for r in rows)
    return int(pixels * per_pixel)


def scoring_gpus(opts: ScoringOptions) -> float:
    """GPUs per scoring actor (and for the AdaBN pass): 1 when the cluster has GPUs."""
    if opts.gpus_per_actor is not None:
        return opts.gpus_per_actor
    return 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def _run_pipeline(checkpoint: str, out: str, opts: ScoringOptions, writer: ScoreWriter) -> None:
    todo = list(writer.by_fp.values())
    gpus = scoring_gpus(opts)
    actors = opts.actors or _default_actors(gpus)
    cpus = int(ray.cluster_resources().get("CPU", 1))
    threads = opts.threads_per_actor or max(1, cpus // actors)
    with scoring_context():
        ds = _pipeline(todo, checkpoint, opts, gpus, actors, threads)
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.add(batch)
    writer.flush()


@contextlib.contextmanager
def scoring_context() -> Iterator[None]:
    """Ray Data settings of the scoring pipeline, for the datasets created inside: each
    dataset keeps the copy of the driver's ``DataContext`` made when it was created (a
    setting changed later does not reach it), and the driver's own is restored after."""
    ctx = ray.data.DataContext.get_current()
    saved = (ctx.wait_for_min_actors_s, ctx.max_consecutive_actor_init_deaths)
    saved_options = ctx.execution_options
    # Start every scorer before the first batch is dispatched: otherwise the first actor to
    # load its model takes all the work of a small job and the other nodes sit idle.
    ctx.wait_for_min_actors_s = max(ctx.wait_for_min_actors_s, 600)
    # A scorer lost while starting (node lost, process killed) is replaced, not fatal;
    # one lost later is restarted by Ray Data and its batches are retried.
    ctx.max_consecutive_actor_init_deaths = max(ctx.max_consecutive_actor_init_deaths, 3)
    # Dispatch to the least busy scorer, not to the one on the node holding the decoded
    # batch: scoring costs far more than moving a batch, and locality would keep every
    # batch on the node where the decode tasks ran.
    # Deprecated in Ray 2.60 (to be removed after January 2027) but still honoured.
    ctx.execution_options = copy.deepcopy(saved_options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.execution_options.actor_locality_enabled = False
    try:
        yield
    finally:
        ctx.wait_for_min_actors_s, ctx.max_consecutive_actor_init_deaths = saved
        ctx.execution_options = saved_options


def _pipeline(
    todo: list[dict], checkpoint: str, opts: ScoringOptions, gpus: float, actors: int, threads: int
) -> ray.data.Dataset:
    ds = ray.data.from_items(todo, override_num_blocks=max(1, len(todo) // opts.batch_size))
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs={"size": opts.size},
        batch_size=opts.batch_size,
        batch_format="numpy",
    )
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for the scheduling strategy yet; its warning
        # about the remote arg would be the job's noise, once per scoring.
        warnings.filterwarnings("ignore", "`ray_remote_args` is deprecated", DeprecationWarning)
        ds = ds.map_batches(
            Scorer,
            fn_constructor_kwargs={
                "checkpoint": checkpoint,
                "mc_passes": opts.mc_passes,
                "threads": threads,
                "perf": opts.perf,
                # Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone in an actor holding no GPU:
                # "auto" there would take a GPU of its node that it did not reserve.
                "device": "cuda" if gpus else "cpu",
            },
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=opts.batch_size,
            batch_format="numpy",
            num_gpus=gpus,
            # A CPU actor reserves one CPU however many torch threads it runs, so that
            # decode tasks always find a CPU to run on (an actor holding every CPU would
            # starve them).
            num_cpus=0 if gpus else 1,
            # One scorer per node before doubling up. SPREAD is also Ray Data's default,
            # but naming it (a deprecated remote arg in Ray 2.60) keeps decoding a separate
            # stage: with identical remote args Ray Data fuses decode_batch into the
            # scoring actors.
            scheduling_strategy="SPREAD",
        )
    return ds


class ScoreWriter:
    """The driver's side of scoring: each image's PNG maps written next to the table, its
    row appended to ``OUT/parts`` in atomically written parts of ``part_rows`` rows."""

    def __init__(self, out: str, todo: list[dict], part_rows: int = 64):
        self.out, self.part_rows = out, part_rows
        self.by_fp = {r["fingerprint"]: r for r in todo}
        self.pending: list[dict] = []
        self.rows = 0
        self.first: tuple[float, int] | None = None  # (time, rows) of the first batch
        self.last = 0.0

    def add(self, scored: pa.Table) -> None:
        """Rows of ``ACTOR_SCHEMA`` (what a ``Scorer`` returns)."""
        self.rows += scored.num_rows
        self.last = time.perf_counter()
        if self.first is None:
            self.first = (self.last, self.rows)
        records = [self._record(row) for row in scored.to_pylist()]
        # Concurrently: in a bucket each map is a request of tens of milliseconds, which
        # one at a time would make the driver, not the scorers, set the pace.
        with ThreadPoolExecutor(DRIVER_IO_THREADS) as pool:
            writes = [w for _, maps in records for w in maps]
            list(pool.map(lambda w: storage.atomic_write_bytes(*w), writes))
        self.pending.extend(r for r, _ in records)  # a row only once its maps are written
        if len(self.pending) >= self.part_rows:
            self.flush()

    def _record(self, row: dict) -> tuple[dict, list[tuple[str, bytes]]]:
        """The scores row of a scored image, and its maps to write (path, PNG bytes)."""
        source = self.by_fp[row["fingerprint"]]
        record = {k: source[k] for k in MANIFEST_COLUMNS}
        record.update({k: v for k, v in row.items() if k not in MAP_COLUMNS})
        writes = []
        for key, (column, suffix) in MAP_COLUMNS.items():
            record[column] = None
            if row[key] is not None:
                name = map_name(source["image_id"], source["fingerprint"], suffix)
                record[column] = storage.join(self.out, "maps", name)
                writes.append((record[column], row[key]))
        return record, writes

    def startup_seconds(self, start: float) -> float | None:
        return round(self.first[0] - start, 2) if self.first else None

    def steady_images_per_s(self) -> float | None:
        if self.first is None or self.last <= self.first[0]:
            return None
        return round((self.rows - self.first[1]) / (self.last - self.first[0]), 2)

    def flush(self) -> None:
        if not self.pending:
            return
        table = pa.Table.from_pylist(self.pending, schema=SCORES_SCHEMA)
        name = f"part-{time.time_ns()}-{uuid.uuid4().hex[:6]}.parquet"
        storage.write_parquet(table, storage.join(self.out, "parts", name))
        self.pending.clear()


def summarize_scores(
    table: pa.Table,
    scored_now: int,
    seconds: float,
    select_cfg: SelectConfig,
    num_classes: int = 19,
) -> dict:
    errors = [e for e in table["error"].to_pylist() if e is not None]
    ok = table.filter(pc.is_null(table["error"]))
    # Scored images whose label could not be read: left out of the quality figures only.
    label_errors = [e for e in ok["eval_error"].to_pylist() if e is not None]
    summary = {
        "images": table.num_rows,
        "scored": ok.num_rows,
        "skipped": len(errors),
        "skipped_reasons": dict(Counter(error_reason(e) for e in errors)),
        "label_errors": len(label_errors),
        "first_label_error": label_errors[0] if label_errors else None,
        "scored_this_run": scored_now,
        "seconds": round(seconds, 2),
        "images_per_s": round(scored_now / seconds, 2) if seconds > 0 else None,
        "nodes": dict(Counter(ok["node_id"].to_pylist())),
        "mean_score": float(pc.mean(ok["score"]).as_py() or 0.0) if ok.num_rows else None,
    }
    if ok.num_rows:
        # Quality of the configured selection (pseudo-labels against labels, where known).
        selection = select(ok, select_cfg, num_classes)
        quality = selection_quality(ok, selection, num_classes)
        summary.update({f"quality_{k}": v for k, v in quality.items()})
    return summary


def write_pictures(out: str, select_cfg: SelectConfig, num_classes: int = 19) -> list[str]:
    """Score histogram with the selection cut and a selected/rejected grid, as PNGs."""
    from sfda_ray.pictures import score_histogram, selection_grid

    ok = scored_rows(out)
    if ok.num_rows == 0:
        return []
    selection = select(ok, select_cfg, num_classes)
    paths = [storage.join(out, "score_histogram.png"), storage.join(out, "selection_grid.png")]
    storage.atomic_write_bytes(paths[0], score_histogram(ok, selection))
    storage.atomic_write_bytes(paths[1], selection_grid(ok, selection))
    return paths
