"""The method and model packages are plain PyTorch: importing them imports no Ray.

Checked in a fresh interpreter, since this test process may have Ray loaded already.
"""

import subprocess
import sys

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


def test_core_imports_no_ray():
    code = (
        f"import sys, {', '.join(PLAIN)}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_check_would_see_ray():
    # The lightest module of the Ray layer: it imports Ray and nothing of torch.
    code = "import sys, sfda_ray.dist.runtime; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_decode_stage_imports_no_torch():
    """Ray Data's decode workers import this module only: without torch they start in
    about a second and stay small (the scoring actors are the ones that need torch)."""
    code = "import sys, sfda_ray.data.decode; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"
