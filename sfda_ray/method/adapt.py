"""The adaptation step and the baselines, in plain PyTorch.

``Adapter`` owns the segmentation net (student), the self-training teacher, the
output-space discriminator and their optimizers. A step takes one virtual-source batch
(images in [0, 1], pseudo-labels with low-confidence pixels set to 255, confidence
weights) and one target batch (images only). Distribution is the caller's business:
``wrap`` (e.g. Ray Train's ``prepare_model``) is applied to the trained modules.
Forward passes run under the ``Execution``'s autocast (bf16 on a GPU by default);
losses are taken in fp32.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torchvision.transforms.v2 import functional as TF

from sfda_ray.config import AdaptConfig
from sfda_ray.data.labels import IGNORE_INDEX
from sfda_ray.data.transforms import normalize_batch
from sfda_ray.method.losses import (
    discriminator_input,
    entropy_loss,
    prior_kl,
    weighted_bce,
    weighted_cross_entropy,
)
from sfda_ray.method.scoring import CONFIDENCE_BINS, class_confidence_histogram, normalized_entropy
from sfda_ray.method.selection import class_balanced_thresholds
from sfda_ray.models.discriminator import FCDiscriminator
from sfda_ray.models.execution import Execution

SOURCE_LABEL, TARGET_LABEL = 0.0, 1.0  # the virtual source plays the source domain


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def to_input(images: torch.Tensor, normalization: str) -> torch.Tensor:
    """[0, 1] NCHW images -> the checkpoint's input normalisation."""
    return normalize_batch((images * 255.0).permute(0, 2, 3, 1), normalization)


def strong_augment(
    images: torch.Tensor, generator: torch.Generator, noise_generator: torch.Generator
) -> torch.Tensor:
    """Per-image photometric perturbation of [0, 1] images: colour jitter, blur, noise.
    ``generator`` (CPU) draws each image's parameters, ``noise_generator`` (on the images'
    device) its noise: drawn on the CPU and copied, a 1024x512 image's noise cost a GPU
    step 5 ms (65 ms for 12 images on an H200, 0.35 ms drawn there)."""
    out = []
    for img in images:
        u = torch.rand(5, generator=generator).tolist()
        img = TF.adjust_brightness(img, 0.6 + 0.8 * u[0])
        img = TF.adjust_contrast(img, 0.6 + 0.8 * u[1])
        img = TF.adjust_saturation(img, 0.5 + 1.0 * u[2])
        if u[3] < 0.5:
            img = TF.gaussian_blur(img, kernel_size=[5, 5], sigma=[0.3 + 1.2 * u[4]] * 2)
        noise = torch.randn(img.shape, generator=noise_generator, device=img.device)
        out.append((img + 0.03 * u[4] * noise).clamp(0, 1))
    return torch.stack(out)


def class_mix(
    a: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ClassMix (DACS): paste the pixels of a random half of each ``a`` image's labelled
    classes onto the matching ``b`` image. ``a`` and ``b`` are (images [B, 3, H, W],
    labels [B, H, W], pixel weights [B, H, W]); labels and weights follow the pixels.
    Batches of different sizes (a skipped image, a worker's short last batch of V) give
    as many mixed images as the smaller has."""
    n = min(len(a[0]), len(b[0]))
    images_a, labels_a, weights_a = (t[:n] for t in a)
    images_b, labels_b, weights_b = (t[:n] for t in b)
    masks = []
    for label in labels_a:
        classes = label.unique()
        classes = classes[classes != IGNORE_INDEX]
        keep = torch.randperm(classes.numel(), generator=generator)[: (classes.numel() + 1) // 2]
        masks.append(torch.isin(label, classes[keep.to(classes.device)]))
    mask = torch.stack(masks)
    return (
        torch.where(mask[:, None], images_a, images_b),
        torch.where(mask, labels_a, labels_b),
        torch.where(mask, weights_a, weights_b),
    )


def is_distributed() -> bool:
    """Whether this process is one of several DDP workers."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def sum_over_workers(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed in place over the DDP workers (on its device, which the backend must
    take: CUDA for NCCL); ``t`` as it is in a single process."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) on every DDP worker: each worker's last
    training step moved its own. Nothing in a single process."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def mean_over_workers(t: torch.Tensor) -> torch.Tensor:
    """``t`` averaged in place over the DDP workers; ``t`` as it is in a single process."""
    if is_distributed():
        dist.all_reduce(t)
        t.div_(dist.get_world_size())
    return t


def split_params(model: nn.Module, bn_only: bool) -> list[nn.Parameter]:
    """Trainable parameters; TENT trains only the normalisation layers' affine params."""
    if not bn_only:
        return [p for p in model.parameters() if p.requires_grad]
    params = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params += [p for p in (m.weight, m.bias) if p is not None]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def poly_lr(base: float, it: int, total: int, power: float = 0.9) -> float:
    """DeepLab's poly learning-rate schedule: ``base`` at iteration 0, 0 at ``total``."""
    return base * (1 - it / max(total, 1)) ** power


class Adapter:
    """One adaptation run's trainable state and its step."""

    def __init__(
        self,
        model: nn.Module,
        cfg: AdaptConfig,
        normalization: str,
        prior_target: torch.Tensor,
        class_weight: torch.Tensor | None,
        execution: Execution,
        wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    ) -> None:
        """``model`` is already on the execution's device (see ``Execution.prepare``)."""
        self.cfg = cfg
        self.normalization = normalization
        self.exe = execution
        self.device = device = execution.device
        self.num_classes = prior_target.numel()
        self.prior = prior_target.to(device)
        self.alpha = (
            class_weight.to(device) if (cfg.class_weights and class_weight is not None) else None
        )
        if cfg.method == "tent" and getattr(model, "freeze_bn", False):
            # TENT normalises with each target batch's statistics: frozen BN would not.
            model.set_freeze_bn(False)
        params = split_params(model, bn_only=cfg.method == "tent")
        self.student = wrap(model)
        self.forward = execution.compiled(self.student)
        self.opt = torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
        self.use_adv = cfg.adversarial
        self.disc = self.opt_d = None
        if self.use_adv:
            self.disc = wrap(execution.prepare(FCDiscriminator(self.num_classes)))
            self.opt_d = torch.optim.Adam(
                self.disc.parameters(), lr=cfg.lr_discriminator, betas=(0.9, 0.99)
            )
        self.teacher: nn.Module | None = None
        self.st_thresholds = torch.full((self.num_classes,), cfg.st_tau, device=device)
        self.round = -1
        # Strong augmentation and ClassMix draws: each worker its own, rank 0 as one process.
        rank = dist.get_rank() if is_distributed() else 0
        self.generator = torch.Generator().manual_seed(cfg.seed + rank)
        self.noise_generator = torch.Generator(device).manual_seed(cfg.seed + rank)

    @property
    def uses_teacher(self) -> bool:
        return self.cfg.method == "self_training" or (
            self.cfg.method == "sfda" and self.cfg.lambda_st > 0
        )

    # --- self-training rounds -----------------------------------------------------------

    @torch.no_grad()
    def begin_round(self, round_index: int, target_images: Iterable[torch.Tensor]) -> None:
        """Refresh the teacher from the student and its class-balanced thresholds (CBST)."""
        self.round = round_index
        if not self.uses_teacher:
            return
        if self.teacher is None or self.cfg.teacher == "round":
            broadcast_buffers(unwrap(self.student))  # one teacher on every worker
            self.teacher = copy.deepcopy(unwrap(self.student)).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        hist = torch.zeros(self.num_classes * CONFIDENCE_BINS, dtype=torch.long)
        for images in target_images:
            prob = self._teacher_prob(images)
            conf, label = prob.max(1)
            conf_u8 = (conf * 255).round().to(torch.uint8)
            hist += class_confidence_histogram(label.cpu(), conf_u8.cpu(), self.num_classes)
        # Every worker's images decide the thresholds, and every worker gets the same ones.
        hist = sum_over_workers(hist.to(self.device)).cpu()
        thresholds = class_balanced_thresholds(
            hist.view(self.num_classes, CONFIDENCE_BINS).numpy(),
            self.cfg.st_tau,
            self.cfg.st_portion,
        )
        self.st_thresholds = torch.as_tensor(thresholds, dtype=torch.float32, device=self.device)

    @torch.no_grad()
    def pseudo_label(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher labels for target images: class-balanced and certainty-weighted for the
        method, plain argmax for the self-training baseline."""
        prob = self._teacher_prob(images)
        conf, label = prob.max(1)
        if self.cfg.method == "self_training":
            return label, torch.ones_like(conf)
        label = torch.where(conf >= self.st_thresholds[label], label, IGNORE_INDEX)
        weight = conf if self.cfg.uncertainty_weights else torch.ones_like(conf)
        return label, weight

    def _teacher_prob(self, images: torch.Tensor) -> torch.Tensor:
        with self.exe.autocast():
            logits = self.teacher(self._normalize(images))
        return logits.float().softmax(1)

    @torch.no_grad()
    def update_ema(self) -> None:
        if self.cfg.teacher != "ema" or self.teacher is None:
            return
        m = self.cfg.ema_momentum
        for t, s in zip(
            self.teacher.state_dict().values(),
            unwrap(self.student).state_dict().values(),
            strict=True,
        ):
            if t.dtype.is_floating_point:
                t.mul_(m).add_(s.detach(), alpha=1 - m)
            else:
                t.copy_(s)

    # --- one step -----------------------------------------------------------------------

    def _normalize(self, images: torch.Tensor) -> torch.Tensor:
        return to_input(images, self.normalization)

    def _view(self, images: torch.Tensor) -> torch.Tensor:
        if self.cfg.strong_aug:
            # On the device; only the random parameters come from the CPU generator.
            images = strong_augment(images, self.generator, self.noise_generator)
        return self._normalize(images)

    def set_lr(self, it: int, total: int) -> None:
        """The poly schedule of both the net's and the discriminator's rate."""
        for group in self.opt.param_groups:
            group["lr"] = poly_lr(self.cfg.lr, it, total)
        if self.opt_d is not None:
            for group in self.opt_d.param_groups:
                group["lr"] = poly_lr(self.cfg.lr_discriminator, it, total)

    def step(self, batch_v: dict | None, batch_t: dict) -> dict[str, float]:
        """One update of the student (and discriminator); returns each loss as a float."""
        cfg = self.cfg
        self.student.train()
        xt = self.exe.to_device(batch_t["image"])
        # A crop's padding is no image: no loss, pseudo-label or statistic is taken there.
        valid_t = self._valid(batch_t)
        logs: dict[str, float] = {}
        if cfg.method in ("tent", "minent"):
            # The plain view, as both were published: strong augmentation is self-training's.
            loss = cfg.lambda_entropy * entropy_loss(self._logits(self._normalize(xt)), valid_t)
            logs["loss_entropy"] = loss.item()
            self._update(loss)
            return logs

        use_v = cfg.method == "sfda" and batch_v is not None and cfg.lambda_v > 0
        # V's logits also train the discriminator, with L_V or without it (its ablation).
        forward_v = use_v or (self.use_adv and batch_v is not None)
        if self.uses_teacher:
            pl_t, w_t = self.pseudo_label(xt)
            if valid_t is not None:
                pl_t = pl_t.masked_fill(~valid_t, IGNORE_INDEX)
        valid_v = None
        if forward_v:  # moved to the device once, for L_V, D and ClassMix
            xv, yv, wv = (self.exe.to_device(batch_v[k]) for k in ("image", "label", "weight"))
            valid_v = self._valid(batch_v)
        views = [self._view(xv)] if forward_v else []
        use_mix = use_v and self.uses_teacher and cfg.lambda_mix > 0
        if use_mix:
            # V's labelled objects pasted into target scenes: the same objects in new
            # contexts, so layout cues alone cannot explain the labels.
            mixed, pl_mix, w_mix = class_mix((xv, yv, wv), (xt, pl_t, w_t), self.generator)
            if not cfg.uncertainty_weights:
                w_mix = torch.ones_like(w_mix)
        n_v, n_t = len(views[0]) if forward_v else 0, len(xt)
        logits = self._logits(
            torch.cat([*views, self._view(xt), *([self._view(mixed)] if use_mix else [])])
        )
        logits_v, logits_t = logits[:n_v], logits[n_v : n_v + n_t]
        total = logits.sum() * 0.0
        if use_v:
            l_v = weighted_cross_entropy(
                logits_v, yv, wv if cfg.uncertainty_weights else None, self.alpha
            )
            total = total + cfg.lambda_v * l_v
            logs["loss_v"] = l_v.item()
        if self.uses_teacher:
            alpha = self.alpha if cfg.method == "sfda" else None
            l_st = weighted_cross_entropy(logits_t, pl_t, w_t, alpha)
            weight = cfg.lambda_st if cfg.method == "sfda" else 1.0
            total = total + weight * l_st
            logs["loss_st"] = l_st.item()
            logs["st_kept_fraction"] = (pl_t != IGNORE_INDEX).float().mean().item()
        if use_mix:
            l_mix = weighted_cross_entropy(logits[n_v + n_t :], pl_mix, w_mix, self.alpha)
            total = total + cfg.lambda_mix * l_mix
            logs["loss_mix"] = l_mix.item()
        if cfg.method == "sfda" and cfg.lambda_prior > 0:
            if use_v:
                both = valid_v is not None and valid_t is not None
                mask = torch.cat([valid_v, valid_t]) if both else None
                l_prior = prior_kl(logits[: n_v + n_t], self.prior, mask)
            else:
                l_prior = prior_kl(logits_t, self.prior, valid_t)
            total = total + cfg.lambda_prior * l_prior
            logs["loss_prior"] = l_prior.item()
        if self.use_adv:
            d_in_t = discriminator_input(logits_t, cfg.discriminator_input)
            # Fool D on the target: weighted towards uncertain pixels and rare classes.
            w_adv = self._adversarial_weight(logits_t)
            if valid_t is not None:
                w_adv = valid_t.float() if w_adv is None else w_adv * valid_t
            # D's own weights stay out of this graph: the generator's backward needs only
            # the gradient through D, not D's weight gradients (D learns in its own step).
            disc = unwrap(self.disc).requires_grad_(False)
            try:
                with self.exe.autocast():
                    d_out_t = disc(d_in_t)
            finally:
                disc.requires_grad_(True)
            l_adv = weighted_bce(d_out_t.float(), SOURCE_LABEL, w_adv)
            total = total + cfg.lambda_adv * l_adv
            logs["loss_adv"] = l_adv.item()
        self._update(total)
        if self.use_adv and forward_v:
            logs["loss_d"] = self._discriminator_step(
                logits_v.detach(), logits_t.detach(), valid_v, valid_t
            )
        self.update_ema()
        logs["loss_total"] = total.item()
        return logs

    def _valid(self, batch: dict) -> torch.Tensor | None:
        """The batch's image pixels (None: every pixel, a batch without the mask)."""
        valid = batch.get("valid")
        return None if valid is None else self.exe.to_device(valid)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The student's forward (compiled when asked) under autocast; fp32 logits."""
        with self.exe.autocast():
            logits = self.forward(x)
        return logits.float()

    @torch.no_grad()
    def _adversarial_weight(self, logits_t: torch.Tensor) -> torch.Tensor | None:
        if not (self.cfg.uncertainty_weights or self.alpha is not None):
            return None
        prob = logits_t.detach().softmax(1)
        weight = torch.ones_like(prob[:, 0])
        if self.cfg.uncertainty_weights:
            weight = weight * (0.5 + normalized_entropy(prob))
        if self.alpha is not None:
            weight = weight * self.alpha[prob.argmax(1)]
        return weight / weight.mean().clamp_min(1e-8)

    def _update(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def _discriminator_step(
        self,
        logits_v: torch.Tensor,
        logits_t: torch.Tensor,
        valid_v: torch.Tensor | None = None,
        valid_t: torch.Tensor | None = None,
    ) -> float:
        mode = self.cfg.discriminator_input
        d_in = torch.cat([discriminator_input(logits_v, mode), discriminator_input(logits_t, mode)])
        with self.exe.autocast():
            d_out = self.disc(d_in).float()
        n_v = logits_v.shape[0]
        loss = 0.5 * (
            weighted_bce(d_out[:n_v], SOURCE_LABEL, valid_v)
            + weighted_bce(d_out[n_v:], TARGET_LABEL, valid_t)
        )
        self.opt_d.zero_grad(set_to_none=True)
        loss.backward()
        self.opt_d.step()
        return loss.item()

    # --- checkpoints --------------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {
            "student": unwrap(self.student).state_dict(),
            "opt": self.opt.state_dict(),
            "round": self.round,
            "st_thresholds": self.st_thresholds.cpu(),
            "generator": self.generator.get_state(),
            # A CUDA generator's state is not a CPU one's: kept with its device type.
            "noise_generator": (self.device.type, self.noise_generator.get_state()),
        }
        if self.disc is not None:
            state["disc"] = unwrap(self.disc).state_dict()
            state["opt_d"] = self.opt_d.state_dict()
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.student).load_state_dict(state["student"])
        self.opt.load_state_dict(state["opt"])
        self.round = state["round"]
        self.st_thresholds = state["st_thresholds"].to(self.device)
        self.generator.set_state(state["generator"])
        # From another device type, or a checkpoint from before it was kept: its seed.
        device_type, noise_state = state.get("noise_generator", (None, None))
        if device_type == self.device.type:
            self.noise_generator.set_state(noise_state)
        if self.disc is not None:
            unwrap(self.disc).load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        if "teacher" in state:
            self.teacher = copy.deepcopy(unwrap(self.student)).eval()
            self.teacher.load_state_dict(state["teacher"])
            for p in self.teacher.parameters():
                p.requires_grad_(False)
