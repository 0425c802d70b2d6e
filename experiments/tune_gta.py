"""The main job: source model -> scores -> adaptation -> evaluation.

With no dataset given it runs on the built-in synthetic benchmark (generated and cached
under --out, with its source model), so it works on a fresh CPU-only machine:

    python experiments/tune_gta.py [--out outputs/tune_gta] [--smoke]

With real data, give the target dataset and the source checkpoint:

    python experiments/tune_gta.py --data cityscapes.yaml --checkpoint gta5_source.pth \
        --config experiments/configs/gta5_cityscapes.yaml

The Ray Tune search over thresholds and loss weights is not part of this version: the
job runs one adaptation with the configured values and reports it next to the
source-only model and AdaBN.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from sfda_ray.config import load_config, parse_override
from sfda_ray.data.catalog import open_dataset
from sfda_ray.data.synthetic import BenchmarkSpec, generate
from sfda_ray.dist.runtime import init_ray
from sfda_ray.dist.scoring import ScoringOptions, score_dataset, write_pictures
from sfda_ray.dist.train import run_adapt
from sfda_ray.evaluate import adabn_on_split, evaluate_model
from sfda_ray.models.checkpoint import load_model
from sfda_ray.train_source import train_source

SMOKE = {  # a minute-scale run through every stage
    "source.iterations": 60,
    "adapt.iterations": 20,
    "adapt.eval_every": 10,
    "adapt.checkpoint_every": 10,
}
SMOKE_BENCH = BenchmarkSpec(
    height=64, width=128, source_train=64, source_val=16, target_train=64, target_val=24
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/tune_gta", help="output directory")
    parser.add_argument("--data", help="target data (manifest, dataset yaml); default: synthetic")
    parser.add_argument("--checkpoint", help="source checkpoint (required with --data)")
    parser.add_argument("--config", help="YAML config")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--seed", type=int, default=0, help="synthetic benchmark seed")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if bool(args.data) != bool(args.checkpoint):
        parser.error("--data and --checkpoint go together (or neither, for the synthetic run)")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = {**(SMOKE if args.smoke else {}), **dict(map(parse_override, args.set))}
    cfg = load_config(args.config, overrides)
    t0 = time.perf_counter()

    if args.data:
        data, checkpoint = args.data, args.checkpoint
    else:
        data = out / ("synthetic_smoke" if args.smoke else f"synthetic_seed{args.seed}")
        if not (data / "benchmark.json").is_file():
            generate(data, SMOKE_BENCH if args.smoke else BenchmarkSpec(seed=args.seed))
        checkpoint = out / "source.pt"
        train_source(cfg, str(data), str(checkpoint))  # a no-op once complete
    data, checkpoint = str(data), str(checkpoint)

    init_ray(args.address)
    scores = str(out / "scores")
    score_dataset(
        checkpoint,
        data,
        scores,
        ScoringOptions.from_config(cfg),
    )
    write_pictures(scores, cfg.select)
    metrics = run_adapt(
        cfg,
        checkpoint,
        scores,
        data,
        str(out / "run"),
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
    )

    target = open_dataset(data, "target")
    summary = {
        "data": data,
        "checkpoint": checkpoint,
        "adapted_checkpoint": str(out / "run" / "final.pt"),
    }
    if "val" in set(target.manifest["split"].to_pylist()):
        model, meta = load_model(checkpoint)
        norm = meta["normalization"]
        summary["source_only_miou"] = evaluate_model(model, target, "val", norm)["miou"]
        adabn_on_split(model, target.split("train"), norm)
        summary["adabn_miou"] = evaluate_model(model, target, "val", norm)["miou"]
        adapted, _ = load_model(str(out / "run" / "final.pt"))
        summary["adapted_miou"] = evaluate_model(adapted, target, "val", norm)["miou"]
    summary["adapt_metrics"] = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
    summary["selection"] = metrics.get("selection")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print(f"\ntarget val mIoU (%) on {data}:")
    for key in ("source_only_miou", "adabn_miou", "adapted_miou"):
        if key in summary:
            print(f"  {key[:-5]:<12} {summary[key]:6.2f}")
    print(f"adapted model: {summary['adapted_checkpoint']}")
    print(f"scores and pictures: {scores}/ (score_histogram.png, selection_grid.png)")
    print(f"summary: {out / 'summary.json'} ({summary['seconds']} s)")


if __name__ == "__main__":
    main()
