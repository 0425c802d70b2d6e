"""The ``sfda-ray`` command."""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Callable
from typing import Any

from sfda_ray.config import NORMALIZATIONS, Config, ConfigError, load_config, parse_override
from sfda_ray.data.labels import EVAL_SUBSETS


def _at_least(kind: type, low: float, exclusive: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: a number of ``kind`` at least (or above) ``low``, refused in
    argparse's words (``argument --batch-size: 0 is out of range; allowed: >= 1``), as
    the config's keys are, where the flag sets no config key."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {expected}") from None
        if not math.isfinite(value) or value < low or (exclusive and value == low):
            bound = f"{'>' if exclusive else '>='} {low:g}"
            raise argparse.ArgumentTypeError(f"{text} is out of range; allowed: {bound}")
        return value

    return parse


COUNT = _at_least(int, 0)
POSITIVE = _at_least(int, 1)


def check_inputs_exist(inputs: dict[str, str]) -> None:
    """Before Ray starts: a missing input (flag -> path) is named at once, not from a Ray
    task; ``--scores`` is a directory that ``score`` wrote."""
    from sfda_ray import storage

    for flag, path in inputs.items():
        if flag == "--scores" and not storage.exists(storage.join(path, "scores.parquet")):
            raise FileNotFoundError(
                f"--scores {path} holds no scores.parquet; score the target first "
                "(sfda-ray score --out DIR)"
            )
        if not storage.exists(path):
            raise FileNotFoundError(f"{flag} {path} does not exist")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config; flags given here override its values")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override any config value, e.g. --set source.lr=0.005 (repeatable)",
    )


def _config(args: argparse.Namespace, flags: dict[str, Any]) -> Config:
    overrides = dict(parse_override(s) for s in args.set)
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(args.config, overrides)


def _add_domain_arg(p: argparse.ArgumentParser, default: str, what: str) -> None:
    p.add_argument(
        "--domain",
        choices=("source", "target"),
        help=f"synthetic benchmark only: the half {what} (default: {default}); "
        "a real dataset is one domain",
    )
    p.set_defaults(default_domain=default)


def _add_device_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--device", default="auto", help=f"{what} (auto: a GPU when there is one; cpu; cuda:N)"
    )


def _domain(args: argparse.Namespace) -> str:
    """``--domain`` picks a half of a synthetic benchmark. A real dataset is one domain, so
    the flag there is a mistake to report, not a value to ignore."""
    if args.domain is None:
        return args.default_domain
    from sfda_ray.data.catalog import is_synthetic

    if not is_synthetic(args.data):
        raise ValueError(
            f"--domain {args.domain}: {args.data} is not a synthetic benchmark, the only "
            "data with two domains; drop --domain (a real dataset is its own domain)"
        )
    return args.domain


def cmd_synth(args: argparse.Namespace) -> int:
    from sfda_ray.data.synthetic import BenchmarkSpec, generate

    spec = BenchmarkSpec(
        seed=args.seed,
        height=args.height,
        width=args.width,
        shift=args.shift,
        source_train=args.source_train,
        source_val=args.source_val,
        target_train=args.target_train,
        target_val=args.target_val,
    )
    info = generate(args.out, spec)
    print(
        f"wrote {sum(info['images'].values())} images to {args.out} "
        f"(preview: {args.out}/preview.png)"
    )
    return 0


def cmd_train_source(args: argparse.Namespace) -> int:
    from sfda_ray.train_source import train_source

    cfg = _config(
        args,
        {
            "source.iterations": args.iterations,
            "source.batch_size": args.batch_size,
            "source.lr": args.lr,
            "source.seed": args.seed,
            "model.name": args.model,
        },
    )
    domain = _domain(args)
    meta = train_source(cfg, args.data, args.out, domain=domain, device=args.device)
    print(
        f"checkpoint {args.out}: {meta['arch']['name']}, {meta['iteration']} iterations, "
        f"trained on {domain} data {meta['data_fingerprint']}"
    )
    return 0


def cmd_import_checkpoint(args: argparse.Namespace) -> int:
    from sfda_ray import storage
    from sfda_ray.data.labels import CLASS_NAMES
    from sfda_ray.models.checkpoint import file_fingerprint, load_model, save_checkpoint

    if storage.resolve(args.out)[1] == storage.resolve(args.checkpoint)[1]:
        raise ValueError(f"--out {args.out} is the checkpoint being imported; name a new file")
    if storage.exists(args.out) and not args.force:
        raise ValueError(f"--out {args.out} exists; pass --force to replace it")
    options = {"layout": args.layout, "multi_level": args.multi_level}
    if args.aspp_sum:
        options["aspp_sum"] = args.aspp_sum
    # Every key must match the chosen layout: a wrong one is refused, naming the keys.
    model, meta = load_model(
        args.checkpoint,
        arch={"name": args.model, "options": options},
        num_classes=len(CLASS_NAMES),
    )
    save_checkpoint(
        args.out,
        model,
        {
            "normalization": args.normalization,
            "imported_from": str(args.checkpoint),
            "imported_fingerprint": file_fingerprint(args.checkpoint),
        },
    )
    print(
        f"checkpoint {args.out}: {meta['arch']['name']} {meta['arch']['options']}, "
        f"{meta['num_classes']} classes, {args.normalization} input, from {args.checkpoint}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from sfda_ray.evaluate import evaluate_checkpoint

    report = evaluate_checkpoint(
        args.checkpoint,
        args.data,
        _domain(args),
        args.split,
        tuple(args.size) if args.size else None,
        args.batch_size,
        args.classes,
        args.device,
    )
    if args.json:
        print(json.dumps(report))
        return 0

    def percent(value: float | None) -> str:  # None: no pixel of the class(es) anywhere
        return "-" if value is None else f"{value:.2f}"

    print(
        f"{report['dataset']} {args.split}: mIoU {percent(report['miou'])} over "
        f"{report['eval_classes']} ({report['images']} images, {report['skipped']} skipped)"
    )
    for name, iou in report["per_class"].items():
        print(f"  {name:<14} {percent(iou)}")
    for name, miou in report["subsets"].items():
        print(f"  mIoU[{name}] {percent(miou)}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from sfda_ray.dist.runtime import init_ray
    from sfda_ray.dist.scoring import ScoringOptions, score_dataset, write_pictures

    cfg = _config(
        args,
        {
            "score.batch_size": args.batch_size,
            "score.actors": args.actors,
            "score.mc_passes": args.mc_passes,
            "score.split": args.split,
        },
    )
    options = ScoringOptions.from_config(cfg, _domain(args))
    check_inputs_exist({"--checkpoint": args.checkpoint, "--data": args.data})
    init_ray(args.address)
    summary = score_dataset(args.checkpoint, args.data, args.out, options)
    pictures = write_pictures(args.out, cfg.select, cfg.model.num_classes)
    print(
        f"scored {summary['scored']} images, skipped {summary['skipped']} "
        f"{summary['skipped_reasons'] or ''} in {summary['seconds']} s "
        f"({summary['images_per_s']} images/s) on {len(summary['nodes'])} node(s)"
    )
    for key in (
        "quality_kept_pixel_accuracy",
        "quality_all_pixel_accuracy",
        "quality_score_miou_spearman",
    ):
        if summary.get(key) is not None:
            print(f"  {key[len('quality_') :]}: {summary[key]:.3f}")
    print(f"table: {args.out}/scores.parquet; pictures: {', '.join(pictures)}")
    return 0


def cmd_adapt(args: argparse.Namespace) -> int:
    from sfda_ray.dist.runtime import init_ray
    from sfda_ray.dist.train import run_adapt

    cfg = _config(
        args,
        {
            "adapt.method": args.method,
            "adapt.iterations": args.iterations,
            "adapt.seed": args.seed,
        },
    )
    check_inputs_exist(
        {"--checkpoint": args.checkpoint, "--scores": args.scores, "--data": args.data}
    )
    init_ray(args.address)
    metrics = run_adapt(
        cfg,
        args.checkpoint,
        args.scores,
        args.data,
        args.out,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        cpus_per_worker=args.cpus_per_worker,
        placement_strategy=args.placement,
    )
    shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
    print(
        f"adapted model: {args.out}/final.pt ({cfg.adapt.method}, "
        f"{metrics.get('iteration')} iterations) {shown}"
    )
    return 0


def add_tune_args(parser: argparse.ArgumentParser, default_out: str = "outputs/tune") -> None:
    """Arguments of the main job (`sfda-ray tune`, `experiments/tune_*.py`)."""
    parser.add_argument(
        "--out",
        help=f"output directory (default: {default_out}; on the synthetic benchmark, "
        f"{default_out}_smoke with --smoke and {default_out}_seedN with --seed N > 0)",
    )
    parser.set_defaults(default_out=default_out)
    parser.add_argument(
        "--data", help="target data: manifest .parquet or dataset .yaml (default: synthetic)"
    )
    parser.add_argument(
        "--checkpoint",
        help="source checkpoint (required with --data; convert a public .pth with "
        "`sfda-ray import-checkpoint`)",
    )
    parser.add_argument("--config", help="YAML config (flags and --set override it)")
    parser.add_argument(
        "--space",
        help="search-space YAML (default: tune.space, else sfda_ray/dist/tune_space.yaml)",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--samples", type=int, help="trials (tune.num_samples)")
    parser.add_argument("--concurrent", type=int, help="trials at once (tune.max_concurrent)")
    parser.add_argument("--workers", type=int, help="Ray Train workers per trial")
    parser.add_argument("--gpus-per-worker", type=float)
    parser.add_argument("--experiment", help="MLflow experiment (default: from the task)")
    parser.add_argument("--seed", type=COUNT, default=0, help="synthetic benchmark seed")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for a quick check")
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    parser.add_argument(
        "--keep-train-checkpoints",
        action="store_true",
        help="keep the Ray Train checkpoints of the completed and early-stopped trials "
        "(by default deleted once the sweep has ended; a completed trial keeps final.pt)",
    )


def cmd_tune(args: argparse.Namespace) -> int:
    from sfda_ray.dist.job import run_job_command

    return run_job_command(args, args.task, "sfda-ray tune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sfda-ray",
        description="Source-data-free domain adaptation for semantic segmentation on Ray.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("synth", help="write the built-in synthetic benchmark")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=COUNT, default=0)
    p.add_argument("--height", type=POSITIVE, default=96)
    p.add_argument("--width", type=POSITIVE, default=192)
    p.add_argument(
        "--shift",
        type=float,
        default=1.0,
        help="strength of the source->target shift, 0 (none) to 1 (default)",
    )
    p.add_argument("--source-train", type=COUNT, default=600)
    p.add_argument("--source-val", type=COUNT, default=100)
    p.add_argument("--target-train", type=COUNT, default=600)
    p.add_argument("--target-val", type=COUNT, default=150)
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser(
        "train-source", help="train a source model (the only command that reads source data)"
    )
    p.add_argument(
        "--data", required=True, help="synthetic benchmark dir, manifest .parquet or dataset .yaml"
    )
    p.add_argument("--out", required=True, help="checkpoint file (resumed if incomplete)")
    _add_domain_arg(p, "source", "to train on; `target` trains the oracle, a reference")
    p.add_argument("--model", help="model name (config model.name)")
    p.add_argument("--iterations", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--seed", type=int)
    _add_device_arg(p, "where the model trains, as the config's perf section says")
    _add_config_args(p)
    p.set_defaults(func=cmd_train_source)

    p = sub.add_parser(
        "import-checkpoint",
        help="wrap a public AdaptSegNet/ADVENT state dict (.pth) as an sfda_ray checkpoint",
    )
    p.add_argument("checkpoint", help="raw state dict, local path or URI")
    p.add_argument("--out", required=True, help="sfda_ray checkpoint to write (path or URI)")
    p.add_argument("--model", default="deeplabv2_resnet101", help="model name (config model.name)")
    p.add_argument(
        "--layout",
        required=True,
        choices=("adaptsegnet", "advent"),
        help="classifier names: AdaptSegNet's Res_Deeplab (layer5) or ADVENT's (layer6)",
    )
    p.add_argument(
        "--multi-level", action="store_true", help="two classifiers (layer5 on layer3, layer6)"
    )
    p.add_argument(
        "--aspp-sum",
        choices=("two", "all"),
        help="ASPP branches summed (default: two for adaptsegnet, its quirk; all for advent)",
    )
    p.add_argument(
        "--normalization",
        default="caffe_bgr",
        choices=NORMALIZATIONS,
        help="input the weights expect: caffe_bgr (the public checkpoints) or imagenet",
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_import_checkpoint)

    p = sub.add_parser(
        "eval",
        help="mIoU and per-class IoU of a checkpoint (with --json also the confusion matrix)",
    )
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    _add_domain_arg(p, "target", "to evaluate")
    p.add_argument("--split", default="val")
    p.add_argument(
        "--size",
        type=POSITIVE,
        nargs=2,
        metavar=("H", "W"),
        help="model input size; predictions are scored at label resolution",
    )
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument(
        "--classes",
        nargs="+",
        choices=list(EVAL_SUBSETS),
        help="class subsets to score (the first gives the headline mIoU); default: the "
        "dataset's own, e.g. `--classes synthia16 synthia13` for SYNTHIA -> Cityscapes",
    )
    _add_device_arg(p, "where the model runs, in fp32")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("score", help="score target images with the source model (Ray Data)")
    p.add_argument("--checkpoint", required=True, help="source model checkpoint")
    p.add_argument("--data", required=True, help="target data (benchmark dir, manifest, yaml)")
    p.add_argument("--out", required=True, help="scores directory (local path or URI)")
    _add_domain_arg(p, "target", "to score")
    p.add_argument("--split", help="split to score (default: train)")
    p.add_argument("--actors", type=int, help="scoring actors (default: from the cluster)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--mc-passes", type=int, help="MC-dropout passes (0: off)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    _add_config_args(p)
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("adapt", help="adapt the source model to the target (Ray Train)")
    p.add_argument("--checkpoint", required=True, help="source model checkpoint")
    p.add_argument("--scores", required=True, help="scores directory written by `score`")
    p.add_argument("--data", required=True, help="target data (for evaluation splits)")
    p.add_argument("--out", required=True, help="run directory; final model at OUT/final.pt")
    p.add_argument(
        "--method",
        help="sfda (default) or a baseline: source_only, adabn, tent, minent, self_training",
    )
    p.add_argument("--iterations", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--workers", type=POSITIVE, default=1, help="Ray Train workers (DDP)")
    p.add_argument("--gpus-per-worker", type=_at_least(float, 0.0), default=0.0)
    p.add_argument("--cpus-per-worker", type=_at_least(float, 0.0, exclusive=True), default=1.0)
    p.add_argument(
        "--placement",
        choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
        default="PACK",
        help="SPREAD: spread workers over nodes where it can (STRICT_: always); "
        "PACK (default): fill a node first",
    )
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or local)")
    _add_config_args(p)
    p.set_defaults(func=cmd_adapt)

    p = sub.add_parser(
        "tune", help="score once, then a Ray Tune sweep of adaptations, logged to MLflow"
    )
    add_tune_args(p)
    p.add_argument(
        "--task",
        default="gta5_cityscapes",
        help="names the MLflow experiment (sfda_ray/TASK) for real data",
    )
    p.set_defaults(func=cmd_tune)
    return parser


BAD_INPUT = (ConfigError, ValueError, OSError)


# pyarrow's words for an object store that did not answer (its errors are plain OSError).
_STORE_UNREACHABLE = (
    "NETWORK_CONNECTION",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "REQUEST_TIMEOUT",
    "THROTTLING",
)
# MLflow's error codes of a store that could not serve the request just now.
_MLFLOW_UNAVAILABLE = ("TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED")


def is_transient(error: BaseException) -> bool:
    """A lost connection or a timeout (a Ray ``GetTimeoutError``, an MLflow server or a
    bucket that stopped answering): not bad input, and a rerun may not meet it."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):  # MLflow wraps a failed request in its own
        return error.error_code in _MLFLOW_UNAVAILABLE or bool(
            re.match(r"API request to \S+ failed with (timeout )?exception", error.message)
        )
    if isinstance(
        error, (ConnectionError, TimeoutError, requests.ConnectionError, requests.Timeout)
    ):
        return True
    return isinstance(error, OSError) and any(w in str(error) for w in _STORE_UNREACHABLE)


def _causes(error: BaseException) -> list[BaseException]:
    """What was raised where the work ran: inside Ray, each failed worker's exception."""
    if type(error).__module__.startswith("ray."):
        from sfda_ray.dist.tracking import root_causes

        return root_causes(error)
    return [error]


def _reportable(cause: BaseException) -> bool:
    """Bad input, a transient failure, or an error of Ray's or MLflow's own (a lost actor
    or node, a store's refusal); not a bug in the code, whose traceback is wanted. Ray
    Data's ``UserCodeException`` stands for an error in the code it ran, which only its
    traceback text still names."""
    if type(cause).__module__.startswith("ray."):
        from ray.exceptions import UserCodeException

        return not isinstance(cause, UserCodeException)
    return (
        isinstance(cause, BAD_INPUT)
        or is_transient(cause)
        or type(cause).__module__.startswith("mlflow.")
    )


def is_told(error: BaseException) -> bool:
    """Whether ``error`` is told in one line and an exit code rather than a traceback."""
    return all(_reportable(c) for c in _causes(error))


def error_exit(prog: str, error: BaseException) -> int:
    """Print ``error`` in one line and return the exit code: 2 for bad input, else 1; a
    transient error says that a rerun of the same command resumes past it. An error Ray
    raised is told by its causes (each failed worker's), without Ray's wrapping."""
    causes, text = _causes(error), str(error)
    if type(error).__module__.startswith("ray."):
        from sfda_ray.dist.tracking import describe_error

        text = describe_error(error)
    if any(is_transient(c) for c in causes):
        print(f"{prog}: error: {text} (rerun the same command to resume)", file=sys.stderr)
        return 1
    print(f"{prog}: error: {text}", file=sys.stderr)
    return 2 if all(isinstance(c, BAD_INPUT) for c in causes) else 1


_sigterm_received = False


def raise_terminated(signum: int, frame: Any) -> None:
    """SIGTERM (``ray job stop``, a scheduler ending the job) unwinds as Ctrl-C does, once
    Ray is up (``dist.runtime.init_ray`` installs this): the MLflow runs are closed KILLED
    and a rerun resumes. An exception raised while Ray waits (``ray.get``, Tune's loop)
    comes out of Ray as a plain KeyboardInterrupt whatever its type, so the signal is
    recorded here, for ``exit_code``."""
    global _sigterm_received
    _sigterm_received = True
    raise KeyboardInterrupt


def exit_code(prog: str, error: BaseException, interrupted: str = "interrupted") -> int | None:
    """The exit code of a command stopped by ``error``, which is told in one line: 130
    for Ctrl-C, 143 (128 + SIGTERM, as a shell reports it) for SIGTERM once Ray is up,
    else ``error_exit``'s; None for an error whose traceback is wanted."""
    if isinstance(error, KeyboardInterrupt):
        code = 143 if _sigterm_received else 130
        if code == 143:
            interrupted = interrupted.replace("interrupted", "stopped by SIGTERM", 1)
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return code
    if isinstance(error, Exception) and is_told(error):
        return error_exit(prog, error)
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as e:  # train-source, score, adapt resume on rerun
        code = exit_code("sfda-ray", e)
        if code is None:
            raise
        return code


if __name__ == "__main__":
    sys.exit(main())
