"""Adaptation on Ray Train: the plain loop of ``sfda_ray.adaptation`` in a TorchTrainer.

DDP over N workers (NCCL on GPU, gloo on CPU), each worker sampling its own shard;
checkpoints every K iterations into the run's storage (local path or ``s3://``);
a rerun with the same ``out`` resumes from the latest checkpoint, and
``FailureConfig(max_failures)`` restarts a failed worker group from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import tempfile
import threading
from dataclasses import asdict

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from sfda_ray import storage
from sfda_ray.adaptation import (
    AdaptPlan,
    load_state,
    make_plan,
    run_adaptation,
    save_adapted,
    save_state,
)
from sfda_ray.config import (
    Config,
    ConfigError,
    changed_settings,
    describe_changes,
    from_dict,
    result_identity,
    to_dict,
)
from sfda_ray.dist.runtime import check_placeable
from sfda_ray.models.checkpoint import DivergedError, file_fingerprint, load_model

log = logging.getLogger(__name__)
STATE_FILE = "state.pt"
DIVERGED_FILE = "diverged.txt"  # in OUT: why the run stopped, for run_adapt to raise
RUN_FILE = "adapt.json"
TRAIN_STATE_DIR = "ray"  # in OUT: Ray Train's run, its checkpoints among it
# Keys that change how a run goes or reports, not what it computes: a resumed run may
# change them (evaluation never changes training's draws; the data is in the plan's
# digest by fingerprint, wherever it lies).
_NOT_IDENTITY = {
    "adapt": ("eval_every", "checkpoint_every", "log_every", "threads"),
    "data": ("root", "manifest"),
}


def run_identity(cfg: Config, plan: AdaptPlan, workers: int) -> dict:
    """What decides an adaptation's result: its config keys (not those that only change how
    it runs or reports), its worker count (each draws a batch of its own shard: the global
    batch and the data streams a resume reads on from) and a digest of its plan
    (selection, start checkpoint, data)."""
    config = result_identity(cfg)
    identity: dict = {
        f"{section}.{key}": value
        for section in ("model", "data", "select", "adapt")
        for key, value in config[section].items()
        if key not in _NOT_IDENTITY.get(section, ())
    }
    # The plan by content, not by how its paths are spelled (./src.pt and src.pt are one).
    content = {
        "start_checkpoint": file_fingerprint(plan.checkpoint),
        "bn_adapted": plan.bn_adapted,
        "fingerprints": plan.fingerprints,  # the source checkpoint's and the data's
        "virtual": [r["image_id"] for r in plan.virtual_rows],
        "target": [r["image_id"] for r in plan.target_rows],
        "eval": [r["image_id"] for r in plan.eval_rows + plan.proxy_rows],
        **{
            k: getattr(plan, k)
            for k in (
                "thresholds",
                "prior_target",
                "class_weight",
                "virtual_sampling_weights",
                "map_size",
                "eval_classes",
            )
        },
    }
    plan_json = json.dumps(content, sort_keys=True, default=str)
    identity["workers"] = workers
    identity["plan"] = hashlib.sha256(plan_json.encode()).hexdigest()[:16]
    return identity


def _check_same_run(out: str, storage_path: str, identity: dict) -> None:
    """A rerun into ``out`` resumes the Ray Train checkpoint there: only the same run may."""
    path = storage.join(out, RUN_FILE)
    if storage.exists(path) and storage.list_files(storage_path, STATE_FILE):
        recorded = json.loads(storage.read_bytes(path))
        if changed := changed_settings(recorded, identity):
            plan = "plan (selection, start checkpoint or data)"
            what = describe_changes([plan if k == "plan" else k for k in changed])
            raise ConfigError(
                f"{out} holds an adaptation run with other settings ({what} differ), which "
                f"a rerun would resume: use another output directory, or delete {out}"
            )
    storage.atomic_write_bytes(path, (json.dumps(identity, indent=2) + "\n").encode())


def reportable(metrics: dict) -> dict[str, float]:
    """The numbers of a report, a missing one (``val_miou`` of an evaluation without a
    pixel of the evaluated classes) as NaN: Tune stops the whole sweep at a result
    without the metric it ranks on, and ranks no trial on NaN."""
    return {
        k: math.nan if v is None else v
        for k, v in metrics.items()
        if v is None or isinstance(v, (int, float))
    }


class RayTrainEnv:
    """``TrainEnv`` of a Ray Train worker."""

    def __init__(self) -> None:
        ctx = ray.train.get_context()
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        # Distinct Ray nodes the worker group spans (by node id: nodes may share an IP).
        node = ray.get_runtime_context().get_node_id()
        nodes = [node]
        if self.world_size > 1 and torch.distributed.is_initialized():
            nodes = [None] * self.world_size
            torch.distributed.all_gather_object(nodes, node)
        self.nodes = len(set(nodes))

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world_size == 1:
            return model.to(self.device)
        return ray.train.torch.prepare_model(model)

    def report(self, metrics: dict, state: dict | None) -> None:
        flat = reportable(metrics)  # pooled over the workers by the loop
        flat["train_workers"], flat["train_nodes"] = self.world_size, self.nodes
        if state is None:
            ray.train.report(flat)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_state(state, os.path.join(tmp, STATE_FILE))
            ray.train.report(flat, checkpoint=Checkpoint.from_directory(tmp))

    def load_state(self) -> dict | None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as path:
            return load_state(os.path.join(path, STATE_FILE))


def train_loop_per_worker(config: dict) -> None:
    cfg = from_dict(Config, config["cfg"])
    plan = AdaptPlan(**config["plan"])
    env = RayTrainEnv()
    try:
        run_adaptation(plan, cfg, env)
    except DivergedError as e:
        # Ray Train retries whatever a worker raises, and a retry from the last checkpoint
        # would diverge again: the run ends here and run_adapt raises the error. Every
        # worker raises it at the same step (the check is pooled), so none is left
        # waiting in a collective.
        if env.rank == 0:
            storage.atomic_write_bytes(storage.join(config["out"], DIVERGED_FILE), str(e).encode())


def _fit(trainer: TorchTrainer):
    """``trainer.fit()``, a Ctrl-C raising KeyboardInterrupt as anywhere else. On the main
    thread, fit installs Ray Train's SIGINT handler, which aborts the run and then raises
    SystemExit (status 0 or 1: no message, no "rerun to resume"), and leaves it installed."""
    handler = signal.getsignal(signal.SIGINT)
    try:
        return trainer.fit()
    except SystemExit as e:
        if e.code not in (0, 1, None):  # not its handler's: ray.init's SIGTERM exit, say
            raise
        raise KeyboardInterrupt from e
    finally:
        if handler is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, handler)


def run_adapt(
    cfg: Config,
    checkpoint: str,
    scores: str,
    data: str,
    out: str,
    workers: int = 1,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    max_failures: int = 2,
    callbacks: list | None = None,
    placement_strategy: str = "PACK",
) -> dict:
    """Adapt on Ray Train; writes ``out/final.pt`` and returns the final metrics.

    ``callbacks`` are Ray Train callbacks (a Tune trial passes ``TuneReportCallback``);
    ``placement_strategy`` SPREAD spreads workers over nodes where it can (STRICT_SPREAD
    always), PACK fills a node first.
    """
    checkpoint, scores, data, out = map(storage.absolute, (checkpoint, scores, data, out))
    # A Ray Train checkpoint holds student, teacher, discriminator and optimizer state
    # (about 3-4 model sizes); 2 are kept and a third is written before the oldest goes,
    # then final.pt: about ten model files in all (baselines: one checkpoint and final.pt),
    # less what an earlier attempt at this run already wrote.
    models = 10 if cfg.adapt.method not in ("source_only", "adabn") else 5
    needs = models * storage.file_size(checkpoint) - storage.tree_size(out)
    storage.prepare_output(out, needs, "the adaptation's checkpoints")
    plan = make_plan(cfg, checkpoint, scores, data)
    storage_path = storage.join(out, TRAIN_STATE_DIR)
    diverged = storage.join(out, DIVERGED_FILE)
    _check_same_run(out, storage_path, run_identity(cfg, plan, workers))
    resources = {"CPU": cpus_per_worker}
    if gpus_per_worker:
        resources["GPU"] = gpus_per_worker
    check_placeable("adapt", resources, workers, placement_strategy)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": to_dict(cfg), "plan": asdict(plan), "out": out},
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name="adapt",
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )
    storage.remove(diverged)  # an earlier attempt's
    result = _fit(trainer)
    if storage.exists(diverged):
        raise DivergedError(storage.read_bytes(diverged).decode())
    if result.checkpoint is None:
        raise RuntimeError(f"adaptation under {storage_path} finished without a checkpoint")
    with result.checkpoint.as_directory() as path:
        state = load_state(os.path.join(path, STATE_FILE))
    model, meta = load_model(checkpoint)
    model.load_state_dict(state["adapter"]["student"])
    metrics = dict(result.metrics or {})
    save_adapted(storage.join(out, "final.pt"), model, meta, cfg, plan, metrics)
    metrics["selection"] = plan.selection_summary
    return metrics
