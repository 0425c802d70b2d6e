"""Resolve what a user passes as ``--data`` into a manifest and its evaluation classes.

``--data`` may be a synthetic benchmark directory (it holds ``benchmark.json``), a
Parquet manifest, a dataset root of a known layout (with ``kind``), or a YAML file with
a ``data:`` section (``kind``, ``root``, optional ``manifest``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import yaml

from sfda_ray.data.labels import EVAL_SUBSETS
from sfda_ray.data.manifest import read_manifest
from sfda_ray.data.readers import scan_dataset
from sfda_ray.data.synthetic import load_benchmark_info


@dataclass
class DatasetRef:
    name: str
    manifest: pa.Table  # good rows only
    eval_subsets: dict[str, tuple[int, ...]]  # first entry gives the headline mIoU
    skipped: int  # rows with an error, recorded in the manifest and left out

    @property
    def fingerprint(self) -> str:
        return manifest_fingerprint(self.manifest)

    def split(self, split: str) -> pa.Table:
        table = self.manifest.filter(pa.compute.equal(self.manifest["split"], split))
        if table.num_rows == 0:
            splits = sorted(set(self.manifest["split"].to_pylist()))
            raise ValueError(f"dataset {self.name}: no images in split {split!r}; has {splits}")
        return table


def manifest_fingerprint(table: pa.Table) -> str:
    """Identity of a set of images: ids and sizes, not file contents (cheap at 25k rows)."""
    h = hashlib.sha256()
    for image_id, height, width in zip(
        table["image_id"].to_pylist(),
        table["height"].to_pylist(),
        table["width"].to_pylist(),
        strict=True,
    ):
        h.update(f"{image_id}:{height}x{width};".encode())
    return h.hexdigest()[:16]


def _subsets_for(kind: str) -> dict[str, tuple[int, ...]]:
    if kind == "synthia":
        return {"synthia16": EVAL_SUBSETS["synthia16"], "synthia13": EVAL_SUBSETS["synthia13"]}
    return {"cityscapes19": EVAL_SUBSETS["cityscapes19"]}


def _ref(name: str, table: pa.Table, subsets: dict[str, tuple[int, ...]]) -> DatasetRef:
    ok = table.filter(pa.compute.is_null(table["error"]))
    return DatasetRef(name, ok, subsets, table.num_rows - ok.num_rows)


def open_dataset(data: str | Path, domain: str = "target", kind: str | None = None) -> DatasetRef:
    """Open ``data`` (see module doc). ``domain`` picks the half of a synthetic benchmark."""
    path = Path(str(data)).expanduser()
    if str(data).endswith(".parquet"):
        table = read_manifest(str(data), include_errors=True)
        kinds = set(table["dataset"].to_pylist())
        return _ref(str(data), table, _subsets_for(kind or next(iter(kinds), "cityscapes")))
    if path.is_dir() and (path / "benchmark.json").is_file():
        if domain not in ("source", "target"):
            raise ValueError(f"domain: {domain!r} is not allowed; allowed: source, target")
        info = load_benchmark_info(path)
        table = read_manifest(str(path / info["manifests"][domain]), include_errors=True)
        return _ref(f"synthetic:{domain}", table, {"synthetic": tuple(info["class_ids"])})
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"dataset config {path} does not exist")
        spec = (yaml.safe_load(path.read_text()) or {}).get("data")
        if not isinstance(spec, dict) or "kind" not in spec or "root" not in spec:
            raise ValueError(f"{path}: expected a `data:` section with `kind` and `root`")
        if spec.get("manifest"):
            return open_dataset(spec["manifest"], domain, spec["kind"])
        return open_dataset(spec["root"], domain, spec["kind"])
    if kind is None:
        raise ValueError(
            f"{data}: not a synthetic benchmark (no benchmark.json), not a .parquet manifest "
            "and not a .yaml dataset config; for a dataset root also give its kind "
            "(gta5, synthia, cityscapes)"
        )
    table = scan_dataset(kind, str(path))
    return _ref(f"{kind}:{path}", table, _subsets_for(kind))
