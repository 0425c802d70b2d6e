"""An adaptation run: plan it on the driver, run the loop on each worker.

Source-free by construction: the inputs are a source checkpoint, a scores table and
target data; nothing here can open a source dataset. The loop is plain PyTorch; the
environment it runs in (a single process, or a Ray Train worker) is passed in as a
``TrainEnv`` that names the worker's rank and device, wraps models for DDP and reports
metrics and checkpoints.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch
from torch import distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from sfda_ray import storage
from sfda_ray.config import Config, to_dict
from sfda_ray.data.adaptation import AdaptationDataset, load_map, rare_class_sampling_weights
from sfda_ray.data.catalog import DatasetRef, open_dataset
from sfda_ray.data.dataset import collate_skip_bad
from sfda_ray.data.labels import CLASS_NAMES
from sfda_ray.data.loaders import eval_loader, forever, image_loader
from sfda_ray.data.scores import ADABN_FILE, scored_rows
from sfda_ray.evaluate import confusion_on
from sfda_ray.method.adapt import (
    Adapter,
    broadcast_buffers,
    is_distributed,
    mean_over_workers,
    sum_over_workers,
    to_input,
    unwrap,
)
from sfda_ray.method.baselines import adapt_batchnorm
from sfda_ray.method.scoring import normalized_entropy
from sfda_ray.method.selection import select
from sfda_ray.metrics import segmentation_report
from sfda_ray.models import discriminator
from sfda_ray.models.checkpoint import (
    DivergedError,
    file_fingerprint,
    load_checkpoint,
    load_model,
    save_checkpoint,
    weights_finite,
)
from sfda_ray.models.execution import Execution

log = logging.getLogger(__name__)
PROXY_IMAGES = 100  # train images the proxy is computed on when no val split exists


@dataclass
class AdaptPlan:
    """Everything a worker needs: small, picklable, computed once on the driver."""

    checkpoint: str  # the model to start from
    source_checkpoint: str  # the user's source model (source-only baseline, provenance)
    virtual_rows: list[dict]
    target_rows: list[dict]
    thresholds: list[float]
    prior_target: list[float]
    class_weight: list[float]
    map_size: tuple[int, int]
    eval_rows: list[dict] = field(default_factory=list)  # labelled target val, evaluation only
    proxy_rows: list[dict] = field(default_factory=list)  # no labelled val: proxy images
    eval_classes: tuple[int, ...] = ()
    virtual_sampling_weights: list[float] | None = None
    selection_summary: dict = field(default_factory=dict)
    fingerprints: dict = field(default_factory=dict)
    bn_adapted: bool = False  # the start checkpoint already has target BN statistics


def check_discriminator_fits(map_size: tuple[int, int]) -> None:
    """``ValueError`` when maps of ``map_size`` (H, W), the size adaptation trains at, are
    too small for the output-space discriminator."""
    if min(map_size) < discriminator.MIN_SIDE:
        raise ValueError(
            f"the images were scored at {map_size[0]}x{map_size[1]} pixels, and adaptation "
            f"trains at that size; adversarial alignment (adapt.lambda_adv > 0) needs at "
            f"least {discriminator.MIN_SIDE} pixels a side: score at a larger data.size, "
            "or set adapt.lambda_adv=0 (and, in a sweep, leave it out of the search space)"
        )


def first_map_size(paths: list[str], tries: int = 10) -> tuple[int, int] | None:
    """(H, W) of the first of the first ``tries`` maps in ``paths`` that reads; None when
    none does (each stage then meets the bad maps itself)."""
    for path in paths[:tries]:
        try:
            return tuple(load_map(path).shape[:2])
        except (OSError, ValueError) as e:
            log.warning("map %s does not read (%s): trying the next one", path, e)
    return None


def scored_map_size(scores: str) -> tuple[int, int] | None:
    """(H, W) of the maps of a scores directory (``first_map_size`` of its scored rows)."""
    return first_map_size(scored_rows(scores)["pseudo_label_path"].to_pylist())


def make_plan(cfg: Config, checkpoint: str, scores: str, data: str) -> AdaptPlan:
    """Select the virtual source from a scores table and gather the target splits."""
    table = scored_rows(scores)
    if table.num_rows == 0:
        raise ValueError(f"{scores}/scores.parquet has no scored images")
    selection = select(table, cfg.select, cfg.model.num_classes)
    if not (len(selection.virtual) and len(selection.target)):
        s = cfg.select
        rule = f"ratio {s.ratio}" if s.ratio is not None else f"score_threshold {s.score_threshold}"
        raise ValueError(
            f"select.{rule} puts {len(selection.virtual)} of {table.num_rows} scored images "
            f"in the virtual source and {len(selection.target)} in the target; "
            "adaptation needs at least one in each"
        )
    a = cfg.adapt
    alpha = selection.class_weights(a.prior_beta, (a.alpha_min, a.alpha_max))
    rows = {
        r["image_id"]: r
        for r in table.select(
            ["image_id", "image_path", "pseudo_label_path", "confidence_path"]
        ).to_pylist()
    }
    virtual = [rows[i] for i in selection.virtual]
    map_size = first_map_size([row["pseudo_label_path"] for row in virtual])
    if map_size is None:
        raise ValueError(
            f"none of the first virtual-source maps listed in {scores}/scores.parquet reads "
            "(see the warnings above): score the images again"
        )
    if a.adversarial:
        check_discriminator_fits(map_size)
    weights = None
    if a.rare_class_sampling:
        hists = np.stack(
            table.select(["image_id", "class_hist"])
            .to_pandas()
            .set_index("image_id")
            .loc[selection.virtual, "class_hist"]
            .to_numpy()
        )
        weights = rare_class_sampling_weights(hists, alpha).tolist()

    # Start from the model that made the pseudo-labels when it is the AdaBN'd source model
    # (kept in the scores directory, read from where the directory is now).
    start_checkpoint, bn_adapted = str(checkpoint), False
    summary_path = storage.join(scores, "summary.json")
    adabn = storage.join(scores, ADABN_FILE)
    scored_with = {}
    if storage.exists(summary_path):
        scored_with = json.loads(storage.read_bytes(summary_path))
    source = file_fingerprint(checkpoint)
    scoring_model = scored_with.get("checkpoint_fingerprint")
    with_adabn = scored_with.get("checkpoint") != scored_with.get("source_checkpoint")
    # A scores directory names the model that scored it: pseudo-labels of another source
    # model, or of another model's AdaBN, would be trained on without a word.
    kept_adabn = with_adabn and storage.exists(adabn) and scoring_model == file_fingerprint(adabn)
    scored_by = None
    if kept_adabn:
        scored_by = load_checkpoint(adabn)["meta"].get("adabn_of")
    elif scored_with and not with_adabn:
        scored_by = scoring_model
    if scored_by not in (None, source):
        raise ValueError(
            f"{scores} was scored with another source model (fingerprint {scored_by}) than "
            f"{checkpoint} ({source}): give the checkpoint it was scored with, or score again"
        )
    if kept_adabn:
        start_checkpoint, bn_adapted = adabn, True
    elif with_adabn:
        log.warning(
            "%s was scored with an AdaBN model that %s no longer holds (removed, or replaced "
            "by a later scoring that did not finish): starting from %s, and which source "
            "model made the pseudo-labels cannot be checked",
            scores,
            adabn,
            checkpoint,
        )

    ref = open_dataset(data, "target")
    foreign = set(table["image_id"].to_pylist()) - set(ref.manifest["image_id"].to_pylist())
    if foreign:
        raise ValueError(
            f"{len(foreign)} of the {table.num_rows} images {scores} scored are not images of "
            f"{data} (first: {min(foreign)}): give the data it scored, or score again"
        )
    if cfg.data.eval_classes and list(ref.eval_subsets) != list(cfg.data.eval_classes):
        # The data says what it is scored over (the main job writes the config's choice
        # into the dataset YAML it passes on); a config that disagrees is not ignored.
        raise ValueError(
            f"data.eval_classes {cfg.data.eval_classes} in the config, but {data} is scored "
            f"over {list(ref.eval_subsets)}: give a dataset YAML with `eval_classes: "
            f"{cfg.data.eval_classes}` as the data"
        )
    val = ref.labelled("val")
    if val is not None and "val" in set(table["split"].to_pylist()):
        raise ValueError(
            f"{scores}: the target's val split was scored, and val is what the adaptation "
            "is evaluated on: it would train on the images it is measured on; score the "
            "train split (score.split: train)"
        )
    eval_rows = val.to_pylist() if val is not None else []
    proxy_rows = [] if val is not None else _proxy_rows(ref)
    eval_classes = next(iter(ref.eval_subsets.values()))
    return AdaptPlan(
        checkpoint=start_checkpoint,
        source_checkpoint=str(checkpoint),
        bn_adapted=bn_adapted,
        virtual_rows=virtual,
        target_rows=[rows[i] for i in selection.target],
        thresholds=selection.class_thresholds.tolist(),
        prior_target=selection.prior_target.tolist(),
        class_weight=alpha.tolist(),
        map_size=map_size,
        eval_rows=eval_rows,
        proxy_rows=proxy_rows,
        eval_classes=tuple(eval_classes),
        virtual_sampling_weights=weights,
        selection_summary=selection.summary(),
        fingerprints={"checkpoint": file_fingerprint(checkpoint), "data": ref.fingerprint},
    )


def _proxy_rows(ref: DatasetRef) -> list[dict]:
    """Images for the label-free proxy when no val split is labelled: the unlabelled val
    images, else up to ``PROXY_IMAGES`` train images evenly spaced in id order."""
    has_val = "val" in set(ref.manifest["split"].to_pylist())
    table = ref.split("val" if has_val else "train").sort_by("image_id")
    if not has_val and table.num_rows > PROXY_IMAGES:
        table = table.take(np.linspace(0, table.num_rows - 1, PROXY_IMAGES).round().astype(int))
    return table.to_pylist()


class TrainEnv(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def wrap(self, model: nn.Module) -> nn.Module: ...

    def report(self, metrics: dict, state: dict | None) -> None: ...

    def load_state(self) -> dict | None: ...


@torch.no_grad()
def evaluate_adapted(
    model: nn.Module,
    plan: AdaptPlan,
    normalization: str,
    size: tuple[int, int],
    execution: Execution | None = None,
) -> dict:
    """Target-val mIoU (labels: evaluation only) and the unsupervised proxy; the proxy
    alone, on ``plan.proxy_rows``, when the target has no labelled val split.

    proxy = mean normalised prediction entropy + KL(pi_T || mean predicted distribution);
    lower is better; it needs no labels.
    """
    rows = plan.eval_rows or plan.proxy_rows
    if not rows:
        return {}
    exe = execution or Execution(torch.device("cpu"))
    num_classes = len(CLASS_NAMES)
    # Under DDP every worker evaluates its own share of the images and the sums are
    # pooled: no worker waits while another evaluates. The weights are equal on all of
    # them, the BatchNorm statistics are not (each worker's last step updated its own):
    # rank 0's, those of the model it saves, become every worker's first.
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    broadcast_buffers(model)
    shard = rows[rank::world]
    entropy, mean_pred, n = 0.0, torch.zeros(num_classes, dtype=torch.float64), 0

    def observe(logits: torch.Tensor) -> None:
        nonlocal entropy, mean_pred, n
        prob = logits.softmax(1)
        entropy += normalized_entropy(prob).mean().item() * prob.shape[0]
        mean_pred = mean_pred + prob.mean(dim=(2, 3)).sum(0).double().cpu()
        n += prob.shape[0]

    cm = np.zeros((num_classes, num_classes), np.int64)
    if shard:
        table = pa.Table.from_pylist(shard)
        make = eval_loader if plan.eval_rows else image_loader
        loader = make(table, size, normalization, batch_size=8, num_workers=exe.loader_workers)
        cm, _ = confusion_on(model, loader, num_classes, exe, observe=observe)
    # One all-reduce of every sum, on the device (NCCL takes CUDA tensors alone).
    totals = torch.tensor([entropy, n], dtype=torch.float64)
    sums = torch.cat([torch.from_numpy(cm).double().flatten(), mean_pred, totals])
    sums = sum_over_workers(sums.to(exe.device)).cpu()
    cm = sums[: num_classes**2].round().long().reshape(num_classes, num_classes).numpy()
    mean_pred, (entropy, n) = sums[num_classes**2 : -2], sums[-2:].tolist()
    n = round(n)
    if n == 0:  # an evaluation of nothing would leave a sweep nothing to rank trials on
        raise ValueError(
            f"none of the {len(rows)} target images evaluated could be read (each was logged "
            "with its reason): the target's val split (or, unlabelled, its proxy images) "
            "needs mending"
        )
    prior = torch.tensor(plan.prior_target)
    mean_pred = (mean_pred.float() / n).clamp_min(1e-8)
    kl = torch.where(prior > 0, prior * (prior.clamp_min(1e-12).log() - mean_pred.log()), 0.0)
    proxy = {
        "proxy_entropy": entropy / n,
        "proxy_prior_kl": kl.sum().item(),
        "proxy": entropy / n + kl.sum().item(),
    }
    if not plan.eval_rows:
        return proxy
    report = segmentation_report(cm, CLASS_NAMES, {"eval": plan.eval_classes})
    return {
        "val_miou": report["subsets"]["eval"],
        **proxy,
        "per_class": {
            CLASS_NAMES[c]: report["per_class"][CLASS_NAMES[c]] for c in plan.eval_classes
        },
        "confusion_matrix": report["confusion_matrix"],
    }


def pool_batchnorm_statistics(model: nn.Module) -> None:
    """BatchNorm statistics of the union of the workers' (equal-sized) shards: the mean of
    the means, and the mean of the variances plus the spread of the means (the variance
    of the pooled data); unchanged in a single process."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            mean_square = mean_over_workers(m.running_mean.square())
            mean_over_workers(m.running_mean)
            mean_over_workers(m.running_var)
            m.running_var.add_(mean_square - m.running_mean.square())


def check_finite(logs: dict[str, float], iteration: int, lr: float, device: torch.device) -> None:
    """Raise when a loss of this step is not finite, on every worker when on any: through
    DDP one worker's NaN reaches every worker's weights."""
    diverged = [k for k, v in logs.items() if not math.isfinite(v)]
    if is_distributed():
        anywhere = sum_over_workers(torch.tensor([float(len(diverged))], device=device))
        if anywhere.item() and not diverged:
            diverged = ["another worker's loss"]
    if diverged:
        raise _diverged(f"at iteration {iteration}: {', '.join(diverged)} not finite", lr)


def _diverged(what: str, lr: float) -> DivergedError:
    return DivergedError(
        f"adaptation diverged {what} (adapt.lr {lr}; a lower learning rate or loss weight may help)"
    )


def run_adaptation(plan: AdaptPlan, cfg: Config, env: TrainEnv) -> dict:
    """The loop of one worker; returns the final metrics (rank 0's are the run's)."""
    a = cfg.adapt
    torch.manual_seed(a.seed + env.rank)
    torch.set_num_threads(a.threads)
    model, meta = load_model(
        plan.source_checkpoint if a.method == "source_only" else plan.checkpoint,
        num_classes=len(CLASS_NAMES),
    )
    exe = Execution.resolve(cfg.perf, env.device)
    exe.prepare(model)
    norm = meta["normalization"]
    size = plan.map_size
    scale = (cfg.data.scale_min, cfg.data.scale_max)
    baseline = a.method != "sfda"
    # Baselines adapt to all target images; the method splits them into V and T.
    t_rows = plan.virtual_rows + plan.target_rows if baseline else plan.target_rows
    target_set = AdaptationDataset(t_rows, size, None, scale, cfg.data.hflip)
    virtual_set = AdaptationDataset(
        plan.virtual_rows, size, np.array(plan.thresholds), scale, cfg.data.hflip
    )

    skipped = Counter()  # bad V/T inputs met since this loop (re)started, each logged

    def loader(
        dataset: Dataset, batch_size: int, seed: int, weights=None, start: int = 0, count=True
    ):
        return batch_stream(
            lambda e, skip: make_loader(
                dataset,
                batch_size,
                seed + 1000 * e,
                weights,
                env.rank,
                env.world_size,
                exe.loader_workers,
                exe.pin_memory,
                skip,
            ),
            start,
            skipped if count else None,
        )

    def plain_images(n_batches: int, seed: int) -> Iterator[torch.Tensor]:
        """Unaugmented-geometry target images for AdaBN and round thresholds (a bad image
        met here is logged, and counted when training meets it)."""
        plain = AdaptationDataset(t_rows, size, None, (1.0, 1.0), hflip=False)
        batches = loader(plain, a.batch_size * 2, seed, count=False)
        for _ in range(n_batches):
            yield exe.to_device(next(batches)["image"])

    state = env.load_state()
    # The adabn baseline is this re-estimation alone, whatever adabn_init says.
    adabn = a.adabn_init or a.method == "adabn"
    if state is None and adabn and not plan.bn_adapted and a.method != "source_only":
        n_batches = max(1, len(t_rows) // (a.batch_size * 2))
        with exe.autocast():
            adapt_batchnorm(
                model,
                (to_input(x, norm) for x in plain_images(n_batches, a.seed)),
                max_batches=50,
                device=exe.device,
            )
        pool_batchnorm_statistics(model)  # each worker saw its own shard
    adapter = Adapter(
        model,
        a,
        norm,
        torch.tensor(plan.prior_target),
        torch.tensor(plan.class_weight),
        exe,
        env.wrap,
    )
    start = 0
    if state is not None:
        adapter.load_state_dict(state["adapter"])
        start = state["iteration"]
        log.info("rank %d resuming from iteration %d", env.rank, start)
        # Fresh crop/flip draws: a resumed run must not replay those of its first steps.
        resumed_seed = a.seed + env.rank + 1_000_003 * start
        torch.manual_seed(resumed_seed)
        if env.rank > 0:  # the checkpoint holds rank 0's augmentation generators alone
            adapter.generator.manual_seed(resumed_seed)
            adapter.noise_generator.manual_seed(resumed_seed)

    iterations = 0 if a.method in ("source_only", "adabn") else a.iterations
    # A resumed run reads on from where its streams were at iteration `start`.
    t_batches = loader(target_set, a.batch_size, a.seed, start=start)
    v_batches = None
    if a.method == "sfda":
        v_weights = plan.virtual_sampling_weights
        v_batches = loader(virtual_set, a.batch_size, a.seed + 1, v_weights, start=start)
    # Losses are reported as means over the interval since the previous report.
    interval: dict[str, float] = {}
    interval_steps = 0
    final: dict = {}
    t0 = time.perf_counter()
    for it in range(start, iterations):
        round_index = it * a.st_rounds // iterations  # st_rounds rounds of equal length
        if round_index != adapter.round:
            adapter.begin_round(round_index, plain_images(8, a.seed + round_index))
        adapter.set_lr(it, iterations)
        logs = adapter.step(next(v_batches) if v_batches else None, next(t_batches))
        # Raised before the weights are checkpointed: a retry resumes sound ones.
        check_finite(logs, it + 1, a.lr, exe.device)
        for k, v in logs.items():
            interval[k] = interval.get(k, 0.0) + v
        interval_steps += 1
        done = it + 1
        if done % a.log_every == 0:
            log.info(
                "iter %d/%d %s", done, iterations, " ".join(f"{k} {v:.4f}" for k, v in logs.items())
            )
        evaluate_now = done % a.eval_every == 0 or done == iterations
        checkpoint_now = done % a.checkpoint_every == 0 or done == iterations
        if not (evaluate_now or checkpoint_now):
            continue
        elapsed = time.perf_counter() - t0
        metrics = {
            "iteration": done,
            "round": round_index,
            "resumed_from": start,
            **{k: v / interval_steps for k, v in interval.items()},
            "seconds": elapsed,  # in this loop since it (re)started, reports included
            "seconds_per_iter": elapsed / (done - start),
            "skipped_inputs": sum(skipped.values()),
        }
        interval, interval_steps = {}, 0
        # Over every worker's shard (a collective: each reports at the same iterations);
        # the checkpoint keeps this report, which must not be pooled a second time.
        metrics.update(metrics_over_workers(metrics, env.device))
        if evaluate_now:  # on every worker, each its share of the images
            final = evaluate_adapted(unwrap(adapter.student), plan, norm, size, exe)
            metrics.update(
                {k: v for k, v in final.items() if k not in ("per_class", "confusion_matrix")}
            )
            if "proxy" in metrics and env.rank == 0:
                miou = metrics.get("val_miou")  # None: no pixel of the evaluated classes
                miou = "" if miou is None else f"val_miou {miou:.2f} "
                log.info("iter %d: %sproxy %.4f", done, miou, metrics["proxy"])
        state_out = None
        # A finite loss can still leave an inf gradient behind: never save such weights.
        # Checked on every worker (DDP keeps their weights equal), so all of them stop
        # here rather than rank 0 alone while the others wait in the next collective.
        if checkpoint_now:
            if not weights_finite(unwrap(adapter.student)):
                raise _diverged(f"by iteration {done}: the weights are not finite", a.lr)
            if env.rank == 0:
                # With its report: a run resumed at its end reports it again (below).
                state_out = {"adapter": adapter.state_dict(), "iteration": done, "report": metrics}
        env.report(metrics, state_out)
    if iterations == start:  # nothing trained in this call (baselines, or already done)
        final = evaluate_adapted(unwrap(adapter.student), plan, norm, size, exe)
        # A run that had finished when its driver stopped (before it logged the last
        # report, maybe) reports that report again, its losses included.
        report = {
            **{k: v for k, v in final.items() if not isinstance(v, (dict, list))},
            **(state or {}).get("report", {}),
            "iteration": iterations,
        }
        env.report(
            report,
            {"adapter": adapter.state_dict(), "iteration": iterations, "report": report}
            if env.rank == 0
            else None,
        )
    final.update({"iteration": iterations, "method": a.method})
    return {"model": unwrap(adapter.student), "meta": meta, "metrics": final}


def batch_stream(
    make: Callable[[int, int], DataLoader], start: int = 0, skipped: Counter | None = None
) -> Iterator[dict]:
    """Endless batches, pass ``e`` from ``make(e, skip)``, beginning at the ``start``-th
    batch of the uninterrupted stream (a resumed run); ``skip`` batches of a pass are left
    out by its sampler, so none is read to be thrown away."""
    first, skip = divmod(start, len(make(0, 0)))
    return forever(lambda e: make(first + e, skip if e == 0 else 0), skipped, skip > 0)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    weights: list[float] | None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
    skip_batches: int = 0,
) -> DataLoader:
    """Shuffled (or weighted) batches of this worker's share of ``dataset``: ``len /
    world_size`` samples per pass.

    Without weights the ranks split one permutation (the same seed on every rank), so
    their shards are disjoint; weighted sampling (rare-class sampling) draws with
    replacement, each rank with its own seed.
    """
    n = max(1, len(dataset) // world_size)
    if weights is not None:
        g = torch.Generator().manual_seed(seed * 1000 + rank)
        sampler = WeightedRandomSampler(weights, n, replacement=True, generator=g)
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 1000))
        # Fewer items than ranks: each rank still gets one.
        shard = order[rank::world_size][:n] if len(dataset) >= world_size else order[:1]
        sampler = shard.tolist()
    if skip_batches:
        sampler = list(sampler)[skip_batches * batch_size :]
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=n >= batch_size,
        num_workers=num_workers,
        collate_fn=collate_skip_bad,
        pin_memory=pin_memory,
    )


def metrics_over_workers(metrics: dict, device: torch.device) -> dict:
    """Losses averaged and skipped inputs summed over every DDP worker's shard (Ray Train
    keeps rank 0's metrics); nothing in a single process.

    A collective: every rank calls it at the same iterations with the same keys."""
    means = sorted(k for k in metrics if k.startswith("loss_") or k == "st_kept_fraction")
    keys = means + [k for k in ("skipped_inputs",) if k in metrics]
    if not keys or not is_distributed():
        return {}
    world_size = torch.distributed.get_world_size()
    values = [metrics[k] for k in keys]
    totals = sum_over_workers(torch.tensor(values, dtype=torch.float64, device=device))
    return {
        k: v / world_size if k in means else int(v)
        for k, v in zip(keys, totals.tolist(), strict=True)
    }


class LocalEnv:
    """A single process: the plain loop (tests, benchmarks, a laptop without Ray)."""

    rank = 0
    world_size = 1

    def __init__(self, device: str = "cpu", state_path: str | None = None):
        self.device = torch.device(device)
        self.state_path = state_path
        self.reports: list[dict] = []

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def report(self, metrics: dict, state: dict | None) -> None:
        self.reports.append(dict(metrics))
        if state is not None and self.state_path:
            save_state(state, self.state_path)

    def load_state(self) -> dict | None:
        if self.state_path and storage.exists(self.state_path):
            return load_state(self.state_path)
        return None


def save_state(state: dict, path: str) -> None:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    storage.atomic_write_bytes(path, buf.getvalue())


def load_state(path: str) -> dict:
    import io

    if not storage.is_uri(path):
        # Mapped, not read: of a state (student, teacher, discriminator, optimisers) the
        # reader usually takes the student alone, and needs no second copy in memory.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return torch.load(io.BytesIO(storage.read_bytes(path)), map_location="cpu", weights_only=True)


def save_adapted(
    path: str, model: nn.Module, source_meta: dict, cfg: Config, plan: AdaptPlan, metrics: dict
) -> None:
    """The adapted model in the same checkpoint format as every other one."""
    meta = {
        "arch": source_meta["arch"],
        "num_classes": source_meta["num_classes"],
        "class_names": source_meta["class_names"],
        "normalization": source_meta["normalization"],
        "train_config": {**to_dict(cfg), "source_checkpoint": plan.source_checkpoint},
        "data_fingerprint": plan.fingerprints.get("data"),
        "iteration": metrics.get("iteration"),
        "complete": True,
        "source_checkpoint_fingerprint": plan.fingerprints.get("checkpoint"),
        "selection": plan.selection_summary,
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))},
    }
    save_checkpoint(path, model, meta)
