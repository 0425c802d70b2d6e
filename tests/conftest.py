"""Shared fixtures: one tiny synthetic benchmark and one tiny source model per session."""

import os
import shutil
import signal

import pytest

from sfda_ray.config import load_config
from sfda_ray.data.synthetic import BenchmarkSpec, generate
from sfda_ray.train_source import train_source

TINY = BenchmarkSpec(
    seed=0, height=48, width=96, source_train=16, source_val=6, target_train=24, target_val=8
)


# The tests that press Ctrl-C on a command they started need it to arrive as from a
# terminal, also when the suite runs where SIGINT is ignored (a background job of a
# non-interactive shell): a child inherits an ignored SIGINT, and Python then never
# raises KeyboardInterrupt in it. A handler, unlike SIG_IGN, is reset by exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Ray Train's controller polls its workers every 2 s, and a run's start, its reports and
# its end each wait for a poll; each worker group also starts a preemption watcher.
# Nothing here is preempted: polls every 0.5 s, and no watcher, for every Ray Train run of
# the tests, also in the commands they start (these settings go by the environment).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


def tiny_config(**overrides):
    base = {
        "source.iterations": 6,
        "source.batch_size": 4,
        "source.checkpoint_every": 2,
        "source.log_every": 2,
    }
    return load_config(None, {**base, **overrides})


@pytest.fixture(scope="session")
def tiny_benchmark(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    generate(root, TINY)
    return root


@pytest.fixture(scope="session")
def tiny_source_ckpt(tiny_benchmark, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "source.pt"
    train_source(tiny_config(), str(tiny_benchmark), str(path))
    return path


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory):
    """An empty MLflow sqlite store with its schema made: MLflow builds the tables and
    runs its many migrations on a new file, seconds each time."""
    from mlflow.tracking import MlflowClient

    path = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_db(mlflow_db_template, tmp_path):
    """The URI of an MLflow sqlite store of the test's own, ``tmp_path/mlflow.db``."""
    path = tmp_path / "mlflow.db"
    shutil.copyfile(mlflow_db_template, path)
    return f"sqlite:///{path}"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole test session (starting Ray costs seconds and ~0.7 GB).

    More logical CPUs than cores: a training worker group and a data stage must be able
    to run side by side: under num_cpus=2 the data stage waits for CPUs the workers hold,
    and the run hangs.
    """
    import ray

    # The object-storage tests' S3 server (moto, on 127.0.0.1) takes any credentials;
    # set before Ray starts, so its workers have them too. Never a real account's.
    for key, value in (
        ("AWS_ACCESS_KEY_ID", "sfda-ray-tests"),
        ("AWS_SECRET_ACCESS_KEY", "sfda-ray-tests"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ):
        os.environ[key] = value
    from sfda_ray.dist.runtime import no_dashboard_runtime_env

    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        runtime_env=no_dashboard_runtime_env(),  # as a job's local Ray
        log_to_driver=False,
        configure_logging=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_scores(ray_session, tiny_benchmark, tiny_source_ckpt, tmp_path_factory):
    from sfda_ray.dist.scoring import ScoringOptions, score_dataset

    out = tmp_path_factory.mktemp("scores")
    summary = score_dataset(
        str(tiny_source_ckpt), str(tiny_benchmark), str(out), ScoringOptions(batch_size=5, actors=1)
    )
    return out, summary
