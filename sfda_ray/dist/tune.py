"""The sweep on Ray Tune: each trial is a Ray Train adaptation run with sampled values.

The Tune trial (``sfda_ray.dist.trial``) is a small driver function that fits a
``TorchTrainer`` (Ray Train V2), so a trial can itself span several workers and nodes;
``TuneReportCallback`` forwards the workers' reports, and ASHA stops weak trials early
on them. Each trial writes its run under ``OUT/trials/<trial_id>/`` (checkpoints,
``final.pt``, report files), which the driver-side ``TrialLogger`` logs to MLflow.

Rerunning with the same ``OUT`` resumes the sweep (``Tuner.restore``): finished trials
are not run again, unfinished ones continue from their last Ray Train checkpoint.
"""

from __future__ import annotations

import fnmatch
import functools
import itertools
import json
import logging
import math
import os
import posixpath
import time
from collections import Counter
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.sample import Domain

from sfda_ray import storage
from sfda_ray.adaptation import check_discriminator_fits, scored_map_size
from sfda_ray.config import (
    Config,
    ConfigError,
    apply_overrides,
    changed_settings,
    describe_changes,
    result_identity,
    to_dict,
)
from sfda_ray.data.catalog import open_dataset
from sfda_ray.dist.runtime import release_stopped_train_runs
from sfda_ray.dist.tracking import (
    SweepTracker,
    TrialLogger,
    describe_error,
    flatten,
    git_commit,
)
from sfda_ray.dist.train import TRAIN_STATE_DIR
from sfda_ray.dist.trial import adapt_trial, report_files, trial_dir
from sfda_ray.method.selection import spearman
from sfda_ray.models.checkpoint import file_fingerprint

log = logging.getLogger(__name__)
SWEEP_NAME = "sweep"
SWEEP_FILE = "sweep.json"  # in OUT: the settings a resume must share
# Tune's experiment state files (TuneController.CKPT_FILE_TMPL).
EXPERIMENT_STATE = "experiment_state-*.json"
TRIAL_DRIVER_MEMORY = 512 * 2**20
_CAUSES_SHOWN = 5  # distinct trial errors listed when no trial completed


class SweepFailed(RuntimeError):
    """No trial of a sweep completed; the message says what the trials raised."""


def tune_domain(kind: str, args: list) -> Domain | dict:
    """A Ray Tune sampling domain from a validated search-space entry."""
    if kind == "grid":
        return tune.grid_search(args)
    return {
        "uniform": tune.uniform,
        "loguniform": tune.loguniform,
        "randint": tune.randint,
        "choice": lambda *values: tune.choice(list(values)),
    }[kind](*args)


def has_labelled_val(data: str) -> bool:
    """Whether any target val image has a label (those without one are left out of
    evaluation, with a warning)."""
    return open_dataset(data, "target").labelled("val") is not None


def _max_concurrent(cfg: Config) -> int:
    t = cfg.tune
    if t.max_concurrent:
        return t.max_concurrent
    resources = ray.cluster_resources()
    if t.gpus_per_worker:
        fit = resources.get("GPU", 0) / (t.gpus_per_worker * t.workers_per_trial)
    else:
        fit = resources.get("CPU", 1) / (t.cpus_per_worker * t.workers_per_trial)
    return max(1, int(fit))


def run_sweep(
    cfg: Config,
    checkpoint: str,
    scores: str,
    data: str,
    out: str,
    space: dict[str, tuple[str, list]],
    experiment: str,
    tracking_uri: str,
) -> tuple[dict, SweepTracker]:
    """Run (or resume) the sweep; returns its summary (best trial, every trial) and the
    tracker, whose parent run stays open for the caller's last records."""
    metric, mode = sweep_metric(cfg, data)
    base = _sweep_config(cfg)
    # What every trial would refuse is refused here, once, before any trial starts.
    if _every_trial_adversarial(base, space) and (map_size := scored_map_size(scores)):
        check_discriminator_fits(map_size)
    storage_path = storage.join(out, "tune")
    sweep_path = sweep_dir(out)
    identity = sweep_identity(
        base, space, metric, checkpoint, scores, data, tracking_uri, experiment
    )
    resume = can_resume(sweep_path)
    if resume:
        _refuse_other_settings(out, identity)
    else:
        storage.atomic_write_bytes(
            storage.join(out, SWEEP_FILE), (json.dumps(identity, indent=2) + "\n").encode()
        )

    tags = {
        "git_commit": git_commit(),
        "data_fingerprint": identity["data"],
        "checkpoint_fingerprint": identity["checkpoint"],
        "sfda.metric": metric,
    }
    fixed = {k: v for k, v in flatten(to_dict(base)).items() if k not in space}
    tracker = SweepTracker(tracking_uri, experiment, sweep_path, str(out))
    tracker.start(f"sweep {os.path.basename(os.path.abspath(str(out)))}", fixed, tags)

    trainable = tune.with_parameters(
        adapt_trial, base=to_dict(base), checkpoint=checkpoint, scores=scores, data=data, out=out
    )
    # The trial function only drives its Ray Train workers, which hold the CPUs and GPUs:
    # it asks for memory alone (Tune refuses an empty request), so it never blocks them.
    trainable = tune.with_resources(trainable, {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    # Ctrl-C raises KeyboardInterrupt here, as anywhere else in the job. Tune's own handler
    # would stop the sweep and return from fit() as if it had finished. (A resume then
    # starts from Tune's last periodic snapshot of the sweep, seconds old.)
    sigint_handler = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        if resume:
            log.info("resuming the sweep at %s", sweep_path)
            tuner = tune.Tuner.restore(sweep_path, trainable, resume_errored=True)
        else:
            tuner = _new_tuner(
                base, space, metric, mode, trainable, storage_path, tracker, fixed, out
            )
        grid = tuner.fit()
        return _summarise(grid, out, space, metric, mode, sweep_path, tracker), tracker
    except SweepFailed:
        raise  # the parent run is closed, with the reason
    except KeyboardInterrupt:
        tracker.finish("KILLED")
        raise
    except BaseException:
        tracker.finish("FAILED")
        raise
    finally:
        if sigint_handler is None:
            del os.environ["TUNE_DISABLE_SIGINT_HANDLER"]
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = sigint_handler


def _sweep_config(cfg: Config) -> Config:
    """The config every trial starts from: every report must carry the metric ASHA ranks
    on, so each evaluation is checkpointed."""
    return apply_overrides(cfg, {"adapt.checkpoint_every": cfg.adapt.eval_every})


def check_sweep_settings(
    cfg: Config,
    space: dict[str, tuple[str, list]],
    checkpoint: str,
    data: str,
    out: str,
    tracking_uri: str,
    experiment: str,
) -> None:
    """Before scoring: a rerun into ``out``, whose sweep it would resume, is refused when
    its settings differ, rather than after scoring the target again with them. The
    scores are compared once scored (``run_sweep``); the checkpoint, when it exists (the
    synthetic run trains its own)."""
    if not can_resume(sweep_dir(out)):
        return
    metric, _ = sweep_metric(cfg, data)
    known = checkpoint if storage.exists(checkpoint) else None
    _refuse_other_settings(
        out,
        sweep_identity(
            _sweep_config(cfg), space, metric, known, None, data, tracking_uri, experiment
        ),
    )


def _refuse_other_settings(out: str, identity: dict) -> None:
    recorded = json.loads(storage.read_bytes(storage.join(out, SWEEP_FILE)))
    tune = recorded.get("config", {}).get("tune", {})
    if tune.get("metric") == "auto":  # recorded before what `auto` resolved to was
        tune["metric"] = identity["config"]["tune"]["metric"]
    changed = changed_settings(recorded, identity)
    # The space's keys are the user's choice, not a version's: one added or removed is a
    # change (Tune would restore the old space).
    added_or_removed = recorded.get("space", {}).keys() ^ identity["space"].keys()
    changed += sorted(f"space.{key}" for key in added_or_removed)
    if changed:
        raise ConfigError(
            f"{out} holds a sweep with other settings ({describe_changes(changed)} differ): "
            "use another output directory, or delete "
            f"{sweep_dir(out)} to start over"
        )


class ReleaseStoppedTrainRuns(tune.Callback):
    """Every few seconds of the sweep, frees the CPUs and GPUs the Ray Train runs of
    stopped trials still hold where Ray Train's own cleaner did not
    (``runtime.release_stopped_train_runs``): otherwise the next trial waits for them
    forever."""

    def __init__(self, every_s: float = 5.0) -> None:
        self.every_s = every_s
        self._last = 0.0  # wall-clock time: a resumed sweep unpickles it in a new process

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        if time.time() - self._last < self.every_s:
            return
        self._last = time.time()
        try:
            if released := release_stopped_train_runs():
                log.info("freed the workers' placement groups of %d stopped trial(s)", released)
        except Exception as e:  # not worth stopping the sweep for
            log.warning("could not free what stopped trials hold: %s", describe_error(e))


def sweep_dir(out: str) -> str:
    """Tune's state of the sweep under ``out``."""
    return storage.join(out, "tune", SWEEP_NAME)


def can_resume(sweep_path: str) -> bool:
    """Whether Tune can restore the sweep: it writes ``tuner.pkl`` when the Tuner is made
    but its experiment state only at the first step, and a restore without that state
    fails. A sweep stopped between the two (a Ctrl-C at once) starts again."""
    if not tune.Tuner.can_restore(sweep_path):
        return False
    fs, root = storage.resolve(sweep_path)
    infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    return any(fnmatch.fnmatch(posixpath.basename(i.path), EXPERIMENT_STATE) for i in infos)


def sweep_identity(
    base: Config,
    space: dict[str, tuple[str, list]],
    metric: str,
    checkpoint: str | None,
    scores: str | None,
    data: str,
    tracking_uri: str,
    experiment: str,
) -> dict:
    """What a resumed sweep must share with the one it resumes (``OUT/sweep.json``); a
    ``checkpoint`` or ``scores`` of None is left out (not yet made)."""
    config = result_identity(base)
    del config["tune"]["space"]  # the space by content, not by how its path is spelled
    # What `auto` resolved to: Tune restores its scheduler ranking on that metric.
    config["tune"]["metric"] = metric
    identity = {
        "space": {k: [kind, args] for k, (kind, args) in space.items()},
        "config": config,
        "data": open_dataset(data, "target").fingerprint,
        # A resumed sweep logs through the callbacks it was started with (Tune restores
        # them), so it must log to the same place.
        "mlflow": {"tracking_uri": tracking_uri, "experiment": experiment},
    }
    if checkpoint is not None:
        identity["checkpoint"] = file_fingerprint(checkpoint)
    if scores is not None:
        summary = json.loads(storage.read_bytes(storage.join(scores, "summary.json")))
        identity["scores"] = summary.get("checkpoint_fingerprint")
    return identity


def sweep_metric(cfg: Config, data: str) -> tuple[str, str]:
    """The metric trials are ranked on and its mode: ``tune.metric``, where ``auto`` is
    val_miou when the target has labelled val images and the label-free proxy otherwise."""
    labelled = has_labelled_val(data)
    metric = cfg.tune.metric
    if metric == "auto":
        metric = "val_miou" if labelled else "proxy"
    elif metric == "val_miou" and not labelled:
        raise ConfigError(
            "tune.metric val_miou needs a labelled target val split, which this data has not; "
            "use proxy (or auto)"
        )
    return metric, "max" if metric == "val_miou" else "min"


def best_trial(trials: list[dict], metric: str, mode: str) -> dict | None:
    """The completed trial with the best ``metric`` (the first of equals), None when no
    trial completed with one. A non-finite value (a run that blew up) never ranks: Python
    orders nothing against NaN, so ``max`` could return it. Such a trial gets an error."""
    ranked = []
    for tr in trials:
        value = tr[metric]
        if not tr["completed"] or value is None:
            continue
        if math.isfinite(value):
            ranked.append(tr)
        elif tr["error"] is None:
            tr["error"] = (
                f"{metric} is {value}: the run diverged, or its evaluation had no pixel of "
                "the evaluated classes"
            )
    return (max if mode == "max" else min)(ranked, key=lambda tr: tr[metric], default=None)


def _summarise(
    grid, out: str, space: dict, metric: str, mode: str, sweep_path: str, tracker: SweepTracker
) -> dict:
    """The sweep's summary from Tune's results (a failed sweep closes its parent run)."""
    parent = tracker.parent_id
    trials, histories = [], []
    for result in grid:
        if result.metrics is None or "trial_id" not in result.metrics:
            continue
        trial_id = result.metrics["trial_id"]
        final = storage.join(trial_dir(out, trial_id), "final.pt")
        report = report_files(out, trial_id)
        evaluation = json.loads(report["evaluation.json"]) if "evaluation.json" in report else {}
        trials.append(
            {
                "trial_id": trial_id,
                "config": {k: result.config[k] for k in space},
                "iteration": result.metrics.get("iteration"),
                "completed": storage.exists(final) and result.error is None,
                "val_miou": result.metrics.get("val_miou"),
                "proxy": result.metrics.get("proxy"),
                "final_miou": evaluation.get("miou"),
                "train_nodes": result.metrics.get("train_nodes"),
                "checkpoint": final if storage.exists(final) else None,
                "error": describe_error(result.error),
            }
        )
        histories.append(_reports(result))
    best = best_trial(trials, metric, mode)
    if best is None:
        message = _failure_message(sweep_path, trials)
        tracker.finish("FAILED", error=message)
        raise SweepFailed(message)
    rho, rho_iteration = proxy_rank_correlation(histories)
    summary = {
        "metric": metric,
        "mode": mode,
        "best_trial": best["trial_id"],
        "best_config": best["config"],
        "best_checkpoint": best["checkpoint"],
        "best_metric": best[metric],
        "trials": trials,
        "proxy_miou_spearman": rho,
        "proxy_miou_iteration": rho_iteration,
        "sweep_path": sweep_path,
        "mlflow_parent_run_id": parent,
    }
    return summary


def remove_finished_train_state(out: str, trials: list[dict], iterations: int) -> tuple[int, int]:
    """Deletes the Ray Train runs (checkpoints: student, teacher, discriminator and
    optimizer state, several times ``final.pt``) of the trials that no resume runs again:
    those that completed (their model is ``final.pt``) and those ASHA stopped early. A
    failed trial's run stays, for the rerun that retries it from its last checkpoint; so
    does that of a trial stopped at its last iteration without a ``final.pt`` (by the
    plain ASHA of a sweep started before ``RungsOnlyASHA``): it holds the trained weights.
    Returns the trials whose run was deleted and the bytes freed; one that cannot be
    deleted is left with a warning."""
    removed = freed = 0
    for trial in trials:
        last = trial["config"].get("adapt.iterations", iterations)
        if trial["error"] is not None or not (
            trial["completed"] or (trial["iteration"] or 0) < last
        ):
            continue
        run = storage.join(trial_dir(out, trial["trial_id"]), TRAIN_STATE_DIR)
        try:
            size = storage.remove_tree(run)
        except OSError as e:  # the results are saved: not worth failing the job for
            log.warning("could not delete %s: %s", run, e)
            continue
        removed, freed = removed + (size > 0), freed + size
    if removed:
        log.info(
            "deleted the Ray Train checkpoints of %d finished trial(s), %.2f GB (a completed "
            "trial keeps final.pt; --keep-train-checkpoints keeps them)",
            removed,
            freed / 1e9,
        )
    return removed, freed


def proxy_rank_correlation(histories: list[list[dict]]) -> tuple[float | None, int | None]:
    """Rank correlation of (lower) proxy and mIoU across trials, and the iteration it is
    taken at: does the label-free proxy pick the trial the labels would? ``histories``
    holds each trial's reports (``iteration``, ``val_miou``, ``proxy``). The trials are
    compared at one iteration, the last at which at least 3 reported both as numbers: ASHA
    stops trials at different iterations, and a stopped trial's early mIoU is not
    comparable with a finished one's. (None, None) when no iteration has 3."""
    at: dict[int, list[tuple[float, float]]] = {}
    for history in histories:
        # A resumed trial may report an iteration again: its latest report counts, once.
        latest = {int(report["iteration"]): report for report in history}
        for iteration, report in latest.items():
            miou, proxy = report.get("val_miou"), report.get("proxy")
            if all(v is not None and math.isfinite(v) for v in (miou, proxy)):
                at.setdefault(iteration, []).append((miou, proxy))
    common = [it for it, pairs in at.items() if len(pairs) >= 3]
    if not common:
        return None, None
    iteration = max(common)
    miou, proxy = np.array(at[iteration]).T
    rho = spearman(-proxy, miou)
    return (None, None) if math.isnan(rho) else (rho, iteration)


def _reports(result) -> list[dict]:
    """A trial's reports (iteration, val_miou, proxy), read back from Tune's results."""
    frame = result.metrics_dataframe
    if frame is None or "iteration" not in frame:
        return []
    columns = [c for c in ("iteration", "val_miou", "proxy") if c in frame]
    return frame[columns].to_dict("records")


def record_best(tracker: SweepTracker, sweep: dict) -> None:
    """The sweep's result in MLflow: the best trial's model in its run, and the parent's
    tags and metrics pointing at it."""
    parent, best_id, metric = tracker.parent_id, sweep["best_trial"], sweep["metric"]
    best_run = tracker.child(best_id, best_id, {}, tracker.tags, reopen=False)
    # Uploaded once: a rerun of the finished sweep finds the model in place (whole: an
    # upload cut short, by a kill mid-copy, is made again).
    size = storage.file_size(sweep["best_checkpoint"])
    if not any(
        a.path == "model/final.pt" and a.file_size in (size, None)  # None: not told
        for a in tracker.client.list_artifacts(best_run, "model")
    ):
        model = storage.read_bytes(sweep["best_checkpoint"])
        tracker.log_files(best_run, {"final.pt": model}, "model")
    tracker.client.set_tag(parent, "sfda.best_trial", best_id)
    tracker.client.set_tag(parent, "sfda.best_run_id", best_run)
    metrics = {"best_" + metric: sweep["best_metric"]}
    if sweep["proxy_miou_spearman"] is not None:
        metrics["proxy_miou_spearman"] = sweep["proxy_miou_spearman"]
        metrics["proxy_miou_iteration"] = sweep["proxy_miou_iteration"]
    tracker.log_results(parent, metrics)


def _every_trial_adversarial(base: Config, space: dict[str, tuple[str, list]]) -> bool:
    """Whether every configuration the space can produce trains the discriminator."""
    choices = []
    for key in ("adapt.method", "adapt.lambda_adv"):
        if key in space:
            kind, args = space[key]
            if kind in ("uniform", "loguniform"):  # a continuous draw is never an endpoint
                args = [(args[0] + args[1]) / 2]
            elif kind == "randint":  # [low, high): low is the smallest weight drawn
                args = args[:1]
            choices.append([(key, value) for value in args])
    return all(
        apply_overrides(base, dict(point)).adapt.adversarial
        for point in itertools.product(*choices)
    )


def _failure_message(sweep_path: str, trials: list[dict]) -> str:
    lines = [f"no trial of the sweep completed ({len(trials)} trials):"]
    errors = Counter(tr["error"] for tr in trials if tr["error"])
    shown = errors.most_common(_CAUSES_SHOWN)
    rows = [(n, error) for error, n in shown]
    others = len(errors) - len(shown)
    if others:
        rows.append((sum(errors.values()) - sum(n for _, n in shown), f"{others} other errors"))
    unfinished = sum(1 for tr in trials if not tr["error"])
    if unfinished:
        rows.append((unfinished, "stopped, no error"))
    lines += [f"  {n} trial{'s' if n > 1 else ''}: {what}" for n, what in rows]
    lines.append(f"tracebacks: error.txt in each trial's directory under {sweep_path}")
    lines.append(
        "the same command retries these trials; to change a setting, delete that directory "
        "first (the scores are kept) or use another output directory"
    )
    return "\n".join(lines)


class RungsOnlyASHA(ASHAScheduler):
    """ASHA that decides at its rungs alone: a report past the last rung (the trial's
    final one) always continues. Plain ASHA compares such a report with the top rung's
    records when the trial has none there, which happens after a resume (Tune does not
    save the rungs): it could stop a fully trained trial before it wrote its model."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get(self._time_attr, 0) > self._max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def trial_scheduler(cfg: Config) -> TrialScheduler:
    """ASHA with rungs at ``grace_period`` × ``reduction_factor``^k, the last before the
    final report: a trial that survives them runs to its end and writes its model (ASHA
    would otherwise stop it at its last report). FIFO when asked for, or when the first
    rung is past the last (said, as ``tune.scheduler asha`` then stops nothing)."""
    t, a = cfg.tune, cfg.adapt
    last_rung = a.iterations - a.eval_every
    grace = t.grace_period or max(1, a.iterations // 3)
    if t.scheduler == "fifo":
        return FIFOScheduler()
    if grace > last_rung:
        log.info(
            "tune.grace_period %d is past ASHA's last rung, iteration %d (adapt.iterations %d "
            "- adapt.eval_every %d): no trial is stopped early, each runs to its end",
            grace,
            last_rung,
            a.iterations,
            a.eval_every,
        )
        return FIFOScheduler()
    return RungsOnlyASHA(
        time_attr="iteration",
        max_t=last_rung,
        grace_period=grace,
        reduction_factor=t.reduction_factor,
        stop_last_trials=False,
    )


def _new_tuner(base, space, metric, mode, trainable, storage_path, tracker, fixed, out):
    t, a = base.tune, base.adapt
    configured = to_dict(base)
    points = []
    if t.include_configured and all(kind != "grid" for kind, _ in space.values()):
        point = {}
        for key in space:
            node = configured
            for part in key.split("."):
                node = node[part]
            point[key] = node
        points.append(point)
    scheduler = trial_scheduler(base)
    logger = TrialLogger(tracker, fixed, functools.partial(report_files, out), a.iterations)
    return tune.Tuner(
        trainable,
        param_space={k: tune_domain(kind, args) for k, (kind, args) in space.items()},
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            # Tune ignores max_concurrent_trials for a generator: the limit goes here.
            search_alg=BasicVariantGenerator(
                points_to_evaluate=points,
                random_state=t.seed,
                max_concurrent=_max_concurrent(base),
            ),
            scheduler=scheduler,
            num_samples=t.num_samples,
        ),
        run_config=tune.RunConfig(
            name=SWEEP_NAME,
            storage_path=storage_path,
            callbacks=[logger, ReleaseStoppedTrainRuns()],
            failure_config=tune.FailureConfig(max_failures=t.max_failures),
        ),
    )
