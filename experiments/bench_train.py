"""Adaptation step time: Ray Train against the plain loop, and 2 workers against 1.

The same adaptation (default method, default small model, same scores, same seeds) runs
three times: the plain single-process loop, Ray Train with 1 worker, and Ray Train with 2
workers at the same global batch (half the per-worker batch, one torch thread each).
Step time is taken inside the loop, per report interval, so it excludes start-up and
includes Ray's per-report work (a checkpoint to storage at every report). On a small shared
machine single runs differ by 10-20%, more than the overhead measured: the three runs are
repeated, interleaved (each repeat starts with the next one), and each run's figure is the
median over its report intervals, each configuration's the median over its repeats. Losses
are means over each report interval (over both workers with 2), so the curves can be
compared.

    python experiments/bench_train.py --iterations 60 --repeats 3 --json bench_train.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from ray.train import Checkpoint, UserCallback

from sfda_ray.adaptation import LocalEnv, make_plan, run_adaptation
from sfda_ray.config import Config, load_config
from sfda_ray.data.synthetic import BenchmarkSpec, generate
from sfda_ray.dist.runtime import init_ray
from sfda_ray.dist.scoring import ScoringOptions, score_dataset
from sfda_ray.dist.train import run_adapt
from sfda_ray.models import build_model
from sfda_ray.models.checkpoint import save_checkpoint


class ReportLog(UserCallback):
    """Every report of rank 0, appended to a JSON-lines file (callbacks run in Ray Train's
    controller, not in this process)."""

    def __init__(self, path: str):
        self.path = path

    def after_report(
        self, run_context: object, metrics: list[dict], checkpoint: Checkpoint | None
    ) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics[0]) + "\n")


def interval_seconds(reports: list[dict]) -> list[float]:
    """Seconds per iteration over each interval between consecutive reports of a run."""
    return [
        (b["seconds"] - a["seconds"]) / (b["iteration"] - a["iteration"])
        for a, b in itertools.pairwise(reports)
    ]


def curve(reports: list[dict], key: str = "loss_total") -> list[float]:
    return [r[key] for r in reports if key in r]


def ray_run(cfg: Config, ckpt: str, scores: str, data: str, out: Path, workers: int) -> list[dict]:
    log_path = out.with_suffix(".jsonl")
    run_adapt(
        cfg, ckpt, scores, data, str(out), workers=workers, callbacks=[ReportLog(str(log_path))]
    )
    return [json.loads(line) for line in log_path.read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--report-every", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4, help="global, for each of V and T")
    parser.add_argument("--images", type=int, default=64, help="target images")
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each configuration")
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    if args.batch_size % 2:
        parser.error("--batch-size must be even (it is split over 2 workers)")
    if args.repeats < 1 or args.iterations < 2 * args.report_every:
        parser.error(
            "needs --repeats >= 1 and two reports at least (--iterations >= 2 x --report-every)"
        )
    threads = min(2, psutil.cpu_count())
    common = {
        "adapt.iterations": args.iterations,
        "adapt.batch_size": args.batch_size,
        # Evaluation only after the last timed point: reports carry losses and timings.
        "adapt.eval_every": args.iterations,
        "adapt.checkpoint_every": args.report_every,
        "adapt.log_every": args.report_every,
        "adapt.threads": threads,
    }
    cfg = load_config(None, common)
    cfg2 = load_config(
        None, {**common, "adapt.batch_size": args.batch_size // 2, "adapt.threads": 1}
    )
    init_ray(num_cpus=max(4, psutil.cpu_count()))  # logical CPUs: 2 workers + the controller
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "bench"
        generate(
            data,
            BenchmarkSpec(
                height=args.height,
                width=args.width,
                source_train=1,
                source_val=1,
                target_train=args.images,
                target_val=2,
            ),
        )
        ckpt = str(tmp / "model.pt")
        torch.manual_seed(0)
        model = build_model(
            cfg.model.name, cfg.model.num_classes, output_stride=cfg.model.output_stride
        )
        save_checkpoint(ckpt, model, {"normalization": "imagenet"})
        scores = str(tmp / "scores")
        score_dataset(ckpt, str(data), scores, ScoringOptions(batch_size=16))

        names = ("plain", "ray_1_worker", "ray_2_workers")
        runs: dict[str, list[list[dict]]] = {name: [] for name in names}
        walls: dict[str, list[float]] = {name: [] for name in names}
        for repeat in range(args.repeats):
            # Each repeat starts one further along, so no configuration always runs first.
            for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
                out = tmp / f"{name}_{repeat}"  # a fresh run each time, never a resume
                t0 = time.perf_counter()
                if name == "plain":
                    plain_env = LocalEnv(state_path=str(out.with_suffix(".pt")))
                    run_adaptation(make_plan(cfg, ckpt, scores, str(data)), cfg, plain_env)
                    runs[name].append(plain_env.reports)
                else:
                    config, workers = (cfg, 1) if name == "ray_1_worker" else (cfg2, 2)
                    runs[name].append(ray_run(config, ckpt, scores, str(data), out, workers))
                walls[name].append(time.perf_counter() - t0)

    per_run = {
        name: [float(np.median(interval_seconds(r))) for r in reports]
        for name, reports in runs.items()
    }
    seconds = {name: float(np.median(values)) for name, values in per_run.items()}
    curves = {name: curve(reports[0]) for name, reports in runs.items()}
    level = float(np.mean(np.abs(curves["plain"])))
    result = {
        "iterations": args.iterations,
        "global_batch": args.batch_size,
        "image_size": [args.height, args.width],
        "model": cfg.model.name,
        "repeats": args.repeats,
        "seconds_per_iter": {k: round(v, 4) for k, v in seconds.items()},
        "seconds_per_iter_per_repeat": {k: [round(x, 4) for x in v] for k, v in per_run.items()},
        "wall_seconds_per_repeat": {k: [round(x, 1) for x in v] for k, v in walls.items()},
        "ratio_ray_1_worker_vs_plain": round(seconds["ray_1_worker"] / seconds["plain"], 3),
        "ratio_ray_2_workers_vs_plain": round(seconds["ray_2_workers"] / seconds["plain"], 3),
        "report_iterations": [r["iteration"] for r in runs["plain"][0]],
        "loss_total": {k: [round(x, 4) for x in v] for k, v in curves.items()},
        # Same seeds and shard: 1 Ray worker should retrace the plain loop.
        "max_abs_loss_diff_ray_1_vs_plain": float(
            np.max(np.abs(np.subtract(curves["ray_1_worker"], curves["plain"])))
        ),
        # Other shards and per-worker BatchNorm statistics: equal within noise, not exactly.
        "mean_abs_loss_diff_2_vs_1_workers_relative": float(
            np.mean(np.abs(np.subtract(curves["ray_2_workers"], curves["ray_1_worker"]))) / level
        ),
        "machine": f"{psutil.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{'run':<15} {'s/iter':>8} {'vs plain':>9}  {'per repeat':<24} {'wall s'}")
    for name in runs:
        print(
            f"{name:<15} {seconds[name]:8.3f} {seconds[name] / seconds['plain']:9.3f}  "
            f"{' '.join(f'{x:.3f}' for x in per_run[name]):<24} "
            + " ".join(f"{x:.0f}" for x in walls[name])
        )
    print("loss_total per report interval (first repeat):")
    for name, values in curves.items():
        print(f"  {name:<15} " + " ".join(f"{v:.3f}" for v in values))
    print(
        f"max |ray 1 worker - plain| = {result['max_abs_loss_diff_ray_1_vs_plain']:.2e}; "
        "mean |2 workers - 1 worker| / mean loss = "
        f"{result['mean_abs_loss_diff_2_vs_1_workers_relative']:.3f}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
