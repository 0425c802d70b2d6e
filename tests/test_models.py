"""DeepLab-v2 models: compatibility with the public AdaptSegNet/ADVENT layouts, frozen BN,
MC-dropout, small backbones, discriminator."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sfda_ray.models import (
    MODEL_NAMES,
    FCDiscriminator,
    build_model,
    load_weights,
    set_mc_dropout,
)

# --- An independent re-statement of the public layouts, written from their description:
# Caffe-style bottleneck (stride on the first 1x1), projection on every layer's first
# block, layer3/layer4 dilated 2/4 at stride 1, ASPP heads named layer5/layer6.


class RefBottleneck(nn.Module):
    def __init__(self, cin: int, mid: int, stride: int, dilation: int, project: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, mid, 1, stride, bias=False)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = nn.Conv2d(mid, mid, 3, 1, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = nn.Conv2d(mid, 4 * mid, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * mid)
        self.downsample = None
        if project:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, 4 * mid, 1, stride, bias=False), nn.BatchNorm2d(4 * mid)
            )

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class RefASPP(nn.Module):
    def __init__(self, cin: int, n: int, early_return: bool):
        super().__init__()
        self.early_return = early_return
        self.conv2d_list = nn.ModuleList(
            nn.Conv2d(cin, n, 3, padding=d, dilation=d) for d in (6, 12, 18, 24)
        )

    def forward(self, x):
        out = self.conv2d_list[0](x)
        for conv in self.conv2d_list[1:]:
            out = out + conv(x)
            if self.early_return:  # AdaptSegNet returns inside its summing loop
                return out
        return out


class RefDeepLab(nn.Module):
    def __init__(self, n: int, layout: str, multi: bool, early_return: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        cin = 64
        for i, (mid, blocks, stride, dil) in enumerate(
            [(64, 3, 1, 1), (128, 4, 2, 1), (256, 23, 1, 2), (512, 3, 1, 4)], start=1
        ):
            layer = [RefBottleneck(cin, mid, stride, dil, project=True)]
            layer += [RefBottleneck(4 * mid, mid, 1, dil, project=False) for _ in range(blocks - 1)]
            setattr(self, f"layer{i}", nn.Sequential(*layer))
            cin = 4 * mid
        self.multi = multi
        if multi:
            self.layer5 = RefASPP(1024, n, early_return)
            self.layer6 = RefASPP(2048, n, early_return)
        elif layout == "adaptsegnet":
            self.layer5 = RefASPP(2048, n, early_return)
        else:
            self.layer6 = RefASPP(2048, n, early_return)
        self.main = "layer6" if multi or layout == "advent" else "layer5"

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        c3 = self.layer3(self.layer2(self.layer1(x)))
        return (self.layer5(c3) if self.multi else None), getattr(self, self.main)(self.layer4(c3))


def _randomize_bn(model: nn.Module) -> None:
    # Non-trivial running statistics, so eval-mode BN is really exercised.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.1, 0.1)


@pytest.mark.parametrize(
    "layout, multi, aspp_sum, prefix",
    [
        ("adaptsegnet", False, "two", "Scale."),
        ("adaptsegnet", True, "two", "module."),
        ("advent", False, "all", ""),
        ("advent", True, "all", ""),
        ("advent", True, "two", ""),
    ],
)
@torch.no_grad()
def test_resnet101_loads_public_layouts(layout, multi, aspp_sum, prefix):
    torch.manual_seed(0)
    ref = RefDeepLab(7, layout, multi, early_return=aspp_sum == "two")
    _randomize_bn(ref)
    ref.eval()
    state = {prefix + k: v for k, v in ref.state_dict().items()}

    ours = build_model(
        "deeplabv2_resnet101", 7, layout=layout, multi_level=multi, aspp_sum=aspp_sum
    )
    missing, unexpected = load_weights(ours, state)
    assert missing == [] and unexpected == []
    ours.eval()

    x = torch.randn(1, 3, 64, 65)  # even height: max-pool ceil_mode matters
    ref_aux, ref_main = ref(x)
    aux, main = ours.forward_heads(x)
    assert ref_main.std() > 0
    torch.testing.assert_close(main, ref_main)
    if multi:
        torch.testing.assert_close(aux, ref_aux)
    else:
        assert aux is None
    expected = F.interpolate(ref_main, size=(64, 65), mode="bilinear", align_corners=True)
    torch.testing.assert_close(ours(x), expected)


@torch.no_grad()
def test_aspp_sum_modes_differ_and_unused_branches_are_frozen():
    torch.manual_seed(0)
    two = build_model("deeplabv2_resnet18", 4, aspp_sum="two").eval()
    every = build_model("deeplabv2_resnet18", 4, aspp_sum="all").eval()
    every.load_state_dict(two.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert not torch.allclose(two(x), every(x))
    assert [c.weight.requires_grad for c in two.layer6.conv2d_list] == [True, True, False, False]
    assert all(c.weight.requires_grad for c in every.layer6.conv2d_list)


def test_layout_picks_head_names():
    single_asn = build_model("deeplabv2_resnet18", 3, layout="adaptsegnet")
    single_adv = build_model("deeplabv2_resnet18", 3, layout="advent")
    multi = build_model("deeplabv2_resnet18", 3, layout="adaptsegnet", multi_level=True)
    heads = [
        sorted({k.split(".")[0] for k in m.state_dict() if k.startswith(("layer5", "layer6"))})
        for m in (single_asn, single_adv, multi)
    ]
    assert heads == [["layer5"], ["layer6"], ["layer5", "layer6"]]
    assert not single_asn.layer5.sum_all and single_adv.layer6.sum_all  # per-layout default
    assert single_asn.layer5.conv2d_list[0].in_channels == 512
    assert multi.layer5.conv2d_list[0].in_channels == 256


@pytest.mark.parametrize(
    "options",
    [{}, {"multi_level": True}, {"multi_level": True, "layout": "adaptsegnet", "aspp_sum": "two"}],
)
def test_every_trainable_parameter_gets_a_gradient(options):
    """DDP (without find_unused_parameters) fails on a trainable parameter that gets no
    gradient; the multi-level checkpoints' layer3 head is used by no loss."""
    model = build_model("deeplabv2_resnet18", 3, **options).train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(1).mean().backward()
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert unused == []


@pytest.mark.parametrize("name", ["deeplabv2_resnet18", "deeplabv2_resnet50"])
def test_small_backbones_output_stride_8(name):
    model = build_model(name, 5, multi_level=True).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        aux, main = model.forward_heads(x)
        out = model(x)
    assert aux.shape == main.shape == (2, 5, 8, 12)
    assert out.shape == (2, 5, 64, 96)
    assert not model.freeze_bn and model.bn1.weight.requires_grad


def test_frozen_bn_stays_frozen_after_train():
    model = build_model("deeplabv2_resnet18", 3, freeze_bn=True).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    before = [m.running_mean.clone() for m in bns]
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    assert model.training and model.layer1.training
    assert not any(m.training for m in bns)
    assert not any(p.requires_grad for m in bns for p in m.parameters())
    assert all(m.weight.grad is None for m in bns)
    assert model.conv1.weight.grad is not None
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, bns, strict=True))

    # Unfreezing (AdaBN, TENT) puts batch statistics back in play.
    model.set_freeze_bn(False)
    model(torch.randn(2, 3, 32, 32))
    assert all(m.training for m in bns)
    assert not torch.equal(before[0], bns[0].running_mean)


def test_resnet101_freezes_bn_by_default():
    model = build_model("deeplabv2_resnet101", 3).train()
    assert model.freeze_bn and not model.bn1.training and not model.bn1.weight.requires_grad


@torch.no_grad()
def test_mc_dropout_only_when_enabled():
    torch.manual_seed(0)
    # Frozen BN makes train mode deterministic, so dropout is the only noise source.
    model = build_model("deeplabv2_resnet18", 3, mc_dropout=0.5, freeze_bn=True)
    x = torch.randn(1, 3, 32, 32)
    for mode in (True, False):
        model.train(mode)
        assert torch.equal(model(x), model(x))
    set_mc_dropout(model, True)
    assert not torch.equal(model(x), model(x))  # eval mode still stochastic
    set_mc_dropout(model, False)
    assert torch.equal(model(x), model(x))
    with pytest.raises(ValueError, match="mc_dropout=0"):
        set_mc_dropout(build_model("deeplabv2_resnet18", 3), True)


def test_build_model_rejects_unknown_name_and_bad_options():
    with pytest.raises(ValueError) as err:
        build_model("unet", 3)
    assert all(name in str(err.value) for name in MODEL_NAMES)
    with pytest.raises(ValueError, match="layout"):
        build_model("deeplabv2_resnet18", 3, layout="deeplab")
    with pytest.raises(ValueError, match="aspp_sum"):
        build_model("deeplabv2_resnet18", 3, aspp_sum="three")


def test_discriminator_shape_and_names():
    disc = FCDiscriminator(19)
    assert disc(torch.randn(1, 19, 64, 64)).shape == (1, 1, 2, 2)
    assert [k for k in disc.state_dict() if k.endswith("weight")] == [
        "conv1.weight",
        "conv2.weight",
        "conv3.weight",
        "conv4.weight",
        "classifier.weight",
    ]
    assert FCDiscriminator(7, ndf=8)(torch.randn(2, 7, 96, 192)).shape == (2, 1, 3, 6)
    assert FCDiscriminator(7, ndf=8)(torch.randn(1, 7, 32, 32)).shape == (1, 1, 1, 1)
    # Narrower maps would leave the classifier an empty input: a clear error instead.
    with pytest.raises(ValueError, match=r"at least 32x32 pixels, got 16x64"):
        FCDiscriminator(7, ndf=8)(torch.randn(1, 7, 16, 64))
