"""GPU throughput of DeepLab-v2: scoring images/s and adaptation iterations/s, fp32 and bf16.

By default DeepLab-v2 ResNet-101 at 1024x512 (the paper's setting) on the GPU, or a
ResNet-18 at 64x128 on a CPU (so it is tested without a GPU). Measured, each in fp32
and bf16 (``torch.autocast``):

* scoring: forward under ``torch.inference_mode()``, softmax, per-pixel max/argmax and
  normalised entropy, as when scoring the virtual source;
* adaptation: forward, cross-entropy on random labels (19 classes, ignore 255),
  backward and an SGD step;
* the same two through the Ray layer (one Ray actor holding the model, one call per
  batch), when ``import ray`` works and ``--no-ray`` is not given; else ``"ray": null``;
* the model's FLOPs per image (``FlopCounterMode``, a multiply-add is 2 FLOPs), a large
  bf16 matmul's TFLOPS, and the fraction of the latter that bf16 scoring achieves.

    python experiments/bench_gpu.py --json experiments/results/gpu_<device>.json

Targets on an H100-class GPU: bf16 scoring at least 1.5x fp32; bf16 scoring at least
40% of the measured bf16 matmul throughput; the Ray layer at most 10% slower than the
core alone at the same batch size.

The core path imports only torch, torchvision and ``sfda_ray/models/deeplabv2.py``
(loaded by file path), so it runs where the package's other dependencies are missing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# `sfda_ray.models` pulls in checkpoint IO and with it pyarrow; deeplabv2.py itself needs
# only torch and torchvision.
MODEL_FILE = Path(__file__).resolve().parents[1] / "sfda_ray" / "models" / "deeplabv2.py"
NUM_CLASSES = 19
IGNORE_INDEX = 255


def load_deeplabv2() -> ModuleType:
    """``sfda_ray.models.deeplabv2`` loaded by path, without the package's ``__init__``."""
    name = "_bench_deeplabv2"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, MODEL_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def torchvision_version() -> str:
    import torchvision  # deeplabv2.py imports it anyway

    return torchvision.__version__


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Bench:
    """One model, its optimizer and fixed CPU batches, stepped on one device.

    Runs in this process for the core numbers and inside a Ray actor for the Ray ones;
    the same seed gives both the same weights and the same input tensors.
    """

    def __init__(self, args: argparse.Namespace, threads: int) -> None:
        # Ray workers default to one intra-op thread; match the driver for a fair CPU run.
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        # Imported here: a reference to torch.backends.cudnn in this class's code would make
        # cloudpickle try to pickle that module when Ray ships the class to its actor.
        from torch.backends import cudnn

        cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
        self.device, self.channels_last = args.device, args.channels_last
        self.model = load_deeplabv2().build_model(args.model, NUM_CLASSES).to(args.device)
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.step_model = torch.compile(self.model) if args.compile else self.model
        self.optimizer = torch.optim.SGD(
            [p for p in self.model.parameters() if p.requires_grad],
            lr=2.5e-4,
            momentum=0.9,
            weight_decay=5e-4,
        )
        h, w = args.size
        # Batches start on the CPU and are copied every step, as a data loader's would be.
        self.score_images = torch.randn(args.score_batch, 3, h, w)
        self.train_images = torch.randn(args.train_batch, 3, h, w)
        labels = torch.randint(0, NUM_CLASSES, (args.train_batch, h, w))
        self.train_labels = labels.masked_fill(torch.rand(labels.shape) < 0.1, IGNORE_INDEX)

    def _to_device(self, images: torch.Tensor) -> torch.Tensor:
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        return images.to(self.device, memory_format=fmt)

    def _set_mode(self, train: bool) -> None:
        if self.model.training != train:
            self.model.train(train)

    def score(self, bf16: bool) -> None:
        self._set_mode(False)
        with torch.inference_mode(), torch.autocast(self.device, torch.bfloat16, enabled=bf16):
            logits = self.step_model(self._to_device(self.score_images))
            prob = logits.float().softmax(1)
            conf, label = prob.max(1)
            entropy = -(prob * prob.clamp_min(1e-12).log()).sum(1) / math.log(NUM_CLASSES)
        del conf, label, entropy  # computed for their cost; scores stay on the device

    def train(self, bf16: bool) -> None:
        self._set_mode(True)
        labels = self.train_labels.to(self.device)
        with torch.autocast(self.device, torch.bfloat16, enabled=bf16):
            logits = self.step_model(self._to_device(self.train_images))
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        synchronize(self.device)


def steps_per_s(
    step: Callable[[], object], sync: Callable[[], object], warmup: int, iters: int
) -> float:
    """Steps per second over ``iters`` timed steps, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    sync()  # GPU work is asynchronous: the clock stops when the last step has finished
    return iters / (time.perf_counter() - start)


def measure(
    call: Callable[[str, bool], Callable[[], object]],
    sync: Callable[[], object],
    args: argparse.Namespace,
) -> dict:
    """Scoring images/s and train iterations/s in fp32 and bf16; ``call(kind, bf16)``
    returns a function doing one step."""
    scoring, train = {}, {}
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        rate = steps_per_s(call("score", bf16), sync, args.warmup, args.iters)
        scoring[f"{precision}_images_per_s"] = rate * args.score_batch
        train[f"{precision}_iters_per_s"] = steps_per_s(
            call("train", bf16), sync, args.warmup, args.iters
        )
    scoring["bf16_speedup"] = scoring["bf16_images_per_s"] / scoring["fp32_images_per_s"]
    train["bf16_speedup"] = train["bf16_iters_per_s"] / train["fp32_iters_per_s"]
    return {"scoring": scoring, "train": train}


def model_gflops(
    model: torch.nn.Module, size: tuple[int, int], device: str, channels_last: bool
) -> float:
    """GFLOPs of one forward at batch 1, counted (not timed) on the eager model."""
    x = torch.randn(1, 3, *size, device=device)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    model.eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(x)
    return counter.get_total_flops() / 1e9


def bf16_matmul_tflops(n: int, device: str, reps: int) -> float:
    """Measured bf16 matmul throughput, the ceiling the model's FLOPs are compared with."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    rate = steps_per_s(lambda: a @ b, lambda: synchronize(device), warmup=3, iters=reps)
    return rate * 2 * n**3 / 1e12


def measure_core(args: argparse.Namespace) -> tuple[float, dict]:
    """Model GFLOPs per image and the core's numbers, the model in this process."""
    bench = Bench(args, torch.get_num_threads())
    gflops = model_gflops(bench.model, tuple(args.size), args.device, args.channels_last)
    return gflops, measure(lambda kind, bf16: partial(getattr(bench, kind), bf16), bench.sync, args)


def measure_ray(args: argparse.Namespace, core: dict) -> dict | None:
    """The same steps in one Ray actor, one blocking call per batch; None without Ray."""
    try:
        import ray
    except ImportError:
        print("ray is not installed: no Ray-layer numbers")
        return None
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        gpus = 1 if args.device == "cuda" else 0
        actor = ray.remote(num_gpus=gpus)(Bench).remote(args, torch.get_num_threads())

        def call(kind: str, bf16: bool) -> Callable[[], object]:
            method = getattr(actor, kind)
            # Waiting on each call puts the full hop latency on every batch: an upper bound.
            return lambda: ray.get(method.remote(bf16))

        result = measure(call, lambda: ray.get(actor.sync.remote()), args)
    finally:
        ray.shutdown()
    # Overhead = extra time per batch relative to the core alone.
    result["overhead"] = {
        f"{section}_{p}": core[section][f"{p}_{unit}"] / result[section][f"{p}_{unit}"] - 1
        for section, unit in (("scoring", "images_per_s"), ("train", "iters_per_s"))
        for p in ("fp32", "bf16")
    }
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--model", help="default: deeplabv2_resnet101 (cuda), _resnet18 (cpu)")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("H", "W"),
        help="default: 512 1024 (cuda), 64 128 (cpu)",
    )
    parser.add_argument("--score-batch", type=int, help="default: 8 (cuda), 2 (cpu)")
    parser.add_argument("--train-batch", type=int, help="default: 4 (cuda), 2 (cpu)")
    parser.add_argument("--iters", type=int, help="timed steps; default 20 (cuda), 5 (cpu)")
    parser.add_argument("--warmup", type=int, help="untimed steps; default 5 (cuda), 2 (cpu)")
    parser.add_argument("--matmul-size", type=int, help="default: 8192 (cuda), 512 (cpu)")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray-layer numbers")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    defaults = {
        "model": "deeplabv2_resnet101" if gpu else "deeplabv2_resnet18",
        "size": [512, 1024] if gpu else [64, 128],
        "score_batch": 8 if gpu else 2,
        "train_batch": 4 if gpu else 2,
        "iters": 20 if gpu else 5,
        "warmup": 5 if gpu else 2,
        "matmul_size": 8192 if gpu else 512,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def print_table(result: dict) -> None:
    print(f"{'':<22}{'fp32':>12}{'bf16':>12}{'bf16/fp32':>12}")
    sections = (("scoring", "images_per_s", "img/s"), ("train", "iters_per_s", "it/s"))
    for name, r in [("core", result), ("ray", result["ray"])]:
        for section, unit, label in sections if r is not None else ():
            fp32, bf16 = r[section][f"fp32_{unit}"], r[section][f"bf16_{unit}"]
            row = f"{name} {section} {label}"
            print(f"{row:<22}{fp32:>12.3g}{bf16:>12.3g}{bf16 / fp32:>11.2f}x")
    print(
        f"model {result['model_gflops_per_image']:.3g} GFLOPs/image; "
        f"bf16 matmul {result['bf16_matmul_tflops']:.3g} TFLOPS; "
        f"bf16 scoring reaches {result['scoring_bf16_fraction_of_matmul']:.1%} of it"
    )
    if result["ray"] is not None:
        overhead = ", ".join(f"{k} {v:+.1%}" for k, v in result["ray"]["overhead"].items())
        print(f"ray overhead (extra time per batch): {overhead}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible; use --device cpu")
    settings = {
        "model": args.model,
        "height": args.size[0],
        "width": args.size[1],
        "score_batch": args.score_batch,
        "train_batch": args.train_batch,
        "iters": args.iters,
        "warmup": args.warmup,
        "matmul_size": args.matmul_size,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "torch": torch.__version__,
        "torchvision": torchvision_version(),
        "threads": torch.get_num_threads(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if args.device == "cuda" else None,
    }
    gflops, core = measure_core(args)
    if args.device == "cuda":
        torch.cuda.empty_cache()  # the core's model is gone; free its memory for what follows
    reps = 20 if args.device == "cuda" else 5
    tflops = bf16_matmul_tflops(args.matmul_size, args.device, reps)
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        **core,
        "bf16_matmul_tflops": tflops,
        "model_gflops_per_image": gflops,
        "scoring_bf16_fraction_of_matmul": core["scoring"]["bf16_images_per_s"]
        * gflops
        / (tflops * 1000),
        "ray": None if args.no_ray else measure_ray(args, core),
        "settings": settings,
    }
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
