"""Baselines and ablations of the method on the synthetic benchmark, over seeds.

Per seed: the benchmark and its source model and oracle (cached; the calibration
script's --out is reused when given the same directory), one scoring pass on Ray Data,
then every row below adapted with the plain single-process loop (the same code Ray
Train runs per worker) and evaluated on target val. Each finished row is kept in
OUT/ablation_seed<N>.json with its resolved config and scoring model, so a rerun after
an interruption skips the rows already done with the same config and source model.

    python experiments/ablation_synthetic.py --seeds 0 1 --json ablation.json
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

from sfda_ray.adaptation import LocalEnv, make_plan, run_adaptation
from sfda_ray.config import load_config, result_identity
from sfda_ray.data.catalog import open_dataset
from sfda_ray.data.synthetic import BenchmarkSpec, ensure_benchmark
from sfda_ray.dist.runtime import init_ray
from sfda_ray.dist.scoring import ScoringOptions, score_dataset
from sfda_ray.evaluate import evaluate_model
from sfda_ray.models.checkpoint import load_model
from sfda_ray.train_source import train_source

ROWS = {
    "source-only": {"adapt.method": "source_only"},
    "AdaBN": {"adapt.method": "adabn"},
    "TENT": {"adapt.method": "tent"},
    "MinEnt (whole net)": {"adapt.method": "minent"},
    "self-training (argmax)": {"adapt.method": "self_training"},
    "full method": {},
    "- uncertainty weights": {"adapt.uncertainty_weights": False},
    "- L_adv": {"adapt.lambda_adv": 0.0},
    "- L_ST": {"adapt.lambda_st": 0.0},
    "- L_prior and alpha": {"adapt.lambda_prior": 0.0, "adapt.class_weights": False},
    # The recipe's other switches (each on in the full method unless marked "+").
    "- AdaBN start": {"adapt.adabn_init": False},
    "- strong augmentation": {"adapt.strong_aug": False},
    "- rare-class sampling": {"adapt.rare_class_sampling": False},
    "+ EMA teacher (for rounds)": {"adapt.teacher": "ema"},
    "+ ClassMix (V objects into T)": {"adapt.lambda_mix": 1.0},
    "- long schedule (150 iterations)": {"adapt.iterations": 150},
}


def run_seed(out: Path, seed: int, config: str | None, rows: list[str]) -> dict:
    bench = out / f"synthetic_seed{seed}"
    ensure_benchmark(bench, BenchmarkSpec(seed=seed))
    base = load_config(config, {"source.seed": seed})
    source, oracle = out / f"source_seed{seed}.pt", out / f"oracle_seed{seed}.pt"
    train_source(base, str(bench), str(source))
    train_source(base, str(bench), str(oracle), domain="target")
    target = open_dataset(bench, "target")
    model, meta = load_model(str(oracle))
    result = {"oracle": evaluate_model(model, target, "val", meta["normalization"])["miou"]}
    scores = out / f"scores_seed{seed}"
    result["scoring"] = score_dataset(
        str(source), str(bench), str(scores), ScoringOptions(batch_size=16)
    )
    # A kept row is this source model's (its scoring model names it): one trained again
    # (after deleting source_seedN.pt, say) runs every row again.
    scored_with = result["scoring"]["checkpoint_fingerprint"]
    done_path = out / f"ablation_seed{seed}.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}
    for name in rows:
        cfg = load_config(config, {"source.seed": seed, "adapt.seed": seed, **ROWS[name]})
        resolved = result_identity(cfg)
        kept = done.get(name, {})
        if kept.get("config") == resolved and kept.get("scored_with") == scored_with:
            result[name] = done[name]
            logging.info(
                "seed %d %-24s mIoU %.2f (kept from %s)", seed, name, done[name]["miou"], done_path
            )
            continue
        t0 = time.perf_counter()
        plan = make_plan(cfg, str(source), str(scores), str(bench))
        metrics = run_adaptation(plan, cfg, LocalEnv())["metrics"]
        result[name] = {
            "miou": metrics["val_miou"],
            "proxy": metrics["proxy"],
            "per_class": metrics["per_class"],
            "seconds": round(time.perf_counter() - t0, 1),
            "config": resolved,
            "scored_with": scored_with,
        }
        done[name] = result[name]
        done_path.write_text(json.dumps(done, indent=1) + "\n")
        logging.info("seed %d %-24s mIoU %.2f", seed, name, metrics["val_miou"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--config", help="YAML config (adapt section: the method's defaults)")
    parser.add_argument("--out", default="outputs/calibration")
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--json", help="write the table here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    init_ray()
    per_seed = {s: run_seed(Path(args.out), s, args.config, args.rows) for s in args.seeds}

    def stats(key):
        values = [
            per_seed[s][key]["miou"] if isinstance(per_seed[s][key], dict) else per_seed[s][key]
            for s in args.seeds
        ]
        return float(np.mean(values)), float(np.ptp(values)) / 2, values

    source_only = stats("source-only")[0] if "source-only" in args.rows else None
    oracle = stats("oracle")[0]
    table = []
    print(f"{'':<26} {'mIoU':>6} {'± half-range':>12}  gap closed   per seed")
    for name in args.rows:
        mean, spread, values = stats(name)
        closed = (mean - source_only) / (oracle - source_only) if source_only is not None else None
        table.append(
            {
                "name": name,
                "miou_mean": mean,
                "miou_spread": spread,
                "miou_per_seed": values,
                "gap_closed": closed,
            }
        )
        print(
            f"{name:<26} {mean:6.2f} {spread:12.2f}  "
            f"{'' if closed is None else f'{100 * closed:8.1f}%'}   "
            f"{', '.join(f'{v:.2f}' for v in values)}"
        )
    print(f"{'oracle (target labels)':<26} {oracle:6.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "rows": table,
                    "source_only": source_only,
                    "oracle": oracle,
                    "seeds": args.seeds,
                    "details": {
                        str(s): {
                            k: {f: x for f, x in v.items() if f != "config"}
                            if isinstance(v, dict)
                            else v
                            for k, v in r.items()
                            if k != "scoring"
                        }
                        for s, r in per_seed.items()
                    },
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
