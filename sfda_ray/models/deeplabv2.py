"""DeepLab-v2 (ASPP head, output stride 8; 16 optional on small trunks) on ResNet trunks.

The ResNet-101 variant reproduces the module layout of AdaptSegNet (``Res_Deeplab``,
``DeeplabMulti``) and ADVENT (``get_deeplab_v2``) so that their public GTA5 checkpoints load
by name: ``conv1, bn1, layer1..layer4`` (Caffe-style Bottleneck, stride on the first 1x1
conv) and ASPP classifiers ``layer5`` / ``layer6`` with ``conv2d_list.{0..3}``. Those
checkpoints expect Caffe BGR mean-subtracted input; normalisation is the caller's job.

The ResNet-50/18 variants use torchvision trunks with the same head, for CPU work.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

LAYOUTS = ("adaptsegnet", "advent")
ASPP_DILATIONS = (6, 12, 18, 24)


class Bottleneck(nn.Module):
    """Caffe-style ResNet bottleneck: the stride sits on ``conv1`` (1x1), not on the 3x3."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        downsample: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _caffe_layer(inplanes: int, planes: int, blocks: int, stride: int, dilation: int) -> nn.Module:
    # Same condition as AdaptSegNet/ADVENT: the dilated layers always get a projection.
    downsample = None
    if stride != 1 or inplanes != planes * 4 or dilation in (2, 4):
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * 4, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * 4),
        )
    layers = [Bottleneck(inplanes, planes, stride, dilation, downsample)]
    layers += [Bottleneck(planes * 4, planes, dilation=dilation) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


def _caffe_resnet101_trunk() -> dict[str, nn.Module]:
    return {
        "conv1": nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False),
        "bn1": nn.BatchNorm2d(64),
        "maxpool": nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True),
        "layer1": _caffe_layer(64, 64, 3, stride=1, dilation=1),
        "layer2": _caffe_layer(256, 128, 4, stride=2, dilation=1),
        "layer3": _caffe_layer(512, 256, 23, stride=1, dilation=2),
        "layer4": _caffe_layer(1024, 512, 3, stride=1, dilation=4),
    }


def _torchvision_trunk(net: torchvision.models.ResNet) -> dict[str, nn.Module]:
    names = ("conv1", "bn1", "maxpool", "layer1", "layer2", "layer3", "layer4")
    return {name: getattr(net, name) for name in names}


def _dilate_basic_layer(layer: nn.Module, dilation: int) -> None:
    """Turn a stride-2 torchvision BasicBlock layer into a stride-1 dilated one, in place.

    torchvision refuses dilation for BasicBlock; weights shapes do not change, so this is
    only a matter of stride, padding and dilation of the existing convs.
    """
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation = (dilation, dilation)
                m.padding = (dilation, dilation)


def _load_trunk(trunk: dict[str, nn.Module], state_dict: dict[str, torch.Tensor]) -> None:
    # Old torchvision weights lack num_batches_tracked; anything else missing is a bug.
    result = nn.ModuleDict(trunk).load_state_dict(state_dict, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"ImageNet weights do not fit the trunk: missing {missing}, "
            f"unexpected {result.unexpected_keys}"
        )


class ClassifierModule(nn.Module):
    """DeepLab-v2 ASPP classifier: four parallel 3x3 dilated convs whose outputs are summed.

    ``sum_all=False`` reproduces AdaptSegNet, whose forward returns inside its loop after
    the first two branches; the last two branches then never receive a gradient, so they
    are frozen to keep DDP from waiting for them.
    """

    def __init__(self, inplanes: int, num_classes: int, sum_all: bool) -> None:
        super().__init__()
        self.sum_all = sum_all
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(inplanes, num_classes, 3, padding=d, dilation=d, bias=True)
            for d in ASPP_DILATIONS
        )
        for conv in self.conv2d_list:
            nn.init.normal_(conv.weight, 0.0, 0.01)
        if not sum_all:
            for conv in self.conv2d_list[2:]:
                conv.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branches = self.conv2d_list if self.sum_all else self.conv2d_list[:2]
        return sum(conv(x) for conv in branches)


class MCDropout2d(nn.Module):
    """Channel dropout that acts only while switched on, in train and eval mode alike.

    Off (the default) it is the identity, so plain training and inference are unchanged;
    scoring switches it on with :func:`set_mc_dropout` for T stochastic passes.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"mc_dropout must be in [0, 1), got {p}")
        self.p = p
        self.active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout2d(x, self.p, training=self.active)


def set_mc_dropout(model: nn.Module, enabled: bool) -> None:
    """Switch MC-dropout on or off in every DeepLab-v2 inside ``model`` (DDP-wrapped too)."""
    layers = [m for m in model.modules() if isinstance(m, MCDropout2d) and m.p > 0]
    if enabled and not layers:
        raise ValueError("model was built with mc_dropout=0; rebuild it with mc_dropout > 0")
    for m in layers:
        m.active = enabled


class DeepLabV2(nn.Module):
    """ResNet trunk + DeepLab-v2 ASPP head(s).

    ``layout`` picks the classifier names of the public checkpoints: single-level is
    ``layer5`` (AdaptSegNet ``Res_Deeplab``) or ``layer6`` (ADVENT); multi-level is
    ``layer5`` on layer3 plus ``layer6`` on layer4 in both. ``aspp_sum`` defaults to
    "two" for AdaptSegNet (its quirk) and "all" for ADVENT.
    """

    def __init__(
        self,
        trunk: dict[str, nn.Module],
        channels: tuple[int, int],
        num_classes: int,
        *,
        layout: str = "advent",
        multi_level: bool = False,
        aspp_sum: str | None = None,
        mc_dropout: float = 0.0,
        freeze_bn: bool = False,
    ) -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        aspp_sum = aspp_sum or ("two" if layout == "adaptsegnet" else "all")
        if aspp_sum not in ("two", "all"):
            raise ValueError(f"aspp_sum must be 'two' or 'all', got {aspp_sum!r}")
        self.num_classes = num_classes
        self.multi_level = multi_level
        self.conv1 = trunk["conv1"]
        self.bn1 = trunk["bn1"]
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = trunk["maxpool"]
        self.layer1 = trunk["layer1"]
        self.layer2 = trunk["layer2"]
        self.layer3 = trunk["layer3"]
        self.layer4 = trunk["layer4"]
        sum_all = aspp_sum == "all"
        if multi_level:
            # The layer3 head of the public multi-level checkpoints, kept so they load and
            # save whole. No loss here uses it: frozen, so that every trainable parameter
            # gets a gradient (DDP, without find_unused_parameters, requires it).
            self.layer5 = ClassifierModule(channels[0], num_classes, sum_all)
            self.layer5.requires_grad_(False)
        self.main_head = "layer5" if layout == "adaptsegnet" and not multi_level else "layer6"
        self.add_module(self.main_head, ClassifierModule(channels[1], num_classes, sum_all))
        self.dropout = MCDropout2d(mc_dropout)
        self.set_freeze_bn(freeze_bn)

    def set_freeze_bn(self, frozen: bool) -> None:
        """Frozen BN: eval mode whatever ``train()`` says, and no gradient for its affine."""
        self.freeze_bn = frozen
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> DeepLabV2:
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self

    def _layer3(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def _main_logits(self, c3: torch.Tensor) -> torch.Tensor:
        return getattr(self, self.main_head)(self.dropout(self.layer4(c3)))

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Logits at feature resolution: (layer3 head or None, layer4 head)."""
        c3 = self._layer3(x)
        aux = self.layer5(c3) if self.multi_level else None
        return aux, self._main_logits(c3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Main-head logits upsampled to the input size (the layer3 head is not run)."""
        main = self._main_logits(self._layer3(x))
        return F.interpolate(main, size=x.shape[-2:], mode="bilinear", align_corners=True)


def deeplabv2_resnet101(num_classes: int, imagenet_init: bool = False, **options: Any) -> DeepLabV2:
    """AdaptSegNet/ADVENT-compatible DeepLab-v2 ResNet-101; BN frozen by default as there.

    ``imagenet_init`` copies torchvision's ImageNet ResNet-101 weights (a download; the
    names match, the stride placement differs slightly; use "imagenet" normalisation).
    """
    options.setdefault("freeze_bn", True)
    trunk = _caffe_resnet101_trunk()
    if imagenet_init:
        weights = torchvision.models.ResNet101_Weights.IMAGENET1K_V1.get_state_dict()
        _load_trunk(trunk, {k: v for k, v in weights.items() if not k.startswith("fc.")})
    return DeepLabV2(trunk, (1024, 2048), num_classes, **options)


def _check_output_stride(output_stride: int) -> None:
    if output_stride not in (8, 16):
        raise ValueError(f"output_stride must be 8 or 16, got {output_stride!r}")


def deeplabv2_resnet50(
    num_classes: int, imagenet_init: bool = False, output_stride: int = 8, **options: Any
) -> DeepLabV2:
    """torchvision ResNet-50 dilated to output stride 8 (or 16), BN trainable by default."""
    _check_output_stride(output_stride)
    weights = "IMAGENET1K_V1" if imagenet_init else None
    net = torchvision.models.resnet50(
        weights=weights, replace_stride_with_dilation=[False, output_stride == 8, True]
    )
    return DeepLabV2(_torchvision_trunk(net), (1024, 2048), num_classes, **options)


def deeplabv2_resnet18(
    num_classes: int, imagenet_init: bool = False, output_stride: int = 8, **options: Any
) -> DeepLabV2:
    """torchvision ResNet-18 with the last layers made stride 1 and dilated.

    Output stride 8 dilates layer3/layer4 by 2/4; output stride 16 dilates layer4 by 2
    only, about three times cheaper on a CPU (the synthetic benchmark's default).
    """
    _check_output_stride(output_stride)
    weights = "IMAGENET1K_V1" if imagenet_init else None
    net = torchvision.models.resnet18(weights=weights)
    if output_stride == 8:
        _dilate_basic_layer(net.layer3, 2)
        _dilate_basic_layer(net.layer4, 4)
    else:
        _dilate_basic_layer(net.layer4, 2)
    return DeepLabV2(_torchvision_trunk(net), (256, 512), num_classes, **options)


_BUILDERS = {
    "deeplabv2_resnet101": deeplabv2_resnet101,
    "deeplabv2_resnet50": deeplabv2_resnet50,
    "deeplabv2_resnet18": deeplabv2_resnet18,
}
MODEL_NAMES = tuple(_BUILDERS)


def build_model(name: str, num_classes: int, **options: Any) -> DeepLabV2:
    """Build a segmentation model by name.

    Options: ``layout`` ("advent" | "adaptsegnet"), ``multi_level``, ``aspp_sum``
    ("two" | "all"), ``mc_dropout``, ``freeze_bn``, ``imagenet_init`` (downloads), and
    for the torchvision backbones ``output_stride`` (8 | 16).
    The model carries ``arch = {"name", "options"}`` so a checkpoint can rebuild it;
    ``imagenet_init`` is left out of it, being an initialisation, not an architecture.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    model = _BUILDERS[name](num_classes, **options)
    options.pop("imagenet_init", None)
    model.arch = {"name": name, "options": options}
    return model
