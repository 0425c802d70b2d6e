"""experiments/bench_gpu.py on the CPU at a tiny size, as the GPU machine would run it."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sfda_ray.models import build_model

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_gpu.py"
# Missing on the GPU machine; the core path must not need them (nor this package installed).
BLOCKED = ("sfda_ray", "pyarrow", "cv2", "mlflow", "cityscapesscripts", "ray")
ARGS = ["--device", "cpu", "--model", "deeplabv2_resnet18", "--size", "32", "64"]
ARGS += ["--score-batch", "2", "--train-batch", "2", "--iters", "2", "--warmup", "1"]
ARGS += ["--matmul-size", "128"]


@pytest.fixture(scope="module")
def blocked(tmp_path_factory):
    """subprocess.run keywords for a Python in which BLOCKED fail to import."""
    stubs = tmp_path_factory.mktemp("blocked")
    for name in BLOCKED:
        (stubs / f"{name}.py").write_text(f"raise ImportError('{name} blocked by the test')\n")
    env = dict(os.environ, PYTHONPATH=str(stubs))
    # One intra-op thread: on a busy 2-core machine more threads spin against each other
    # and a run takes many times longer.
    env["OMP_NUM_THREADS"] = "1"
    # Not the repo root as working directory: `python -c` would find sfda_ray/ there.
    return {"env": env, "cwd": stubs, "capture_output": True, "text": True}


@pytest.fixture(scope="module")
def run(blocked, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_gpu") / "gpu_cpu.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *ARGS, "--json", str(out)], timeout=120, **blocked
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(out.read_text()), proc.stdout


def test_blocked_modules_really_fail_to_import(blocked):
    probe = (
        "import importlib, sys\n"
        f"for name in {BLOCKED!r}:\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError:\n"
        "        continue\n"
        "    sys.exit(f'{name} imported')\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], **blocked)
    assert proc.returncode == 0, proc.stderr


def test_json_has_the_numbers_and_settings(run):
    result, _ = run
    assert result["device"] == "cpu"
    assert result["ray"] is None  # no Ray installed there: the core alone
    numbers = [
        result["scoring"]["fp32_images_per_s"],
        result["scoring"]["bf16_images_per_s"],
        result["train"]["fp32_iters_per_s"],
        result["train"]["bf16_iters_per_s"],
        result["bf16_matmul_tflops"],
        result["model_gflops_per_image"],
        result["scoring_bf16_fraction_of_matmul"],
    ]
    assert all(math.isfinite(x) and x > 0 for x in numbers), numbers
    settings = result["settings"]
    assert settings["model"] == "deeplabv2_resnet18"
    assert (settings["height"], settings["width"]) == (32, 64)
    assert (settings["score_batch"], settings["train_batch"]) == (2, 2)
    assert (settings["iters"], settings["warmup"]) == (2, 1)
    assert settings["channels_last"] is False and settings["compile"] is False
    assert settings["cudnn_benchmark"] is False  # as the project runs
    assert settings["torch"] == torch.__version__
    assert settings["date"].startswith("20") and "bench_gpu.py" in settings["command"]


def test_fraction_and_speedups_follow_from_the_rates(run):
    result, _ = run
    scoring, train = result["scoring"], result["train"]
    fraction = (
        scoring["bf16_images_per_s"]
        * result["model_gflops_per_image"]
        / (result["bf16_matmul_tflops"] * 1000)
    )
    assert result["scoring_bf16_fraction_of_matmul"] == pytest.approx(fraction, rel=1e-9)
    ratio = scoring["bf16_images_per_s"] / scoring["fp32_images_per_s"]
    assert scoring["bf16_speedup"] == pytest.approx(ratio, rel=1e-9)
    ratio = train["bf16_iters_per_s"] / train["fp32_iters_per_s"]
    assert train["bf16_speedup"] == pytest.approx(ratio, rel=1e-9)


def test_gflops_are_one_image_of_the_package_model(run):
    # Counted at batch 1 (not the score batch) on the very model sfda_ray.models builds.
    model = build_model("deeplabv2_resnet18", 19).eval()
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(torch.zeros(1, 3, 32, 64))
    expected = counter.get_total_flops() / 1e9
    assert run[0]["model_gflops_per_image"] == pytest.approx(expected, rel=1e-9)


def test_prints_a_table(run):
    _, stdout = run
    for row in ("core scoring img/s", "core train it/s", "GFLOPs/image", "TFLOPS"):
        assert row in stdout, stdout
    assert "ray scoring" not in stdout and "ray is not installed" in stdout


def _bench_module(script: Path = SCRIPT):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"{script.stem}_under_test", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_method_step_benchmark_times_both_steps(tmp_path):
    """experiments/bench_method_step.py at a toy size on the CPU: the method's step with
    and without ClassMix, each with its losses, in the JSON it writes."""
    bench = _bench_module(SCRIPT.with_name("bench_method_step.py"))
    out = tmp_path / "step.json"
    bench.main(["--device", "cpu", "--size", "32", "32", "--iters", "1", "--warmup", "0"]
               + ["--json", str(out)])  # fmt: skip
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["settings"]["precision"] == "fp32"
    plain, mixed = result["steps"]["plain"], result["steps"]["class_mix"]
    for step in (plain, mixed):
        assert step["ms_per_step"] > 0
        assert step["steps_per_s"] == pytest.approx(1000 / step["ms_per_step"])
    assert {"loss_v", "loss_adv", "loss_st", "loss_d"} <= set(plain["losses"])
    assert "loss_mix" in mixed["losses"] and "loss_mix" not in plain["losses"]


def test_rates_are_timed_for_at_least_min_seconds():
    import time

    bench = _bench_module()
    steps = []
    rate = bench.steps_per_s(lambda: steps.append(time.sleep(0.01)), lambda: None, 1, 2, 0.1)
    assert len(steps) >= 1 + 10  # the warm-up step, then 0.1 s of 10 ms steps
    assert 50 < rate <= 100


def test_the_ray_layer_carries_each_batch_through_an_actor(ray_session):
    bench = _bench_module()
    args = bench.parse_args([*ARGS, "--iters", "1", "--warmup", "1"])
    _, core = bench.measure_core(args)
    result = bench.measure_ray(args, core)  # in the session's Ray, which it leaves running
    for section, unit in (("scoring", "images_per_s"), ("train", "iters_per_s")):
        assert all(result[section][f"{p}_{unit}"] > 0 for p in ("fp32", "bf16"))
    assert set(result["overhead"]) == {
        f"{s}_{p}" for s in ("scoring", "train") for p in ("fp32", "bf16")
    }
    import ray

    assert ray.is_initialized()


def test_a_failed_ray_measurement_still_kills_its_actor(ray_session, monkeypatch):
    import ray

    bench = _bench_module()
    args = bench.parse_args([*ARGS, "--iters", "1", "--warmup", "1"])
    killed = []
    real_kill = ray.kill
    monkeypatch.setattr(ray, "kill", lambda actor: (killed.append(actor), real_kill(actor)))

    def broken(call, sync, args):
        sync()  # the actor is up and answering
        raise RuntimeError("out of memory")

    monkeypatch.setattr(bench, "measure", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        bench.measure_ray(args, core={})
    assert len(killed) == 1
    # ray.kill is asynchronous: a call made at once may still reach the actor.
    deadline = time.time() + 60
    while True:
        try:
            ray.get(killed[0].sync.remote(), timeout=60)
        except ray.exceptions.RayActorError:
            break
        assert time.time() < deadline, "the benchmark's actor lives on"
        time.sleep(0.5)
    assert ray.is_initialized()  # a joined Ray is left running
