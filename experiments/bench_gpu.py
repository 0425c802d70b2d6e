"""GPU throughput of DeepLab-v2: scoring images/s and adaptation iterations/s, fp32 and bf16.

By default DeepLab-v2 ResNet-101 at 1024x512 (the paper's setting) on the GPU, or a
ResNet-18 at 64x128 on a CPU (so it is tested without a GPU). Measured, each in fp32
and bf16 (``torch.autocast``):

* scoring: a uint8 batch copied to the device (from pageable memory, as the scoring
  actors copy Ray Data's batches), normalised there, a forward under
  ``torch.inference_mode()``, softmax, per-pixel max/argmax and normalised entropy, as
  when scoring the virtual source;
* adaptation: a uint8 batch copied from pinned memory (as the adaptation loaders pin
  theirs), forward, cross-entropy on random labels (19 classes, ignore 255), backward and
  an SGD step;
* the same two through the Ray layer (one Ray actor holding the model, each call
  carrying its batch through Ray's object store, as Ray Data hands batches to the
  scorers), when ``import ray`` works and ``--no-ray`` is not given; else ``"ray": null``;
* the model's FLOPs per image (``FlopCounterMode``, a multiply-add is 2 FLOPs), a large
  bf16 matmul's TFLOPS, and the fraction of the latter that bf16 scoring achieves.

As the project runs on a GPU: channels-last, cuDNN's default algorithm choice (no
``cudnn.benchmark``), and "fp32" convolutions in TF32 where torch allows it (recorded in
``settings``). Each rate is timed over at least ``--min-seconds``. The JSON is written
once the core numbers are in, and again with the Ray ones.

    python experiments/bench_gpu.py --json experiments/results/gpu_<device>.json

Targets on an H100-class GPU: bf16 scoring at least 1.5x fp32; bf16 scoring at least
40% of the measured bf16 matmul throughput; the Ray layer at most 10% slower than the
core alone at the same batch size.

The core path imports only torch, torchvision and ``sfda_ray/models/deeplabv2.py``
(loaded by file path), so it runs where the package's other dependencies are missing.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import platform
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

if TYPE_CHECKING:
    import numpy as np

# `sfda_ray.models` pulls in checkpoint IO and with it pyarrow; deeplabv2.py itself needs
# only torch and torchvision.
MODEL_FILE = Path(__file__).resolve().parents[1] / "sfda_ray" / "models" / "deeplabv2.py"
NUM_CLASSES = 19
IGNORE_INDEX = 255
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # imagenet normalisation


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
    """One model, its optimizer and fixed uint8 CPU batches, stepped on one device.

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

        cudnn.benchmark = args.cudnn_benchmark
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
        self.mean = torch.tensor(MEAN, device=args.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(STD, device=args.device).view(1, 3, 1, 1) * 255
        self.score_images, self.train_images, self.train_labels = batches(args)
        if args.device == "cuda":  # page-locked, as the adaptation loaders' batches are
            self.train_images = self.train_images.pin_memory()
            self.train_labels = self.train_labels.pin_memory()

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images over the bus, normalised on the device."""
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def _set_mode(self, train: bool) -> None:
        if self.model.training != train:
            self.model.train(train)

    def score(self, bf16: bool, images: np.ndarray | None = None) -> None:
        """One scoring batch: this bench's own, or ``images`` (a uint8 array) when given."""
        images = self.score_images if images is None else torch.from_numpy(images)
        self._set_mode(False)
        with torch.inference_mode(), torch.autocast(self.device, torch.bfloat16, enabled=bf16):
            logits = self.step_model(self._input(images))
            prob = logits.float().softmax(1)
            conf, label = prob.max(1)
            entropy = -(prob * prob.clamp_min(1e-12).log()).sum(1) / math.log(NUM_CLASSES)
        del conf, label, entropy  # computed for their cost; scores stay on the device

    def train(
        self, bf16: bool, images: np.ndarray | None = None, labels: np.ndarray | None = None
    ) -> None:
        """One adaptation step: this bench's batch, or ``images`` and ``labels`` (uint8)."""
        if images is None:
            images, labels = self.train_images, self.train_labels
        else:
            images, labels = torch.from_numpy(images), torch.from_numpy(labels)
        self._set_mode(True)
        labels = labels.to(self.device, non_blocking=True).long()
        with torch.autocast(self.device, torch.bfloat16, enabled=bf16):
            logits = self.step_model(self._input(images))
        loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def sync(self) -> None:
        synchronize(self.device)


def batches(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scoring images, training images and their labels, uint8 on the CPU, seeded."""
    g = torch.Generator().manual_seed(0)
    h, w = args.size

    def images(n: int) -> torch.Tensor:
        return torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)

    score_images, train_images = images(args.score_batch), images(args.train_batch)
    labels = torch.randint(0, NUM_CLASSES, (args.train_batch, h, w), generator=g)
    labels = labels.masked_fill(torch.rand(labels.shape, generator=g) < 0.1, IGNORE_INDEX)
    return score_images, train_images, labels.to(torch.uint8)


def steps_per_s(
    step: Callable[[], object],
    sync: Callable[[], object],
    warmup: int,
    iters: int,
    min_seconds: float = 0.0,
) -> float:
    """Steps per second over at least ``iters`` timed steps and ``min_seconds``, after
    ``warmup`` untimed ones."""
    for _ in range(warmup):
        step()
    sync()
    n = iters
    while True:
        start = time.perf_counter()
        for _ in range(n):
            step()
        sync()  # GPU work is asynchronous: the clock stops when the last step has finished
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return n / elapsed
        n = math.ceil(n * 1.2 * min_seconds / max(elapsed, 1e-6))  # long enough this time


def measure(
    call: Callable[[str, bool], Callable[[], object]],
    sync: Callable[[], object],
    args: argparse.Namespace,
) -> dict:
    """Scoring images/s and train iterations/s in fp32 and bf16; ``call(kind, bf16)``
    returns a function doing one step."""
    scoring, train = {}, {}
    for precision, bf16 in (("fp32", False), ("bf16", True)):
        timing = (sync, args.warmup, args.iters, args.min_seconds)
        rate = steps_per_s(call("score", bf16), *timing)
        scoring[f"{precision}_images_per_s"] = rate * args.score_batch
        train[f"{precision}_iters_per_s"] = steps_per_s(call("train", bf16), *timing)
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


def bf16_matmul_tflops(n: int, device: str, min_seconds: float) -> float:
    """Measured bf16 matmul throughput, the ceiling the model's FLOPs are compared with
    (sustained: timed over ``min_seconds``, not a burst of a few products)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    rate = steps_per_s(lambda: a @ b, lambda: synchronize(device), 3, 5, min_seconds)
    return rate * 2 * n**3 / 1e12


def measure_core(args: argparse.Namespace) -> tuple[float, dict]:
    """Model GFLOPs per image and the core's numbers, the model in this process."""
    bench = Bench(args, torch.get_num_threads())
    gflops = model_gflops(bench.model, tuple(args.size), args.device, args.channels_last)
    return gflops, measure(lambda kind, bf16: partial(getattr(bench, kind), bf16), bench.sync, args)


def measure_ray(args: argparse.Namespace, core: dict) -> dict | None:
    """The same steps in one Ray actor, each call carrying its batch (a uint8 array, put
    in Ray's object store per call); None without Ray. Joins a running Ray if there is
    one, else starts its own."""
    try:
        import ray
    except ImportError:
        print("ray is not installed: no Ray-layer numbers")
        return None
    own = not ray.is_initialized()
    if own:
        ray.init(include_dashboard=False, log_to_driver=False)
    try:
        gpus = 1 if args.device == "cuda" else 0
        actor = ray.remote(num_gpus=gpus)(Bench).remote(args, torch.get_num_threads())
        try:
            score_images, train_images, train_labels = (t.numpy() for t in batches(args))

            def call(kind: str, bf16: bool) -> Callable[[], object]:
                if kind == "score":
                    return lambda: ray.get(actor.score.remote(bf16, score_images))
                return lambda: ray.get(actor.train.remote(bf16, train_images, train_labels))

            # Waiting on each call puts the full hop on every batch, as a blocking
            # pipeline's.
            result = measure(call, lambda: ray.get(actor.sync.remote()), args)
        finally:
            # A joined Ray outlives this script: the actor must not keep its GPU.
            ray.kill(actor)
    finally:
        if own:
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
    parser.add_argument(
        "--min-seconds", type=float, help="shortest timing of a rate; default 2 (cuda), 0 (cpu)"
    )
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="NHWC model and inputs; default: on (cuda), off (cpu), as the project runs",
    )
    parser.add_argument(
        "--cudnn-benchmark",
        action="store_true",
        help="let cuDNN time its kernels first (the project leaves this off)",
    )
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
        "min_seconds": 2.0 if gpu else 0.0,
        "channels_last": gpu,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.iters < 1 or args.warmup < 0 or args.min_seconds < 0:
        parser.error("--iters must be at least 1, --warmup and --min-seconds at least 0")
    return args


def print_table(result: dict) -> None:
    tf32 = result["settings"]["cudnn_allow_tf32"]
    print(f"{'':<22}{'fp32*' if tf32 else 'fp32':>12}{'bf16':>12}{'bf16/fp32':>12}")
    sections = (("scoring", "images_per_s", "img/s"), ("train", "iters_per_s", "it/s"))
    ray_ok = result["ray"] is not None and "error" not in result["ray"]
    for name, r in [("core", result), ("ray", result["ray"] if ray_ok else None)]:
        for section, unit, label in sections if r is not None else ():
            fp32, bf16 = r[section][f"fp32_{unit}"], r[section][f"bf16_{unit}"]
            row = f"{name} {section} {label}"
            print(f"{row:<22}{fp32:>12.3g}{bf16:>12.3g}{bf16 / fp32:>11.2f}x")
    print(
        f"model {result['model_gflops_per_image']:.3g} GFLOPs/image; "
        f"bf16 matmul {result['bf16_matmul_tflops']:.3g} TFLOPS; "
        f"bf16 scoring reaches {result['scoring_bf16_fraction_of_matmul']:.1%} of it"
    )
    if tf32:
        print("* convolutions in TF32 (torch.backends.cudnn.allow_tf32), as torch's default")
    if ray_ok:
        overhead = ", ".join(f"{k} {v:+.1%}" for k, v in result["ray"]["overhead"].items())
        print(f"ray overhead (extra time per batch): {overhead}")


def write(result: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no GPU is visible; use --device cpu")
    cuda = args.device == "cuda"
    settings = {
        "model": args.model,
        "height": args.size[0],
        "width": args.size[1],
        "score_batch": args.score_batch,
        "train_batch": args.train_batch,
        "iters": args.iters,
        "warmup": args.warmup,
        "min_seconds": args.min_seconds,
        "matmul_size": args.matmul_size,
        "channels_last": args.channels_last,
        "cudnn_benchmark": args.cudnn_benchmark,
        "compile": args.compile,
        "torch": torch.__version__,
        "torchvision": torchvision_version(),
        "cuda": torch.version.cuda if cuda else None,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "threads": torch.get_num_threads(),
        "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32 if cuda else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "command": " ".join(sys.argv),
    }
    gflops, core = measure_core(args)
    if cuda:
        torch.cuda.empty_cache()  # the core's model is gone; free its memory for what follows
    tflops = bf16_matmul_tflops(args.matmul_size, args.device, args.min_seconds)
    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        **core,
        "bf16_matmul_tflops": tflops,
        "model_gflops_per_image": gflops,
        "scoring_bf16_fraction_of_matmul": core["scoring"]["bf16_images_per_s"]
        * gflops
        / (tflops * 1000),
        "ray": None if args.no_ray else "pending",
        "settings": settings,
    }
    write(result, args.json)  # the core numbers are kept whatever the Ray layer does
    if not args.no_ray:
        try:
            result["ray"] = measure_ray(args, core)
        except Exception as e:  # noqa: BLE001 - a broken Ray costs its numbers, not the core's
            print(f"the Ray-layer measurement failed: {e!r}", file=sys.stderr)
            result["ray"] = {"error": repr(e)}
    print_table(result)
    write(result, args.json)
    return result


if __name__ == "__main__":
    main()
