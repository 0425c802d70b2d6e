"""Typed configuration: dataclasses loaded from YAML and validated on load.

Every error names the dotted key, the value found and what is allowed, e.g.
``source.lr: -0.1 is out of range; allowed: > 0``. Command-line flags override YAML
values through :func:`apply_overrides` with the same validation.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sfda_ray.data.labels import EVAL_SUBSETS


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


def _check(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    choices: tuple | None = None,
) -> dict:
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "choices": choices}


def _field(default: Any, **check: Any) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=_check(**check))
    return field(default=default, metadata=_check(**check))


DATA_KINDS = ("synthetic", "gta5", "synthia", "cityscapes")
NORMALIZATIONS = ("imagenet", "caffe_bgr")


@dataclass
class DataConfig:
    """Where the images are and how they are fed to the model."""

    kind: str = _field("synthetic", choices=DATA_KINDS)
    # Dataset root (for `synthetic`: the benchmark directory written by `sfda-ray synth`).
    root: str | None = None
    # Optional prebuilt manifest; otherwise the root is scanned.
    manifest: str | None = None
    # Resize every image to (height, width) before augmentation; null keeps native size.
    size: list[int] | None = None
    # Source-training crop (height, width); null: data.size, else the most common
    # image size.
    crop: list[int] | None = None
    scale_min: float = _field(0.75, lo=0.0, lo_open=True)
    scale_max: float = _field(1.25, lo=0.0, lo_open=True)
    hflip: bool = True
    normalization: str = _field("imagenet", choices=NORMALIZATIONS)
    # Class subsets scored on the target (first: the headline mIoU); null: the dataset's
    # own (all 19 on Cityscapes). SYNTHIA -> Cityscapes uses [synthia16, synthia13].
    eval_classes: list[str] | None = None

    @property
    def input_size(self) -> tuple[int, int] | None:
        """``size`` as the (H, W) tuple the loaders take; None keeps the native size."""
        return tuple(self.size) if self.size else None


@dataclass
class ModelConfig:
    name: str = _field(
        "deeplabv2_resnet18",
        choices=("deeplabv2_resnet18", "deeplabv2_resnet50", "deeplabv2_resnet101"),
    )
    # Every dataset's labels are read into Cityscapes' 19 train ids (SYNTHIA's 16 and 13
    # classes are scored as subsets of them), so every model predicts those 19.
    num_classes: int = _field(19, choices=(19,))
    # Small torchvision backbones only: 16 is about three times cheaper than 8 on a CPU.
    output_stride: int = _field(16, choices=(8, 16))
    # Frozen BatchNorm (the ResNet-101 checkpoints' setting); null: the model's default.
    freeze_bn: bool | None = None
    mc_dropout: float = _field(0.0, lo=0.0, hi=1.0, hi_open=True)
    # Downloads torchvision ImageNet weights: never on by default.
    imagenet_init: bool = False


@dataclass
class SourceTrainConfig:
    """Supervised training of a source model (or, on the synthetic benchmark, the oracle)."""

    iterations: int = _field(400, lo=1)
    batch_size: int = _field(8, lo=1)
    lr: float = _field(0.05, lo=0.0, lo_open=True)
    momentum: float = _field(0.9, lo=0.0, hi=1.0)
    weight_decay: float = _field(1e-4, lo=0.0)
    checkpoint_every: int = _field(100, lo=1)
    log_every: int = _field(20, lo=1)
    seed: int = _field(0, lo=0)
    threads: int = _field(2, lo=1)


@dataclass
class ScoreConfig:
    """Scoring target images with the source model on Ray Data."""

    batch_size: int = _field(16, lo=1)
    # Scoring actors; null: one per GPU, else the cluster's CPUs less one (at least one).
    actors: int | None = _field(None, lo=1)
    # GPUs per scoring actor; null: 1 if the cluster has GPUs when scoring starts. Set it
    # (with `actors`) on a cluster whose GPU nodes autoscale from zero: the request is
    # what starts them.
    gpus_per_actor: float | None = _field(None, lo=0.0)
    # Torch threads per CPU actor; null: the cluster's CPUs shared among the actors.
    threads_per_actor: int | None = _field(None, lo=1)
    # MC-dropout passes (0: off); needs a model built with model.mc_dropout > 0.
    mc_passes: int = _field(0, lo=0)
    # Score with the source model after AdaBN on the target (pseudo-labels far better
    # under an appearance shift; the adaptation then starts from the same model).
    adabn: bool = True
    split: str = "train"


@dataclass
class SelectConfig:
    """Virtual-source selection: applied to a scores table, never re-runs the model."""

    # Top fraction of images by score that form the virtual source ...
    ratio: float | None = _field(0.5, lo=0.0, lo_open=True, hi=1.0)
    # ... or, instead, every image whose score is at least this.
    score_threshold: float | None = _field(None, lo=0.0, hi=1.0)
    # Pixels of the virtual source below this confidence are ignored (with class_balanced,
    # each class's threshold is at most this); rounded up to a confidence bin edge (0.05).
    # At most 0.95, the last bin's lower edge: a higher threshold would keep no pixel.
    tau: float = _field(0.9, lo=0.0, hi=0.95)
    # CBST-style per-class thresholds: each class keeps its top `cb_portion` of pixels.
    class_balanced: bool = True
    cb_portion: float = _field(0.5, lo=0.0, lo_open=True, hi=1.0)


ADAPT_METHODS = ("sfda", "source_only", "adabn", "tent", "minent", "self_training")


@dataclass
class AdaptConfig:
    """The adaptation and, by `method`, the baselines (README: "The method, as implemented")."""

    method: str = _field("sfda", choices=ADAPT_METHODS)
    iterations: int = _field(300, lo=0)
    batch_size: int = _field(4, lo=1)  # per worker, for each of V and T
    lr: float = _field(0.005, lo=0.0, lo_open=True)
    momentum: float = _field(0.9, lo=0.0, hi=1.0)
    weight_decay: float = _field(1e-4, lo=0.0)
    lr_discriminator: float = _field(1e-4, lo=0.0, lo_open=True)
    lambda_v: float = _field(1.0, lo=0.0)
    lambda_adv: float = _field(0.001, lo=0.0)
    lambda_st: float = _field(1.0, lo=0.0)
    lambda_prior: float = _field(0.1, lo=0.0)
    # ClassMix (DACS): self-training on target images with V's objects pasted in; 0: off.
    lambda_mix: float = _field(0.0, lo=0.0)
    lambda_entropy: float = _field(1.0, lo=0.0)  # tent / minent only
    discriminator_input: str = _field("entropy", choices=("softmax", "entropy"))
    # Per-pixel certainty weights (source confidence on V, teacher confidence on T).
    uncertainty_weights: bool = True
    # Per-class weights alpha = (pi_T / pi_V)^beta, clipped.
    class_weights: bool = True
    prior_beta: float = _field(1.0, lo=0.0)
    alpha_min: float = _field(0.5, lo=0.0, lo_open=True)
    alpha_max: float = _field(5.0, lo=0.0, lo_open=True)
    # Self-training: teacher refreshed each round (round 0: the source model) or an EMA.
    st_rounds: int = _field(2, lo=1)
    teacher: str = _field("round", choices=("round", "ema"))
    ema_momentum: float = _field(0.99, lo=0.0, hi=1.0)
    st_tau: float = _field(0.9, lo=0.0, hi=1.0)
    st_portion: float = _field(0.5, lo=0.0, lo_open=True, hi=1.0)
    # Pseudo-labels from the plain view, losses on a photometrically perturbed view (the
    # self-training methods; tent and minent take the plain view's entropy).
    strong_aug: bool = True
    # Re-estimate BatchNorm statistics on target images before training (method adabn
    # always does: it is that alone).
    adabn_init: bool = True
    # Draw virtual-source images in proportion to their rare-class content.
    rare_class_sampling: bool = True
    eval_every: int = _field(50, lo=1)
    checkpoint_every: int = _field(50, lo=1)
    log_every: int = _field(10, lo=1)
    seed: int = _field(0, lo=0)
    threads: int = _field(2, lo=1)

    @property
    def adversarial(self) -> bool:
        """Whether the output-space discriminator trains (the method, lambda_adv > 0)."""
        return self.method == "sfda" and self.lambda_adv > 0


@dataclass
class SweepConfig:
    """The Ray Tune search over selection thresholds and loss weights (`sfda-ray tune`)."""

    # Search-space YAML (see sfda_ray/dist/tune_space.yaml); null: that default. In a
    # config YAML a relative path is relative to that YAML (a space ships beside it).
    space: str | None = None
    num_samples: int = _field(4, lo=1)
    # Trials running at once; null: as many as the cluster has workers' resources for.
    max_concurrent: int | None = _field(None, lo=1)
    # Each trial is a Ray Train run of this many workers (DDP).
    workers_per_trial: int = _field(1, lo=1)
    cpus_per_worker: float = _field(1.0, lo=0.0, lo_open=True)
    gpus_per_worker: float = _field(0.0, lo=0.0)
    # SPREAD: workers on different nodes where possible (STRICT_: always); PACK: fill a
    # node (NVLink) before the next (STRICT_: one node).
    placement_strategy: str = _field(
        "PACK", choices=("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    )
    # ASHA stops weak trials at rungs of `grace_period` * reduction_factor^k iterations.
    scheduler: str = _field("asha", choices=("asha", "fifo"))
    grace_period: int | None = _field(None, lo=1)  # null: a third of adapt.iterations
    reduction_factor: int = _field(2, lo=2)
    # auto: target-val mIoU when the target has a labelled val split, else the proxy.
    metric: str = _field("auto", choices=("auto", "val_miou", "proxy"))
    # The first trial runs the configured values, so the sweep never does worse than them.
    include_configured: bool = True
    # Times Tune reruns a failed trial, from its last checkpoint (a trial driver's node
    # lost, say); a lost Ray Train worker is restarted within the trial first.
    max_failures: int = _field(1, lo=0)
    seed: int = _field(0, lo=0)


@dataclass
class PerfConfig:
    """How models run on their device (source training, scoring, adaptation and its
    evaluations as it runs; a final evaluation and ``sfda-ray eval`` run in fp32). Every
    setting is safe on a CPU, where ``auto`` means fp32, NCHW and no loader processes."""

    # bf16 autocast of forward passes (losses stay fp32); auto: bf16 on a GPU.
    precision: str = _field("auto", choices=("auto", "fp32", "bf16"))
    # NHWC activations (tensor-core convolutions under bf16); null: on a GPU.
    channels_last: bool | None = None
    # torch.compile the trained and the scoring model; the first steps pay for compiling.
    compile: bool = False
    compile_backend: str = "inductor"
    # Page-locked host batches and non-blocking copies to the GPU (nothing on a CPU).
    pin_memory: bool = True
    # DataLoader processes of source training and of each adaptation worker; null: 4 on
    # a GPU, 0 on a CPU (where extra processes only compete with the model for cores).
    loader_workers: int | None = _field(None, lo=0)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    source: SourceTrainConfig = field(default_factory=SourceTrainConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    tune: SweepConfig = field(default_factory=SweepConfig)
    perf: PerfConfig = field(default_factory=PerfConfig)


# --- loading and validation -------------------------------------------------------------


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} has the wrong type; expected {_type_name(tp)}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} has the wrong type; expected a list")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: {value!r} has the wrong type; expected a number")
        if not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: {value!r} has the wrong type; expected an integer")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: {value!r} has the wrong type; expected true or false")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {value!r} has the wrong type; expected a string")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for {key}")


def _check_range(value: Any, meta: typing.Mapping, key: str) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(
            f"{key}: {value!r} is not allowed; allowed: {', '.join(map(str, choices))}"
        )
    lo, hi = meta.get("lo"), meta.get("hi")
    lo_open, hi_open = meta.get("lo_open"), meta.get("hi_open")
    if lo is None and hi is None:
        return
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or (
        hi is not None and (value >= hi if hi_open else value > hi)
    )
    if bad:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi}")
        raise ConfigError(f"{key}: {value!r} is out of range; allowed: {' and '.join(parts)}")


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad values."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(map(str, unknown))}; allowed: {', '.join(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, key)
            continue
        value = _coerce(value, tp, key)
        _check_range(value, fields[name].metadata, key)
        kwargs[name] = value
    obj = cls(**kwargs)
    _check_cross_fields(obj, prefix)
    return obj


def _check_cross_fields(obj: Any, prefix: str) -> None:
    if isinstance(obj, SelectConfig) and (obj.ratio is None) == (obj.score_threshold is None):
        raise ConfigError(
            f"{prefix}: give exactly one of ratio ({obj.ratio}) and score_threshold "
            f"({obj.score_threshold}); set the other to null"
        )
    if isinstance(obj, AdaptConfig) and obj.alpha_min > obj.alpha_max:
        raise ConfigError(
            f"{prefix}.alpha_min: {obj.alpha_min} is larger than alpha_max {obj.alpha_max}"
        )
    if (
        isinstance(obj, AdaptConfig)
        and obj.method == "sfda"
        and obj.lambda_mix > 0
        and min(obj.lambda_v, obj.lambda_st) == 0
    ):
        # ClassMix pastes V's labelled objects into target images the L_ST teacher labels:
        # without either term there is nothing to mix, and it would be silently off.
        raise ConfigError(
            f"{prefix}.lambda_mix: {obj.lambda_mix} needs lambda_v > 0 and lambda_st > 0 "
            f"(here {obj.lambda_v} and {obj.lambda_st}); set lambda_mix to 0 to turn it off"
        )
    if isinstance(obj, PerfConfig) and obj.compile:
        # Checked only when on: listing the backends imports torch._dynamo (~1.5 s).
        from torch._dynamo import list_backends

        if obj.compile_backend not in list_backends(exclude_tags=()):
            raise ConfigError(
                f"{prefix}.compile_backend: {obj.compile_backend!r} is not a torch.compile "
                f"backend here; allowed: {', '.join(list_backends())} (or a debugging one: "
                "eager, aot_eager, ...)"
            )
    if isinstance(obj, ScoreConfig) and obj.mc_passes == 1:
        raise ConfigError(
            f"{prefix}.mc_passes: 1 is not allowed; 0 (off) or at least 2 stochastic passes"
        )
    if isinstance(obj, DataConfig):
        if obj.scale_min > obj.scale_max:
            raise ConfigError(
                f"{prefix}.scale_min: {obj.scale_min} is larger than scale_max {obj.scale_max}"
            )
        if obj.eval_classes is not None and (
            not obj.eval_classes or not set(obj.eval_classes) <= set(EVAL_SUBSETS)
        ):
            raise ConfigError(
                f"{prefix}.eval_classes: {obj.eval_classes!r} is not allowed; expected a list "
                f"of {', '.join(EVAL_SUBSETS)}"
            )
        for name in ("size", "crop"):
            hw = getattr(obj, name)
            if hw is not None and (len(hw) != 2 or min(hw) < 1):
                raise ConfigError(
                    f"{prefix}.{name}: {hw!r} is not allowed; expected [height, width] >= 1"
                )


# YAML 1.1 wants a dot in a float with an exponent: "1e-3" would be a string.
_YAML11_MISSED_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class _YamlLoader(yaml.SafeLoader):
    """YAML as a user means it: ``1e-3`` is a number (YAML 1.1 reads it as a string) and
    a key given twice is an error (YAML would keep the last one and drop the first)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # a merged mapping's keys may be overridden: not given twice
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key: SafeLoader names it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping",
                    node.start_mark,
                    f"found the key {key!r} a second time",
                    key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", _YAML11_MISSED_FLOAT, list("-+0123456789.")
)


def read_yaml(data: bytes | str, where: str) -> Any:
    """A YAML document, read as ``_YamlLoader`` says; errors name ``where``."""
    try:
        return yaml.load(data.decode() if isinstance(data, bytes) else data, Loader=_YamlLoader)
    except UnicodeDecodeError as e:
        reason = f"{e.reason} at byte {e.start}"
        raise ConfigError(f"{where}: not a UTF-8 text file ({reason})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None


def _yaml_file(path: str | Path, what: str) -> tuple[Path, Any]:
    """The YAML document of a local file, ``~`` expanded."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"{what} {path} does not exist")
    if not path.is_file():
        raise ConfigError(f"{what} {path} is not a file")
    return path, read_yaml(path.read_bytes(), str(path))


def load_config(
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    preset: dict[str, Any] | None = None,
) -> Config:
    """Defaults, then ``preset``, then the YAML file at ``path``, then ``overrides`` (both
    in dotted keys: ``preset`` changes defaults, ``overrides`` are flags)."""
    data: dict[str, Any] = {}
    if path is not None:
        path, data = _yaml_file(path, "config file")
        data = data or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {data!r}")
        tune = data.get("tune")
        space = tune.get("space") if isinstance(tune, dict) else None
        if isinstance(space, str) and not Path(space).expanduser().is_absolute():
            data["tune"] = {**tune, "space": str(path.parent / space)}
    merged: dict[str, Any] = {}
    for dotted, value in (preset or {}).items():
        section, key = dotted.split(".")
        merged.setdefault(section, {})[key] = value
    for section, values in data.items():
        if values is None:
            values = {}  # a section whose keys are all commented out sets nothing
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    try:
        cfg = from_dict(Config, merged)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path else str(e)) from None
    return apply_overrides(cfg, overrides or {})


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """Return a copy of ``cfg`` with dotted keys (``source.lr``) replaced, re-validated.

    ``None`` sets a key to null; callers drop flags that were not given.
    """
    data = to_dict(cfg)
    for dotted, value in overrides.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"{dotted}: unknown section {p!r}")
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"{dotted}: unknown key; allowed: {', '.join(node)}")
        if isinstance(node[leaf], dict):
            # Replacing a whole section would reset every key not given to its default.
            raise ConfigError(
                f"{dotted}: a section, not a key; set its keys one by one ({dotted}.KEY=VALUE)"
            )
        node[leaf] = value
    return from_dict(Config, data)


def parse_override(text: str) -> tuple[str, Any]:
    """``key.sub=value`` with the value read as YAML (``lr=0.01``, ``size=[96,192]``)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. source.lr=0.01")
    key, raw = text.split("=", 1)
    return key.strip(), read_yaml(raw, f"--set {text!r}: the value")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def result_identity(cfg: Config) -> dict[str, Any]:
    """What decides a run's result: the config without ``perf`` (how models run, which may
    change between attempts of the same experiment), as plain JSON values."""
    return json.loads(json.dumps({k: v for k, v in to_dict(cfg).items() if k != "perf"}))


def changed_settings(recorded: object, current: object, key: str = "") -> list[str]:
    """The dotted keys at which a recorded identity (JSON) and this run's differ. A key only
    one side has is a setting added or removed between versions, not a change."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        return [
            changed
            for k in sorted(recorded.keys() & current.keys())
            for changed in changed_settings(recorded[k], current[k], f"{key}.{k}" if key else k)
        ]
    return [] if recorded == current else [key]


def describe_changes(keys: list[str], most: int = 8) -> str:
    """``a, b and 3 more``: changed keys for a message."""
    return ", ".join(keys[:most]) + (f" and {len(keys) - most} more" if len(keys) > most else "")


# --- search spaces ----------------------------------------------------------------------

# kind -> number of arguments (None: a non-empty list of values)
SPACE_KINDS = {"uniform": 2, "loguniform": 2, "randint": 2, "choice": None, "grid": None}
# What is fixed before any trial starts, so a search space cannot vary it.
_FIXED_FOR_THE_SWEEP = {
    "source": "the source model is trained before the sweep",
    "model": "the model comes from the checkpoint",
    "score": "the target is scored once, before the trials",
    "tune": "it is a setting of the sweep itself",
    **{
        f"data.{key}": "the data, and the size it was scored at, are the sweep's"
        for key in ("kind", "root", "manifest", "size", "crop", "normalization", "eval_classes")
    },
}


# What acts under adapt.method sfda alone: the baselines train on every target image (no
# virtual source, so no selection), with no discriminator, class weights or prior.
_SFDA_ONLY = (
    "adapt.lambda_v",
    "adapt.lambda_adv",
    "adapt.lambda_st",
    "adapt.lambda_prior",
    "adapt.lambda_mix",
    "adapt.lr_discriminator",
    "adapt.discriminator_input",
    "adapt.uncertainty_weights",
    "adapt.class_weights",
    "adapt.prior_beta",
    "adapt.alpha_min",
    "adapt.alpha_max",
    "adapt.rare_class_sampling",
    "adapt.st_tau",
    "adapt.st_portion",
)


def load_search_space(path: str | Path, cfg: Config) -> dict[str, tuple[str, list]]:
    """Read a search space: ``{dotted.key: {kind: args}}`` -> ``{key: (kind, args)}``.

    Every key must be a config key and every value it can take must pass that key's
    validation, so a bad space fails here, before any trial starts.
    """
    path, data = _yaml_file(path, "search space")
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a mapping of config keys to {{kind: args}}")
    space = {}
    for key, spec in data.items():
        where = f"{path}: {key}"
        if not isinstance(key, str):
            raise ConfigError(f"{where}: not a config key; expected section.name, e.g. adapt.lr")
        if not isinstance(spec, dict) or len(spec) != 1:
            raise ConfigError(
                f"{where}: {spec!r} should be one of {{kind: args}} with kind in "
                f"{', '.join(SPACE_KINDS)}"
            )
        ((kind, args),) = spec.items()
        if kind not in SPACE_KINDS:
            raise ConfigError(f"{where}: unknown kind {kind!r}; allowed: {', '.join(SPACE_KINDS)}")
        arity = SPACE_KINDS[kind]
        if not isinstance(args, list) or not args or (arity and len(args) != arity):
            expected = "[low, high]" if arity else "a non-empty list of values"
            raise ConfigError(f"{where}: {kind} takes {expected}, got {args!r}")
        if arity:
            low, high = args
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in args):
                raise ConfigError(f"{where}: {kind} bounds must be numbers, got {args!r}")
            if low >= high:
                raise ConfigError(f"{where}: {kind} needs low < high, got {args!r}")
            if kind == "loguniform" and low <= 0:
                raise ConfigError(f"{where}: loguniform needs low > 0, got {args!r}")
            if kind == "randint" and not all(isinstance(v, int) for v in args):
                raise ConfigError(f"{where}: randint bounds must be integers, got {args!r}")
        for value in _drawn_ends(kind, args):  # the key exists and takes each end / choice
            try:
                _check_value(key, value)
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}") from None
        fixed = _FIXED_FOR_THE_SWEEP.get(key) or _FIXED_FOR_THE_SWEEP.get(key.split(".")[0])
        if fixed:
            raise ConfigError(f"{where}: trials cannot vary it: {fixed}")
        if kind in ("uniform", "loguniform") and _takes_integers(key):
            # Its endpoints pass, but every value drawn between them would not.
            raise ConfigError(
                f"{where}: the key takes integers and {kind} draws fractions; use randint "
                "(or choice)"
            )
        space[key] = (kind, list(args))
    _check_space_combinations(path, space, cfg)
    idle = [k for k in space if k.startswith("select.") or k in _SFDA_ONLY]
    methods = space["adapt.method"][1] if "adapt.method" in space else [cfg.adapt.method]
    if idle and "sfda" not in methods:
        raise ConfigError(
            f"{path}: {', '.join(idle)} act under adapt.method sfda only, not "
            f"{', '.join(methods)}: a baseline reads none of them, so trials would differ "
            "in them for nothing; sweep a space without them (--space)"
        )
    return space


def _field_of(dotted: str) -> tuple[dataclasses.Field, Any]:
    """The dataclass field of the config key ``section.name``, and its type."""
    section, _, name = dotted.partition(".")
    sections = typing.get_type_hints(Config)
    if section in sections and not name:
        raise ConfigError(f"{dotted}: a section, not a key; sweep its keys ({dotted}.KEY)")
    if section not in sections:
        raise ConfigError(f"{dotted}: unknown section {section!r}; allowed: {', '.join(sections)}")
    fields = {f.name: f for f in dataclasses.fields(sections[section])}
    if name not in fields:
        raise ConfigError(f"{dotted}: unknown key; allowed: {', '.join(fields)}")
    return fields[name], typing.get_type_hints(sections[section])[name]


def _check_value(dotted: str, value: Any) -> None:
    """``value`` alone for the key ``section.name``: the key exists and the value has its
    type and range (the rules between keys are checked over whole trials)."""
    field_, tp = _field_of(dotted)
    _check_range(_coerce(value, tp, dotted), field_.metadata, dotted)


def _drawn_ends(kind: str, args: list) -> list:
    """The extreme values a trial can draw: a range's ends (randint's high is exclusive),
    or every choice."""
    return [args[0], args[1] - 1] if kind == "randint" else args


# The keys _check_cross_fields reads (keep the two in step): only their values can make
# a trial's config invalid once each value has passed alone.
_CROSS_CHECKED = (
    "select.ratio",
    "select.score_threshold",
    "adapt.method",
    "adapt.alpha_min",
    "adapt.alpha_max",
    "adapt.lambda_mix",
    "adapt.lambda_v",
    "adapt.lambda_st",
    "score.mc_passes",
    "data.scale_min",
    "data.scale_max",
    "data.eval_classes",
    "data.size",
    "data.crop",
    "perf.compile",
    "perf.compile_backend",
)


def _check_space_combinations(path: Path, space: dict[str, tuple[str, list]], cfg: Config) -> None:
    """The rules between keys (alpha_min <= alpha_max, say) hold for every combination of
    the swept keys they read that a trial can draw (a range at its ends), the other keys at
    the base config's values."""
    swept = [key for key in space if key in _CROSS_CHECKED]
    for values in itertools.product(*(_drawn_ends(*space[key]) for key in swept)):
        point = dict(zip(swept, values, strict=True))
        try:
            apply_overrides(cfg, point)
        except ConfigError as e:
            drawn = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(
                f"{path}: a trial can draw {drawn}, which is not allowed: {e}"
            ) from None


def _takes_integers(key: str) -> bool:
    """Whether the config key ``section.name`` holds an integer (perhaps null)."""
    _, tp = _field_of(key)
    return int in (tp, *typing.get_args(tp))
