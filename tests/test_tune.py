"""The sweep's pieces that need no running sweep: search spaces and MLflow bookkeeping."""

import argparse
import json
import logging
import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from sfda_ray.config import (
    ConfigError,
    apply_overrides,
    load_config,
    load_search_space,
    to_dict,
)
from sfda_ray.dist.job import DEFAULT_SPACE
from sfda_ray.dist.tracking import ERROR_TAG, PARENT_TAG, SweepTracker, git_commit

ROOT = Path(__file__).resolve().parents[1]


def _space(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return load_search_space(path, load_config())


def test_shipped_search_space_is_valid():
    space = load_search_space(DEFAULT_SPACE, load_config())
    assert space["select.tau"] == ("choice", [0.8, 0.85, 0.9, 0.95])
    assert {"select.ratio", "adapt.lambda_adv", "adapt.lambda_st", "adapt.lr"} <= set(space)


@pytest.mark.parametrize("config", [None, "gta5_cityscapes.yaml", "synthia_cityscapes.yaml"])
def test_each_shipped_config_searches_around_its_own_settings(config, monkeypatch, tmp_path):
    """A sweep samples near what its config sets: ResNet-101 at batch size 1 wants a
    learning rate some 20 times lower than the synthetic model, so it has its own space."""
    monkeypatch.chdir(tmp_path)  # the space beside a config is found from anywhere
    cfg = load_config(config and ROOT / "experiments" / "configs" / config)
    space = load_search_space(cfg.tune.space or DEFAULT_SPACE, cfg)
    configured = to_dict(cfg)
    for key, (kind, args) in space.items():
        section, name = key.split(".")
        value = configured[section][name]
        if kind in ("uniform", "loguniform"):
            assert args[0] <= value <= args[1], (config, key, value, args)
        else:
            assert value in args, (config, key, value, args)


@pytest.mark.parametrize(
    "text, message",
    [
        ("select.tua: {uniform: [0.1, 0.2]}", "select.tua: unknown key"),
        ("select.tau: {uniform: [0.5, 1.5]}", "select.tau: 1.5 is out of range"),
        ("adapt.lambda_adv: {loguniform: [0, 0.1]}", "loguniform needs low > 0"),
        ("adapt.lr: {uniform: [0.1, 0.01]}", "needs low < high"),
        ("adapt.lr: {normal: [0, 1]}", "unknown kind 'normal'"),
        ("adapt.lr: {uniform: [0.1]}", "takes [low, high]"),
        ("adapt.discriminator_input: {choice: [softmax, logits]}", "'logits' is not allowed"),
        ("adapt.lr: 0.01", "should be one of {kind: args}"),
        ("- a list", "expected a mapping"),
        ("adapt.iterations: {uniform: [10, 20]}", "takes integers and uniform draws fractions"),
        ("score.mc_passes: {choice: [0, 2]}", "trials cannot vary it: the target is scored once"),
        ("model.name: {choice: [deeplabv2_resnet18]}", "the model comes from the checkpoint"),
        ("data.size: {choice: [[32, 64], [48, 96]]}", "the size it was scored at"),
        ("adapt.lr: {uniform: [0.1, 0.2]}\nadapt.lr: {uniform: [0.2, 0.3]}", "a second time"),
        ("1: {choice: [1]}", "1: not a config key"),
        ("adapt: {choice: [1]}", "adapt: a section, not a key; sweep its keys (adapt.KEY)"),
        # Four keys in one rule: only the draw of all of them together breaks it.
        (
            "adapt.method: {choice: [sfda, tent]}\nadapt.lambda_mix: {choice: [0, 1]}\n"
            "adapt.lambda_v: {choice: [0, 1]}\nadapt.lr: {choice: [0.01, 0.02, 0.03]}",
            "adapt.method='sfda', adapt.lambda_mix=1, adapt.lambda_v=0, which is not allowed",
        ),
        # Many choices of one key: each is checked against the base config's scale_max.
        (
            "data.scale_min: {choice: ["
            + ", ".join(f"{1 + i / 1000:.3f}" for i in range(300))
            + "]}",
            "a trial can draw data.scale_min=1.251, which is not allowed",
        ),
        # Each value passes alone; some draws of the two together do not.
        (
            "adapt.alpha_min: {uniform: [1, 4]}\nadapt.alpha_max: {uniform: [2, 5]}",
            "a trial can draw adapt.alpha_min=4, adapt.alpha_max=2",
        ),
        (
            "adapt.lambda_v: {choice: [0, 1]}\nadapt.lambda_mix: {choice: [0, 0.5]}",
            "adapt.lambda_v=0, adapt.lambda_mix=0.5, which is not allowed",
        ),
        (
            "data.scale_min: {randint: [1, 3]}\ndata.scale_max: {choice: [1.5, 3]}",
            "data.scale_min=2, data.scale_max=1.5",
        ),
    ],
)
def test_bad_search_space_names_key_and_rule(tmp_path, text, message):
    with pytest.raises(ConfigError, match="space.yaml") as e:
        _space(tmp_path, text)
    assert message in str(e.value)


@pytest.mark.parametrize(
    "text",
    [
        # alpha_min's range ends where alpha_max's begins: no draw breaks the rule.
        "adapt.alpha_min: {uniform: [1, 2]}\nadapt.alpha_max: {uniform: [2, 5]}",
        # 1.3 is above the base scale_max (1.25), but not above any scale_max drawn with it.
        "data.scale_min: {choice: [1.3]}\ndata.scale_max: {choice: [1.5, 2]}",
    ],
)
def test_a_space_whose_every_draw_keeps_the_rules_is_accepted(tmp_path, text):
    space = _space(tmp_path, text)
    assert len(space) == 2


def test_a_rule_between_a_swept_key_and_the_base_config_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="data.scale_min=1.3, which is not allowed"):
        _space(tmp_path, "data.scale_min: {choice: [1.0, 1.3]}")


def test_a_baseline_sweep_of_the_methods_own_keys_is_refused(tmp_path):
    tent = load_config(None, {"adapt.method": "tent"})
    with pytest.raises(ConfigError, match=r"select.ratio, select.tau, adapt.lambda_adv, .* act "):
        load_search_space(DEFAULT_SPACE, tent)
    (tmp_path / "baselines.yaml").write_text(
        "adapt.method: {choice: [tent, minent]}\nadapt.st_tau: {uniform: [0.8, 0.9]}\n"
    )
    with pytest.raises(ConfigError, match="adapt.st_tau act under adapt.method sfda only, not te"):
        load_search_space(tmp_path / "baselines.yaml", load_config())
    (tmp_path / "tent.yaml").write_text("adapt.lr: {loguniform: [0.001, 0.01]}\n")
    assert list(load_search_space(tmp_path / "tent.yaml", tent)) == ["adapt.lr"]
    # A space that sweeps the method itself has trials where they act.
    (tmp_path / "both.yaml").write_text(
        "adapt.method: {choice: [sfda, tent]}\nadapt.lambda_st: {uniform: [0.5, 1.5]}\n"
    )
    assert len(load_search_space(tmp_path / "both.yaml", tent)) == 2


def test_choice_and_grid_values_are_kept(tmp_path):
    space = _space(
        tmp_path,
        "adapt.discriminator_input: {choice: [softmax, entropy]}\nadapt.st_rounds: {grid: [1, 2]}",
    )
    assert space == {
        "adapt.discriminator_input": ("choice", ["softmax", "entropy"]),
        "adapt.st_rounds": ("grid", [1, 2]),
    }


def test_a_space_reads_numbers_as_written_from_a_path_with_a_tilde(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    text = "adapt.lr: {loguniform: [1e-4, 1e-2]}\nadapt.iterations: {randint: [10, 20]}\n"
    (tmp_path / "space.yaml").write_text(text)
    space = load_search_space("~/space.yaml", load_config())
    assert space == {
        "adapt.lr": ("loguniform", [1e-4, 1e-2]),
        "adapt.iterations": ("randint", [10, 20]),
    }


def test_tracker_reuses_runs_and_closes_interrupted_ones(tmp_path, mlflow_db):
    uri = mlflow_db
    sweep = tmp_path / "sweep"
    tracker = SweepTracker(uri, "exp", str(sweep), str(tmp_path))
    parent = tracker.start("sweep", {"adapt": {"lr": 0.01}}, {"git_commit": "abc"})
    child = tracker.child("t1", "trial 1", {"select.tau": 0.9}, {})
    tracker.log_metrics(child, {"val_miou": 20.0}, 5)
    tracker.client.set_tag(child, ERROR_TAG, "RuntimeError: CUDA out of memory")
    tracker.finish("FAILED", error="no trial of the sweep completed")

    # A new driver (a resumed sweep) finds the same runs instead of making new ones, and
    # the errors of the attempt it retries are gone.
    again = SweepTracker(uri, "exp", str(sweep), str(tmp_path))
    assert again.start("sweep", {}, {}) == parent
    assert again.child("t1", "trial 1", {"select.tau": 0.9}, {}) == child
    for run in (parent, child):
        assert again.client.get_run(run).info.status == "RUNNING"
        assert ERROR_TAG not in again.client.get_run(run).data.tags
    other = again.child("t2", "trial 2", {"select.tau": 0.8}, {})
    again.client.set_terminated(other, "FINISHED")
    again.finish()

    client = MlflowClient(uri)
    runs = {r.info.run_id: r for r in client.search_runs([again.experiment_id])}
    assert len(runs) == 3
    assert runs[parent].info.status == "FINISHED"
    assert runs[child].info.status == "KILLED"  # left running by the interrupted driver
    assert runs[other].info.status == "FINISHED"
    assert runs[child].data.tags[PARENT_TAG] == parent
    assert runs[parent].data.params["adapt.lr"] == "0.01"
    assert runs[child].data.metrics["val_miou"] == 20.0
    assert (tmp_path / "mlartifacts").as_uri() == client.get_experiment(
        again.experiment_id
    ).artifact_location


def test_a_resumed_sweep_whose_store_lost_its_runs_logs_to_new_ones(tmp_path, mlflow_db, caplog):
    # The same tracking URI, but a store without the sweep's runs: a new head whose
    # saved mlflow.db was not restored.
    uri = mlflow_db
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    lost = "0" * 32
    state = {"tracking_uri": uri, "parent_run_id": lost}
    (sweep / "mlflow.json").write_text(json.dumps(state))

    again = SweepTracker(uri, "exp", str(sweep), str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sfda_ray.dist.tracking"):
        parent = again.start("sweep", {"adapt": {"lr": 0.01}}, {"git_commit": "abc"})
    assert parent != lost
    assert f"the sweep's MLflow run {lost} is not in" in caplog.text
    run = again.client.get_run(parent)
    assert run.info.status == "RUNNING" and run.data.params["adapt.lr"] == "0.01"
    # ... and the sweep's state now names the new run, for the next resume.
    assert json.loads((sweep / "mlflow.json").read_text())["parent_run_id"] == parent
    again.finish()


def test_git_commit_tag_says_when_the_code_was_edited(tmp_path, monkeypatch):
    for variable in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):
        monkeypatch.delenv(variable, raising=False)
    assert git_commit(tmp_path) == "unknown"  # not a checkout
    repo = tmp_path / "repo"
    repo.mkdir()

    def git(*args: str) -> str:
        config = ["-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
        return subprocess.run(
            ["git", *config, *args], cwd=repo, check=True, capture_output=True, text=True
        ).stdout.strip()

    git("init", "-q")
    (repo / "method.py").write_text("lr = 0.01\n")
    git("add", "method.py")
    git("commit", "-q", "-m", "first")
    sha = git("rev-parse", "HEAD")
    assert re.fullmatch(r"[0-9a-f]{40}", sha) and git_commit(repo) == sha
    (repo / "notes.txt").write_text("untracked files do not change what runs\n")
    assert git_commit(repo) == sha
    (repo / "method.py").write_text("lr = 0.1\n")
    assert git_commit(repo) == f"{sha}-dirty"
    (repo / ".git" / "index").write_bytes(b"not an index")  # git cannot compare any more
    assert git_commit(repo) == f"{sha}-unverified"
    (repo / ".git" / "index").unlink()
    git("reset", "-q")  # the index rebuilt from the commit
    # A package installed into an environment that the checkout ignores is not its code.
    (repo / ".gitignore").write_text("venv/\n")
    (repo / "venv" / "site-packages" / "pkg").mkdir(parents=True)
    assert git_commit(repo / "venv" / "site-packages" / "pkg") == "unknown"


def test_the_configs_eval_classes_apply_to_the_data_given_by_flag(
    tiny_source_ckpt, tmp_path, mlflow_db, monkeypatch
):
    """`--config synthia_cityscapes.yaml --data cs.parquet`: Cityscapes is still scored
    over SYNTHIA's classes, in every stage (they all read the dataset YAML the job writes)."""
    from data_fixtures import cityscapes_yaml

    import sfda_ray.dist.job as job
    from sfda_ray.cli import add_tune_args
    from sfda_ray.data.catalog import open_dataset
    from sfda_ray.data.readers import build_manifest

    cityscapes_yaml(tmp_path)
    build_manifest("cityscapes", str(tmp_path / "cs"), str(tmp_path / "cs.parquet"))
    (tmp_path / "cs13.yaml").write_text(
        f"data: {{kind: cityscapes, root: {tmp_path / 'cs'}, eval_classes: [synthia13]}}\n"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)

    class RayStarted(Exception):
        pass

    def up_to_ray(data: str) -> list[str]:
        parser = argparse.ArgumentParser()
        add_tune_args(parser)
        args = parser.parse_args(
            ["--data", data, "--checkpoint", str(tiny_source_ckpt), "--out", str(tmp_path / "out")]
            + ["--set", "data.eval_classes=[synthia16, synthia13]"]
        )
        with pytest.raises(RayStarted):
            job.run_job(args, "synthia_cityscapes")
        return list(open_dataset(args.data).eval_subsets)

    monkeypatch.setattr(job, "init_ray", lambda address: (_ for _ in ()).throw(RayStarted()))
    assert up_to_ray(str(tmp_path / "cs.parquet")) == ["synthia16", "synthia13"]
    assert up_to_ray(str(tmp_path / "cs.yaml")) == ["synthia16", "synthia13"]
    with pytest.raises(ValueError, match=r"\['synthia16', 'synthia13'\] in the config and "):
        up_to_ray(str(tmp_path / "cs13.yaml"))


def test_the_configs_eval_classes_apply_to_the_synthetic_benchmark(tiny_benchmark, tmp_path):
    """The synthetic run passes its benchmark folder on the same way, so its trials agree
    with the config they are given."""
    from sfda_ray.data.catalog import is_synthetic, open_dataset
    from sfda_ray.dist.job import apply_eval_classes

    data = apply_eval_classes(str(tiny_benchmark), ["cityscapes19"], str(tmp_path))
    assert is_synthetic(data) and list(open_dataset(data).eval_subsets) == ["cityscapes19"]
    assert open_dataset(data, "source").name == "synthetic:source"


def test_config_data_section_names_the_target(tmp_path):
    from data_fixtures import make_cityscapes

    from sfda_ray.data.catalog import open_dataset
    from sfda_ray.dist.job import pin_manifest, write_dataset_spec

    split_images = {"train": ["aachen/aachen_0_19"], "val": ["lindau/lindau_0_19"]}
    make_cityscapes(tmp_path / "cs", split_images)
    cfg = load_config(
        None,
        {
            "data.kind": "cityscapes",
            "data.root": str(tmp_path / "cs"),
            "data.eval_classes": ["synthia13"],
        },
    )
    out = tmp_path / "out"
    out.mkdir()
    spec = write_dataset_spec(cfg, str(out))
    ref = open_dataset(spec)
    assert list(ref.eval_subsets) == ["synthia13"]
    assert ref.split("val").num_rows == 1
    # The job scans a root once; every later stage reads the manifest, not the tree.
    pinned = pin_manifest(spec, str(out))
    manifest = out / "target_manifest.parquet"
    assert manifest.is_file() and f"manifest: {manifest}" in Path(pinned).read_text()
    shutil.rmtree(tmp_path / "cs" / "gtFine")  # a rescan would now find no labels
    ref = open_dataset(pinned)
    assert list(ref.eval_subsets) == ["synthia13"] and ref.labelled("val").num_rows == 1
    scanned_at = manifest.stat().st_mtime_ns
    rerun = pin_manifest(write_dataset_spec(cfg, str(out)), str(out))
    assert open_dataset(rerun).labelled("val").num_rows == 1  # the manifest it made before
    assert manifest.stat().st_mtime_ns == scanned_at
    # Another root in the same output directory is scanned, not served the old list.
    make_cityscapes(tmp_path / "cs2", {"train": ["a/a_0_19"], "val": ["b/b_0_19", "b/b_1_19"]})
    moved = apply_overrides(cfg, {"data.root": str(tmp_path / "cs2")})
    other = pin_manifest(write_dataset_spec(moved, str(out)), str(out))
    assert open_dataset(other).split("val").num_rows == 2
    with pytest.raises(ConfigError, match=r"data.eval_classes: \['synthia19'\]"):
        load_config(None, {"data.eval_classes": ["synthia19"]})


def test_synthetic_preset_never_overrides_a_config(tmp_path, monkeypatch):
    """The synthetic run's short schedule fills in defaults only: a real-data config keeps
    its own values, and a YAML value beats the preset."""
    import argparse

    from data_fixtures import make_cityscapes

    from sfda_ray.cli import add_tune_args
    from sfda_ray.data.catalog import open_dataset
    from sfda_ray.dist.job import SYNTHETIC, job_config, write_dataset_spec

    parser = argparse.ArgumentParser()
    add_tune_args(parser, "out")
    gta = str(ROOT / "experiments" / "configs" / "gta5_cityscapes.yaml")
    cfg = job_config(parser.parse_args(["--config", gta, "--checkpoint", "src.pth"]))
    assert (cfg.adapt.iterations, cfg.adapt.threads) == (20000, 4)
    assert job_config(parser.parse_args([])).adapt.iterations == SYNTHETIC["adapt.iterations"]
    mine = tmp_path / "mine.yaml"
    mine.write_text("adapt: {iterations: 12, lr: 0.001}\n")
    cfg = job_config(parser.parse_args(["--config", str(mine)]))
    assert (cfg.adapt.iterations, cfg.adapt.lr) == (12, 0.001)
    assert cfg.adapt.eval_every == SYNTHETIC["adapt.eval_every"]
    smoke = job_config(parser.parse_args(["--config", str(mine), "--smoke"]))
    assert smoke.adapt.iterations == 10  # --smoke is a flag: it beats the YAML

    # A relative data.root given as a flag is relative to the working directory.
    make_cityscapes(tmp_path / "cs", {"train": ["a/a_0_19"], "val": ["b/b_0_19"]})
    monkeypatch.chdir(tmp_path)
    args = ["--checkpoint", "src.pth", "--set", "data.kind=cityscapes", "--set", "data.root=cs"]
    cfg = job_config(parser.parse_args(args))
    assert cfg.adapt.iterations == load_config().adapt.iterations  # a real dataset: no preset
    (tmp_path / "out").mkdir()
    assert open_dataset(write_dataset_spec(cfg, str(tmp_path / "out"))).manifest.num_rows == 2


def test_remote_output_needs_a_tracking_server(monkeypatch, tmp_path):
    from sfda_ray.dist.tracking import default_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri(str(tmp_path)) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    with pytest.raises(ValueError, match="set MLFLOW_TRACKING_URI"):
        default_tracking_uri("s3://bucket/runs")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert default_tracking_uri("s3://bucket/runs") == "http://127.0.0.1:5000"


def test_the_synthetic_run_needs_a_local_output(monkeypatch, tmp_path, capsys):
    from sfda_ray.dist.job import main

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    assert main("synthetic", "out", "the job", ["--smoke", "--out", "s3://bucket/runs"]) == 2
    assert "--out s3://bucket/runs: the synthetic run" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before anything was made


def test_an_unusable_tracking_store_fails_the_job_before_any_work(monkeypatch, tmp_path, capsys):
    from sfda_ray.dist.job import main

    # MLflow 3 refuses a plain file store unless told otherwise: the job says so at once.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    out = tmp_path / "out"
    assert main("synthetic", str(out), "the job", ["--smoke", "--out", str(out)]) == 2
    assert f"MLflow tracking store {(tmp_path / 'mlruns').as_uri()}:" in capsys.readouterr().err
    assert not any(out.iterdir())  # no benchmark generated, no source model trained


def test_a_deleted_experiment_is_refused_with_the_way_back(tmp_path, mlflow_db):
    from sfda_ray.dist.tracking import check_tracking_store

    uri = mlflow_db
    client = MlflowClient(uri)
    check_tracking_store(uri, "exp")  # not there yet: the sweep will create it
    experiment_id = client.create_experiment("exp")
    client.delete_experiment(experiment_id)
    restore = (
        f"MLFLOW_TRACKING_URI={uri} mlflow experiments restore --experiment-id {experiment_id}"
    )
    with pytest.raises(ValueError, match=re.escape(restore)):
        check_tracking_store(uri, "exp")


def test_looking_up_a_finished_trial_run_leaves_it_finished(tmp_path, mlflow_db):
    uri = mlflow_db
    tracker = SweepTracker(uri, "exp", str(tmp_path / "sweep"), str(tmp_path))
    tracker.start("sweep", {}, {})
    run = tracker.child("t1", "trial 1", {}, {})
    tracker.client.set_terminated(run, "FINISHED")
    again = SweepTracker(uri, "exp", str(tmp_path / "sweep"), str(tmp_path))
    again.start("sweep", {}, {})
    assert again.child("t1", "trial 1", {}, {}, reopen=False) == run
    again.finish()
    assert again.client.get_run(run).info.status == "FINISHED"


def test_evaluations_run_where_the_gpus_are():
    """The driver and the trial processes hold no GPU: with GPU workers, evaluation runs
    in a Ray task holding one. A separate Ray here, with one (logical) GPU."""
    import json
    import subprocess
    import sys

    code = """
import json, os, ray
from sfda_ray.dist.runtime import on_gpus
def where(x, device):
    return {"x": x, "device": device, "gpus": ray.get_gpu_ids(), "pid": os.getpid()}
ray.init(address="local", num_cpus=1, num_gpus=1, include_dashboard=False)
print(json.dumps([on_gpus(where, 1, 7), on_gpus(where, 0, 7), os.getpid()]))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    on_gpu, on_cpu, driver = json.loads(out.stdout.strip().splitlines()[-1])
    assert on_gpu["device"] == "cuda" and on_gpu["gpus"] and on_gpu["pid"] != driver
    assert on_cpu == {"x": 7, "device": "cpu", "gpus": [], "pid": driver}


def test_baselines_include_adabn_when_scoring_did_not_use_it(
    ray_session, tiny_benchmark, tiny_source_ckpt, tiny_scores, tmp_path
):
    """Every table has both cheap baselines, also when pseudo-labels came from the plain
    source model (score.adabn false, as for the frozen-BN ResNet-101 configs)."""
    from sfda_ray.dist.job import baseline_mious
    from sfda_ray.evaluate import evaluate_checkpoint
    from sfda_ray.models.checkpoint import file_fingerprint

    source, bench, scores = str(tiny_source_ckpt), str(tiny_benchmark), tmp_path / "scores"
    # The summary of a scoring without AdaBN (test_scoring: its model is the source's).
    scored = dict(
        tiny_scores[1], checkpoint=source, checkpoint_fingerprint=file_fingerprint(source)
    )
    miou = baseline_mious(source, scored, bench, str(scores), load_config())
    adabn = evaluate_checkpoint(str(scores / "source_adabn.pt"), bench)["miou"]
    assert miou == {
        "source_only_miou": evaluate_checkpoint(source, bench)["miou"],
        "adabn_miou": adabn,
    }
    assert miou["adabn_miou"] != miou["source_only_miou"]


def test_trial_errors_are_told_without_ray_wrapping(ray_session):
    import ray
    from ray.train import ControllerError, WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    from sfda_ray.dist.tracking import describe_error

    @ray.remote
    def fails():
        raise ValueError("select.ratio 1.0 leaves no target image")

    with pytest.raises(ray.exceptions.RayTaskError) as raised:
        ray.get(fails.remote())
    assert "line " in str(raised.value)  # what Tune would have shown: where it was raised
    assert describe_error(raised.value) == "ValueError: select.ratio 1.0 leaves no target image"

    # A trial that ran the failing code in a task of its own (evaluation on a GPU).
    @ray.remote
    def runs_a_task():
        return ray.get(fails.remote())

    with pytest.raises(ray.exceptions.RayTaskError) as nested:
        ray.get(runs_a_task.remote())
    assert describe_error(nested.value) == "ValueError: select.ratio 1.0 leaves no target image"

    # An actor killed under the trial (OOM killer, lost node): the sentences, not the ids.
    @ray.remote(max_restarts=0)
    class Worker:
        def die(self):
            os._exit(1)

    with pytest.raises(ray.exceptions.ActorDiedError) as died:
        ray.get(Worker.remote().die.remote())
    assert "actor_id" in str(died.value)
    told = describe_error(died.value)
    assert told.startswith("ActorDiedError: The actor died") and "actor_id" not in told
    assert "\n" not in told

    oom = RuntimeError("CUDA out of memory")
    workers = WorkerGroupError("snippets", {1: oom, 0: oom, 2: KeyError("label")})
    assert describe_error(workers) == (
        "Ray Train workers 0, 1: RuntimeError: CUDA out of memory; "
        "Ray Train worker 2: KeyError: 'label'"
    )
    lost = WorkerHealthCheckFailedError("A worker health check failed.", died.value)
    assert describe_error(WorkerGroupError("snippet", {0: lost})) == f"Ray Train worker 0: {told}"
    assert describe_error(ControllerError(oom)) == "RuntimeError: CUDA out of memory"
    # Tune's error.txt, for errors it does not pickle: the latest failure's last line.
    text = "Failure # 1 (occurred at x)\nTuneError: first\nFailure # 2 (occurred at y)\n"
    assert describe_error(text + "Traceback ...\n  File ...\nTuneError: second\n") == (
        "TuneError: second"
    )
    assert describe_error(None) is None


def test_a_sweep_where_no_trial_completes_says_why(
    ray_session,
    tiny_benchmark,
    tiny_source_ckpt,
    tiny_scores,
    tmp_path,
    mlflow_db,
    monkeypatch,
    capsys,
):
    """Every trial refuses its config: one readable error naming the cause, and MLflow
    runs marked FAILED with the cause, instead of a dump of Ray tracebacks."""
    from sfda_ray.dist.tune import SweepFailed, run_sweep

    scores, _ = tiny_scores
    # Every image in the virtual source leaves no target to adapt to.
    overrides = {"select.ratio": 1.0, "adapt.iterations": 2, "tune.num_samples": 1}
    overrides["tune.max_failures"] = 0  # each trial fails once, not again on its retry
    cfg = load_config(None, {**overrides, "adapt.eval_every": 1})
    space_file = tmp_path / "space.yaml"
    space_file.write_text("adapt.lr: {grid: [0.01, 0.02]}\n")
    space = load_search_space(space_file, cfg)
    uri = mlflow_db
    args = (str(tiny_source_ckpt), str(scores), str(tiny_benchmark), str(tmp_path), space)
    with pytest.raises(SweepFailed) as failed:
        run_sweep(cfg, *args, "failing", uri)
    cause = "ValueError: select.ratio 1.0 puts 24 of 24 scored images in the virtual source"
    message = str(failed.value)
    assert message.startswith("no trial of the sweep completed (2 trials):\n  2 trials: " + cause)
    assert "Traceback" not in message and str(tmp_path / "tune" / "sweep") in message

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("failing").experiment_id])
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FAILED"}
    for run in runs:  # the parent says it all; each trial's run says its own error
        assert run.data.tags[ERROR_TAG].startswith(
            message if PARENT_TAG not in run.data.tags else cause
        )
    # Resuming with other settings, or logging elsewhere, is refused, naming what changed.
    other = apply_overrides(cfg, {"adapt.iterations": 3})
    elsewhere = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(
        ConfigError, match=r"\(config\.adapt\.iterations, mlflow\.tracking_uri differ\)"
    ):
        run_sweep(other, *args, "failing", elsewhere)
    # The main job refuses such a rerun before it scores the target again.
    from sfda_ray.dist.job import main

    args = ["--data", str(tiny_benchmark), "--checkpoint", str(tiny_source_ckpt)]
    args += ["--out", str(tmp_path), "--experiment", "failing", "--space", str(space_file)]
    for key, value in {**overrides, "adapt.eval_every": 1, "adapt.iterations": 3}.items():
        args += ["--set", f"{key}={value}"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert main("synthetic", "out", "the job", args) == 2
    told = capsys.readouterr().err
    assert "holds a sweep with other settings (config.adapt.iterations differ)" in told
    assert not (tmp_path / "scores").exists()  # nothing scored
    # The path of the space is not part of it, only what the space holds.
    from sfda_ray.dist.tune import sweep_identity

    spelled = apply_overrides(cfg, {"tune.space": "./space.yaml"})
    where = ("val_miou", str(tiny_source_ckpt), str(scores), str(tiny_benchmark), uri, "failing")
    assert sweep_identity(spelled, space, *where) == sweep_identity(cfg, space, *where)
    assert sweep_identity(other, space, *where) != sweep_identity(cfg, space, *where)
    # sweep.json records the metric `auto` resolved to (the target's val is labelled).
    recorded = json.loads((tmp_path / "sweep.json").read_text())
    assert cfg.tune.metric == "auto" and recorded["config"]["tune"]["metric"] == "val_miou"
    from sfda_ray.dist.tune import check_sweep_settings

    located = (str(tiny_source_ckpt), str(tiny_benchmark), str(tmp_path), uri, "failing")
    check_sweep_settings(cfg, space, *located)  # the same settings: it would resume
    # A key added to (or removed from) the space is a change: Tune restores the old space.
    wider = {**space, "adapt.iterations": ("randint", [2, 4])}
    with pytest.raises(ConfigError, match=r"\(space\.adapt\.iterations differ\)"):
        check_sweep_settings(cfg, wider, *located)
    # A sweep.json written before the resolved metric was recorded ("auto") still resumes.
    recorded["config"]["tune"]["metric"] = "auto"
    (tmp_path / "sweep.json").write_text(json.dumps(recorded))
    check_sweep_settings(cfg, space, *located)


def test_val_miou_on_an_unlabelled_target_is_refused_before_any_work(
    tiny_source_ckpt, tmp_path, monkeypatch, capsys
):
    from data_fixtures import cityscapes_yaml

    from sfda_ray.dist.job import main

    cityscapes_yaml(tmp_path, unlabelled=("b/b_0_19",))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/m.db")
    args = ["--data", str(tmp_path / "cs.yaml"), "--checkpoint", str(tiny_source_ckpt)]
    out = tmp_path / "out"
    args += ["--out", str(out), "--set", "tune.metric=val_miou"]
    assert main("cityscapes", "out", "the job", args) == 2
    assert "tune.metric val_miou needs a labelled target val" in capsys.readouterr().err
    assert not (out / "scores").exists()  # nothing scored


@pytest.mark.parametrize(
    "split, told",
    [
        ("trian", "score.split: 'trian' is not a split of dataset "),
        ("val", "score.split: val is what the trials are evaluated on"),
    ],
)
def test_a_scored_split_the_trials_cannot_use_is_refused_before_ray_starts(
    split, told, tiny_source_ckpt, tmp_path, mlflow_db, monkeypatch, capsys
):
    from data_fixtures import cityscapes_yaml

    import sfda_ray.dist.job as job

    cityscapes_yaml(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_db)
    monkeypatch.setattr(job, "init_ray", lambda address: pytest.fail("Ray started"))
    args = ["--data", str(tmp_path / "cs.yaml"), "--checkpoint", str(tiny_source_ckpt)]
    args += ["--out", str(tmp_path / "out"), "--set", f"score.split={split}"]
    assert job.main("cityscapes", "out", "the job", args) == 2
    err = capsys.readouterr().err
    assert told in err and "Traceback" not in err
    if split == "trian":
        assert "it has train, val" in err


@pytest.mark.parametrize(
    "argv, told",
    [
        (
            ["--smoke", "--seed", "2"],
            "--seed 2: seeds the synthetic benchmark, which --smoke fixes",
        ),
        (
            ["--data", "cs.yaml", "--checkpoint", "source.pt", "--seed", "2"],
            "--seed 2: seeds the synthetic benchmark, which a real target replaces",
        ),
    ],
)
def test_a_seed_the_job_would_not_use_is_refused(argv, told, tmp_path, monkeypatch, capsys):
    from sfda_ray.dist.job import main

    monkeypatch.chdir(tmp_path)
    assert main("gta5_cityscapes", "out", "the job", [*argv, "--out", "out"]) == 2
    assert told in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_diverged_trial_never_ranks_best():
    from sfda_ray.dist.tune import best_trial

    def trial(name, proxy, completed=True):
        return {"trial_id": name, "proxy": proxy, "completed": completed, "error": None}

    nan_first = [
        trial("nan", float("nan")),
        trial("a", 0.5),
        trial("b", 0.3),
        trial("c", 0.1, False),
    ]
    assert best_trial(nan_first, "proxy", "min")["trial_id"] == "b"
    assert nan_first[0]["error"].startswith("proxy is nan: the run diverged, or its evaluation")
    assert best_trial(nan_first, "proxy", "max")["trial_id"] == "a"
    assert best_trial([trial("inf", float("inf"))], "proxy", "min") is None


def test_the_proxy_is_ranked_against_miou_at_one_iteration(ray_session, tmp_path):
    """Trials are compared at the last iteration at least 3 reached, read back from real
    Tune results: a trial ASHA stopped early (d, whose proxy disagrees) does not enter."""
    from ray import tune

    from sfda_ray.dist.tune import _reports, proxy_rank_correlation

    trials = {  # name: (mIoU, proxy, last iteration)
        "a": (10.0, 0.9, 4),
        "b": (20.0, 0.5, 4),
        "c": (30.0, 0.1, 4),
        "d": (90.0, 5.0, 2),
    }

    def trainable(config):
        miou, proxy, last = trials[config["name"]]
        for iteration in range(2, last + 1, 2):
            tune.report({"iteration": iteration, "val_miou": miou, "proxy": proxy})

    grid = tune.Tuner(
        trainable,
        param_space={"name": tune.grid_search(sorted(trials))},
        run_config=tune.RunConfig(storage_path=str(tmp_path), name="sweep", verbose=0),
    ).fit()
    histories = [_reports(result) for result in grid]
    assert sorted(len(h) for h in histories) == [1, 2, 2, 2]
    assert proxy_rank_correlation(histories) == (pytest.approx(1.0), 4)
    # A trial evaluated on nothing (NaN) is left out.
    nan = [{"iteration": 4, "val_miou": math.nan, "proxy": 0.2}]
    assert proxy_rank_correlation([*histories, nan]) == (pytest.approx(1.0), 4)
    assert proxy_rank_correlation([*histories[:2], nan]) == (None, None)
    # At iteration 2 alone, d's disagreeing proxy enters the ranking.
    at_2 = [[r for r in h if r["iteration"] == 2] for h in histories]
    rho, iteration = proxy_rank_correlation(at_2)
    assert iteration == 2 and rho < 0.5
    assert proxy_rank_correlation(histories[:2]) == (None, None)
    # A resumed trial that reported its last iteration twice still counts once.
    resumed = [h + h[-1:] for h in histories[:2]]
    assert proxy_rank_correlation(resumed) == (None, None)


def test_each_synthetic_benchmark_has_its_own_default_out():
    """A smoke run first and then the full run (as the README suggests) do not meet each
    other's source model, scores and sweep; a real dataset keeps the task's directory."""
    import argparse

    from sfda_ray.cli import add_tune_args
    from sfda_ray.dist.job import default_out, job_config

    parser = argparse.ArgumentParser()
    add_tune_args(parser, "outputs/tune_gta")

    def out(*argv: str) -> str:
        args = parser.parse_args(list(argv))
        return default_out(args, job_config(args))

    assert out() == "outputs/tune_gta"
    assert out("--smoke") == "outputs/tune_gta_smoke"
    assert out("--seed", "2") == "outputs/tune_gta_seed2"
    gta = str(ROOT / "experiments" / "configs" / "gta5_cityscapes.yaml")
    assert out("--config", gta, "--checkpoint", "gta5.pt", "--seed", "2") == "outputs/tune_gta"


def test_a_report_always_carries_its_metric():
    """Tune stops the whole sweep at a result without its metric: an evaluation without a
    pixel of the evaluated classes reports val_miou as NaN, which ranks no trial."""
    from sfda_ray.dist.train import reportable

    got = reportable({"val_miou": None, "proxy": 0.5, "iteration": 4, "per_class": {}})
    assert set(got) == {"val_miou", "proxy", "iteration"}
    assert math.isnan(got["val_miou"]) and got["proxy"] == 0.5 and got["iteration"] == 4


def test_an_mlflow_failure_in_a_trial_hook_does_not_stop_the_sweep(tmp_path, mlflow_db, caplog):
    from types import SimpleNamespace

    from mlflow.exceptions import MlflowException

    from sfda_ray.dist.tracking import TrialLogger

    tracker = SweepTracker(mlflow_db, "exp", str(tmp_path), str(tmp_path))
    tracker.start("sweep", {}, {})
    logger = TrialLogger(tracker, {}, lambda trial_id: {}, iterations=10)
    trial = SimpleNamespace(trial_id="t1", config={"adapt.lr": 0.01}, last_result={})

    def server_gone(*args, **kwargs):
        raise MlflowException("API request failed after 7 retries")

    tracker.log_metrics = server_gone
    logger.on_trial_result(0, [], trial, {"iteration": 5, "val_miou": 20.0})
    assert "on_trial_result of trial t1 not recorded: API request failed" in caplog.text
    logger.on_trial_complete(0, [], trial)  # the rest of the trial is still recorded
    run = tracker.client.get_run(tracker.child("t1", "t1", {}, {}))
    assert run.info.status == "FINISHED" and run.data.params["adapt.lr"] == "0.01"
    assert run.data.tags["sfda.stopped_early"] == "True"  # its last report: 5 of 10


def test_stopped_early_is_judged_against_the_trials_own_iterations(tmp_path, mlflow_db):
    """A baseline trains no iteration; a trial may search adapt.iterations itself."""
    from types import SimpleNamespace

    from sfda_ray.dist.tracking import TrialLogger

    tracker = SweepTracker(mlflow_db, "exp", str(tmp_path), str(tmp_path))
    tracker.start("sweep", {}, {})
    logger = TrialLogger(tracker, {"adapt.iterations": 10}, lambda trial_id: {}, iterations=10)
    trials = {
        "adabn": ({"adapt.method": "adabn"}, 0, "False"),
        "short": ({"adapt.iterations": 6}, 6, "False"),
        "stopped": ({"adapt.method": "sfda"}, 5, "True"),
        "finished": ({"adapt.method": "sfda"}, 10, "False"),
    }
    for name, (config, last, _) in trials.items():
        trial = SimpleNamespace(trial_id=name, config=config, last_result={"iteration": last})
        logger.on_trial_complete(0, [], trial)
    for name, (_, _, expected) in trials.items():
        run = tracker.client.get_run(tracker.child(name, name, {}, {}))
        assert run.data.tags["sfda.stopped_early"] == expected, name


@pytest.mark.parametrize(
    "space, overrides, every_trial",
    [
        ({"adapt.lambda_adv": ("loguniform", [0.0001, 0.01])}, {}, True),
        ({"adapt.lambda_adv": ("uniform", [0.0, 0.01])}, {}, True),  # 0 is never drawn
        ({"adapt.lambda_adv": ("choice", [0.0, 0.001])}, {}, False),
        ({"adapt.lambda_adv": ("randint", [0, 2])}, {}, False),
        ({"adapt.method": ("grid", ["sfda", "tent"])}, {}, False),
        ({"adapt.lr": ("uniform", [0.001, 0.01])}, {"adapt.lambda_adv": 0.0}, False),
        ({"adapt.lr": ("uniform", [0.001, 0.01])}, {}, True),
    ],
)
def test_which_sweeps_train_the_discriminator_in_every_trial(space, overrides, every_trial):
    from sfda_ray.dist.tune import _every_trial_adversarial

    assert _every_trial_adversarial(load_config(None, overrides), space) is every_trial


def test_a_resumed_driver_does_not_log_a_step_twice(tmp_path, mlflow_db):
    """A trial resumed after its last report was logged reports that step again: the new
    driver (callbacks unpickled, as Tune restores them) reads what was logged from MLflow."""
    import pickle
    from types import SimpleNamespace

    from sfda_ray.dist.tracking import TrialLogger

    uri = mlflow_db
    tracker = SweepTracker(uri, "exp", str(tmp_path), str(tmp_path))
    tracker.start("sweep", {}, {})
    logger = TrialLogger(tracker, {}, dict, iterations=10)
    trial = SimpleNamespace(trial_id="t1", config={}, last_result={})
    for step, miou in ((5, 20.0), (10, 25.0)):
        logger.on_trial_result(0, [], trial, {"iteration": step, "val_miou": miou})
    restored = pickle.loads(pickle.dumps(logger))
    restored.tracker.start("sweep", {}, {})
    restored.on_trial_result(0, [], trial, {"iteration": 10, "val_miou": 25.0})
    run = restored.tracker.child("t1", "t1", {}, {})
    history = MlflowClient(uri).get_metric_history(run, "val_miou")
    assert [(m.step, m.value) for m in history] == [(5, 20.0), (10, 25.0)]


def _finished_sweep(tmp_path) -> dict:
    """A sweep's result as ``save_and_record`` takes it, its best model in ``final.pt``."""
    (tmp_path / "final.pt").write_bytes(b"weights")
    return {
        "best_trial": "t1",
        "best_checkpoint": str(tmp_path / "final.pt"),
        "metric": "val_miou",
        "best_metric": 30.0,
        "proxy_miou_spearman": None,
    }


def test_the_summary_is_saved_whatever_mlflow_does_at_the_end(tmp_path, mlflow_db, caplog):
    from mlflow.exceptions import MlflowException

    from sfda_ray.dist.job import save_and_record

    uri = mlflow_db
    tracker = SweepTracker(uri, "exp", str(tmp_path / "sweep"), str(tmp_path))
    parent = tracker.start("sweep", {}, {"git_commit": "abc"})
    sweep = _finished_sweep(tmp_path)
    summary = {"best_miou": 30.0, "source_only_miou": 20.0}
    save_and_record(str(tmp_path), summary, {"hist.png": b"png"}, sweep, tracker)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    client = MlflowClient(uri)
    run = client.get_run(parent)
    assert run.info.status == "FINISHED" and run.data.metrics["best_val_miou"] == 30.0
    assert {a.path for a in client.list_artifacts(parent)} == {"hist.png", "summary.json"}
    best = run.data.tags["sfda.best_run_id"]
    assert [a.path for a in client.list_artifacts(best, "model")] == ["model/final.pt"]
    assert client.get_run(best).data.tags["git_commit"] == "abc"
    # The same command again after the sweep finished: nothing is recorded twice.
    assert tracker.start("sweep", {}, {"git_commit": "abc"}) == parent
    save_and_record(str(tmp_path), summary, {"hist.png": b"png"}, sweep, tracker)
    for key in ("best_val_miou", "best_miou", "source_only_miou"):
        assert len(client.get_metric_history(parent, key)) == 1, key
    model = client.list_artifacts(best, "model")[0]
    assert model.path == "model/final.pt" and model.file_size == len(b"weights")
    # An upload cut short (the driver killed mid-copy) is made again by the next rerun.
    uploaded = Path(client.get_run(best).info.artifact_uri.removeprefix("file://"))
    (uploaded / "model" / "final.pt").write_bytes(b"wei")
    save_and_record(str(tmp_path), summary, {"hist.png": b"png"}, sweep, tracker)
    assert (uploaded / "model" / "final.pt").read_bytes() == b"weights"

    # The tracking server gone at the very end: the summary is on disk all the same.
    (tmp_path / "summary.json").unlink()

    def server_gone(*args, **kwargs):
        raise MlflowException("API request failed after 7 retries")

    tracker.log_files = server_gone
    save_and_record(str(tmp_path), summary, {}, sweep, tracker)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert "the sweep's results are in" in caplog.text and "after 7 retries" in caplog.text


def test_an_artifact_store_that_cannot_be_written_leaves_the_summary(tmp_path, mlflow_db, caplog):
    """The artifact store fails with its own error (here an OSError: the location lies
    under a file), not an MlflowException: still a warning, the summary on disk."""
    from sfda_ray.dist.job import save_and_record

    uri = mlflow_db
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where the artifact store expects a directory")
    MlflowClient(uri).create_experiment("exp", artifact_location=f"file://{blocker}/artifacts")
    tracker = SweepTracker(uri, "exp", str(tmp_path / "sweep"), str(tmp_path))
    tracker.start("sweep", {}, {"git_commit": "abc"})
    sweep = _finished_sweep(tmp_path)
    save_and_record(str(tmp_path), {"best_miou": 30.0}, {}, sweep, tracker)
    assert json.loads((tmp_path / "summary.json").read_text()) == {"best_miou": 30.0}
    assert "the sweep's results are in" in caplog.text
    assert "NotADirectoryError" in caplog.text or "Not a directory" in caplog.text


def _no_files(trial_id: str) -> dict:
    return {}


def test_a_resumed_sweeps_callbacks_log_where_its_new_driver_started(tmp_path, mlflow_db):
    """Tune restores its callbacks from the pickle made when the sweep was first started.
    On a new store (a new head without the saved mlflow.db) the new driver opens a new
    parent run: the restored logger's trial runs must be its children, with its tags."""
    import pickle
    from types import SimpleNamespace

    from sfda_ray.dist.tracking import TrialLogger

    uri = mlflow_db
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    # The first driver's tracker, as pickled: its parent run is not in this store.
    first = SweepTracker(uri, "exp", str(sweep), str(tmp_path))
    first.parent_id, first.tags = "0" * 32, {"git_commit": "old"}
    first._save_state()
    pickled = pickle.dumps(TrialLogger(first, {}, _no_files, iterations=10))

    driver = SweepTracker(uri, "exp", str(sweep), str(tmp_path))
    new_parent = driver.start("sweep", {}, {"git_commit": "new"})
    assert new_parent != "0" * 32
    restored = pickle.loads(pickled)
    restored.setup(stop=None, num_samples=1, total_num_samples=1)
    trial = SimpleNamespace(trial_id="t1", config={}, last_result={"iteration": 10})
    restored.on_trial_result(0, [], trial, {"iteration": 10, "val_miou": 25.0})
    restored.on_trial_complete(0, [], trial)
    runs = MlflowClient(uri).search_runs(
        [driver.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{new_parent}'"
    )
    assert len(runs) == 1
    assert runs[0].data.tags["git_commit"] == "new"
    assert runs[0].data.metrics["val_miou"] == 25.0
    driver.finish()
    assert MlflowClient(uri).get_run(runs[0].info.run_id).info.status == "FINISHED"


def test_a_completed_trial_whose_files_fail_to_upload_is_still_finished(
    tmp_path, mlflow_db, caplog
):
    from types import SimpleNamespace

    from sfda_ray.dist.tracking import TrialLogger

    tracker = SweepTracker(mlflow_db, "exp", str(tmp_path), str(tmp_path))
    tracker.start("sweep", {}, {})

    def upload_fails(run_id, files, artifact_path=None):
        raise OSError("bucket not writable")

    tracker.log_files = upload_fails
    logger = TrialLogger(tracker, {}, lambda trial_id: {"a.txt": b"x"}, iterations=10)
    trial = SimpleNamespace(trial_id="t1", config={}, last_result={"iteration": 10})
    logger.on_trial_complete(0, [], trial)
    assert "on_trial_complete of trial t1 not recorded: bucket not writable" in caplog.text
    tracker.finish()  # would call a trial still RUNNING KILLED
    run = tracker.client.get_run(tracker.child("t1", "t1", {}, {}))
    assert run.info.status == "FINISHED"


def test_a_sweep_stopped_before_its_first_step_starts_again(tmp_path):
    """Tune writes tuner.pkl when the Tuner is made and its experiment state only at the
    first step; a restore without the state would fail on every rerun."""
    from sfda_ray.dist.tune import can_resume

    sweep = tmp_path / "sweep"
    assert not can_resume(str(sweep))
    sweep.mkdir()
    (sweep / "tuner.pkl").write_bytes(b"tuner")
    assert not can_resume(str(sweep)) and not can_resume(f"file://{sweep}")
    (sweep / "experiment_state-2026-11-30_02-00-00.json").write_text("{}")
    assert can_resume(str(sweep)) and can_resume(f"file://{sweep}")


def test_asha_rungs_end_before_the_last_report_and_a_fallback_to_fifo_is_said(caplog):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from sfda_ray.dist.job import SMOKE
    from sfda_ray.dist.tune import trial_scheduler

    asha = trial_scheduler(load_config(None, {"adapt.iterations": 30, "adapt.eval_every": 5}))
    assert isinstance(asha, ASHAScheduler)
    # First rung iterations // 3, doubling, the last before the final report at 30.
    assert asha._max_t == 25 and [rung for rung, _ in asha._brackets[0]._rungs] == [20, 10]
    fifo = load_config(None, {"tune.scheduler": "fifo"})
    with caplog.at_level(logging.INFO, logger="sfda_ray.dist.tune"):
        assert type(trial_scheduler(fifo)) is FIFOScheduler
        assert caplog.records == []
        # The --smoke preset: its first rung, 10, is past the last, 10 - 5.
        assert type(trial_scheduler(load_config(None, SMOKE))) is FIFOScheduler
    assert caplog.messages == [
        "tune.grace_period 10 is past ASHA's last rung, iteration 5 (adapt.iterations 10 "
        "- adapt.eval_every 5): no trial is stopped early, each runs to its end"
    ]


def test_a_trial_resumed_past_the_last_rung_is_never_stopped_at_its_final_report():
    """After a resume ASHA's rungs are empty (Tune does not save them): a trial resumed
    past the last rung meets the top rung's records for the first time at its final
    report, and plain ASHA would stop it there, before it writes its model."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    from sfda_ray.dist.tune import trial_scheduler

    cfg = load_config(None, {"adapt.iterations": 30, "adapt.eval_every": 5})

    def decisions(scheduler) -> list[str]:
        scheduler.set_search_properties("val_miou", "max")
        trials = [SimpleNamespace(trial_id=name) for name in ("fresh", "resumed", "weak")]
        for trial in trials:
            scheduler.on_trial_add(None, trial)
        reports = [("fresh", 20, 0.9), ("resumed", 30, 0.1), ("weak", 20, 0.05)]
        return [
            scheduler.on_trial_result(None, trials[i], {"iteration": it, "val_miou": v})
            for i, (_, it, v) in enumerate(reports)
        ]

    plain = ASHAScheduler(time_attr="iteration", max_t=25, grace_period=10, stop_last_trials=False)
    assert decisions(plain)[1] == TrialScheduler.STOP  # what this guards against
    # The final report continues; a weak trial at a rung is still stopped.
    assert decisions(trial_scheduler(cfg)) == ["CONTINUE", "CONTINUE", "STOP"]


def test_a_finished_sweep_deletes_the_train_state_no_resume_needs(tmp_path, monkeypatch, caplog):
    from sfda_ray import storage
    from sfda_ray.dist.tune import remove_finished_train_state

    def trial(name, iteration, completed=False, error=None, config=None):
        return {"trial_id": name, "iteration": iteration, "completed": completed,
                "error": error, "config": config or {}}  # fmt: skip

    trials = [
        trial("done", 30, completed=True),
        trial("stopped", 10),  # by ASHA, at a rung
        trial("failed", 20, error="RuntimeError: lost"),
        # Stopped at its last report by the plain ASHA of a sweep started before
        # RungsOnlyASHA: no final.pt, its checkpoint holds the trained weights.
        trial("stopped_at_end", 30),
        trial("longer", 30, config={"adapt.iterations": 60}),  # swept: stopped early
        trial("never", None),  # no run written
    ]
    for name in ("done", "stopped", "failed", "stopped_at_end", "longer"):
        run = tmp_path / "trials" / name
        (run / "ray" / "adapt" / "checkpoint_1").mkdir(parents=True)
        (run / "ray" / "adapt" / "checkpoint_1" / "state.pt").write_bytes(b"x" * 1000)
    (tmp_path / "trials" / "done" / "final.pt").write_bytes(b"model")

    # One that cannot be deleted is said, and the others are deleted all the same.
    remove_tree = storage.remove_tree

    def refuse_done(path):
        if "/done/" in path:
            raise PermissionError(path)
        return remove_tree(path)

    monkeypatch.setattr(storage, "remove_tree", refuse_done)
    with caplog.at_level(logging.INFO, logger="sfda_ray.dist.tune"):
        assert remove_finished_train_state(str(tmp_path), trials, 30) == (2, 2000)
    assert "could not delete" in caplog.text and "trials/done/ray" in caplog.text
    assert "deleted the Ray Train checkpoints of 2 finished trial(s)" in caplog.text
    monkeypatch.undo()

    assert remove_finished_train_state(str(tmp_path), trials, 30) == (1, 1000)
    kept = sorted(p.parent.name for p in tmp_path.glob("trials/*/ray"))
    assert kept == ["failed", "stopped_at_end"]
    assert (tmp_path / "trials" / "done" / "final.pt").read_bytes() == b"model"
    assert remove_finished_train_state(str(tmp_path), trials, 30) == (0, 0)
