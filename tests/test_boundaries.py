"""The method and model packages are plain PyTorch: importing them imports no Ray.

Checked in a fresh interpreter, since this test process may have Ray loaded already.
"""

import json
import subprocess
import sys

import pytest

PLAIN = [
    "sfda_ray.method.adapt",
    "sfda_ray.method.losses",
    "sfda_ray.method.scoring",
    "sfda_ray.method.selection",
    "sfda_ray.method.baselines",
    "sfda_ray.models",
    "sfda_ray.adaptation",
    "sfda_ray.train_source",
    "sfda_ray.evaluate",
    "sfda_ray.data.catalog",
    "sfda_ray.data.adaptation",
    "sfda_ray.metrics",
    "sfda_ray.report",
    "sfda_ray.pictures",
    "sfda_ray.config",
]


# One fresh interpreter imports the layers from the lightest up, and says after each
# which of torch and Ray it has loaded.
IMPORTS_IN_TURN = f"""
import json, sys
def loaded():
    ray = sorted(m for m in sys.modules if m.split(".")[0] == "ray")
    return {{"torch": "torch" in sys.modules, "ray": ray}}
import sfda_ray.data.decode
decode = loaded()
import {", ".join(PLAIN)}
plain = loaded()
import sfda_ray.dist.runtime
print(json.dumps({{"decode": decode, "plain": plain, "dist": loaded()}}))
"""


@pytest.fixture(scope="module")
def loaded_after():
    out = subprocess.run(
        [sys.executable, "-c", IMPORTS_IN_TURN], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_decode_stage_imports_no_torch(loaded_after):
    """Ray Data's decode workers import this module only: without torch they start in
    about a second and stay small (the scoring actors are the ones that need torch)."""
    assert loaded_after["decode"] == {"torch": False, "ray": []}


def test_core_imports_no_ray(loaded_after):
    assert loaded_after["plain"]["torch"] and loaded_after["plain"]["ray"] == []


def test_the_check_would_see_ray(loaded_after):
    # The lightest module of the Ray layer imports Ray.
    assert "ray" in loaded_after["dist"]["ray"]
