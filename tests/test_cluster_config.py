"""cluster.yaml against Ray's own cluster-config schema (offline), plus our own checks."""

import copy
import re
from importlib.metadata import requires
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _commands(cfg: dict) -> list[str]:
    keys = (
        "setup_commands",
        "head_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    return [c for k in keys for c in cfg.get(k, [])]


def test_validates_against_ray_schema(cluster):
    validate_config(prepare_config(copy.deepcopy(cluster)))


def test_schema_check_rejects_a_broken_config(cluster):
    broken = copy.deepcopy(cluster)
    broken["available_node_types"]["gpu_worker"]["min_workers"] = "zero"
    from jsonschema import ValidationError

    with pytest.raises(ValidationError, match="'zero' is not of type 'integer'") as err:
        validate_config(prepare_config(broken))
    assert list(err.value.path) == ["available_node_types", "gpu_worker", "min_workers"]


def test_gpu_workers_declare_gpus(cluster):
    types = cluster["available_node_types"]
    head = cluster["head_node_type"]
    assert types[head]["resources"].get("GPU", 0) == 0  # the head only drives
    gpu_types = [name for name, t in types.items() if name != head]
    assert gpu_types
    for name in gpu_types:
        gpus = types[name]["resources"].get("GPU")
        assert isinstance(gpus, int) and gpus >= 1, name
        assert types[name]["max_workers"] >= types[name]["min_workers"] >= 0


def test_setup_installs_the_pinned_project(cluster):
    # The installed metadata, which is pyproject's (tomllib would need Python 3.11).
    ray_pin = next(d for d in requires("sfda_ray") if d.startswith("ray["))
    mount = next(dst for dst, src in cluster["file_mounts"].items() if src == ".")
    setup = " ".join(cluster["setup_commands"])
    # pip install -e of the mounted checkout installs exactly pyproject's pins ...
    assert f"pip install -e {mount}" in setup
    # ... and the dashboard extra is asked for at the very same Ray version.
    version = ray_pin.split("==")[1]
    assert f'"ray[default]=={version}"' in setup
    assert "import torchvision.ops" in setup


def test_nothing_listens_on_a_public_address(cluster):
    commands = " ".join(_commands(cluster))
    assert "0.0.0.0" not in commands
    assert "--dashboard-host=127.0.0.1" in commands
    mlflow = re.search(r"mlflow server .*?--host (\S+)", commands)
    assert mlflow and mlflow.group(1) == "127.0.0.1"


def test_every_node_needs_a_chosen_image_and_workers_can_reach_s3(cluster):
    # Ray 2.60 turns `latest_dlami` into an Ubuntu 18.04 image, too old for the pinned
    # Python packages: every node names its own AMI.
    types = cluster["available_node_types"]
    images = {t["node_config"]["ImageId"] for t in types.values()}
    assert "latest_dlami" not in images and all(i.startswith("ami-") for i in images)
    # Ray gives only the head an instance profile; GPU workers read and write S3 too.
    head = cluster["head_node_type"]
    for name, node_type in types.items():
        if name != head:
            assert "IamInstanceProfile" in node_type["node_config"], name


def test_restarting_mlflow_kills_the_old_server_not_its_own_shell(cluster):
    from ray.autoscaler._private.command_runner import _with_interactive

    server = next(c for c in cluster["head_start_ray_commands"] if "mlflow server" in c)
    running = server.removeprefix("nohup ").split(" >")[0]  # the server's command line
    kills = [c for c in _commands(cluster) if c.startswith("pkill -f")]
    assert kills
    for command in kills:
        pattern = re.match(r'pkill -f "([^"]+)"', command).group(1)
        # Ray runs a command as `bash --login -c -i '...(COMMAND)'`: a pattern that
        # matches that shell's command line kills the shell and fails `ray up`.
        assert not re.search(pattern, " ".join(_with_interactive(command))), command
        assert re.search(pattern, running), command


def test_the_upload_leaves_ignored_files_behind_and_examples_agree(cluster):
    assert ".gitignore" in cluster["rsync_filter"]
    header = (ROOT / "cluster.yaml").read_text().split("\ncluster_name:")[0]
    readme = (ROOT / "README.md").read_text()
    paths = set(re.findall(r"s3://BUCKET/[\w./-]+", header))
    assert paths and paths <= set(re.findall(r"s3://BUCKET/[\w./-]+", readme))
