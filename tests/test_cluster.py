"""A real 2-node Ray cluster on 127.0.0.1 (head and worker raylets as separate processes)
running score -> a tune trial that is a 2-worker Ray Train run, through the documented script
(one trial here; several trials are the main-job test's business)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_node_cluster_end_to_end(tiny_benchmark, tiny_source_ckpt, tmp_path):
    """Without --out, as the README runs it: the default output directory."""
    out = tmp_path / "outputs" / "local_cluster"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "local_cluster.py"),
            "--smoke",
            "--data",
            str(tiny_benchmark),
            "--checkpoint",
            str(tiny_source_ckpt),
            # 24 images in batches of 2 for one scorer per node: work for both.
            "--set",
            "score.batch_size=2",
            "--set",
            "adapt.iterations=3",
            "--set",
            "adapt.eval_every=3",
            "--set",
            "tune.num_samples=1",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
        env={**os.environ, "RAY_ADDRESS": "", "MLFLOW_TRACKING_URI": ""},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    # Without a dashboard there is no State API; Ray Train must not say so every second.
    assert "State API may be temporarily unavailable" not in proc.stderr
    check = json.loads((out / "cluster_check.json").read_text())
    assert len(check["nodes"]) == 2
    # One scoring actor on each node; every target-train image scored exactly once, by
    # those actors (how Ray Data shares the batches between them is its own business).
    assert check["scorer_nodes"] == sorted(check["nodes"])
    assert set(check["scored_per_node"]) <= set(check["nodes"])
    assert sum(check["scored_per_node"].values()) == 24
    # The trial's Ray Train run had one worker on each node.
    assert list(check["trial_train_nodes"].values()) == [2]
    # Results, checkpoints and MLflow runs are all in the shared output directory.
    assert len(check["final_models"]) == 1
    assert {c.split("/")[1] for c in check["checkpoints"]} == set(check["trial_train_nodes"])
    assert check["mlflow_tracking_uri"] == f"sqlite:///{out.resolve() / 'mlflow.db'}"
    assert list(check["mlflow_runs"].values()) == ["FINISHED"] * 2  # the sweep and its trial
    assert (out / "summary.json").is_file() and check["best_miou"] is not None
