import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_main_job_smoke_runs_every_stage(tmp_path):
    """`python experiments/tune_gta.py --smoke`: synthetic data, source model, scoring on
    Ray Data, adaptation on Ray Train, evaluation - in its own Ray, as a user runs it."""
    out = tmp_path / "job"
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "tune_gta.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for key in ("source_only_miou", "adabn_miou", "adapted_miou"):
        assert 0.0 <= summary[key] <= 100.0
    assert (out / "run" / "final.pt").is_file()
    assert (out / "scores" / "score_histogram.png").is_file()
    assert "adapted" in proc.stdout and "summary.json" in proc.stdout
    # A second run reuses the cached benchmark, model and scores.
    again = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "tune_gta.py"), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already complete" in again.stderr
