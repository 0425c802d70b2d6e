"""Shared fixtures: one tiny synthetic benchmark and one tiny source model per session."""

import os

import pytest

from sfda_ray.config import load_config
from sfda_ray.data.synthetic import BenchmarkSpec, generate
from sfda_ray.train_source import train_source

TINY = BenchmarkSpec(
    seed=0, height=48, width=96, source_train=16, source_val=6, target_train=24, target_val=8
)


def tiny_config(**overrides):
    base = {
        "source.iterations": 6,
        "source.batch_size": 4,
        "source.checkpoint_every": 2,
        "source.log_every": 2,
        "data.num_workers": 0,
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
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
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
