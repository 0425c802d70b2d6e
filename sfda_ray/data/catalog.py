"""Resolve what a user passes as ``--data`` into a manifest and its evaluation classes.

``--data`` may be a synthetic benchmark directory (it holds ``benchmark.json``), a
Parquet manifest, a dataset root of a known layout (with ``kind``), or a YAML file with
a ``data:`` section (``kind``, ``root``, optional ``manifest`` and ``eval_classes``).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, fields, replace
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from sfda_ray import storage
from sfda_ray.config import DATA_KINDS, DataConfig, read_yaml
from sfda_ray.data.labels import EVAL_SUBSETS
from sfda_ray.data.manifest import read_manifest
from sfda_ray.data.readers import scan_dataset
from sfda_ray.data.synthetic import load_benchmark_info

log = logging.getLogger(__name__)


@dataclass
class DatasetRef:
    name: str
    manifest: pa.Table  # good rows only
    eval_subsets: dict[str, tuple[int, ...]]  # first entry gives the headline mIoU
    # Per split, the rows with an error (recorded in the manifest) that were left out,
    # and the first of them ("path: error").
    skipped_by_split: dict[str, int]
    first_skipped: dict[str, str]

    @property
    def splits(self) -> list[str]:
        """The dataset's splits, those whose every image was left out as unusable too."""
        return sorted(set(self.manifest["split"].to_pylist()) | set(self.skipped_by_split))

    def check_split(self, split: str, key: str) -> None:
        """``split`` (the value of ``key``, a config key or flag) is one of the dataset's."""
        if split not in self.splits:
            raise ValueError(
                f"{key}: {split!r} is not a split of dataset {self.name}; it has "
                f"{', '.join(self.splits) or 'no images'}"
            )

    def skipped_in(self, split: str) -> int:
        return self.skipped_by_split.get(split, 0)

    @property
    def fingerprint(self) -> str:
        return manifest_fingerprint(self.manifest)

    def labelled(self, split: str) -> pa.Table | None:
        """The split's images that have a label (evaluation), None when none has one. In a
        partly labelled split (an incomplete copy of gtFine, say) the others are left out of
        evaluation: counted by ``unlabelled_in`` and warned about once."""
        if split not in self.splits:
            return None
        table = self.split(split)  # a split whose every image is unusable says so
        labelled = table.filter(pc.is_valid(table["label_path"]))
        if labelled.num_rows == 0:
            return None
        if labelled.num_rows < table.num_rows:
            first = table.filter(pc.is_null(table["label_path"]))["image_id"][0].as_py()
            _warn_unlabelled(self.name, split, table.num_rows - labelled.num_rows, first)
        return labelled

    def unlabelled_in(self, split: str) -> int:
        """The images of a partly labelled split that evaluation leaves out."""
        labelled = self.labelled(split)
        return 0 if labelled is None else self.split(split).num_rows - labelled.num_rows

    def with_eval_classes(self, names: list[str] | tuple[str, ...]) -> DatasetRef:
        """The same data scored over other class subsets (names of ``EVAL_SUBSETS``; the
        first gives the headline mIoU), e.g. Cityscapes over SYNTHIA's 16 and 13 classes."""
        if not isinstance(names, list | tuple) or not names or not set(names) <= set(EVAL_SUBSETS):
            raise ValueError(
                f"eval_classes: {names!r} is not allowed; expected a list of "
                f"{', '.join(EVAL_SUBSETS)} (the first gives the headline mIoU)"
            )
        return replace(self, eval_subsets={n: EVAL_SUBSETS[n] for n in names})

    def split(self, split: str) -> pa.Table:
        table = self.manifest.filter(pc.equal(self.manifest["split"], split))
        if table.num_rows == 0 and self.skipped_in(split):
            raise ValueError(
                f"dataset {self.name}: all {self.skipped_in(split)} images of split {split!r} "
                f"were left out as unusable (first: {self.first_skipped[split]})"
            )
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
    ok = table.filter(pc.is_null(table["error"]))
    bad = table.filter(pc.is_valid(table["error"]))
    skipped = Counter(bad["split"].to_pylist())
    first_skipped: dict[str, str] = {}
    for split, path, error in zip(
        bad["split"].to_pylist(),
        bad["image_path"].to_pylist(),
        bad["error"].to_pylist(),
        strict=True,
    ):
        first_skipped.setdefault(split, f"{path}: {error}")
    if skipped:
        first = next(iter(first_skipped.values()))
        _warn_left_out(name, tuple(sorted(skipped.items())), first)
    return DatasetRef(name, ok, subsets, dict(skipped), first_skipped)


@functools.lru_cache(maxsize=64)
def _warn_unlabelled(name: str, split: str, count: int, first: str) -> None:
    log.warning(
        "dataset %s: %d %s image(s) have no label and are left out of evaluation (first: %s)",
        name,
        count,
        split,
        first,
    )


@functools.lru_cache(maxsize=64)
def _warn_left_out(name: str, skipped: tuple[tuple[str, int], ...], first: str) -> None:
    """Once per dataset and process: the manifest's bad rows are left out of every stage."""
    counts = ", ".join(f"{n} of {split}" for split, n in skipped)
    log.warning("dataset %s: %s left out, as the manifest records (first: %s)", name, counts, first)


# A dataset YAML's `data:` section holds keys of the config's (so a whole config may
# serve as one); a key of neither is a typo to report, not to ignore. Of those, only the
# keys that say where the data is and what to score apply.
DATASET_KEYS = {f.name for f in fields(DataConfig)}
LOCATING_KEYS = ("kind", "root", "manifest", "eval_classes")


def read_dataset_yaml(data: str | Path) -> dict:
    """A dataset YAML's ``data:`` section, its ``root`` and ``manifest`` resolved against
    the YAML's folder and ``where`` set to the YAML's own location."""
    where = str(data) if storage.is_uri(str(data)) else str(Path(str(data)).expanduser())
    if not storage.exists(where):
        raise FileNotFoundError(f"dataset config {where} does not exist")
    document = read_yaml(storage.read_bytes(where), where) or {}
    spec = document.get("data") if isinstance(document, dict) else None
    if (
        not isinstance(spec, dict)
        or "kind" not in spec
        or not (spec.get("root") or spec.get("manifest"))
    ):
        raise ValueError(
            f"{where}: expected a `data:` section with `kind` and `root` (or `manifest`)"
        )
    unknown = sorted(set(spec) - DATASET_KEYS)
    if unknown:
        raise ValueError(
            f"{where}: data: unknown key(s) {', '.join(map(str, unknown))}; allowed: "
            f"{', '.join(sorted(DATASET_KEYS))}"
        )
    if spec["kind"] not in DATA_KINDS:
        raise ValueError(
            f"{where}: data.kind {spec['kind']!r} is not allowed; allowed: {', '.join(DATA_KINDS)}"
        )
    ignored = tuple(sorted(set(spec) - set(LOCATING_KEYS)))
    if ignored:
        _warn_not_applied(where, ignored)
    spec = {k: v for k, v in spec.items() if k in LOCATING_KEYS}
    for key in ("root", "manifest"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise ValueError(f"{where}: data.{key} {spec[key]!r} is not a path")
    if spec.get("manifest") and not storage.has_suffix(spec["manifest"], ".parquet"):
        raise ValueError(
            f"{where}: data.manifest {spec['manifest']} is not a .parquet manifest (a dataset "
            "folder goes in data.root)"
        )
    # A relative `root` or `manifest` is relative to the YAML's folder, not to the working
    # directory, so the file means the same from anywhere.
    located = {k: storage.beside(where, spec[k]) for k in ("root", "manifest") if spec.get(k)}
    return {**spec, **located, "where": where}


@functools.lru_cache(maxsize=64)
def _warn_not_applied(where: str, keys: tuple[str, ...]) -> None:
    """Once per file and process: a job reads its dataset YAML more than once."""
    log.warning(
        "%s: data: %s not applied: a dataset YAML given as --data says where the data is "
        "(%s); set the others in the --config YAML or with --set data.KEY=VALUE",
        where,
        ", ".join(keys),
        ", ".join(LOCATING_KEYS),
    )


def _location(spec: dict) -> str:
    return spec.get("manifest") or spec["root"]


def is_synthetic(data: str | Path) -> bool:
    """Whether ``data`` is a synthetic benchmark (itself or through a dataset YAML): the one
    kind of dataset that holds both domains."""
    if storage.has_suffix(data, ".yaml", ".yml"):
        data = _location(read_dataset_yaml(data))
    return (
        not storage.is_uri(str(data))
        and (Path(str(data)).expanduser() / "benchmark.json").is_file()
    )


def manifest_kind(table: pa.Table, data: str) -> str:
    """The one dataset kind of the manifest ``data`` (read as ``table``); cityscapes for an
    empty one. A manifest mixing kinds is refused: a dataset YAML names the kind."""
    kinds = sorted(set(table["dataset"].to_pylist()))
    if len(kinds) > 1:
        raise ValueError(
            f"{data}: the manifest mixes datasets ({', '.join(kinds)}); name the kind to "
            "evaluate it as in a dataset YAML (`data: {kind: ..., manifest: ...}`)"
        )
    return kinds[0] if kinds else "cityscapes"


def open_dataset(data: str | Path, domain: str = "target", kind: str | None = None) -> DatasetRef:
    """Open ``data`` (see module doc). ``domain`` picks the half of a synthetic benchmark."""
    path = Path(str(data)).expanduser()
    if storage.has_suffix(data, ".parquet"):
        table = read_manifest(str(data), include_errors=True)
        kind = kind or manifest_kind(table, str(data))
        if kind == "synthetic":  # its own classes are in the benchmark's benchmark.json
            log.warning(
                "%s: a synthetic benchmark's manifest is evaluated over all 19 classes; "
                "pass the benchmark directory for the benchmark's own",
                data,
            )
        return _ref(str(data), table, _subsets_for(kind))
    if path.is_dir() and (path / "benchmark.json").is_file():
        if domain not in ("source", "target"):
            raise ValueError(f"domain: {domain!r} is not allowed; allowed: source, target")
        info = load_benchmark_info(path)
        table = read_manifest(str(path / info["manifests"][domain]), include_errors=True)
        return _ref(f"synthetic:{domain}", table, {"synthetic": tuple(info["class_ids"])})
    if storage.has_suffix(data, ".yaml", ".yml"):
        spec = read_dataset_yaml(data)
        ref = open_dataset(_location(spec), domain, spec["kind"])
        # e.g. SYNTHIA -> Cityscapes scores Cityscapes on SYNTHIA's 16 and 13 classes.
        names = spec.get("eval_classes")
        if names is None:
            return ref
        try:
            return ref.with_eval_classes(names)
        except ValueError as e:
            raise ValueError(f"{spec['where']}: data.{e}") from None
    if kind is None:
        what = "a synthetic benchmark, a .parquet manifest or a .yaml dataset config"
        if not storage.exists(str(data)):
            raise FileNotFoundError(f"{data} does not exist; expected {what}")
        raise ValueError(
            f"{data}: not a synthetic benchmark (no benchmark.json), not a .parquet manifest "
            "and not a .yaml dataset config; a dataset root is given by a dataset YAML "
            "(`data: {kind: cityscapes, root: ...}`)"
        )
    # A Path would fold the "//" of s3://bucket/... URIs.
    root = str(data) if storage.is_uri(str(data)) else str(path)
    table = scan_dataset(kind, root)
    return _ref(f"{kind}:{root}", table, _subsets_for(kind))
