"""Scoring throughput: the Ray Data pipeline against a plain single-process PyTorch loop.

Same model, same images, same code per image: the plain loop calls the functions the
pipeline distributes (``decode_batch``, the ``Scorer`` actor's ``__call__``, the
driver's ``ScoreWriter``: decode image and label, normalise, forward, scores, per-image
pseudo-label quality, two PNG maps and the Parquet rows written) one batch after the
other in this process, before Ray is started. Peak memory is the largest resident set
of this process plus every Ray worker process, sampled while scoring.

    python experiments/bench_scoring.py --images 2000 --json bench_scoring.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

from sfda_ray.config import load_config
from sfda_ray.data.catalog import open_dataset
from sfda_ray.data.decode import decode_batch
from sfda_ray.data.synthetic import BenchmarkSpec, generate
from sfda_ray.dist.runtime import init_ray
from sfda_ray.dist.scoring import (
    MANIFEST_COLUMNS,
    Scorer,
    ScoreWriter,
    ScoringOptions,
    score_dataset,
)
from sfda_ray.models import build_model
from sfda_ray.models.checkpoint import save_checkpoint


class PeakMemory:
    """Peak total RSS (MB) of this process and all its descendants (Ray's workers)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0.0, threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total / 2**20)
            time.sleep(self.interval)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def plain_loop(
    checkpoint: str, rows: list[dict], batch_size: int, out: Path, threads: int
) -> tuple[float, float]:
    """Images/s after the first batch (as the pipeline's ``steady_images_per_s``), and
    over the whole loop."""
    scorer = Scorer(checkpoint, mc_passes=0, threads=threads)
    writer = ScoreWriter(str(out), rows)
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch_size):
        chunk = rows[i : i + batch_size]
        batch = {k: np.array([r[k] for r in chunk], dtype=object) for k in chunk[0]}
        writer.add(scorer(decode_batch(batch, None)))
    writer.flush()
    return writer.steady_images_per_s(), len(rows) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, both paths")
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--json", help="write results here")
    args = parser.parse_args()
    cfg = load_config()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        spec = BenchmarkSpec(source_train=1, source_val=1, target_train=args.images, target_val=1)
        generate(tmp / "bench", spec)
        checkpoint = str(tmp / "model.pt")
        model = build_model(
            cfg.model.name, cfg.model.num_classes, output_stride=cfg.model.output_stride
        )
        save_checkpoint(checkpoint, model, {"normalization": "imagenet"})
        table = open_dataset(tmp / "bench", "target").split("train")
        rows = table.select([c for c in MANIFEST_COLUMNS if c != "fingerprint"]).to_pylist()
        for row in rows:
            row["fingerprint"] = row["image_id"]

        with PeakMemory() as plain_mem:
            plain, plain_all = plain_loop(
                checkpoint, rows, args.batch_size, tmp / "plain", args.threads
            )
        init_ray(num_cpus=psutil.cpu_count())
        with PeakMemory() as ray_mem:
            t0 = time.perf_counter()
            summary = score_dataset(
                checkpoint,
                str(tmp / "bench"),
                str(tmp / "ray"),
                ScoringOptions(
                    batch_size=args.batch_size,
                    actors=args.actors,
                    threads_per_actor=args.threads,
                    adabn=False,  # the same model as the plain loop
                ),
            )
            wall = time.perf_counter() - t0
    result = {
        "images": args.images,
        "batch_size": args.batch_size,
        "model": cfg.model.name,
        "image_size": [spec.height, spec.width],
        # After the first batch: the rate a long job runs at (the pipeline's start-up,
        # workers spawning and loading the model, is reported apart).
        "ray_images_per_s": summary["steady_images_per_s"],
        "plain_images_per_s": round(plain, 2),
        "ratio": round(summary["steady_images_per_s"] / plain, 3),
        "ray_startup_seconds": summary["startup_seconds"],
        "ray_images_per_s_overall": summary["images_per_s"],
        "plain_images_per_s_overall": round(plain_all, 2),
        "ray_images_per_s_including_setup": round(args.images / wall, 2),
        "peak_rss_mb": round(ray_mem.peak, 1),
        "plain_peak_rss_mb": round(plain_mem.peak, 1),
        "machine": f"{psutil.cpu_count()} CPUs, {platform.machine()}, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d"),
    }
    print(f"{'path':<10} {'images/s':>9} {'overall':>8} {'peak RSS MB':>12}")
    print(f"{'plain':<10} {plain:9.2f} {plain_all:8.2f} {plain_mem.peak:12.1f}")
    ray_rate, ray_all = summary["steady_images_per_s"], summary["images_per_s"]
    print(f"{'ray data':<10} {ray_rate:9.2f} {ray_all:8.2f} {ray_mem.peak:12.1f}")
    print(f"ray start-up until the first scored batch: {summary['startup_seconds']} s")
    print(f"ratio ray/plain: {result['ratio']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
