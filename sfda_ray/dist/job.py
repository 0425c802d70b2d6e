"""The main job: source model -> scores -> Ray Tune sweep of adaptations -> best model.

``experiments/tune_gta.py``, ``experiments/tune_synthia.py`` and ``sfda-ray tune`` all
run this. With no dataset given it runs on the built-in synthetic benchmark (generated
and cached under ``--out`` with its source model), so it works on a fresh CPU machine.
Every stage is cached or resumable: rerunning the same command continues where it
stopped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import yaml
from mlflow.exceptions import MlflowException

from sfda_ray import storage
from sfda_ray.cli import add_tune_args, check_inputs_exist, exit_code
from sfda_ray.config import (
    Config,
    load_config,
    load_search_space,
    parse_override,
)
from sfda_ray.data.catalog import is_synthetic, manifest_kind, open_dataset, read_dataset_yaml
from sfda_ray.data.manifest import read_manifest
from sfda_ray.data.readers import build_manifest
from sfda_ray.data.synthetic import BenchmarkSpec, ensure_benchmark
from sfda_ray.dist.runtime import check_placeable, init_ray, on_gpus
from sfda_ray.dist.scoring import ScoringOptions, adabn_checkpoint, score_dataset, write_pictures
from sfda_ray.dist.tracking import SweepTracker, check_tracking_store, default_tracking_uri
from sfda_ray.dist.tune import (
    SweepFailed,
    can_resume,
    check_sweep_settings,
    has_labelled_val,
    record_best,
    remove_finished_train_state,
    run_sweep,
    sweep_dir,
    sweep_metric,
)
from sfda_ray.evaluate import evaluate_checkpoint
from sfda_ray.models.checkpoint import file_fingerprint
from sfda_ray.train_source import train_source

log = logging.getLogger(__name__)
# Shipped in the package (package data), so an installed `sfda-ray tune` needs no checkout.
DEFAULT_SPACE = Path(__file__).with_name("tune_space.yaml")

# The synthetic run well within 15 minutes on a 2-core CPU: 4 trials of 30 iterations,
# two at a time, each worker on one torch thread; ASHA may stop a trial at iteration 15.
SYNTHETIC = {
    "adapt.iterations": 30,
    "adapt.eval_every": 15,
    "adapt.threads": 1,
    "tune.num_samples": 4,
    "tune.max_concurrent": 2,
    "tune.grace_period": 15,
}
# A couple of minutes through every stage (tests use it).
SMOKE = {
    "source.iterations": 60,
    "adapt.iterations": 10,
    "adapt.eval_every": 5,
    "adapt.threads": 1,
    "tune.num_samples": 2,
    "tune.max_concurrent": 2,
    "tune.grace_period": 10,
}
SMOKE_BENCH = BenchmarkSpec(
    height=64, width=128, source_train=64, source_val=16, target_train=64, target_val=24
)


def job_config(args: argparse.Namespace) -> Config:
    """The run's config: defaults, then for the synthetic run its preset, then
    ``--config``, then ``--smoke`` (a flag: it beats the YAML), ``--set`` and the flags."""
    flags = {
        "tune.num_samples": args.samples,
        "tune.max_concurrent": args.concurrent,
        "tune.workers_per_trial": args.workers,
        "tune.gpus_per_worker": args.gpus_per_worker,
        "tune.space": args.space,
    }
    overrides = {
        **(SMOKE if args.smoke else {}),
        **dict(map(parse_override, args.set)),
        **{k: v for k, v in flags.items() if v is not None},
    }
    cfg = load_config(args.config, overrides)
    if args.smoke or has_target_data(args, cfg):
        return cfg
    return load_config(args.config, overrides, preset=SYNTHETIC)


def write_dataset_spec(cfg: Config, out: str) -> str:
    """``OUT/dataset.yaml`` from the config's ``data:`` section (YAML, flags and --set
    applied), readable by every node when ``OUT`` is shared storage."""
    d = cfg.data

    def absolute(location: str | None) -> str | None:
        # Relative to the working directory, as flags are; OUT/dataset.yaml would otherwise
        # read it as relative to OUT.
        if location is None or storage.is_uri(location):
            return location
        return str(Path(location).expanduser().resolve())

    spec = {"kind": d.kind, "root": absolute(d.root), "manifest": absolute(d.manifest)}
    if d.eval_classes:
        spec["eval_classes"] = d.eval_classes
    return _write_spec(spec, out)


def apply_eval_classes(data: str, names: list[str], out: str) -> str:
    """The job's data scored over the config's ``data.eval_classes``, as
    ``OUT/dataset.yaml``; a dataset YAML that names other classes is refused rather than
    overridden."""
    if storage.has_suffix(data, ".yaml", ".yml"):
        spec = read_dataset_yaml(data)
        where = spec.pop("where")
        own = spec.get("eval_classes")
        if own is not None and list(own) != list(names):
            raise ValueError(
                f"data.eval_classes {names} in the config and {own} in {where} (--data) "
                "differ; set them in one place"
            )
    elif storage.has_suffix(data, ".parquet"):
        kind = manifest_kind(read_manifest(data, include_errors=True), data)
        spec = {"kind": kind, "manifest": data}
    else:
        open_dataset(data)  # only a synthetic benchmark is given as a folder
        spec = {"kind": "synthetic", "root": data}
    return _write_spec({**spec, "eval_classes": list(names)}, out)


def _write_spec(spec: dict, out: str) -> str:
    path = storage.join(out, "dataset.yaml")
    storage.atomic_write_bytes(path, yaml.safe_dump({"data": spec}).encode())
    return path


def pin_manifest(data: str, out: str) -> str:
    """A dataset YAML that names a root, scanned once into ``OUT/target_manifest.parquet``
    (kept for reruns with the same kind and root, which ``OUT/target_manifest.json``
    records) and given back as ``OUT/dataset.yaml`` naming that manifest, so no later
    stage (each trial plans and evaluates) walks the directory again. Any other ``data``
    is returned as it is."""
    if not storage.has_suffix(data, ".yaml", ".yml"):
        return data
    spec = read_dataset_yaml(data)
    spec.pop("where")
    if spec.get("manifest") or is_synthetic(spec["root"]):
        return data
    manifest = storage.join(out, "target_manifest.parquet")
    source_path = storage.join(out, "target_manifest.json")
    source = {"kind": spec["kind"], "root": spec["root"]}
    scanned = storage.exists(source_path) and json.loads(storage.read_bytes(source_path))
    if not (storage.exists(manifest) and scanned == source):
        if scanned:
            log.info("the target was %s, now %s: scanning again", scanned, source)
        counts = build_manifest(spec["kind"], spec["root"], manifest)
        storage.atomic_write_bytes(source_path, json.dumps(source).encode())
        log.info("scanned %s once into %s: %s", spec["root"], manifest, counts)
    return _write_spec({**spec, "manifest": manifest}, out)


def baseline_mious(checkpoint: str, scored: dict, data: str, scores: str, cfg: Config) -> dict:
    """Target-val mIoU of source-only and AdaBN, cached in ``SCORES/baselines.json`` for
    this checkpoint, scoring model, dataset, input size and evaluated classes.

    Measured as the trials are: at the adaptation's input size, on a GPU when the
    trials' workers use GPUs. AdaBN is the model that scored when scoring used it, else
    made here by the same recipe (``SCORES/source_adabn.pt``).
    """
    size = cfg.data.input_size
    key = {
        "checkpoint": file_fingerprint(checkpoint),
        "scored_with": scored["checkpoint_fingerprint"],
        "data": scored["data_fingerprint"],
        "size": list(size) if size else None,
        "eval_classes": list(open_dataset(data, "target").eval_subsets),
    }
    path = storage.join(scores, "baselines.json")
    if storage.exists(path):
        cached = json.loads(storage.read_bytes(path))
        if cached.get("key") == key and "adabn_miou" in cached["miou"]:
            return cached["miou"]
    gpus = cfg.tune.gpus_per_worker

    def miou_of(model: str) -> float:
        return on_gpus(evaluate_checkpoint, gpus, model, data, size=size)["miou"]

    adabn = scored["checkpoint"]
    if adabn == checkpoint:  # scored without AdaBN
        target_train = open_dataset(data, "target").split(cfg.score.split)
        adabn = on_gpus(adabn_checkpoint, gpus, checkpoint, target_train, scores, size)
    miou = {"source_only_miou": miou_of(checkpoint), "adabn_miou": miou_of(adabn)}
    storage.atomic_write_bytes(path, (json.dumps({"key": key, "miou": miou}) + "\n").encode())
    return miou


def check_scored_split(cfg: Config, data: str) -> None:
    """Before Ray starts: ``score.split`` names a split of the target, and not the val
    split the trials are evaluated on."""
    ref = open_dataset(data, "target")
    ref.check_split(cfg.score.split, "score.split")
    ref.split(cfg.score.split)  # some of its images are usable
    if cfg.score.split == "val" and ref.labelled("val") is not None:
        raise ValueError(
            "score.split: val is what the trials are evaluated on: they would train on the "
            "images they are measured on; score the train split"
        )


def has_target_data(args: argparse.Namespace, cfg: Config) -> bool:
    """Whether the job runs on a real target (``--data``, or ``data.root`` or
    ``data.manifest`` in the config), not on the synthetic benchmark."""
    return bool(args.data or cfg.data.root or cfg.data.manifest)


def default_out(args: argparse.Namespace, cfg: Config) -> str:
    """The task's output directory; on the synthetic benchmark, one per benchmark, since
    the source model, scores and sweep under it belong to that benchmark (a smoke run
    first and then the full run must not meet each other's files)."""
    if has_target_data(args, cfg):
        return args.default_out
    if args.smoke:
        return f"{args.default_out}_smoke"
    return args.default_out + (f"_seed{args.seed}" if args.seed else "")


def run_job(args: argparse.Namespace, task: str) -> dict:
    """Run the job for ``task`` (e.g. ``gta5_cityscapes``); returns ``summary.json``'s data."""
    cfg = job_config(args)
    # Every trial runs in a working directory of its own: no relative path reaches one.
    args.out = out = storage.absolute(args.out or default_out(args, cfg))
    args.checkpoint = args.checkpoint and storage.absolute(args.checkpoint)
    args.data = args.data and storage.absolute(args.data)
    real_target = has_target_data(args, cfg)
    if storage.is_uri(out) and not real_target:
        raise ValueError(
            f"--out {out}: the synthetic run generates its benchmark and trains its source "
            "model under --out, which must be a local directory"
        )
    if real_target != bool(args.checkpoint):
        raise ValueError(
            "a target dataset (--data, or data.root in --config) and --checkpoint go "
            "together (or neither, for the synthetic run)"
        )
    if args.seed and (real_target or args.smoke):
        fixed_by = "a real target replaces" if real_target else "--smoke fixes"
        raise ValueError(
            f"--seed {args.seed}: seeds the synthetic benchmark, which {fixed_by}; the "
            "adaptation's seed is adapt.seed (--set adapt.seed=N)"
        )
    if args.checkpoint:
        check_inputs_exist({"--checkpoint": args.checkpoint})
    # What can be checked without reading the data is, before anything is written.
    tracking_uri = default_tracking_uri(out)
    space = load_search_space(cfg.tune.space or DEFAULT_SPACE, cfg)
    storage.prepare_output(out)
    experiment = args.experiment or (f"sfda_ray/{task}" if real_target else "sfda_ray/synthetic")
    check_tracking_store(tracking_uri, experiment)
    if real_target and not args.data:
        args.data = write_dataset_spec(cfg, out)
    elif args.data and cfg.data.eval_classes:
        args.data = apply_eval_classes(args.data, cfg.data.eval_classes, out)
    if args.data:
        args.data = pin_manifest(str(args.data), out)
        sweep_metric(cfg, args.data)  # refused here rather than after scoring
    t0 = time.perf_counter()

    if args.data:
        data, checkpoint = args.data, args.checkpoint
    else:
        bench = Path(out) / ("synthetic_smoke" if args.smoke else f"synthetic_seed{args.seed}")
        ensure_benchmark(bench, SMOKE_BENCH if args.smoke else BenchmarkSpec(seed=args.seed))
        data, checkpoint = str(bench), str(Path(out) / "source.pt")
        if cfg.data.eval_classes:
            data = apply_eval_classes(data, cfg.data.eval_classes, out)
    check_scored_split(cfg, data)
    # A rerun that would resume another sweep is refused before it scores anything again.
    check_sweep_settings(cfg, space, checkpoint, data, out, tracking_uri, experiment)
    if not args.data:
        # Before Ray starts: its idle processes would only slow the training down.
        train_source(cfg, str(bench), checkpoint)  # a no-op once complete

    init_ray(args.address)
    t = cfg.tune
    trial_worker = {"CPU": t.cpus_per_worker, "GPU": t.gpus_per_worker}
    check_placeable("tune trials", trial_worker, t.workers_per_trial, t.placement_strategy)
    scores = storage.join(out, "scores")
    # A sweep being resumed selected without the images that failed to score: scoring
    # them now would change the selection under the trials it has run.
    resuming = can_resume(sweep_dir(out))
    options = ScoringOptions.from_config(cfg)
    scored = score_dataset(checkpoint, data, scores, options, retry_failed=not resuming)
    pictures = write_pictures(scores, cfg.select, cfg.model.num_classes)

    summary: dict = {"task": task, "data": data, "checkpoint": checkpoint}
    if has_labelled_val(data):
        summary.update(baseline_mious(checkpoint, scored, data, scores, cfg))

    sweep, tracker = run_sweep(cfg, checkpoint, scores, data, out, space, experiment, tracking_uri)
    try:
        best = next(tr for tr in sweep["trials"] if tr["trial_id"] == sweep["best_trial"])
        summary.update(
            {
                "best_miou": best["final_miou"],
                "best_config": sweep["best_config"],
                "best_checkpoint": sweep["best_checkpoint"],
                "best_trial": sweep["best_trial"],
                "metric": sweep["metric"],
                "proxy_miou_spearman": sweep["proxy_miou_spearman"],
                "proxy_miou_iteration": sweep["proxy_miou_iteration"],
                "trials": sweep["trials"],
                "mlflow_tracking_uri": tracking_uri,
                "mlflow_experiment": experiment,
                "mlflow_parent_run_id": sweep["mlflow_parent_run_id"],
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
        files = {storage.basename(p): storage.read_bytes(p) for p in pictures}
        save_and_record(out, summary, files, sweep, tracker)
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    if not args.keep_train_checkpoints:
        # Once the results are saved: what only a resume would read, and none will.
        remove_finished_train_state(out, sweep["trials"], cfg.adapt.iterations)
    _print_summary(summary, out)
    return summary


_STORE_SDKS = ("botocore", "boto3", "google", "azure")


def _store_failure(error: BaseException) -> bool:
    """A failure of the tracking store or of its artifact store: MLflow's own error, an
    HTTP client's or a filesystem's (both OSError), or an object-store SDK's."""
    package = type(error).__module__.split(".")[0]
    return isinstance(error, (MlflowException, OSError)) or package in _STORE_SDKS


def save_and_record(
    out: str, summary: dict, files: dict[str, bytes], sweep: dict, tracker: SweepTracker
) -> None:
    """``OUT/summary.json`` first, then the sweep's results in MLflow. A finished sweep's
    results are on disk whatever the tracking store does: an MLflow failure here (beyond
    the client's own retries) is a warning, and the parent run is closed by the next run."""
    files = {**files, "summary.json": (json.dumps(summary, indent=2) + "\n").encode()}
    path = storage.join(out, "summary.json")
    storage.atomic_write_bytes(path, files["summary.json"])
    baselines = {
        k: summary[k]
        for k in ("source_only_miou", "adabn_miou", "best_miou")
        if summary.get(k) is not None
    }
    try:
        record_best(tracker, sweep)
        tracker.log_results(tracker.parent_id, baselines)
        tracker.log_files(tracker.parent_id, files)
        tracker.finish()
    except Exception as e:  # noqa: BLE001 - sorted below
        if not _store_failure(e):
            raise
        log.warning(
            "MLflow: the sweep's results are in %s but not all in MLflow: %s",
            path,
            e,
            exc_info=True,
        )


def _print_summary(summary: dict, out: str) -> None:
    print(f"\nbest configuration ({summary['metric']}, trial {summary['best_trial']}):")
    for key, value in summary["best_config"].items():
        print(f"  {key:<20} {value:.4g}" if isinstance(value, float) else f"  {key:<20} {value}")
    if summary.get("best_miou") is not None:
        print("target val mIoU (%):")
        for key in ("source_only_miou", "adabn_miou", "best_miou"):
            if summary.get(key) is not None:
                print(f"  {key[:-5]:<12} {summary[key]:6.2f}")
    if summary.get("proxy_miou_spearman") is not None:
        print(
            "proxy vs mIoU rank correlation across trials at iteration "
            f"{summary['proxy_miou_iteration']}: {summary['proxy_miou_spearman']:.2f}"
        )
    print(f"best adapted model: {summary['best_checkpoint']}")
    print(f"summary: {storage.join(out, 'summary.json')} ({summary['seconds']} s)")
    uri = summary["mlflow_tracking_uri"]
    if uri.startswith("sqlite:"):
        print(f"open the runs:  mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
        print("                then http://127.0.0.1:5000 in a browser")
    else:
        print(f"open the runs: {uri} (experiment {summary['mlflow_experiment']})")


def main(task: str, default_out: str, description: str, argv: list[str] | None = None) -> int:
    """Entry point of the ``experiments/tune_*.py`` scripts."""
    parser = argparse.ArgumentParser(description=description)
    add_tune_args(parser, default_out)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return run_job_command(args, task, parser.prog)


def job_exit_code(prog: str, error: BaseException) -> int | None:
    """``exit_code`` for what the main job raised: also 1, with a one-paragraph error,
    when no trial completed; an interruption says how to resume."""
    if isinstance(error, SweepFailed):
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    return exit_code(prog, error, "interrupted; rerun the same command to resume")


def run_job_command(args: argparse.Namespace, task: str, prog: str) -> int:
    """``run_job`` as a command: exit code 2 for bad input, 1 when no trial completed or
    for another failure, 130 when interrupted (Ctrl-C), each told instead of a traceback
    (see ``job_exit_code``)."""
    try:
        run_job(args, task)
    except (Exception, KeyboardInterrupt) as e:
        code = job_exit_code(prog, e)
        if code is None:
            raise
        return code
    return 0
