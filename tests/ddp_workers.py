"""The worker side of two-process DDP tests (gloo on 127.0.0.1), in a module that
imports little: each worker is a fresh process that imports the module of its function,
and importing a test module (Ray, fixtures, every package module) took seconds of it."""

import tempfile
from datetime import timedelta
from pathlib import Path

import torch

from sfda_ray.adaptation import (
    check_finite,
    metrics_over_workers,
    pool_batchnorm_statistics,
)
from sfda_ray.config import AdaptConfig
from sfda_ray.method.adapt import Adapter, mean_over_workers
from sfda_ray.models import build_model
from sfda_ray.models.execution import Execution

C = 19
CPU = Execution(torch.device("cpu"))


def run_pair(fn, *args) -> None:
    """``fn(rank, *args)`` in each of two processes joined in one gloo group."""
    # A rendezvous file rather than a port: a free port found now may be taken by the
    # time the workers, seconds of imports later, bind it.
    with tempfile.TemporaryDirectory() as tmp:
        init = Path(tmp, "rendezvous").as_uri()
        torch.multiprocessing.spawn(_joined, (fn, init, args), nprocs=2)


def _joined(rank, fn, init, args):
    torch.distributed.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    try:
        fn(rank, *args)
    finally:
        torch.distributed.destroy_process_group()


def reported_metrics(rank, results):
    # Rank 1 alone met damaged inputs; each worker has its own losses on its own shard.
    metrics = {"loss_v": [1.0, 3.0][rank], "skipped_inputs": [0, 3][rank], "iteration": 5}
    torch.save(metrics_over_workers(metrics, torch.device("cpu")), results / f"metrics{rank}.pt")


def pooled_batchnorm(rank, data, results):
    bn = torch.nn.BatchNorm2d(3)
    shard = data[rank]  # [N, 3]: each worker's statistics of its own shard
    bn.running_mean.copy_(shard.mean(0))
    bn.running_var.copy_(shard.var(0, unbiased=False))
    pool_batchnorm_statistics(bn)
    torch.save((bn.running_mean, bn.running_var), results / f"bn{rank}.pt")


def divergence(rank, results):
    logs = {"loss_total": [1.0, float("nan")][rank]}  # rank 1 alone blew up
    try:
        check_finite(logs, 7, 0.01, torch.device("cpu"))
        outcome = "went on"
    except ValueError as e:
        outcome = str(e)
    check_finite({"loss_total": 1.0}, 8, 0.01, torch.device("cpu"))  # all finite: no stop
    (results / f"rank{rank}.txt").write_text(outcome)


def round_thresholds(rank, images, results):
    torch.manual_seed(0)
    model = build_model("deeplabv2_resnet18", C, output_stride=16)
    if rank == 1:  # its own last step moved its BatchNorm statistics: rank 0's count
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean += 0.5
    adapter = Adapter(model, AdaptConfig(), "imagenet", torch.full((C,), 1 / C), None, CPU)
    adapter.begin_round(0, [images[rank]])
    mean = mean_over_workers(torch.tensor([float(rank)]))  # as the AdaBN start averages
    draw = torch.rand(4, generator=adapter.generator)
    teacher_bn = torch.cat([b.flatten() for b in adapter.teacher.buffers()])
    torch.save((adapter.st_thresholds, mean, draw, teacher_bn), results / f"rank{rank}.pt")


def sharded_evaluation(rank, checkpoint, plans, size, results):
    import sfda_ray.adaptation as adaptation
    from sfda_ray.models.checkpoint import load_model

    read = []  # the images this worker reads, for each evaluation
    for name in ("eval_loader", "image_loader"):
        make = getattr(adaptation, name)
        setattr(
            adaptation,
            name,
            lambda table, *a, make=make, **k: (
                read.append(table["image_id"].to_pylist()) or make(table, *a, **k)
            ),
        )
    model, _ = load_model(checkpoint, num_classes=C)
    if rank == 1:  # its own last step moved its BatchNorm statistics: rank 0's count
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean += 0.5
    found = [adaptation.evaluate_adapted(model, plan, "imagenet", size) for plan in plans]
    torch.save((found, read), results / f"rank{rank}.pt")
