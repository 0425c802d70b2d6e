"""Supervised training of a source model: the only code that reads source data.

The checkpoint file doubles as the resume point: it is rewritten atomically every
``checkpoint_every`` iterations with the optimizer state and ``complete: false``, and
once more at the end without optimizer state and ``complete: true``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import torch
import torch.nn.functional as F

from sfda_ray.config import Config, changed_settings, describe_changes, to_dict
from sfda_ray.data.catalog import open_dataset
from sfda_ray.data.labels import CLASS_NAMES, IGNORE_INDEX
from sfda_ray.data.loaders import forever, train_loader
from sfda_ray.method.adapt import poly_lr
from sfda_ray.models import build_model
from sfda_ray.models.checkpoint import (
    DivergedError,
    load_checkpoint,
    load_weights,
    save_checkpoint,
    weights_finite,
)
from sfda_ray.models.execution import Execution, resolve_device
from sfda_ray.storage import beside, exists, prepare_output

log = logging.getLogger(__name__)


def model_arch(cfg: Config) -> dict:
    """``{"name", "options"}`` as ``build_model`` takes them and checkpoints store them."""
    options: dict = {"mc_dropout": cfg.model.mc_dropout}
    if cfg.model.freeze_bn is not None:
        options["freeze_bn"] = cfg.model.freeze_bn
    if cfg.model.name != "deeplabv2_resnet101":  # the Caffe ResNet-101 is fixed at stride 8
        options["output_stride"] = cfg.model.output_stride
    return {"name": cfg.model.name, "options": options}


# Settings that change how fast a run goes, how it reports or what the target is
# evaluated on, not what it trains.
RUNTIME_KEYS = {"source": ("threads", "log_every", "checkpoint_every"), "data": ("eval_classes",)}


def source_training_config(cfg: Config, domain: str) -> dict:
    """What identifies a source model: data, model and source-training settings."""
    full = to_dict(cfg)
    out = {section: dict(full[section]) for section in ("data", "model", "source")}
    for section, keys in RUNTIME_KEYS.items():
        for key in keys:
            out[section].pop(key)
    return {**out, "domain": domain}


def _diverged(what: str, lr: float) -> DivergedError:
    return DivergedError(
        f"source training diverged {what} (source.lr {lr}; a lower learning rate may help)"
    )


def _check_weights(model: torch.nn.Module, done: int, lr: float) -> None:
    """Before any checkpoint: broken weights stop the run rather than being saved."""
    if not weights_finite(model):
        raise _diverged(f"by iteration {done}: the weights are not finite", lr)


def train_source(
    cfg: Config, data: str, out: str, domain: str = "source", device: str = "auto"
) -> dict:
    """Train on the labelled ``train`` split of ``data`` on ``device`` (``auto``: a GPU when
    there is one), run as ``cfg.perf`` says; returns the final checkpoint meta."""
    sc = cfg.source
    ref = open_dataset(data, domain)
    table = ref.labelled("train")
    if table is None:
        raise ValueError(f"{data}: no train image has a label; source training needs labels")
    if table.num_rows < sc.batch_size:
        raise ValueError(
            f"{data}: {table.num_rows} usable train images, fewer than one batch "
            f"(source.batch_size {sc.batch_size})"
        )
    train_config = source_training_config(cfg, domain)
    meta = {
        "arch": model_arch(cfg),
        "num_classes": cfg.model.num_classes,
        "class_names": list(CLASS_NAMES[: cfg.model.num_classes]),
        "normalization": cfg.data.normalization,
        "train_config": train_config,
        "data_fingerprint": ref.fingerprint,
        "iteration": 0,
        "complete": False,
    }
    torch.manual_seed(sc.seed)
    torch.set_num_threads(sc.threads)
    exe = Execution.resolve(cfg.perf, resolve_device(device))
    arch = meta["arch"]
    model = build_model(
        arch["name"],
        cfg.model.num_classes,
        **arch["options"],
        imagenet_init=cfg.model.imagenet_init,
    )
    exe.prepare(model)  # before the optimizer is built, so its state follows the device
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=sc.lr,
        momentum=sc.momentum,
        weight_decay=sc.weight_decay,
    )
    start, earlier = 0, {"train_seconds": 0.0, "skipped_items": 0, "skipped_reasons": {}}
    if exists(out):
        saved = load_checkpoint(out)
        if saved["meta"] is None:
            raise ValueError(
                f"{out} exists and is not an sfda_ray checkpoint; choose another --out"
            )
        trained_with = saved["meta"].get("train_config")
        if trained_with is None:
            raise ValueError(
                f"{out} exists and is not a model trained by train-source (an imported "
                "one?); choose another --out"
            )
        if changed := changed_settings(trained_with, train_config):
            raise ValueError(
                f"{out} exists and was trained with other settings ({describe_changes(changed)} "
                "differ); choose another --out or delete it"
            )
        if saved["meta"].get("data_fingerprint") != ref.fingerprint:
            raise ValueError(
                f"{out} exists and was trained on other data (fingerprint "
                f"{saved['meta'].get('data_fingerprint')}, not {ref.fingerprint} of {data}); "
                "choose another --out or delete it"
            )
        if saved["meta"].get("complete"):
            log.info("%s is already complete; nothing to do", out)
            return saved["meta"]
        load_weights(model, saved["state_dict"])
        optimizer.load_state_dict(saved["optimizer"])
        start = saved["meta"]["iteration"]
        earlier = {k: saved["meta"].get(k, v) for k, v in earlier.items()}  # before this resume
        log.info("resuming %s from iteration %d", out, start)

    # A folder that takes no file fails now, not at the first checkpoint with the
    # training done so far lost.
    prepare_output(beside(out, "."))
    # Reseed per resume point so a resumed run does not replay the same batches.
    loader = train_loader(
        table,
        cfg.data,
        sc.batch_size,
        sc.seed + start,
        cfg.data.normalization,
        exe.loader_workers,
        exe.pin_memory,
    )
    skipped = Counter()  # by reason, all-bad batches included

    def skips() -> dict:
        return {
            "skipped_items": earlier["skipped_items"] + sum(skipped.values()),
            "skipped_reasons": dict(Counter(earlier["skipped_reasons"]) + skipped),
        }

    batches = forever(lambda _: loader, skipped)
    model.train()
    forward = exe.compiled(model)
    log.info("training on %s (%s)", exe.device, exe.precision)
    t0, seen = time.perf_counter(), 0
    for it in range(start, sc.iterations):
        batch = next(batches)
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(sc.lr, it, sc.iterations)
        with exe.autocast():
            logits = forward(exe.to_device(batch["image"]))
        # The loss in fp32 whatever the forward's precision.
        loss = F.cross_entropy(
            logits.float(), exe.to_device(batch["label"]), ignore_index=IGNORE_INDEX
        )
        done = it + 1
        if not torch.isfinite(loss):
            raise _diverged(f"at iteration {done}: the loss is {loss.item()}", sc.lr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seen += batch["image"].shape[0]
        if done % sc.log_every == 0 or done == sc.iterations:
            rate = seen / (time.perf_counter() - t0)
            log.info(
                "iter %d/%d loss %.4f lr %.5f %.1f img/s",
                done,
                sc.iterations,
                loss.item(),
                optimizer.param_groups[0]["lr"],
                rate,
            )
        if done % sc.checkpoint_every == 0 or done == sc.iterations:
            _check_weights(model, done, sc.lr)
        if done % sc.checkpoint_every == 0 and done < sc.iterations:
            so_far = {
                "train_seconds": earlier["train_seconds"] + time.perf_counter() - t0,
                **skips(),
            }
            save_checkpoint(
                out, model, {**meta, "iteration": done, **so_far}, optimizer.state_dict()
            )
    final = {
        **meta,
        "iteration": sc.iterations,
        "complete": True,
        # Over the whole run, resumes included.
        "train_seconds": earlier["train_seconds"] + time.perf_counter() - t0,
        **skips(),
        "images": table.num_rows,
        "skipped_images": ref.skipped_in("train") + ref.unlabelled_in("train"),
    }
    save_checkpoint(out, model, final)
    return final
