import json
import logging
import math
import shutil
from pathlib import Path

import ddp_workers
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import TINY, tiny_config
from PIL import Image

from sfda_ray.adaptation import (
    LocalEnv,
    batch_stream,
    make_loader,
    make_plan,
    metrics_over_workers,
    run_adaptation,
)
from sfda_ray.config import (
    AdaptConfig,
    apply_overrides,
    changed_settings,
    load_config,
    load_search_space,
)
from sfda_ray.data.scores import map_name
from sfda_ray.data.synthetic import generate
from sfda_ray.dist.job import DEFAULT_SPACE
from sfda_ray.dist.scoring import ScoringOptions, score_dataset
from sfda_ray.method.adapt import Adapter, class_mix, strong_augment, unwrap
from sfda_ray.method.losses import (
    discriminator_input,
    entropy_loss,
    prior_kl,
    weighted_bce,
    weighted_cross_entropy,
)
from sfda_ray.method.scoring import normalized_entropy
from sfda_ray.models import build_model
from sfda_ray.models.checkpoint import load_model
from sfda_ray.models.execution import Execution
from sfda_ray.train_source import train_source

ROOT = Path(__file__).resolve().parents[1]

C = 19
CPU = Execution(torch.device("cpu"))


def test_uniform_prediction_has_entropy_one_and_one_hot_zero():
    assert entropy_loss(torch.zeros(2, C, 3, 3)).item() == pytest.approx(1.0)
    one_hot = torch.full((1, C, 2, 2), -1e4)
    one_hot[:, 3] = 1e4
    assert normalized_entropy(one_hot.softmax(1)).max().item() == pytest.approx(0.0, abs=1e-6)


def test_prior_kl_is_zero_when_prediction_matches_prior():
    prior = torch.rand(C)
    prior /= prior.sum()
    logits = prior.log().view(1, C, 1, 1).expand(2, C, 4, 4)
    assert prior_kl(logits, prior).item() == pytest.approx(0.0, abs=1e-5)
    assert prior_kl(torch.zeros(1, C, 2, 2), prior).item() > 0.01
    # Classes with zero prior contribute nothing (0 log 0 = 0).
    sparse = torch.zeros(C)
    sparse[[0, 5]] = 0.5
    logits = torch.full((1, C, 1, 1), -30.0)
    logits[:, [0, 5]] = 0.0
    assert prior_kl(logits, sparse).item() == pytest.approx(0.0, abs=1e-5)


def test_weighted_cross_entropy_ignores_and_weights_pixels():
    logits = torch.randn(1, C, 2, 2)
    target = torch.tensor([[[1, 2], [255, 4]]])
    ce = torch.nn.functional.cross_entropy(logits, target.clamp_max(C - 1), reduction="none")[0]
    weight = torch.tensor([[[1.0, 0.0], [5.0, 3.0]]])  # pixel (0,1) weight 0; (1,0) ignored
    alpha = torch.ones(C)
    alpha[4] = 2.0
    expected = (ce[0, 0] * 1 + ce[1, 1] * 3 * 2) / (1 + 6)
    got = weighted_cross_entropy(logits, target, weight, alpha)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # No kept pixel: zero loss that still backpropagates.
    empty = weighted_cross_entropy(logits.requires_grad_(), torch.full((1, 2, 2), 255))
    assert empty.item() == 0.0
    empty.backward()


def test_discriminator_inputs_and_weighted_bce():
    uniform = discriminator_input(torch.zeros(1, C, 2, 2), "entropy")
    assert torch.allclose(uniform, torch.full_like(uniform, 1 / C))
    assert torch.allclose(
        discriminator_input(torch.zeros(1, C, 1, 1), "softmax").sum(1), torch.ones(1, 1, 1)
    )
    d_out = torch.zeros(1, 1, 2, 2)  # logit 0: BCE = log 2 for either label
    assert weighted_bce(d_out, 1.0).item() == pytest.approx(math.log(2))
    weight = torch.zeros(1, 8, 8)
    weight[:, :4, :4] = 1.0  # only the top-left quarter counts
    d_out[..., 0, 0] = 3.0
    expected = torch.nn.functional.softplus(torch.tensor(-3.0)).item()
    assert weighted_bce(d_out, 1.0, weight).item() == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="unknown discriminator input"):
        discriminator_input(d_out, "logits")


def _virtual_batch() -> dict:
    """A virtual-source batch of two 32x64 images with pseudo-labels and weights."""
    return {
        "image": torch.rand(2, 3, 32, 64),
        "label": torch.randint(0, C, (2, 32, 64)),
        "weight": torch.rand(2, 32, 64),
    }


@pytest.mark.parametrize("lambda_v", [1.0, 0.0])
def test_step_updates_segmentation_net_and_discriminator(lambda_v):
    """Also without L_V (its ablation): V's logits still train the discriminator."""
    torch.manual_seed(0)
    model = build_model("deeplabv2_resnet18", C, output_stride=16)
    cfg = AdaptConfig(strong_aug=True, lambda_v=lambda_v)
    prior = torch.full((C,), 1 / C)
    adapter = Adapter(model, cfg, "imagenet", prior, torch.ones(C), CPU)
    images = torch.rand(2, 3, 32, 64)
    adapter.begin_round(0, [images])
    before_net = model.layer1[0].conv1.weight.clone()
    before_d = adapter.disc.conv1.weight.clone()
    d_grads = []  # D's weight gradients: from its own step only, none from the generator's
    adapter.disc.conv1.weight.register_hook(lambda g: d_grads.append(g))
    batch_v = _virtual_batch()
    logs = adapter.step(batch_v, {"image": images})
    assert len(d_grads) == 1
    for key in ("loss_st", "loss_prior", "loss_adv", "loss_d"):
        assert math.isfinite(logs[key]), key
    assert ("loss_v" in logs) == bool(lambda_v)
    assert not torch.equal(before_net, model.layer1[0].conv1.weight)
    assert not torch.equal(before_d, adapter.disc.conv1.weight)
    # The teacher is a frozen copy: it did not move with the student.
    assert all(not p.requires_grad for p in adapter.teacher.parameters())
    assert torch.equal(adapter.teacher.layer1[0].conv1.weight, before_net)


def test_the_learning_rates_follow_the_poly_schedule():
    model = build_model("deeplabv2_resnet18", C, output_stride=16)
    cfg = AdaptConfig(lr=1e-3, lr_discriminator=1e-4)
    adapter = Adapter(model, cfg, "imagenet", torch.full((C,), 1 / C), None, CPU)
    for it, factor in ((0, 1.0), (50, 0.5**0.9), (99, 0.01**0.9), (100, 0.0)):
        adapter.set_lr(it, 100)
        assert adapter.opt.param_groups[0]["lr"] == pytest.approx(1e-3 * factor, abs=1e-12)
        assert adapter.opt_d.param_groups[0]["lr"] == pytest.approx(1e-4 * factor, abs=1e-12)


def test_an_ema_teacher_follows_the_student_a_round_teacher_does_not():
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 64)
    teachers = {}
    for teacher in ("ema", "round"):
        torch.manual_seed(0)
        model = build_model("deeplabv2_resnet18", C, output_stride=16)
        cfg = AdaptConfig(teacher=teacher, ema_momentum=0.9, lambda_adv=0.0)
        adapter = Adapter(model, cfg, "imagenet", torch.full((C,), 1 / C), None, CPU)
        adapter.begin_round(0, [images])
        start = model.layer1[0].conv1.weight.clone()
        adapter.step(_virtual_batch(), {"image": images})
        now = model.layer1[0].conv1.weight
        teachers[teacher] = adapter.teacher.layer1[0].conv1.weight
        if teacher == "ema":
            assert torch.allclose(teachers[teacher], 0.9 * start + 0.1 * now, atol=1e-7)
            # Buffers too: the running statistics move towards the student's.
            t_bn, s_bn = adapter.teacher.bn1, model.bn1
            assert not torch.equal(t_bn.running_mean, s_bn.running_mean)
            assert t_bn.num_batches_tracked == s_bn.num_batches_tracked
        else:
            assert torch.equal(teachers[teacher], start)
    assert not torch.equal(teachers["ema"], teachers["round"])


def test_workers_read_disjoint_shards():
    def order(rank, world_size):
        return list(make_loader(list(range(10)), 1, 3, None, rank, world_size).sampler)

    first, second = order(0, 2), order(1, 2)
    assert len(first) == len(second) == 5 and not set(first) & set(second)
    # One worker reads a plain seeded permutation (as RandomSampler with that seed did).
    assert order(0, 1) == torch.randperm(10, generator=torch.Generator().manual_seed(3000)).tolist()


def test_a_resumed_stream_reads_on_where_it_stopped():
    """Resuming at iteration 5 of 3-batch passes starts at pass 1, batch 2, as the
    uninterrupted stream was; the sampler leaves out the batches already read."""

    def make(epoch, skip):
        return [
            {"image": (epoch, i), "num_skipped": 0, "skipped_reasons": {}} for i in range(skip, 3)
        ]

    def first(stream, n):
        return [next(stream)["image"] for _ in range(n)]

    assert first(batch_stream(make, 5), 3) == first(batch_stream(make, 0), 8)[5:]

    # The rest of a pass may hold only unreadable items: that is no empty whole pass.
    def bad_tail(epoch, skip):
        batches = make(epoch, skip)
        unreadable = {"num_skipped": 2, "skipped_reasons": {"empty file": 2}}
        return [unreadable] * len(batches) if (epoch, skip) == (1, 2) else batches

    assert first(batch_stream(bad_tail, 5), 1) == [(2, 0)]
    full = list(make_loader(list(range(10)), 2, 3, None).sampler)
    assert list(make_loader(list(range(10)), 2, 3, None, skip_batches=2).sampler) == full[4:]
    weights = [1.0] * 10
    drawn = list(make_loader(list(range(10)), 2, 3, weights).sampler)
    assert list(make_loader(list(range(10)), 2, 3, weights, skip_batches=1).sampler) == drawn[2:]


def test_the_adabn_start_pools_the_workers_statistics(tmp_path):
    """The pooled variance holds the spread between the shards' means too."""
    torch.manual_seed(0)
    data = [torch.randn(100, 3), torch.randn(100, 3) * 2 + 5]  # shards that differ
    ddp_workers.run_pair(ddp_workers.pooled_batchnorm, data, tmp_path)
    union = torch.cat(data)
    for rank in (0, 1):
        mean, var = torch.load(tmp_path / f"bn{rank}.pt")
        assert torch.allclose(mean, union.mean(0), atol=1e-5)
        assert torch.allclose(var, union.var(0, unbiased=False), atol=1e-4)


def test_every_worker_stops_when_one_diverges(tmp_path):
    ddp_workers.run_pair(ddp_workers.divergence, tmp_path)
    assert (
        (tmp_path / "rank0.txt")
        .read_text()
        .startswith("adaptation diverged at iteration 7: another worker's loss not finite")
    )
    assert (
        (tmp_path / "rank1.txt")
        .read_text()
        .startswith("adaptation diverged at iteration 7: loss_total not finite")
    )


def test_reported_metrics_cover_every_workers_shard(tmp_path):
    """What rank 0 reports for the run: losses averaged and skipped inputs summed over
    both workers (gloo, real processes); a single process reports its own."""
    ddp_workers.run_pair(ddp_workers.reported_metrics, tmp_path)
    for rank in (0, 1):
        assert torch.load(tmp_path / f"metrics{rank}.pt") == {"loss_v": 2.0, "skipped_inputs": 3}
    assert metrics_over_workers({"loss_v": 1.0, "skipped_inputs": 0}, torch.device("cpu")) == {}


def test_workers_share_round_thresholds_but_not_augmentation_draws(tmp_path):
    """Two DDP workers (gloo, real processes) each see their own target images; the
    class-balanced thresholds come from all of them, the same on both workers, and so
    does the teacher, while each draws its own strong augmentation and ClassMix
    parameters."""
    torch.manual_seed(1)
    images = [torch.rand(2, 3, 32, 64), torch.rand(2, 3, 32, 64) * 0.2]
    ddp_workers.run_pair(ddp_workers.round_thresholds, images, tmp_path)
    ranks, means, draws, teacher_bns = zip(
        *(torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)), strict=True
    )
    assert [m.item() for m in means] == [0.5, 0.5]
    # One teacher on both: rank 0's BatchNorm statistics, not each worker's own.
    assert torch.equal(teacher_bns[0], teacher_bns[1])
    torch.manual_seed(0)
    model = build_model("deeplabv2_resnet18", C, output_stride=16)
    alone = Adapter(model, AdaptConfig(), "imagenet", torch.full((C,), 1 / C), None, CPU)
    # Augmentation draws: rank 0 draws as one process does, rank 1 its own.
    assert torch.equal(draws[0], torch.rand(4, generator=alone.generator))
    assert not torch.equal(draws[0], draws[1])
    alone.begin_round(0, images)  # one process seeing both workers' images
    assert torch.equal(ranks[0], ranks[1]) and torch.equal(ranks[0], alone.st_thresholds)
    alone.begin_round(0, images[:1])
    assert not torch.equal(ranks[0], alone.st_thresholds)  # rank 0's images alone differ


def test_a_checkpoint_carries_the_augmentation_draws_on(tmp_path):
    """Strong augmentation draws its parameters on the CPU and its noise where the images
    are; a resumed adapter draws on from both, as the uninterrupted one does."""
    torch.manual_seed(0)
    images = torch.rand(2, 3, 16, 32)

    def adapter() -> Adapter:
        model = build_model("deeplabv2_resnet18", C, output_stride=16)
        return Adapter(model, AdaptConfig(), "imagenet", torch.full((C,), 1 / C), None, CPU)

    def augment(a: Adapter) -> torch.Tensor:
        return strong_augment(images, a.generator, a.noise_generator)

    first = adapter()
    assert first.noise_generator.device == CPU.device
    augment(first)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    resumed = adapter()
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=False))
    assert torch.equal(augment(resumed), augment(first))
    # A checkpoint made on another device type (or before the noise was kept) restarts
    # the noise from its seed, the parameters still from the checkpoint.
    state = first.state_dict()
    state["noise_generator"] = ("cuda", torch.zeros(16, dtype=torch.uint8))
    other = adapter()
    other.load_state_dict(state)
    assert torch.equal(other.generator.get_state(), first.generator.get_state())
    assert torch.equal(other.noise_generator.get_state(), adapter().noise_generator.get_state())


def test_class_mix_pastes_half_of_the_labelled_classes_with_their_labels():
    g = torch.Generator().manual_seed(0)
    label_a = torch.tensor([[[1, 1, 2, 2], [3, 3, 255, 255]]])  # classes 1, 2, 3 + ignored
    a = (torch.ones(1, 3, 2, 4), label_a, torch.full((1, 2, 4), 0.9))
    b = (torch.zeros(1, 3, 2, 4), torch.full((1, 2, 4), 7), torch.full((1, 2, 4), 0.5))
    images, labels, weights = class_mix(a, b, g)
    pasted = images[0, 0] == 1
    pasted_classes = set(label_a[0][pasted].tolist())
    assert len(pasted_classes) == 2 and 255 not in pasted_classes  # ceil(3 / 2) classes
    assert torch.equal(pasted, torch.isin(label_a[0], torch.tensor(sorted(pasted_classes))))
    assert torch.equal(labels[0], torch.where(pasted, label_a[0], 7))
    assert torch.equal(weights[0], torch.where(pasted, 0.9, 0.5))
    # A batch of V shorter than the target's (a skipped image): one mixed image per pair.
    b3 = tuple(torch.cat([t] * 3) for t in b)
    images, labels, weights = class_mix(a, b3, g)
    assert images.shape == (1, 3, 2, 4) and labels.shape == weights.shape == (1, 2, 4)


def test_class_mix_loss_is_reported_and_trains_the_net():
    torch.manual_seed(0)
    model = build_model("deeplabv2_resnet18", C, output_stride=16)
    adapter = Adapter(
        model, AdaptConfig(lambda_mix=1.0), "imagenet", torch.full((C,), 1 / C), None, CPU
    )
    images = torch.rand(2, 3, 32, 64)
    adapter.begin_round(0, [images])
    batch_v = _virtual_batch()
    logs = adapter.step(batch_v, {"image": images})
    assert math.isfinite(logs["loss_mix"]) and logs["loss_mix"] > 0
    # Batches of V and T of different sizes (an image of either skipped) still mix.
    logs = adapter.step(batch_v, {"image": torch.rand(3, 3, 32, 64)})
    assert math.isfinite(logs["loss_mix"]) and logs["loss_mix"] > 0
    logs = adapter.step({k: v[:1] for k, v in batch_v.items()}, {"image": images})
    assert math.isfinite(logs["loss_mix"]) and logs["loss_mix"] > 0


def test_tent_trains_only_normalisation_parameters():
    model = build_model("deeplabv2_resnet18", C, output_stride=16)
    conv, bn = model.layer1[0].conv1.weight.clone(), model.layer1[0].bn1.weight.clone()
    adapter = Adapter(
        model,
        AdaptConfig(method="tent", strong_aug=False),
        "imagenet",
        torch.full((C,), 1 / C),
        None,
        CPU,
    )
    adapter.step(None, {"image": torch.rand(2, 3, 32, 64)})
    assert torch.equal(conv, model.layer1[0].conv1.weight)
    assert not torch.equal(bn, model.layer1[0].bn1.weight)


@pytest.mark.parametrize("method", ["tent", "minent"])
def test_entropy_baselines_take_the_plain_view(method):
    """As TENT and ADVENT's MinEnt were published: strong augmentation changes nothing."""
    images = torch.rand(2, 3, 32, 64)
    models = []
    for strong_aug in (True, False):
        torch.manual_seed(0)
        model = build_model("deeplabv2_resnet18", C, output_stride=16)
        cfg = AdaptConfig(method=method, strong_aug=strong_aug)
        Adapter(model, cfg, "imagenet", torch.full((C,), 1 / C), None, CPU).step(
            None, {"image": images.clone()}
        )
        models.append(model.state_dict())
    for key, value in models[0].items():
        assert torch.equal(value, models[1][key]), key


def test_tent_normalises_with_target_batches_on_a_frozen_bn_model():
    """The ResNet-101 checkpoints freeze BN; TENT's point is the target batch statistics."""
    model = build_model("deeplabv2_resnet18", C, output_stride=16, freeze_bn=True)
    mean = model.layer1[0].bn1.running_mean.clone()
    cfg = AdaptConfig(method="tent", strong_aug=False)
    adapter = Adapter(model, cfg, "imagenet", torch.full((C,), 1 / C), None, CPU)
    adapter.step(None, {"image": torch.rand(2, 3, 32, 64)})
    assert model.layer1[0].bn1.training  # batch statistics in the step
    assert not torch.equal(mean, model.layer1[0].bn1.running_mean)


def _adapt_cfg(**kw):
    base = {
        "adapt.iterations": 4,
        "adapt.batch_size": 2,
        "adapt.eval_every": 2,
        "adapt.checkpoint_every": 2,
        "adapt.threads": 1,
        "adapt.st_rounds": 2,
    }
    return tiny_config(**{**base, **kw})


def test_plain_loop_adapts_and_reports(tiny_benchmark, tiny_source_ckpt, tiny_scores, monkeypatch):
    scores, _ = tiny_scores
    cfg = _adapt_cfg()
    plan = make_plan(cfg, str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    assert len(plan.virtual_rows) == 12 and len(plan.target_rows) == 12
    assert plan.map_size == (TINY.height, TINY.width) and len(plan.eval_rows) == TINY.target_val
    steps = []
    step = Adapter.step
    monkeypatch.setattr(Adapter, "step", lambda self, *a: steps.append(step(self, *a)) or steps[-1])
    env = LocalEnv()
    result = run_adaptation(plan, cfg, env)
    assert [r["iteration"] for r in env.reports] == [2, 4]
    # Losses are reported as means over the interval since the previous report.
    for report, interval in zip(env.reports, (steps[:2], steps[2:]), strict=True):
        for key in ("loss_total", "loss_v", "loss_st"):
            expected = sum(s[key] for s in interval) / 2
            assert report[key] == pytest.approx(expected, rel=1e-9), key
    assert 0.0 <= result["metrics"]["val_miou"] <= 100.0
    assert result["metrics"]["proxy"] > 0
    source, _ = load_model(str(tiny_source_ckpt))
    adapted = result["model"].state_dict()
    assert any(
        not torch.equal(v, adapted[k])
        for k, v in source.state_dict().items()
        if v.dtype.is_floating_point
    )


def test_a_run_resumed_at_its_end_reports_its_last_report_again(
    tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    """A driver stopped after the run's last checkpoint, but before it logged the report
    that went with it, would otherwise never see that report's losses: the resumed run
    has nothing left to train, and reports the checkpoint's report again."""
    scores, _ = tiny_scores
    cfg = _adapt_cfg()
    plan = make_plan(cfg, str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    state_path = str(tmp_path / "state.pt")
    first = LocalEnv(state_path=state_path)
    run_adaptation(plan, cfg, first)
    again = LocalEnv(state_path=state_path)
    run_adaptation(plan, cfg, again)
    assert [r["iteration"] for r in again.reports] == [4]
    assert again.reports[0] == pytest.approx(first.reports[-1], rel=1e-6)
    assert again.reports[0]["loss_total"] > 0
    # The report is still there for a third start.
    third = LocalEnv(state_path=state_path)
    run_adaptation(plan, cfg, third)
    assert third.reports == again.reports


def test_unlabelled_target_reports_the_proxy(
    tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    """Without target labels the sweep ranks on the proxy, so every evaluation reports it,
    computed as it is with labels."""
    import pyarrow.compute as pc

    from sfda_ray.adaptation import evaluate_adapted
    from sfda_ray.data.catalog import open_dataset
    from sfda_ray.data.manifest import write_manifest

    scores, _ = tiny_scores
    cfg = _adapt_cfg()
    manifest = open_dataset(tiny_benchmark, "target").manifest
    none = pa.nulls(manifest.num_rows, pa.string())
    for column in ("label_path", "label_format"):
        manifest = manifest.set_column(manifest.schema.get_field_index(column), column, none)
    write_manifest(manifest, tmp_path / "unlabelled.parquet")
    plan = make_plan(cfg, str(tiny_source_ckpt), str(scores), str(tmp_path / "unlabelled.parquet"))
    assert plan.eval_rows == [] and len(plan.proxy_rows) == TINY.target_val  # the val images
    env = LocalEnv()
    result = run_adaptation(plan, cfg, env)
    assert [r["iteration"] for r in env.reports] == [2, 4]
    assert all(r["proxy"] > 0 and "val_miou" not in r for r in env.reports)

    labelled = make_plan(cfg, str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    size = (TINY.height, TINY.width)
    with_labels = evaluate_adapted(result["model"], labelled, "imagenet", size)
    without = evaluate_adapted(result["model"], plan, "imagenet", size)
    assert without["proxy"] == pytest.approx(with_labels["proxy"], rel=1e-5)

    train_only = manifest.filter(pc.equal(manifest["split"], "train"))
    write_manifest(train_only, tmp_path / "train_only.parquet")
    plan = make_plan(cfg, str(tiny_source_ckpt), str(scores), str(tmp_path / "train_only.parquet"))
    assert len(plan.proxy_rows) == TINY.target_train  # fewer than PROXY_IMAGES: all of them


def test_an_evaluation_with_nothing_readable_is_an_error(
    tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    """Not an empty report: a sweep ranks trials on what each evaluation reports."""
    from sfda_ray.adaptation import evaluate_adapted

    scores, _ = tiny_scores
    plan = make_plan(_adapt_cfg(), str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(b"not a PNG")
    plan.eval_rows = [{**row, "image_path": str(damaged)} for row in plan.eval_rows]
    model, _ = load_model(str(tiny_source_ckpt), num_classes=19)
    with pytest.raises(ValueError, match=r"none of the 8 target images evaluated could be read"):
        evaluate_adapted(model, plan, "imagenet", (TINY.height, TINY.width))


def test_ddp_workers_each_evaluate_a_share_and_report_the_whole(
    tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    """Two DDP workers (gloo, real processes) split the val images between them and both
    report what one process evaluating them all does with rank 0's model (rank 1's
    BatchNorm statistics differ, as after a DDP step); also when one worker has none."""
    import dataclasses

    from sfda_ray.adaptation import evaluate_adapted

    scores, _ = tiny_scores
    plan = make_plan(_adapt_cfg(), str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    plans = [plan, dataclasses.replace(plan, eval_rows=plan.eval_rows[:1])]
    plans.append(dataclasses.replace(plan, eval_rows=[], proxy_rows=plan.eval_rows))  # no labels
    size, checkpoint = (TINY.height, TINY.width), str(tiny_source_ckpt)
    ddp_workers.run_pair(ddp_workers.sharded_evaluation, checkpoint, plans, size, tmp_path)
    model, _ = load_model(checkpoint, num_classes=19)
    alone = [evaluate_adapted(model, p, "imagenet", size) for p in plans]
    assert alone[0]["val_miou"] != alone[1]["val_miou"]  # the plans differ
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    (found0, read0), (found1, read1) = results
    # Each image read once, by one worker or the other; rank 1 has none of the one-image
    # plan (read0: plans 0, 1, 2; read1: plans 0 and 2).
    assert len(read0) == 3 and len(read1) == 2
    for plan, share0, share1 in ((plans[0], read0[0], read1[0]), (plans[2], read0[2], read1[1])):
        rows = plan.eval_rows or plan.proxy_rows
        assert sorted(share0 + share1) == sorted(r["image_id"] for r in rows)
        assert share0 and share1 and abs(len(share0) - len(share1)) <= 1
    found_by_rank = (found0, found1)
    for rank in (0, 1):
        for found, expected in zip(found_by_rank[rank], alone, strict=True):
            assert found.keys() == expected.keys()
            for key in ("val_miou", "proxy", "proxy_entropy", "proxy_prior_kl"):
                if key in expected:
                    assert found[key] == pytest.approx(expected[key], rel=1e-5), key
            assert found.get("confusion_matrix") == expected.get("confusion_matrix")


def test_a_damaged_input_is_skipped_and_counted(
    tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    scores, _ = tiny_scores
    cfg = _adapt_cfg()
    plan = make_plan(cfg, str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(open(plan.virtual_rows[0]["pseudo_label_path"], "rb").read()[:40])
    good = plan.virtual_rows[:2]  # every other virtual-source map is damaged
    plan.virtual_rows = good + [
        {**row, "pseudo_label_path": str(damaged)} for row in plan.virtual_rows[2:]
    ]
    env = LocalEnv()
    run_adaptation(plan, cfg, env)
    assert [r["iteration"] for r in env.reports] == [2, 4]  # the run goes on without them
    assert env.reports[-1]["skipped_inputs"] >= 1
    assert env.reports[-1]["skipped_inputs"] >= env.reports[0]["skipped_inputs"]
    # Nothing usable at all is an error that says so, not an endless search for a batch.
    plan.virtual_rows = [{**row, "pseudo_label_path": str(damaged)} for row in plan.virtual_rows]
    with pytest.raises(ValueError, match=r"no usable item in a whole pass .*\d+ skipped"):
        run_adaptation(plan, cfg, LocalEnv())


def test_a_diverged_run_stops_before_checkpointing_its_weights(
    tiny_benchmark, tiny_source_ckpt, tiny_scores, monkeypatch
):
    """A non-finite loss (too high a learning rate, say) ends the run with the reason, so a
    sweep shows the trial as failed instead of ranking it; its last checkpoint is sound."""
    scores, _ = tiny_scores
    cfg = _adapt_cfg()
    plan = make_plan(cfg, str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    step, calls = Adapter.step, []

    def blows_up_at_third(self, *batches):
        logs = step(self, *batches)
        calls.append(1)
        return {**logs, "loss_total": math.nan} if len(calls) == 3 else logs

    monkeypatch.setattr(Adapter, "step", blows_up_at_third)
    env = LocalEnv()
    with pytest.raises(ValueError, match="diverged at iteration 3: loss_total not finite"):
        run_adaptation(plan, cfg, env)
    assert [r["iteration"] for r in env.reports] == [2]

    # A finite loss whose step left a weight at inf: the checkpoint is not written.
    calls.clear()

    def breaks_a_weight(self, *batches):
        logs = step(self, *batches)
        calls.append(1)
        if len(calls) == 2:
            with torch.no_grad():
                next(unwrap(self.student).parameters()).view(-1)[0] = math.inf
        return logs

    monkeypatch.setattr(Adapter, "step", breaks_a_weight)
    env = LocalEnv()
    with pytest.raises(ValueError, match="diverged by iteration 2: the weights are not finite"):
        run_adaptation(plan, cfg, env)
    assert env.reports == []
    # Every worker checks (its weights are rank 0's): none goes on into the next collective.
    calls.clear()
    env = LocalEnv()
    env.rank = 1
    with pytest.raises(ValueError, match="diverged by iteration 2: the weights are not finite"):
        run_adaptation(plan, cfg, env)
    assert env.reports == []


def test_the_adabn_baseline_reestimates_whatever_adabn_init_says(
    tiny_benchmark, tiny_source_ckpt, tiny_scores
):
    scores, _ = tiny_scores
    cfg = _adapt_cfg(**{"adapt.method": "adabn", "adapt.adabn_init": False})
    plan = make_plan(cfg, str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    plan.checkpoint, plan.bn_adapted = str(tiny_source_ckpt), False  # scored without AdaBN
    adapted = run_adaptation(plan, cfg, LocalEnv())["model"]
    source, _ = load_model(str(tiny_source_ckpt), num_classes=19)
    pairs = [
        (a.running_mean, s.running_mean)
        for a, s in zip(adapted.modules(), source.modules(), strict=True)
        if isinstance(a, torch.nn.BatchNorm2d)
    ]
    assert pairs and not any(torch.equal(a, s) for a, s in pairs)


def test_self_training_runs_every_round_asked_for(
    tiny_benchmark, tiny_source_ckpt, tiny_scores, monkeypatch
):
    scores, _ = tiny_scores
    cfg = _adapt_cfg(**{"adapt.st_rounds": 3})  # over 4 iterations
    plan = make_plan(cfg, str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    begin, rounds = Adapter.begin_round, []

    def recorded(self, index, images):
        rounds.append(index)
        return begin(self, index, images)

    monkeypatch.setattr(Adapter, "begin_round", recorded)
    env = LocalEnv()
    run_adaptation(plan, cfg, env)
    assert rounds == [0, 1, 2]
    assert [r["round"] for r in env.reports] == [0, 2]  # iterations 1-2, 3 and 4


def test_skipped_inputs_count_training_alone(
    tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    """A damaged target image met by the AdaBN start or a round's threshold pass is not
    counted again: the count is the same with and without those passes."""
    scores, _ = tiny_scores
    damaged = tmp_path / "damaged.png"
    damaged.write_bytes(b"not a PNG")
    counts = []
    for adabn in (True, False):
        cfg = _adapt_cfg(**{"adapt.adabn_init": adabn})
        plan = make_plan(cfg, str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
        plan.bn_adapted = False
        plan.target_rows = [
            {**row, "image_path": str(damaged)} if k % 4 == 0 else row
            for k, row in enumerate(plan.target_rows)
        ]
        env = LocalEnv()
        run_adaptation(plan, cfg, env)
        counts.append(env.reports[-1]["skipped_inputs"])
    assert counts[0] == counts[1] > 0


def test_a_selection_without_virtual_source_or_target_is_refused(
    tiny_benchmark, tiny_source_ckpt, tiny_scores
):
    scores, _ = tiny_scores
    args = (str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    with pytest.raises(ValueError, match=r"select.ratio 1.0 puts 24 of 24 .* and 0 in the target"):
        make_plan(_adapt_cfg(**{"select.ratio": 1.0}), *args)
    empty_v = _adapt_cfg(**{"select.ratio": None, "select.score_threshold": 1.0})
    with pytest.raises(ValueError, match=r"select.score_threshold 1.0 puts 0 of 24 scored"):
        make_plan(empty_v, *args)


def test_scores_of_the_split_it_is_evaluated_on_are_refused(
    tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    """Trained on the val images it is measured on, a run's mIoU would mean nothing."""
    scores, _ = tiny_scores
    on_val = tmp_path / "scores"
    shutil.copytree(scores, on_val)
    table = pq.read_table(on_val / "scores.parquet")
    column = pa.array(["val"] * table.num_rows)
    table = table.set_column(table.schema.get_field_index("split"), "split", column)
    pq.write_table(table, on_val / "scores.parquet")
    args = (str(tiny_source_ckpt), str(on_val), str(tiny_benchmark))
    with pytest.raises(ValueError, match="the target's val split was scored, and val is what"):
        make_plan(_adapt_cfg(), *args)


def test_scores_of_another_source_model_or_other_images_are_refused(
    tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path, caplog
):
    """`adapt --checkpoint B --scores S` with S scored by A would train on A's labels."""
    from data_fixtures import cityscapes_yaml

    from sfda_ray.models.checkpoint import file_fingerprint, load_checkpoint, save_checkpoint

    scores, _ = tiny_scores
    model, meta = load_model(str(tiny_source_ckpt), num_classes=19)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    other = tmp_path / "other_source.pt"
    save_checkpoint(other, model, meta)
    with pytest.raises(ValueError, match=r"scored with another source model \(fingerprint "):
        make_plan(_adapt_cfg(), str(other), str(scores), str(tiny_benchmark))
    cityscapes_yaml(tmp_path)
    with pytest.raises(ValueError, match=r"24 of the 24 images .* are not images of .*cs.yaml"):
        make_plan(_adapt_cfg(), str(tiny_source_ckpt), str(scores), str(tmp_path / "cs.yaml"))
    # The kept AdaBN model names the source it came from.
    assert load_checkpoint(scores / "source_adabn.pt")["meta"]["adabn_of"]
    # Scored without AdaBN, the scoring model is the source model.
    plain = tmp_path / "plain_scores"
    shutil.copytree(scores, plain)
    (plain / "source_adabn.pt").unlink()
    summary = json.loads((plain / "summary.json").read_text())
    summary["checkpoint"] = summary["source_checkpoint"]
    summary["checkpoint_fingerprint"] = file_fingerprint(other)
    (plain / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match=r"plain_scores was scored with another source model"):
        make_plan(_adapt_cfg(), str(tiny_source_ckpt), str(plain), str(tiny_benchmark))
    summary["checkpoint_fingerprint"] = file_fingerprint(tiny_source_ckpt)
    (plain / "summary.json").write_text(json.dumps(summary))
    plan = make_plan(_adapt_cfg(), str(tiny_source_ckpt), str(plain), str(tiny_benchmark))
    assert plan.checkpoint == str(tiny_source_ckpt) and not plan.bn_adapted
    # Scored with AdaBN whose model is gone: the unchecked start is said, not silent.
    gone = tmp_path / "adabn_gone"
    shutil.copytree(scores, gone)
    (gone / "source_adabn.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="sfda_ray.adaptation"):
        plan = make_plan(_adapt_cfg(), str(tiny_source_ckpt), str(gone), str(tiny_benchmark))
    assert not plan.bn_adapted and "no longer holds" in caplog.text


def test_eval_classes_the_data_is_not_scored_over_are_refused(
    tiny_benchmark, tiny_source_ckpt, tiny_scores
):
    scores, _ = tiny_scores
    cfg = _adapt_cfg(**{"data.eval_classes": ["cityscapes19"]})
    with pytest.raises(
        ValueError, match=r"\['cityscapes19'\] in the config, but .* \['synthetic'\]"
    ):
        make_plan(cfg, str(tiny_source_ckpt), str(scores), str(tiny_benchmark))


def test_virtual_source_maps_of_another_size_or_class_range(tmp_path, caplog):
    """A map scored at another (native) size is resized with its image; one holding a class
    outside the label space is skipped and logged, not fatal."""
    import numpy as np
    from data_fixtures import random_rgb, write_png

    from sfda_ray.data.adaptation import AdaptationDataset

    image = write_png(tmp_path / "img.png", random_rgb(0, 16, 32))
    big = write_png(tmp_path / "big.png", np.full((16, 32), 3, np.uint8))
    conf = write_png(tmp_path / "conf.png", np.full((16, 32), 250, np.uint8))
    bad = write_png(tmp_path / "bad.png", np.full((8, 16), 25, np.uint8))
    rows = [
        {"image_path": str(image), "pseudo_label_path": str(p), "confidence_path": str(conf)}
        for p in (big, bad)
    ]
    dataset = AdaptationDataset(rows, (8, 16), np.full(C, 0.9), (1.0, 1.0), hflip=False)
    item = dataset[0]
    assert item["label"].shape == (8, 16) and set(item["label"].unique().tolist()) == {3}
    assert dataset[1].reason == "pseudo-label 25 outside the 19 classes"
    assert "pseudo-label 25 outside the 19 classes" in caplog.text


def test_a_crops_padding_is_marked_and_never_trained_on(tmp_path):
    """A target image scaled below the crop size is padded: the padding is marked, and
    neither pseudo-labels nor the prior and entropy terms take it for image."""
    from data_fixtures import random_rgb, write_png

    from sfda_ray.data.adaptation import AdaptationDataset
    from sfda_ray.method.losses import entropy_loss, prior_kl

    image = write_png(tmp_path / "img.png", random_rgb(0, 16, 32))
    row = {"image_path": str(image)}
    item = AdaptationDataset([row], (16, 32), None, (0.5, 0.5), hflip=False)[0]
    assert item["valid"].sum() == 8 * 16  # the half-size image; the rest is padding
    assert item["image"][:, ~item["valid"]].eq(0).all()

    # Losses over the marked pixels only: padding predicted as class 0, image as class 1.
    logits = torch.zeros(1, C, 4, 4)
    logits[0, 1, :, :2] = 20.0
    logits[0, :, :, 2:] = torch.randn(C, 4, 2)
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[..., :2] = True
    assert entropy_loss(logits, valid) < 1e-6 < entropy_loss(logits)
    prior = torch.zeros(C)
    prior[1] = 1.0
    assert prior_kl(logits, prior, valid) < 1e-6 < prior_kl(logits, prior)

    # A step whose target batch is all padding takes no pseudo-label from it.
    torch.manual_seed(0)
    model = build_model("deeplabv2_resnet18", C, output_stride=16)
    adapter = Adapter(model, AdaptConfig(), "imagenet", torch.full((C,), 1 / C), None, CPU)
    images = torch.rand(2, 3, 32, 64)
    adapter.begin_round(0, [images])
    batch_v = {**_virtual_batch(), "valid": torch.ones(2, 32, 64, dtype=torch.bool)}
    padding = {"image": images, "valid": torch.zeros(2, 32, 64, dtype=torch.bool)}
    logs = adapter.step(batch_v, padding)
    assert logs["st_kept_fraction"] == 0.0 and logs["loss_st"] == 0.0
    assert all(math.isfinite(v) for v in logs.values())
    assert adapter.step(batch_v, {"image": images})["st_kept_fraction"] > 0


def test_maps_too_small_for_the_discriminator_are_refused(
    tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    scores, _ = tiny_scores
    small = tmp_path / "scores"
    small.mkdir()
    shutil.copy(scores / "summary.json", small / "summary.json")
    shutil.copy(scores / "scores.parquet", small / "scores.parquet")
    rows = pq.read_table(scores / "scores.parquet").to_pylist()
    tiny_map = np.zeros((16, 32), np.uint8)  # scored at 16x32
    damaged_bytes = b"\x89PNG\r\n\x1a\n damaged"

    def write_label_maps(damaged_ids=()):
        """Each row's pseudo-label map where the table's readers look for it."""
        for row in rows:
            path = small / "maps" / map_name(row["image_id"], row["fingerprint"], "label")
            path.parent.mkdir(parents=True, exist_ok=True)
            if row["image_id"] in damaged_ids:
                path.write_bytes(damaged_bytes)
            else:
                Image.fromarray(tiny_map).save(path)

    write_label_maps()
    args = (str(tiny_source_ckpt), str(small), str(tiny_benchmark))
    with pytest.raises(ValueError, match=r"scored at 16x32 pixels.*at least 32 pixels a side"):
        make_plan(_adapt_cfg(), *args)
    # Without the adversarial term nothing needs that size.
    assert make_plan(_adapt_cfg(**{"adapt.lambda_adv": 0.0}), *args).map_size == (16, 32)

    # The size comes from the first map that reads: a damaged first one is passed over.
    first = make_plan(_adapt_cfg(**{"adapt.lambda_adv": 0.0}), *args).virtual_rows[0]
    write_label_maps({first["image_id"]})
    plan = make_plan(_adapt_cfg(**{"adapt.lambda_adv": 0.0}), *args)
    assert plan.virtual_rows[0]["image_id"] == first["image_id"]
    assert plan.map_size == (16, 32)
    write_label_maps({row["image_id"] for row in rows})
    with pytest.raises(ValueError, match=r"none of the first virtual-source maps .* reads"):
        make_plan(_adapt_cfg(**{"adapt.lambda_adv": 0.0}), *args)
    write_label_maps()

    # A sweep whose every trial would train the discriminator (the shipped space samples
    # lambda_adv > 0) is refused once, before any trial or MLflow run.
    from sfda_ray.dist.tune import run_sweep

    space = load_search_space(DEFAULT_SPACE, load_config())
    out = tmp_path / "sweep_out"
    with pytest.raises(ValueError, match=r"scored at 16x32 pixels.*search space"):
        run_sweep(_adapt_cfg(), *args, str(out), space, "e", f"sqlite:///{tmp_path}/m.db")
    assert not out.exists()


def test_a_runs_identity_is_its_settings_not_how_its_paths_are_spelled(
    tiny_benchmark, tiny_source_ckpt, tiny_scores
):
    """What decides whether a rerun may resume a run directory (OUT/adapt.json)."""
    from sfda_ray.dist.train import run_identity

    scores, _ = tiny_scores
    cfg = _adapt_cfg()
    plan = make_plan(cfg, str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    respelled = f"{tiny_source_ckpt.parent}/./{tiny_source_ckpt.name}"
    same = make_plan(cfg, respelled, f"{scores}/", str(tiny_benchmark))
    assert run_identity(cfg, same, 1) == run_identity(cfg, plan, 1)
    cadence = apply_overrides(cfg, {"adapt.eval_every": 1, "adapt.log_every": 2})
    assert run_identity(cadence, plan, 1) == run_identity(cfg, plan, 1)
    other_lr = apply_overrides(cfg, {"adapt.lr": 0.01})
    assert run_identity(other_lr, plan, 1)["adapt.lr"] != run_identity(cfg, plan, 1)["adapt.lr"]
    fewer = make_plan(
        apply_overrides(cfg, {"select.ratio": 0.25}),
        *map(str, (tiny_source_ckpt, scores, tiny_benchmark)),
    )
    assert run_identity(cfg, fewer, 1)["plan"] != run_identity(cfg, plan, 1)["plan"]
    # Another worker count is another global batch, and other streams to read on from.
    assert changed_settings(run_identity(cfg, plan, 1), run_identity(cfg, plan, 2)) == ["workers"]


def test_evaluating_mid_run_leaves_training_unchanged(
    tiny_benchmark, tiny_source_ckpt, tiny_scores
):
    """Evaluation draws no random numbers that training's augmentations would see."""
    scores, _ = tiny_scores
    plan = make_plan(_adapt_cfg(), str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    weights = []
    for every in (1, 4):
        cfg = _adapt_cfg(**{"adapt.eval_every": every})
        weights.append(run_adaptation(plan, cfg, LocalEnv())["model"].state_dict())
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())


@pytest.mark.slow
def test_adapt_needs_no_source_data(ray_session, tmp_path):
    """Generate, train the source model, then delete every source image and label: the
    rest of the pipeline (score, adapt, evaluate) runs on target data alone, from a
    scores directory moved after scoring."""
    bench = tmp_path / "bench"
    generate(bench, TINY)
    ckpt = tmp_path / "source.pt"
    train_source(tiny_config(), str(bench), str(ckpt))
    shutil.rmtree(bench / "source")
    assert not list(tmp_path.rglob("*game*"))  # no source file left anywhere under tmp
    scores = tmp_path / "scores"
    score_dataset(str(ckpt), str(bench), str(scores), ScoringOptions(batch_size=8, actors=1))
    # A scores directory moved after scoring (synced to a bucket, say) reads where it is.
    moved = shutil.move(scores, tmp_path / "moved")
    # The plain loop (its Ray Train run is tested in test_faults.py).
    plan = make_plan(_adapt_cfg(), str(ckpt), str(moved), str(bench))
    assert all(r["pseudo_label_path"].startswith(str(moved)) for r in plan.virtual_rows)
    metrics = run_adaptation(plan, _adapt_cfg(), LocalEnv())["metrics"]
    assert metrics["iteration"] == 4 and np.isfinite(metrics["val_miou"])


@pytest.mark.slow
def test_one_ray_train_worker_retraces_the_plain_loop(
    ray_session, tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path, monkeypatch
):
    """The Ray layer adds no computation: one Ray Train worker with the same config and
    seeds ends with the plain loop's weights, bit for bit, and reports its losses. Its
    paths are given relative to the working directory, which the worker does not share."""
    import os

    from sfda_ray.dist.train import run_adapt

    scores, _ = tiny_scores
    cfg = _adapt_cfg()
    args = (str(tiny_source_ckpt), str(scores), str(tiny_benchmark))
    env = LocalEnv()
    plain = run_adaptation(make_plan(cfg, *args), cfg, env)["model"].state_dict()
    monkeypatch.chdir(tmp_path)
    relative = [os.path.relpath(p) for p in args]
    metrics = run_adapt(cfg, *relative, "run", workers=1)
    on_ray = load_model(str(tmp_path / "run" / "final.pt"))[0].state_dict()
    source = load_model(str(tiny_source_ckpt))[0].state_dict()
    assert any(not torch.equal(plain[k], source[k]) for k in plain)  # it did train
    assert plain.keys() == on_ray.keys()
    assert [k for k in plain if not torch.equal(plain[k], on_ray[k])] == []
    assert metrics["iteration"] == env.reports[-1]["iteration"] == 4
    for key in ("loss_total", "loss_v", "loss_st"):
        assert metrics[key] == env.reports[-1][key], key
