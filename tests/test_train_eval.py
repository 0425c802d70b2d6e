import json
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_config
from data_fixtures import CITYSCAPES_TO_TRAIN

from sfda_ray.cli import main
from sfda_ray.data.catalog import open_dataset
from sfda_ray.data.loaders import image_loader, images_of
from sfda_ray.data.synthetic import BenchmarkSpec, generate
from sfda_ray.evaluate import evaluate_model
from sfda_ray.method.baselines import adapt_batchnorm
from sfda_ray.models import build_model
from sfda_ray.models.checkpoint import load_checkpoint, load_model, save_checkpoint
from sfda_ray.train_source import train_source


def test_train_source_then_eval_json(tiny_benchmark, tmp_path, capsys):
    ckpt = tmp_path / "src.pt"
    args = [
        "train-source",
        "--data",
        str(tiny_benchmark),
        "--out",
        str(ckpt),
        "--iterations",
        "4",
        "--batch-size",
        "2",
    ]
    assert main(args) == 0
    meta = load_checkpoint(str(ckpt))["meta"]
    assert meta["complete"] and meta["iteration"] == 4
    assert meta["arch"] == {
        "name": "deeplabv2_resnet18",
        "options": {"mc_dropout": 0.0, "output_stride": 16},
    }
    # The reloaded network is the trained one (stride 16: layer3 still downsamples).
    model, _ = load_model(str(ckpt))
    assert model.layer3[0].conv1.stride == (2, 2) and model.layer4[0].conv1.dilation == (2, 2)
    assert meta["data_fingerprint"] == open_dataset(tiny_benchmark, "source").fingerprint
    capsys.readouterr()
    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(ckpt),
                "--data",
                str(tiny_benchmark),
                "--domain",
                "source",
                "--json",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert 0.0 <= report["miou"] <= 100.0
    assert set(report["per_class"]) == {
        "road",
        "sidewalk",
        "building",
        "pole",
        "traffic sign",
        "vegetation",
        "sky",
        "person",
        "car",
    }
    assert report["images"] == 6 and report["skipped"] == 0
    assert len(report["confusion_matrix"]) == 19
    # Every labelled pixel of the split is counted once.
    assert sum(map(sum, report["confusion_matrix"])) == 6 * 48 * 96


def test_rerun_of_complete_checkpoint_is_a_no_op(tiny_benchmark, tiny_source_ckpt, tmp_path):
    before = tiny_source_ckpt.read_bytes()
    meta = train_source(tiny_config(), str(tiny_benchmark), str(tiny_source_ckpt))
    assert meta["complete"] and tiny_source_ckpt.read_bytes() == before
    with pytest.raises(ValueError, match=r"other settings \(source\.lr differ\)"):
        train_source(tiny_config(**{"source.lr": 0.5}), str(tiny_benchmark), str(tiny_source_ckpt))
    # The classes the target is evaluated on train nothing: the same model, handed back.
    subsets = tiny_config(**{"data.eval_classes": ["synthia13"]})
    assert train_source(subsets, str(tiny_benchmark), str(tiny_source_ckpt))["complete"]
    # A model trained elsewhere (imported) is not one to resume or hand back.
    imported = tmp_path / "imported.pt"
    model, meta = load_model(tiny_source_ckpt)
    del meta["train_config"]
    save_checkpoint(imported, model, meta)
    with pytest.raises(ValueError, match="is not a model trained by train-source"):
        train_source(tiny_config(), str(tiny_benchmark), str(imported))
    # The same settings on other data: not the model asked for, so refused, not handed back.
    other = tmp_path / "other"
    generate(
        other,
        BenchmarkSpec(
            seed=1, height=48, width=96, source_train=4, source_val=2, target_train=2, target_val=2
        ),
    )
    with pytest.raises(ValueError, match=f"trained on other data .* of {other}"):
        train_source(tiny_config(), str(other), str(tiny_source_ckpt))
    assert tiny_source_ckpt.read_bytes() == before
    raw = tmp_path / "raw.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, raw)
    with pytest.raises(ValueError, match="raw.pth exists and is not an sfda_ray checkpoint"):
        train_source(tiny_config(), str(tiny_benchmark), str(raw))


def test_train_source_runs_as_the_perf_section_says(tiny_benchmark, tmp_path, caplog, monkeypatch):
    """bf16 autocast (the GPU default) on the CPU: the loss stays fp32 and the weights
    train; a GPU asked for where there is none is refused, naming the device."""
    import sfda_ray.train_source as module

    caplog.set_level("INFO", logger="sfda_ray.train_source")
    out = tmp_path / "bf16.pt"
    cfg = tiny_config(
        **{"source.iterations": 2, "perf.precision": "bf16", "perf.loader_workers": 1}
    )
    dtypes, loaders = [], []

    def build_and_watch(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.register_forward_hook(lambda m, i, output: dtypes.append(output.dtype))
        return model

    real_loader = module.train_loader

    def loader_and_watch(*args, **kwargs):
        loaders.append(real_loader(*args, **kwargs))
        return loaders[-1]

    monkeypatch.setattr(module, "build_model", build_and_watch)
    monkeypatch.setattr(module, "train_loader", loader_and_watch)
    meta = train_source(cfg, str(tiny_benchmark), str(out), device="cpu")
    assert meta["complete"] and "training on cpu (bf16)" in caplog.text
    assert dtypes == [torch.bfloat16, torch.bfloat16]  # each step's forward ran in bf16
    assert [loader.num_workers for loader in loaders] == [1]  # perf.loader_workers
    trained, _ = load_model(str(out))
    torch.manual_seed(cfg.source.seed)
    start = build_model("deeplabv2_resnet18", 19, output_stride=16)
    assert not torch.equal(trained.layer4[0].conv1.weight, start.layer4[0].conv1.weight)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda': no CUDA GPU is visible"):
            train_source(cfg, str(tiny_benchmark), str(tmp_path / "gpu.pt"), device="cuda")


def test_killed_training_resumes_from_its_checkpoint(tiny_benchmark, tmp_path):
    ckpt = tmp_path / "src.pt"
    cmd = [
        sys.executable,
        "-m",
        "sfda_ray.cli",
        "train-source",
        "--data",
        str(tiny_benchmark),
        "--out",
        str(ckpt),
        "--iterations",
        "16",
        "--batch-size",
        "2",
        "--set",
        "source.checkpoint_every=4",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not ckpt.exists() and time.time() < deadline:
            time.sleep(0.05)
        proc.kill()
        proc.wait()
    finally:
        proc.kill()
    saved = load_checkpoint(str(ckpt))["meta"]
    assert not saved["complete"] and 4 <= saved["iteration"] < 16
    assert not list(tmp_path.glob("*.tmp-*"))  # the kill left no half-written file behind
    # The same command picks up where it stopped.
    resumed = subprocess.run(cmd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming {ckpt} from iteration {saved['iteration']}" in resumed.stderr
    final = load_checkpoint(str(ckpt))["meta"]
    assert final["iteration"] == 16
    # Time and skipped items count the whole run, the stretch before the kill included.
    assert final["train_seconds"] > saved["train_seconds"] > 0


def test_a_resumed_source_run_counts_its_whole_time_and_skipped_items(tiny_benchmark, tmp_path):
    import sfda_ray.train_source as module

    out = tmp_path / "src.pt"
    cfg = tiny_config(**{"source.iterations": 4})

    class Stopped(Exception):
        pass

    def save_then_stop(*args, **kwargs):  # the process dies right after its first checkpoint
        save_checkpoint(*args, **kwargs)
        raise Stopped

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "save_checkpoint", save_then_stop)
        with pytest.raises(Stopped):
            train_source(cfg, str(tiny_benchmark), str(out))
    # As if the first stretch had taken 1000 s and met 7 bad images.
    payload = torch.load(out, weights_only=True)
    assert payload["meta"]["iteration"] == 2 and not payload["meta"]["complete"]
    payload["meta"].update(train_seconds=1000.0, skipped_items=7, skipped_reasons={"empty file": 7})
    torch.save(payload, out)
    meta = train_source(cfg, str(tiny_benchmark), str(out))
    assert meta["complete"] and 1000.0 < meta["train_seconds"] < 1100.0
    assert meta["skipped_items"] == 7 and meta["skipped_reasons"] == {"empty file": 7}


def test_source_training_refuses_what_it_cannot_train_on(tiny_benchmark, tmp_path):
    """Unlabelled images, less than a batch, a diverging loss: each a one-line error, and
    no checkpoint of broken weights."""
    from data_fixtures import make_cityscapes

    from sfda_ray.data.readers import build_manifest

    names = ["a/a_0_19", "a/a_1_19", "a/a_2_19"]
    make_cityscapes(tmp_path / "cs", {"train": names}, unlabelled=tuple(names))
    build_manifest("cityscapes", tmp_path / "cs", tmp_path / "cs.parquet")
    data = str(tmp_path / "cs.parquet")
    with pytest.raises(ValueError, match="no train image has a label"):
        train_source(tiny_config(), data, str(tmp_path / "a.pt"))
    make_cityscapes(tmp_path / "cs2", {"train": names[:2]})
    build_manifest("cityscapes", tmp_path / "cs2", tmp_path / "cs2.parquet")
    data = str(tmp_path / "cs2.parquet")
    with pytest.raises(ValueError, match=r"2 usable train images, fewer than one batch \("):
        train_source(tiny_config(), data, str(tmp_path / "b.pt"))

    out = tmp_path / "diverged.pt"
    cfg = tiny_config(**{"source.lr": 1e12, "source.checkpoint_every": 1})
    with pytest.raises(ValueError, match=r"source training diverged (at|by) iteration") as err:
        train_source(cfg, str(tiny_benchmark), str(out))
    broken_at = int(re.search(r"iteration (\d+)", str(err.value))[1])
    assert broken_at > 1  # a few steps trained, checkpointed while still finite
    saved = load_checkpoint(out)
    assert saved["meta"]["iteration"] < broken_at and not saved["meta"]["complete"]
    weights = [v for v in saved["state_dict"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in weights)


def test_adabn_replaces_batchnorm_statistics(tiny_benchmark, tiny_source_ckpt):
    model, meta = load_model(str(tiny_source_ckpt))
    target = open_dataset(tiny_benchmark, "target")
    before = model.bn1.running_mean.clone()
    loader = image_loader(target.split("train"), None, meta["normalization"], batch_size=24)
    assert adapt_batchnorm(model, images_of(loader)) == 1
    # With momentum=None the new statistics are exactly the target batch's statistics.
    images = next(images_of(loader))
    with torch.no_grad():
        expected = model.conv1(images).mean(dim=(0, 2, 3))
    assert torch.allclose(model.bn1.running_mean, expected, atol=1e-4)
    assert not torch.allclose(before, model.bn1.running_mean)
    assert not model.training
    report = evaluate_model(model, target, "val", meta["normalization"])
    assert 0.0 <= report["miou"] <= 100.0


def test_eval_errors_name_the_problem(tiny_benchmark, tiny_source_ckpt, tmp_path, capsys):
    assert (
        main(["eval", "--checkpoint", str(tmp_path / "missing.pt"), "--data", str(tiny_benchmark)])
        == 2
    )
    assert "missing.pt" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tiny_source_ckpt), "--data", str(tmp_path)]) == 2
    assert "not a synthetic benchmark" in capsys.readouterr().err
    missing = tmp_path / "no_such_data"
    assert main(["eval", "--checkpoint", str(tiny_source_ckpt), "--data", str(missing)]) == 2
    assert f"{missing} does not exist; expected a synthetic benchmark" in capsys.readouterr().err
    args = ["eval", "--checkpoint", str(tiny_source_ckpt), "--data", str(tiny_benchmark)]
    assert main([*args, "--split", "vall"]) == 2
    told = "split: 'vall' is not a split of dataset synthetic:target; it has train, val"
    assert told in capsys.readouterr().err
    if not torch.cuda.is_available():  # asking for a GPU that is not there is an error
        assert main([*args, "--device", "cuda"]) == 2
        assert "device 'cuda': no CUDA GPU" in capsys.readouterr().err
    assert main([*args, "--device", "gpu"]) == 2
    told = capsys.readouterr().err
    assert "device 'gpu': not a device; use auto, cpu, cuda or cuda:N" in told
    assert "Traceback" not in told


@pytest.mark.parametrize(
    "argv, told",
    [
        (["eval", "--batch-size", "-1"], "--batch-size: -1 is out of range; allowed: >= 1"),
        (["eval", "--size", "0", "64"], "argument --size: 0 is out of range; allowed: >= 1"),
        (["adapt", "--workers", "0"], "argument --workers: 0 is out of range; allowed: >= 1"),
        (["adapt", "--cpus-per-worker", "0"], "-worker: 0 is out of range; allowed: > 0\n"),
        (["adapt", "--gpus-per-worker", "nan"], "--gpus-per-worker: nan is out of range"),
        (["adapt", "--gpus-per-worker", "x"], "argument --gpus-per-worker: 'x' is not a number"),
        (["synth", "--seed", "-1"], "argument --seed: -1 is out of range; allowed: >= 0"),
        (["synth", "--target-val", "-5"], "argument --target-val: -5 is out of range"),
    ],
)
def test_flags_that_set_no_config_key_are_checked_as_its_keys_are(argv, told, capsys):
    """Before any work: a batch size of -1 used to evaluate nothing and report mIoU -."""
    required = {
        "eval": ["--checkpoint", "c.pt", "--data", "d"],
        "adapt": ["--checkpoint", "c.pt", "--scores", "s", "--data", "d", "--out", "o"],
        "synth": ["--out", "o"],
    }
    with pytest.raises(SystemExit) as exited:
        main([*argv, *required[argv[0]]])
    assert exited.value.code == 2
    assert told in capsys.readouterr().err


def test_exit_code_tells_bad_input_from_a_lost_connection(capsys):
    """2 asks the user to fix the input; 1 says a rerun may get past it (a Ray get that
    timed out, an MLflow server that stopped answering)."""
    import requests
    from ray.exceptions import GetTimeoutError

    from sfda_ray.cli import error_exit

    assert error_exit("p", FileNotFoundError("manifest not found: m.parquet")) == 2
    assert capsys.readouterr().err == "p: error: manifest not found: m.parquet\n"
    assert error_exit("p", OSError("output location o is not writable")) == 2
    for transient in (
        GetTimeoutError("get timed out"),
        requests.ConnectionError("connection refused"),
        ConnectionResetError("reset by peer"),
    ):
        assert error_exit("p", transient) == 1
        assert "rerun the same command to resume" in capsys.readouterr().err


def test_an_error_ray_raised_is_told_by_its_causes(ray_session, capsys):
    """A failed task, or failed Train workers, in one line without Ray's wrapping: bad
    input in every worker is still bad input, Ray's or MLflow's own failure is 1, a lost
    connection says to rerun, and a bug anywhere keeps its traceback."""
    import ray
    from mlflow.exceptions import MlflowException
    from ray.exceptions import ActorDiedError
    from ray.train import WorkerGroupError

    from sfda_ray.cli import error_exit, is_told

    @ray.remote
    def unreadable():
        raise ValueError("no usable item in a whole pass over the data")

    try:
        ray.get(unreadable.remote())
    except Exception as e:  # noqa: BLE001 - what Ray raised, whatever its class
        task_error = e
    assert is_told(task_error) and error_exit("p", task_error) == 2
    err = capsys.readouterr().err
    assert err == "p: error: ValueError: no usable item in a whole pass over the data\n"

    lost = WorkerGroupError("2 workers failed", {0: ValueError("diverged"), 1: ActorDiedError()})
    assert is_told(lost) and error_exit("p", lost) == 1
    err = capsys.readouterr().err
    assert err.startswith("p: error: Ray Train worker 0: ValueError: diverged; Ray Train worker 1:")
    assert "rerun" not in err
    bug = WorkerGroupError("2 workers failed", {0: ValueError("x"), 1: KeyError("a bug")})
    assert not is_told(bug) and not is_told(KeyError("a bug"))

    class Scorer:  # what Ray Data raises keeps only the text of the error in its code
        def __call__(self, batch):
            raise KeyError("a bug")

    pipeline = ray.data.range(2).map_batches(Scorer, compute=ray.data.ActorPoolStrategy(size=1))
    with pytest.raises(Exception) as raised:  # noqa: PT011 - Ray's wrapper, whatever its class
        pipeline.materialize()
    assert not is_told(raised.value) and "KeyError: 'a bug'" in str(raised.value)
    gone = WorkerGroupError("lost", {0: ConnectionError("node lost")})
    assert error_exit("p", gone) == 1
    assert "rerun the same command to resume" in capsys.readouterr().err

    # MLflow: a request that got no answer is transient; a refusal is not.
    down = MlflowException("API request to http://127.0.0.1:5000/api/2.0/x failed with exception")
    assert is_told(down) and error_exit("p", down) == 1
    assert "rerun the same command to resume" in capsys.readouterr().err
    missing = MlflowException("Run 'abc' not found", error_code="RESOURCE_DOES_NOT_EXIST")
    assert is_told(missing) and error_exit("p", missing) == 1
    assert "rerun" not in capsys.readouterr().err
    # pyarrow's words (25.0) for a bucket endpoint that refused the connection.
    bucket = OSError(
        "When reading information for key 'x.bin' in bucket 'b': AWS Error "
        "NETWORK_CONNECTION during HeadObject operation: curlCode: 7, Could not connect"
    )
    assert error_exit("p", bucket) == 1
    assert "rerun the same command to resume" in capsys.readouterr().err


def test_eval_over_synthia_subsets_of_a_cityscapes_tree(tiny_source_ckpt, tmp_path, capsys, caplog):
    """SYNTHIA -> Cityscapes: the target is Cityscapes, scored over SYNTHIA's classes. An
    image the scan found unreadable is counted as skipped, not silently left out."""
    from data_fixtures import make_cityscapes

    from sfda_ray.data.labels import CLASS_NAMES, EVAL_SUBSETS
    from sfda_ray.data.readers import build_manifest

    splits = {"train": ["a/a_0_19"], "val": ["b/b_0_19", "c/c_0_19", "d/d_0_19"]}
    make_cityscapes(tmp_path / "cs", splits)
    empty = tmp_path / "cs" / "leftImg8bit" / "val" / "d" / "d_0_19_leftImg8bit.png"
    empty.write_bytes(b"")
    build_manifest("cityscapes", tmp_path / "cs", tmp_path / "cs.parquet")
    args = ["eval", "--checkpoint", str(tiny_source_ckpt), "--data", str(tmp_path / "cs.parquet")]
    assert main([*args, "--classes", "synthia16", "synthia13", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["subsets"]) == ["synthia16", "synthia13"]
    assert report["eval_classes"] == "synthia16" and report["images"] == 2
    assert report["skipped"] == 1 and report["skipped_reasons"] == {"left out at scan": 1}
    assert f"1 of val left out, as the manifest records (first: {empty}" in caplog.text
    assert list(report["per_class"]) == [CLASS_NAMES[c] for c in EVAL_SUBSETS["synthia16"]]
    for name in ("synthia16", "synthia13"):  # each subset's mIoU is over its own classes
        ious = [report["per_class"][CLASS_NAMES[c]] for c in EVAL_SUBSETS[name]]
        present = [v for v in ious if v is not None]
        assert report["subsets"][name] == pytest.approx(sum(present) / len(present))
    assert report["miou"] == report["subsets"]["synthia16"]
    assert main(args) == 0  # without --classes: Cityscapes' own 19 classes, as text
    out = capsys.readouterr().out
    assert "over cityscapes19" in out and "mIoU[cityscapes19]" in out
    # --domain picks a half of a synthetic benchmark; on Cityscapes it is a mistake.
    assert main([*args, "--domain", "source"]) == 2
    assert "--domain source: " in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse names the allowed subsets
        main([*args, "--classes", "all"])
    assert "invalid choice: 'all'" in capsys.readouterr().err


def test_eval_batches_frames_of_different_sizes_apart(tiny_source_ckpt, tmp_path, capsys):
    """GTA5 mixes frame sizes and labels are scored at full resolution: each batch holds
    one size, so a split of two sizes is evaluated whole, every labelled pixel once."""
    from data_fixtures import all_ids_label, make_cityscapes, random_rgb, write_png

    root = tmp_path / "cs"
    make_cityscapes(root, {"train": ["t/t_0_19"], "val": ["a/a_0_19", "b/b_0_19", "c/c_0_19"]})
    for rel in ("b/b_0_19",):  # the middle frame is larger
        write_png(root / "leftImg8bit" / "val" / f"{rel}_leftImg8bit.png", random_rgb(1, 24, 40))
        write_png(root / "gtFine" / "val" / f"{rel}_gtFine_labelIds.png", all_ids_label(34, 24, 40))
    (tmp_path / "cs.yaml").write_text(f"data: {{kind: cityscapes, root: {root}}}\n")
    args = ["eval", "--checkpoint", str(tiny_source_ckpt), "--data", str(tmp_path / "cs.yaml")]
    assert main([*args, "--batch-size", "3", "--size", "16", "32", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["images"] == 3 and report["skipped"] == 0
    labelled = sum(1 for v in all_ids_label(34).ravel() if v in CITYSCAPES_TO_TRAIN)
    labelled_large = sum(1 for v in all_ids_label(34, 24, 40).ravel() if v in CITYSCAPES_TO_TRAIN)
    assert sum(map(sum, report["confusion_matrix"])) == 2 * labelled + labelled_large


@pytest.mark.parametrize("command", ["score", "adapt", "tune"])
def test_a_missing_input_is_named_before_ray_starts(
    command, tiny_benchmark, tiny_source_ckpt, tmp_path, monkeypatch, capsys
):
    import sfda_ray.dist.job
    import sfda_ray.dist.runtime

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(sfda_ray.dist.runtime, "init_ray", no_ray)
    monkeypatch.setattr(sfda_ray.dist.job, "init_ray", no_ray)
    missing = tmp_path / "missing.pt"
    args = [command, "--checkpoint", str(missing), "--data", str(tmp_path / "m.parquet")]
    args += ["--out", str(tmp_path / "out"), *(["--scores", "s"] if command == "adapt" else [])]
    assert main(args) == 2
    assert f"--checkpoint {missing} does not exist" in capsys.readouterr().err
    # The other inputs too (the main job names a missing --data as it reads it, also
    # before Ray starts).
    found = [command, "--checkpoint", str(tiny_source_ckpt), "--out", str(tmp_path / "out")]
    if command == "score":
        assert main([*found, "--data", str(tmp_path / "m.yaml")]) == 2
        assert f"--data {tmp_path / 'm.yaml'} does not exist" in capsys.readouterr().err
    if command == "adapt":
        unscored = tmp_path / "never_scored"
        assert main([*found, "--data", str(tiny_benchmark), "--scores", str(unscored)]) == 2
        assert f"--scores {unscored} holds no scores.parquet" in capsys.readouterr().err
