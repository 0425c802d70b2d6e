"""The main job as a user runs it: `python experiments/tune_gta.py --smoke`, in its own
Ray, logging to a real `mlflow server` on 127.0.0.1; interrupted (Ctrl-C) mid-sweep,
resumed, killed outright and resumed again."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from mlflow_server import mlflow_server

ROOT = Path(__file__).resolve().parents[1]
PNGS = {"score_histogram.png", "per_class_iou.png", "confusion_matrix.png", "overlays.png"}


_STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_job_outlives_its_test():
    """A failed assertion mid-test leaves no job, nor its private Ray, running on."""
    yield
    while _STARTED:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(_STARTED.pop().pid, signal.SIGKILL)


def _job(out: Path, env: dict) -> subprocess.Popen:
    """As the README runs it, in fewer iterations: ``--out`` relative to the working
    directory (each trial and Ray Train worker runs in a working directory of its own)."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "experiments" / "tune_gta.py"), "--smoke", "--out", out.name]
        # Two evaluations per trial, as the preset has, in fewer iterations.
        + ["--set", "adapt.iterations=6", "--set", "adapt.eval_every=3"],
        cwd=out.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # the job's own Ray processes go with it when it is killed
    )
    _STARTED.append(proc)
    return proc


def _wait_until(proc: subprocess.Popen, ready, never: str, timeout: float = 420) -> None:
    """Until ``ready()``; the job must not exit meanwhile, and ``never`` says what did
    not happen in ``timeout`` seconds."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, never
        time.sleep(0.5)


def _interrupt_when(proc: subprocess.Popen, ready) -> str:
    """Ctrl-C, as a terminal sends it (to the whole foreground process group), once
    ``ready()``; returns the job's stderr."""
    _wait_until(proc, ready, "the sweep never reached its first checkpoint")
    os.killpg(proc.pid, signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=120)
    finally:  # whatever of its Ray is left
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    return stderr


def _finish(proc: subprocess.Popen) -> tuple[str, str]:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-4000:]
    # The local Ray has no State API; Ray Train must not say so every second of a trial.
    assert "State API may be temporarily unavailable" not in stderr
    return stdout, stderr


@pytest.mark.slow
def test_main_job_sweeps_logs_to_mlflow_and_resumes(tmp_path, mlflow_db_template):
    out = tmp_path / "job"
    with mlflow_server(tmp_path, mlflow_db_template) as uri:
        env = {**os.environ, "RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": uri}

        # Interrupt the job once a trial has written a Ray Train checkpoint: it stops
        # (not as if the sweep had finished), says how to resume and closes its runs.
        first = _job(out, env)
        stderr = _interrupt_when(first, lambda: any(out.glob("trials/*/ray/adapt/checkpoint_*")))
        assert "interrupted; rerun the same command to resume" in stderr
        assert not (out / "summary.json").exists()
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("sfda_ray/synthetic")
        runs = client.search_runs([experiment.experiment_id])
        sweeps = [r.info.status for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert sweeps == ["KILLED"] and "RUNNING" not in {r.info.status for r in runs}
        baselines = out / "scores" / "baselines.json"
        evaluated_at = baselines.stat().st_mtime_ns  # evaluated before the sweep started

        # The same command resumes the sweep; kill it outright (a lost node, the OOM
        # killer) once a resumed trial is training again (it writes a checkpoint), and
        # once more it resumes, to the end.
        second = _job(out, env)
        started = time.time()

        def training_again() -> bool:
            for checkpoint in out.glob("trials/*/ray/adapt/checkpoint_*"):
                with contextlib.suppress(FileNotFoundError):  # a replaced one goes
                    if checkpoint.stat().st_mtime > started:
                        return True
            return False

        _wait_until(second, training_again, "no trial trained again after the resume")
        os.killpg(second.pid, signal.SIGKILL)
        second.wait()
        assert not (out / "summary.json").exists()
        stdout, stderr = _finish(_job(out, env))
        summary = json.loads((out / "summary.json").read_text())
        # Each finished trial keeps final.pt; the checkpoints only a resume needs go.
        assert "deleted the Ray Train checkpoints of 2 finished trial(s)" in stderr
        assert not list(out.glob("trials/*/ray")) and len(list(out.glob("trials/*/final.pt"))) == 2
        # The rerun took the baselines from the cache instead of evaluating them again.
        assert baselines.stat().st_mtime_ns == evaluated_at
        cached = json.loads(baselines.read_text())["miou"]
        assert summary["source_only_miou"] == cached["source_only_miou"]
        assert summary["mlflow_tracking_uri"] == uri
        assert summary["mlflow_experiment"] == "sfda_ray/synthetic"
        assert summary["metric"] == "val_miou"
        assert len(summary["trials"]) == 2
        assert all(t["completed"] for t in summary["trials"])
        assert set(summary["best_config"]) == {
            "select.ratio",
            "select.tau",
            "adapt.lambda_adv",
            "adapt.lambda_st",
            "adapt.lambda_prior",
            "adapt.lr",
        }
        assert summary["best_miou"] > summary["source_only_miou"]
        assert Path(summary["best_checkpoint"]).is_file()
        assert f"open the runs: {uri}" in stdout and "best configuration" in stdout

        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        # One run per trial and one for the sweep, although the sweep ran three times.
        assert len(parents) == 1 and len(children) == 2
        assert {r.info.status for r in runs} == {"FINISHED"}
        parent = parents[0]
        assert parent.data.metrics["best_miou"] == pytest.approx(summary["best_miou"])
        assert parent.data.tags["git_commit"] and parent.data.tags["data_fingerprint"]
        for run in children:
            assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
            params = run.data.params
            assert float(params["select.tau"]) > 0 and "adapt.iterations" in params
            # Step 3 may be lost when the driver stops between the trial's report and its
            # logging; the resumed trial continues from that checkpoint to step 6.
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_miou")]
            assert steps[-1] == 6 and set(steps) <= {3, 6}
            assert client.get_metric_history(run.info.run_id, "loss_total")
            artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
            assert PNGS <= artifacts, artifacts
        best_run = parent.data.tags["sfda.best_run_id"]
        assert [a.path for a in client.list_artifacts(best_run, "model")] == ["model/final.pt"]
