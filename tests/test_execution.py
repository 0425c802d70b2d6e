"""The GPU performance switches (perf section), exercised on the CPU where they must be safe."""

import copy
import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from sfda_ray.config import AdaptConfig, ConfigError, PerfConfig, load_config
from sfda_ray.data.decode import decode_batch
from sfda_ray.dist.scoring import Scorer
from sfda_ray.method.adapt import Adapter
from sfda_ray.method.scoring import score_images
from sfda_ray.models import build_model
from sfda_ray.models.checkpoint import save_checkpoint
from sfda_ray.models.execution import Execution, resolve_device

C = 19


def test_auto_is_fp32_nchw_on_cpu_and_bf16_channels_last_on_gpu(monkeypatch):
    capability = (9, 0)  # an H100's
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cpu = Execution.resolve(PerfConfig(), "cpu")
    assert (cpu.precision, cpu.channels_last, cpu.pin_memory, cpu.loader_workers) == (
        "fp32",
        False,
        False,
        0,
    )
    gpu = Execution.resolve(PerfConfig(), "cuda:0")
    assert (gpu.precision, gpu.channels_last, gpu.pin_memory, gpu.loader_workers) == (
        "bf16",
        True,
        True,
        4,
    )
    forced = Execution.resolve(PerfConfig(precision="fp32", channels_last=False), "cuda")
    assert (forced.precision, forced.channels_last) == ("fp32", False)
    # Before Ampere bf16 is emulated, slower than fp32: auto keeps fp32 there.
    capability = (7, 5)  # a T4's
    assert Execution.resolve(PerfConfig(), "cuda").precision == "fp32"
    assert Execution.resolve(PerfConfig(precision="bf16"), "cuda").precision == "bf16"
    assert Execution.resolve(PerfConfig(compile=True), "cpu").compile_backend == "inductor"


def test_a_gpu_index_past_the_visible_gpus_is_named(monkeypatch):
    # Two GPUs as torch would see them (this machine has none to count).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(
        ValueError, match=r"device 'cuda:2': 2 CUDA GPU\(s\) visible here, cuda:0 to cuda:1"
    ):
        resolve_device("cuda:2")


def test_perf_section_is_validated():
    cfg = load_config(None, {"perf.precision": "bf16", "perf.channels_last": True})
    assert cfg.perf.precision == "bf16"
    with pytest.raises(ConfigError, match=r"perf\.precision.*fp16"):
        load_config(None, {"perf.precision": "fp16"})
    with pytest.raises(ConfigError, match=r"perf\.loader_workers"):
        load_config(None, {"perf.loader_workers": -1})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("deeplabv2_resnet18", C, output_stride=16).eval()


def test_channels_last_and_bf16_scores_agree_with_fp32(model):
    x = torch.randn(2, 3, 48, 96)
    ref = score_images(model, x)
    nhwc = Execution.resolve(PerfConfig(channels_last=True), "cpu")
    last = score_images(nhwc.prepare(copy.deepcopy(model)), x)
    assert (last.label == ref.label).float().mean() > 0.999
    assert torch.allclose(last.score, ref.score, atol=1e-4)
    bf16 = Execution.resolve(PerfConfig(precision="bf16"), "cpu")
    with bf16.autocast():
        low = score_images(model, x)
    assert low.score.dtype == torch.float32
    assert torch.allclose(low.score, ref.score, atol=0.03)
    assert (low.label == ref.label).float().mean() > 0.8


def _batches(seed: int):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(2, 3, 32, 64, generator=g)
    batch_v = {
        "image": torch.rand(2, 3, 32, 64, generator=g),
        "label": torch.randint(0, C, (2, 32, 64), generator=g),
        "weight": torch.rand(2, 32, 64, generator=g),
    }
    return images, batch_v


def _two_steps(model, perf: PerfConfig) -> tuple[list[dict], Adapter]:
    torch.manual_seed(0)
    exe = Execution.resolve(perf, "cpu")
    adapter = Adapter(
        exe.prepare(copy.deepcopy(model)),
        AdaptConfig(strong_aug=True),
        "imagenet",
        torch.full((C,), 1 / C),
        torch.ones(C),
        exe,
    )
    images, batch_v = _batches(0)
    adapter.begin_round(0, [images])
    logs = [adapter.step(batch_v, {"image": images}) for _ in range(2)]
    return logs, adapter


def test_bf16_channels_last_adaptation_steps_train_both_nets(model):
    logs, adapter = _two_steps(model, PerfConfig(precision="bf16", channels_last=True))
    for key in ("loss_v", "loss_st", "loss_prior", "loss_adv", "loss_d", "loss_total"):
        assert all(math.isfinite(step[key]) for step in logs), key
    student = adapter.student.layer1[0].conv1.weight
    assert student.dtype == torch.float32  # autocast: the master weights stay fp32
    assert student.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(student, model.layer1[0].conv1.weight)
    assert all(p.grad is not None for p in adapter.disc.parameters())


def test_compiled_student_matches_eager(model):
    # The "eager" backend runs TorchDynamo's graph capture without code generation: it
    # checks that the model and the step compile, in seconds rather than minutes on 2 cores.
    eager, _ = _two_steps(model, PerfConfig())
    compiled, adapter = _two_steps(model, PerfConfig(compile=True, compile_backend="eager"))
    assert adapter.forward is not adapter.student
    for a, b in zip(eager, compiled, strict=True):
        assert a["loss_total"] == pytest.approx(b["loss_total"], rel=1e-4)
    # The state dict keeps the plain module's keys (checkpoints stay loadable).
    assert "layer1.0.conv1.weight" in adapter.state_dict()["student"]


def test_scoring_actor_in_bf16_writes_the_same_rows(ray_session, model, tmp_path, tiny_benchmark):
    ckpt = tmp_path / "model.pt"
    save_checkpoint(str(ckpt), model, {"normalization": "imagenet"})
    images = sorted((tiny_benchmark / "target").rglob("*leftImg8bit.png"))[:3]
    batch = {
        "image_id": np.array([p.stem for p in images], dtype=object),
        "image_path": np.array([str(p) for p in images], dtype=object),
        "label_path": np.array([None] * 3, dtype=object),
        "label_format": np.array([None] * 3, dtype=object),
        "fingerprint": np.array(["f"] * 3, dtype=object),
    }
    decoded = decode_batch(batch, None)
    threads = torch.get_num_threads()  # a Scorer sets the process's torch threads
    fp32 = Scorer(str(ckpt), 0, threads)(decoded).to_pylist()
    perf = PerfConfig(precision="bf16", channels_last=True)
    bf16 = Scorer(str(ckpt), 0, threads, perf)(decoded)
    assert bf16.num_rows == 3
    for a, b in zip(fp32, bf16.to_pylist(), strict=True):
        assert a["error"] is None and b["error"] is None
        assert b["score"] == pytest.approx(a["score"], abs=0.03)
        assert b["label_png"][:8] == b"\x89PNG\r\n\x1a\n"


def test_a_cpu_scorer_stays_on_the_cpu_of_a_gpu_node(model, tmp_path, monkeypatch):
    """Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone in an actor that holds no GPU: a scorer
    told "cpu" must not take the node's GPU, as "auto" would."""
    ckpt = tmp_path / "model.pt"
    save_checkpoint(str(ckpt), model, {"normalization": "imagenet"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU node
    assert resolve_device("auto").type == "cuda"
    scorer = Scorer(str(ckpt), 0, torch.get_num_threads(), device="cpu")
    assert scorer.exe.device == torch.device("cpu") and scorer.exe.autocast_dtype is None
    assert next(scorer.model.parameters()).device.type == "cpu"


def test_a_scorers_threads_keep_each_images_row(model, tmp_path, tiny_benchmark):
    """Each image's maps are encoded in a thread pool: every map still lands on its image."""
    from sfda_ray.data.catalog import open_dataset

    ckpt = tmp_path / "model.pt"
    save_checkpoint(str(ckpt), model, {"normalization": "imagenet"})
    table = open_dataset(tiny_benchmark).split("val").slice(0, 6)
    columns = ("image_id", "image_path", "label_path", "label_format")
    batch = {c: np.array(table[c].to_pylist(), dtype=object) for c in columns}
    batch["fingerprint"] = np.array(["f"] * 6, dtype=object)
    decoded = decode_batch(batch, None)
    scorer = Scorer(str(ckpt), 0, torch.get_num_threads())
    with ThreadPoolExecutor(4) as scorer.encoders:
        pooled = scorer(decoded).to_pylist()
    with ThreadPoolExecutor(1) as scorer.encoders:  # the same model, one map at a time
        serial = scorer(decoded).to_pylist()
    assert [r["image_id"] for r in pooled] == list(batch["image_id"])
    assert len({r["label_png"] for r in pooled}) == 6  # six different maps ...
    for a, b in zip(serial, pooled, strict=True):  # ... each on its own image
        assert (a["label_png"], a["conf_png"], a["eval_miou"]) == (
            b["label_png"],
            b["conf_png"],
            b["eval_miou"],
        )
        assert b["eval_miou"] is not None  # the labels were read and scored against
