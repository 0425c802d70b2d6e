"""Calibrate the built-in synthetic benchmark: is the domain gap real and not trivial?

Per seed: generate the benchmark, train the default source model on source train and,
for reference only, the oracle on target train labels; then measure source-only on
source val and target val, the oracle on target val, and AdaBN (source model with its
BatchNorm statistics re-estimated on target train images). Data and checkpoints are
cached under --out, so a rerun only evaluates.

    python experiments/calibrate_synthetic.py --seeds 0 1 --json calibration.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
from pathlib import Path

import torch

from sfda_ray.config import load_config
from sfda_ray.data.catalog import open_dataset
from sfda_ray.data.synthetic import BenchmarkSpec, ensure_benchmark
from sfda_ray.evaluate import adabn_on_split, evaluate_model
from sfda_ray.models.checkpoint import load_model
from sfda_ray.train_source import train_source


def calibrate_seed(out: Path, seed: int, shift: float, config: str | None) -> dict:
    bench = out / f"synthetic_seed{seed}"
    ensure_benchmark(bench, BenchmarkSpec(seed=seed, shift=shift))
    cfg = load_config(config, {"source.seed": seed})
    timings = {}
    for name, domain in (("source", "source"), ("oracle", "target")):
        meta = train_source(cfg, str(bench), str(out / f"{name}_seed{seed}.pt"), domain=domain)
        # From the checkpoint, so a cached model still reports what its training took.
        timings[f"{name}_train_s"] = round(meta["train_seconds"], 1)

    source_ref, target_ref = open_dataset(bench, "source"), open_dataset(bench, "target")
    model, meta = load_model(str(out / f"source_seed{seed}.pt"))
    norm = meta["normalization"]
    row = {
        "seed": seed,
        "source_on_source_val": evaluate_model(model, source_ref, "val", norm)["miou"],
        "source_on_target_val": evaluate_model(model, target_ref, "val", norm)["miou"],
    }
    oracle, _ = load_model(str(out / f"oracle_seed{seed}.pt"))
    row["oracle_on_source_val"] = evaluate_model(oracle, source_ref, "val", norm)["miou"]
    row["oracle_on_target_val"] = evaluate_model(oracle, target_ref, "val", norm)["miou"]
    adabn_on_split(model, target_ref.split("train"), norm)
    row["adabn_on_target_val"] = evaluate_model(model, target_ref, "val", norm)["miou"]
    gap = row["oracle_on_target_val"] - row["source_on_target_val"]
    row["gap"] = gap
    row["adabn_gap_closed"] = (row["adabn_on_target_val"] - row["source_on_target_val"]) / gap
    row.update(timings)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--shift", type=float, default=1.0)
    parser.add_argument("--config", help="YAML config for the source model and its training")
    parser.add_argument("--out", default="outputs/calibration")
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(2)
    out = Path(args.out)
    rows = [calibrate_seed(out, s, args.shift, args.config) for s in args.seeds]

    cols = [
        "seed",
        "source_on_source_val",
        "oracle_on_source_val",
        "source_on_target_val",
        "adabn_on_target_val",
        "oracle_on_target_val",
        "gap",
        "adabn_gap_closed",
    ]
    print(" | ".join(cols))
    for r in rows:
        print(
            " | ".join(
                f"{r[c]:.3f}"
                if c == "adabn_gap_closed"
                else (str(r[c]) if c == "seed" else f"{r[c]:.1f}")
                for c in cols
            )
        )
    result = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "machine": (
            f"{platform.machine()}, {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"
        ),
        "shift": args.shift,
        "rows": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
