"""An installed (non-editable) package carries every file the code reads: the wheel
built from this checkout holds every file of the ``sfda_ray`` tree, the default search
space of ``sfda-ray tune`` among them."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_holds_every_file_of_the_package(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(
        ROOT / "sfda_ray", src / "sfda_ray", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--disable-pip-version-check",
            "-w",
            str(tmp_path / "wheel"),
            str(src),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "wheel").glob("sfda_ray-*.whl")
    packed = set(zipfile.ZipFile(wheel).namelist())
    files = {p.relative_to(src).as_posix() for p in (src / "sfda_ray").rglob("*") if p.is_file()}
    assert "sfda_ray/dist/tune_space.yaml" in files
    assert files <= packed, sorted(files - packed)
