"""What one Tune trial runs, in its own process: a Ray Train adaptation with the sampled
values, then the report files describing the adapted model.

Kept apart from the sweep driver (``sfda_ray.dist.tune``) so that a trial process
imports neither MLflow nor the driver's bookkeeping: the driver logs every trial.
"""

from __future__ import annotations

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from sfda_ray import storage
from sfda_ray.config import Config, apply_overrides, from_dict
from sfda_ray.dist.runtime import on_gpus
from sfda_ray.dist.train import run_adapt
from sfda_ray.report import evaluation_files, selection_files


def trial_dir(out: str, trial_id: str) -> str:
    return storage.join(out, "trials", trial_id)


def _report_dir(out: str, trial_id: str) -> str:
    return storage.join(trial_dir(out, trial_id), "report")


def _write_files(directory: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        storage.atomic_write_bytes(storage.join(directory, name), data)


def report_files(out: str, trial_id: str) -> dict[str, bytes]:
    """The report files a trial has written so far (name -> bytes)."""
    directory = _report_dir(out, trial_id)
    if not storage.exists(directory):
        return {}
    return {
        storage.basename(path): storage.read_bytes(path)
        for path in storage.list_files(directory, "")
    }


def adapt_trial(
    params: dict, base: dict, checkpoint: str, scores: str, data: str, out: str
) -> None:
    """One trial: adapt with the sampled values, then describe the adapted model."""
    cfg = apply_overrides(from_dict(Config, base), params)
    trial_id = tune.get_context().get_trial_id()
    run_dir, reports = trial_dir(out, trial_id), _report_dir(out, trial_id)
    _write_files(reports, selection_files(scores, cfg))
    t = cfg.tune
    run_adapt(
        cfg,
        checkpoint,
        scores,
        data,
        run_dir,
        workers=t.workers_per_trial,
        gpus_per_worker=t.gpus_per_worker,
        cpus_per_worker=t.cpus_per_worker,
        callbacks=[TuneReportCallback()],
        placement_strategy=t.placement_strategy,
    )
    # At the adaptation's input size, on a GPU when the trial's workers had GPUs.
    final = storage.join(run_dir, "final.pt")
    size = cfg.data.input_size
    files = on_gpus(evaluation_files, t.gpus_per_worker, checkpoint, final, data, size)
    _write_files(reports, files)
