"""The method's adaptation step: milliseconds per ``Adapter.step`` and steps a second.

One step of the method as the adaptation runs it (``adapt`` defaults: L_V with class and
certainty weights, the output-space discriminator, self-training on the strongly
augmented target with the round teacher's pseudo-labels, the prior term), without and
with ClassMix (``adapt.lambda_mix``), the model run as the ``perf`` defaults say (bf16 and
channels-last on a GPU). By default DeepLab-v2 ResNet-101 at 1024x512 with batches of 4
V and 4 T images on the GPU, or a ResNet-18 at 32x64 with batches of 1 on a CPU (so it
is tested without a GPU). ``bench_gpu.py`` times the segmentation net's own step; this
adds what the method does around it.

    python experiments/bench_method_step.py --json experiments/results/method_step_<device>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

from sfda_ray.config import AdaptConfig, PerfConfig
from sfda_ray.method.adapt import Adapter
from sfda_ray.models import build_model
from sfda_ray.models.execution import Execution

NUM_CLASSES = 19


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--model", help="default: deeplabv2_resnet101 (cuda), _resnet18 (cpu)")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"))
    parser.add_argument("--batch", type=int, help="V and T images each; default 4 (cuda), 1")
    parser.add_argument("--iters", type=int, help="timed steps; default 15 (cuda), 2 (cpu)")
    parser.add_argument("--warmup", type=int, help="untimed steps; default 5 (cuda), 1 (cpu)")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    defaults = {
        "model": "deeplabv2_resnet101" if gpu else "deeplabv2_resnet18",
        "size": [512, 1024] if gpu else [32, 64],
        "batch": 4 if gpu else 1,
        "iters": 15 if gpu else 2,
        "warmup": 5 if gpu else 1,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.iters < 1 or args.warmup < 0 or args.batch < 1:
        parser.error("--iters and --batch must be at least 1, --warmup at least 0")
    return args


def time_steps(args: argparse.Namespace, exe: Execution, lambda_mix: float) -> dict:
    """The mean over ``args.iters`` steps after ``args.warmup``: each step ends in a host
    sync (its losses are read as floats), so wall-clock time is the step's time."""
    h, w, b = *args.size, args.batch
    torch.manual_seed(0)
    model = exe.prepare(build_model(args.model, NUM_CLASSES))
    uniform = torch.full((NUM_CLASSES,), 1 / NUM_CLASSES)
    cfg = AdaptConfig(lambda_mix=lambda_mix)
    adapter = Adapter(model, cfg, "imagenet", uniform, torch.ones(NUM_CLASSES), exe)
    adapter.begin_round(0, [torch.rand(b, 3, h, w, device=exe.device)])

    def images() -> torch.Tensor:  # pinned on a GPU, as the adaptation loaders pin theirs
        x = torch.rand(b, 3, h, w)
        return x.pin_memory() if exe.pin_memory else x

    batch_v = {
        "image": images(),
        "label": torch.randint(0, NUM_CLASSES, (b, h, w)),
        "weight": torch.rand(b, h, w),
    }
    batch_t = {"image": images()}
    for _ in range(args.warmup):
        adapter.step(batch_v, batch_t)
    t0 = time.perf_counter()
    for _ in range(args.iters):
        logs = adapter.step(batch_v, batch_t)
    seconds = (time.perf_counter() - t0) / args.iters
    if not all(math.isfinite(v) for v in logs.values()):
        raise RuntimeError(f"a loss is not finite: {logs}")
    return {"ms_per_step": seconds * 1e3, "steps_per_s": 1 / seconds, "losses": sorted(logs)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible; use --device cpu")
    exe = Execution.resolve(PerfConfig(), args.device)
    steps = {name: time_steps(args, exe, mix) for name, mix in (("plain", 0.0), ("class_mix", 1.0))}
    result = {
        "device": torch.cuda.get_device_name() if exe.device.type == "cuda" else "cpu",
        "steps": steps,
        "settings": {
            "model": args.model,
            "height": args.size[0],
            "width": args.size[1],
            "batch_v": args.batch,
            "batch_t": args.batch,
            "iters": args.iters,
            "warmup": args.warmup,
            "precision": exe.precision,
            "channels_last": exe.channels_last,
            "torch": torch.__version__,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(),
            "command": " ".join(sys.argv),
        },
    }
    print(
        f"{'step':<12}{'ms':>10}{'steps/s':>10}   ({args.model}, {args.size[0]}x{args.size[1]}, "
        f"{args.batch}+{args.batch} images, {exe.precision}, {result['device']})"
    )
    for name, r in steps.items():
        print(f"{name:<12}{r['ms_per_step']:>10.1f}{r['steps_per_s']:>10.2f}")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
