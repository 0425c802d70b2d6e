"""One-file checkpoints that load with ``torch.load(..., weights_only=True)``.

Layout::

    {"format": "sfda_ray.checkpoint/v1",
     "state_dict": {name: tensor},
     "meta": {"arch": {"name", "options"}, "num_classes", "class_names", "normalization",
              "train_config", "data_fingerprint", "iteration", ...},
     "optimizer": optimizer state dict or None,
     "extra": dict or None (discriminator, RNG states, ...)}

Only tensors and plain containers/scalars are stored, so a checkpoint never needs code to
load. Raw state dicts (the public AdaptSegNet/ADVENT ``.pth`` files) load too, given the
architecture.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import time
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from sfda_ray import storage
from sfda_ray.config import NORMALIZATIONS
from sfda_ray.models.deeplabv2 import build_model

CHECKPOINT_FORMAT = "sfda_ray.checkpoint/v1"
META_DEFAULTS = {
    "class_names": None,
    "normalization": None,
    "train_config": None,
    "data_fingerprint": None,
    "iteration": None,
}
# DataParallel/DDP save under "module."; AdaptSegNet's init checkpoints under "Scale.".
_PREFIXES = ("module.", "Scale.")
_PLAIN = (str, int, float, bool, type(None))
_MAX_LISTED = 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be saved, read, or loaded into the given model."""


def _complete_meta(meta: dict) -> dict:
    arch = meta.get("arch")
    if isinstance(arch, str):
        arch = {"name": arch}
    # Anything beside name and options would be silently ignored when the model is
    # rebuilt (a stride given outside options once rebuilt another network): refuse it.
    if (
        not isinstance(arch, dict)
        or not isinstance(arch.get("name"), str)
        or not set(arch) <= {"name", "options"}
        or not isinstance(arch.get("options", {}), dict)
    ):
        raise CheckpointError(
            f"meta['arch'] must be {{'name': ..., 'options': {{...}}}}, got {arch!r}"
        )
    num_classes = meta.get("num_classes")
    if type(num_classes) is not int:
        raise CheckpointError(f"meta['num_classes'] must be an int, got {num_classes!r}")
    names = meta.get("class_names")
    if names is not None and len(names) != num_classes:
        raise CheckpointError(f"{len(names)} class_names for {num_classes} classes")
    if meta.get("normalization") not in (None, *NORMALIZATIONS):
        raise CheckpointError(
            f"meta['normalization'] must be one of {NORMALIZATIONS}, got {meta['normalization']!r}"
        )
    return {**META_DEFAULTS, **meta, "arch": {"options": {}, **arch}}


def _check_plain(obj: Any, where: str) -> None:
    """Refuse anything ``weights_only=True`` could not load back, naming where it sits."""
    if type(obj) in _PLAIN or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (list, tuple):
        for i, value in enumerate(obj):
            _check_plain(value, f"{where}[{i}]")
    elif type(obj) in (dict, OrderedDict):
        for key, value in obj.items():
            if type(key) not in (str, int):
                raise CheckpointError(f"{where} has a key of type {type(key).__name__}")
            _check_plain(value, f"{where}[{key!r}]")
    else:
        raise CheckpointError(
            f"{where} is a {type(obj).__module__}.{type(obj).__name__}; checkpoints hold only "
            "tensors, dicts, lists, tuples, str, int, float, bool and None"
        )


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    meta: dict,
    optimizer_state: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Write a checkpoint atomically (a killed job leaves the previous file or none).

    ``meta["arch"]`` and ``meta["num_classes"]`` default to those of a model made by
    ``build_model``; everything is validated before anything is written.
    """
    model = getattr(model, "module", model)  # unwrap DDP
    meta = _complete_meta(
        {
            "arch": getattr(model, "arch", None),
            "num_classes": getattr(model, "num_classes", None),
            **meta,
        }
    )
    payload = {
        "format": CHECKPOINT_FORMAT,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta,
        "optimizer": optimizer_state,
        "extra": extra,
    }
    _check_plain(payload, "checkpoint")
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    storage.atomic_write_bytes(path, buffer.getvalue())


def _reason(error: pickle.UnpicklingError) -> str:
    """The line of torch's safe-unpickler message that says what it refused."""
    boilerplate = ("Weights only load failed", "Please file an issue", "Check the documentation")
    for line in str(error).splitlines():
        line = line.replace("WeightsUnpickler error:", "").strip()
        if line and not line.startswith(boilerplate):
            return line
    return type(error).__name__


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint (``weights_only=True``, on CPU).

    Returns the checkpoint dict; a raw state dict comes back as
    ``{"format": "raw", "state_dict": ..., "meta": None, "optimizer": None, "extra": None}``.
    """
    data = storage.read_bytes(path)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"refusing to load {path}: it holds pickled objects other than tensors and plain "
            f"containers, whose unpickling could run code, or it is damaged ({_reason(e)})"
        ) from e
    except Exception as e:  # noqa: BLE001 - torch.load raises whatever the bytes lead to
        # An empty or truncated file raises EOFError, a text file KeyError, ...
        raise CheckpointError(
            f"{path} is not a readable torch checkpoint ({type(e).__name__}: {e})"
        ) from e
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        return obj
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"format": "raw", "state_dict": obj, "meta": None, "optimizer": None, "extra": None}
    raise CheckpointError(
        f"{path} is neither an sfda_ray checkpoint ({CHECKPOINT_FORMAT}) nor a raw state dict"
    )


def _strip(key: str) -> str:
    while key.startswith(_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _num_classes(state_dict: dict[str, torch.Tensor]) -> int | None:
    """Class count from the first ASPP conv, or None for a model without one."""
    for key, value in state_dict.items():
        if key.endswith("conv2d_list.0.weight"):
            return int(value.shape[0])
    return None


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else "")


def _heads_hint(keys: list[str]) -> str:
    """Where the keys that do not fit are classifier heads, the options that place them."""
    if any(k.startswith(("layer5.", "layer6.")) for k in keys):
        return " (classifier heads differ: check the layout / multi_level options)"
    return ""


def load_weights(
    model: nn.Module, state_dict: dict[str, torch.Tensor], strict: bool = True
) -> tuple[list[str], list[str]]:
    """Load ``state_dict`` into ``model`` after stripping ``module.``/``Scale.`` prefixes.

    Refuses a class-count or shape mismatch always, and missing/unexpected keys when
    ``strict``, naming the keys. A missing ``num_batches_tracked`` (old checkpoints) is
    fine. Returns (missing, unexpected).
    """
    model = getattr(model, "module", model)
    state_dict = {_strip(k): v for k, v in state_dict.items()}
    own = model.state_dict()
    ckpt_classes, model_classes = _num_classes(state_dict), _num_classes(own)
    if ckpt_classes is not None and model_classes is not None and ckpt_classes != model_classes:
        raise CheckpointError(f"checkpoint has {ckpt_classes} classes, model has {model_classes}")
    mismatched = [
        f"{k} (checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state_dict.items()
        if k in own and v.shape != own[k].shape
    ]
    if mismatched:
        raise CheckpointError(f"shape mismatch: {_listed(mismatched)}{_heads_hint(mismatched)}")
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"missing keys: {_listed(missing)}; unexpected keys: {_listed(unexpected)}"
            f"{_heads_hint(missing + unexpected)}"
        )
    model.load_state_dict(state_dict, strict=False)
    return missing, unexpected


def load_model(
    path: str | os.PathLike,
    *,
    arch: str | dict | None = None,
    num_classes: int | None = None,
    **options: Any,
) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights.

    ``options`` override the stored build options (e.g. ``mc_dropout=0.1``). A raw state
    dict needs ``arch`` (a model name or ``{"name", "options"}``); its class count is read
    from the classifier and its normalisation is taken to be "caffe_bgr", as for the
    public AdaptSegNet/ADVENT checkpoints. ``num_classes``: the class count the caller
    reads the outputs as; a model predicting another number is refused. Returns (model,
    meta) with ``meta["arch"]`` describing the model as built.
    """
    ckpt = load_checkpoint(path)
    meta = ckpt["meta"]
    if meta is None:
        if arch is None:
            raise CheckpointError(
                f"{path} is a raw state dict without sfda_ray meta; convert it once with "
                f"`sfda-ray import-checkpoint {path} --out MODEL.pt --layout adaptsegnet` "
                "(or --layout advent, --multi-level), then pass MODEL.pt"
            )
        found = _num_classes(ckpt["state_dict"])
        if found is None:
            raise CheckpointError(
                f"{path} has no ASPP classifier (no '...conv2d_list.0.weight' key): a backbone "
                "alone is not a segmentation model"
            )
        meta = _complete_meta({"arch": arch, "num_classes": found, "normalization": "caffe_bgr"})
    elif arch is not None:
        raise CheckpointError(
            f"{path} is already an sfda_ray checkpoint, which names its own architecture: "
            "use it as it is (import-checkpoint converts raw state dicts only)"
        )
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise CheckpointError(
            f"{path} predicts {meta['num_classes']} classes, not {num_classes}: every dataset's "
            f"labels are read into Cityscapes' {num_classes} train ids (SYNTHIA's 16 and 13 "
            "classes are scored as subsets of them), and the model must predict those"
        )
    try:
        model = build_model(
            meta["arch"]["name"], meta["num_classes"], **{**meta["arch"]["options"], **options}
        )
    except TypeError as e:
        if "unexpected keyword argument" not in str(e):
            raise
        raise CheckpointError(f"{path}: cannot build {meta['arch']}: {e}") from e
    load_weights(model, ckpt["state_dict"])
    return model, {**meta, "arch": model.arch}


class DivergedError(ValueError):
    """Training stopped because a loss or a weight stopped being finite. A retry from the
    last checkpoint would most likely meet the same, so it is not retried."""


def weights_finite(model: nn.Module) -> bool:
    """Whether every parameter is finite: a finite loss can still leave an inf gradient
    behind, and weights broken that way are never checkpointed."""
    return all(p.isfinite().all() for p in model.parameters())


_FINGERPRINTS: OrderedDict[tuple[str, int, int], str] = OrderedDict()
_SETTLED_NS = 2 * 10**9  # younger files may be rewritten within one timestamp tick


def file_fingerprint(path: str | os.PathLike) -> str:
    """First 16 hex digits of the SHA-256 of the file's bytes.

    Remembered in this process by path, size and modification time once that time is a
    few seconds past: a run fingerprints the same model file several times, each time a
    whole read (from a bucket, a download); a file rewritten since has another time."""
    fs, p = storage.resolve(path)
    info = fs.get_file_info(p)
    key = None
    if info.mtime_ns is not None and time.time_ns() - info.mtime_ns > _SETTLED_NS:
        key = (str(path), info.size, info.mtime_ns)
        if key in _FINGERPRINTS:
            return _FINGERPRINTS[key]
    digest = hashlib.sha256(storage.read_bytes(path)).hexdigest()[:16]
    if key is not None:
        _FINGERPRINTS[key] = digest
        if len(_FINGERPRINTS) > 64:
            _FINGERPRINTS.popitem(last=False)
    return digest
