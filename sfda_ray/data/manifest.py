"""Parquet manifests: one row per image, the interface between every pipeline stage."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from sfda_ray import storage
from sfda_ray.data.labels import LABEL_FORMATS

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # stable, unique within a dataset
        pa.field("image_path", pa.string(), nullable=False),  # absolute local path or URI
        pa.field("label_path", pa.string()),
        pa.field("label_format", pa.string()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("dataset", pa.string(), nullable=False),
        pa.field("height", pa.int32()),  # null when the header could not be read
        pa.field("width", pa.int32()),
        pa.field("error", pa.string()),  # null when the row is usable
    ]
)


def to_manifest_table(
    table_or_rows: pa.Table | Iterable[Mapping[str, Any]], where: str = "manifest"
) -> pa.Table:
    """Validated table in MANIFEST_SCHEMA column order (extra columns are dropped); errors
    name ``where``, the column and the values at fault."""
    if not isinstance(table_or_rows, pa.Table):
        table_or_rows = pa.Table.from_pylist(list(table_or_rows), schema=MANIFEST_SCHEMA)
    missing = [n for n in MANIFEST_SCHEMA.names if n not in table_or_rows.column_names]
    if missing:
        raise ValueError(f"{where}: not a manifest, missing columns {missing}")
    columns = []
    for field in MANIFEST_SCHEMA:
        column = table_or_rows[field.name]
        if not field.nullable and column.null_count:
            raise ValueError(f"{where}: column {field.name!r} has {column.null_count} null values")
        try:
            columns.append(column.cast(field.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"{where}: column {field.name!r} is not {field.type}: {e}") from None
    table = pa.Table.from_arrays(columns, schema=MANIFEST_SCHEMA)
    for name in _OPTIONAL_TEXT:  # "" as CSV exports write a missing value: no value
        column = table[name]
        no_value = pa.scalar(None, pa.string())
        table = table.set_column(
            table.schema.get_field_index(name),
            name,
            pc.if_else(pc.equal(column, ""), no_value, column),
        )
    _check_rows(table, where)
    return table


_OPTIONAL_TEXT = ("label_path", "label_format", "error")


def _check_rows(table: pa.Table, where: str) -> None:
    """What every stage relies on: unique ids that are safe in file names, and a known
    label format wherever a label is named."""
    ids = table["image_id"].to_pylist()
    repeated = [i for i, n in Counter(ids).items() if n > 1]
    if repeated:
        raise ValueError(
            f"{where}: image_id must be unique; {len(repeated)} repeated, e.g. {repeated[:3]}"
        )
    unsafe = [i for i in ids if ".." in i.split("/") or i.startswith("/")]
    if unsafe:
        raise ValueError(
            f"{where}: image_id must be a relative name without '..', e.g. {unsafe[:3]}"
        )
    usable = table.filter(pc.is_null(table["error"]))
    unsized = [
        i
        for i, h, w in zip(
            usable["image_id"].to_pylist(),
            usable["height"].to_pylist(),
            usable["width"].to_pylist(),
            strict=True,
        )
        if not (h and w and h > 0 and w > 0)
    ]
    if unsized:
        raise ValueError(
            f"{where}: a usable row (error null) needs its image's height and width; "
            f"{len(unsized)} have none, e.g. {unsized[:3]}"
        )
    for path, fmt in zip(
        usable["label_path"].to_pylist(), usable["label_format"].to_pylist(), strict=True
    ):
        if path is not None and fmt not in LABEL_FORMATS:
            raise ValueError(
                f"{where}: label_format {fmt!r} (of {path}) is not one of "
                f"{', '.join(LABEL_FORMATS)}"
            )


def write_manifest(
    table_or_rows: pa.Table | Iterable[Mapping[str, Any]], path: str | os.PathLike
) -> None:
    """Validate and write atomically, so readers never see a half-written manifest."""
    table = to_manifest_table(table_or_rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    storage.atomic_write_bytes(path, sink.getvalue().to_pybytes())


def read_manifest(
    path: str | os.PathLike, split: str | None = None, include_errors: bool = False
) -> pa.Table:
    """Rows of one split (or all); rows with an ``error`` are skipped unless asked for."""
    if not storage.exists(path):
        raise FileNotFoundError(f"manifest not found: {path}")
    fs, p = storage.resolve(path)
    try:
        table = pq.read_table(p, filesystem=fs)
    except pa.ArrowInvalid as e:
        raise ValueError(f"{path}: not a Parquet manifest ({e})") from e
    table = _located(to_manifest_table(table, str(path)), str(path))
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    if not include_errors:
        table = table.filter(pc.is_null(table["error"]))
    return table


def _located(table: pa.Table, manifest: str) -> pa.Table:
    """A relative ``image_path`` or ``label_path`` (a hand-made manifest) is relative to
    the manifest's folder, not to the working directory: Ray Tune trials and Train workers
    each run in one of their own, where it would name no file."""
    for name in ("image_path", "label_path"):
        paths = table[name].to_pylist()
        located = [p if p is None else storage.beside(manifest, p) for p in paths]
        if located != paths:
            index = table.schema.get_field_index(name)
            table = table.set_column(
                index, table.schema.field(name), pa.array(located, pa.string())
            )
    return table


def error_reason(error: str) -> str:
    """The category of an error message: the text before the first ': '."""
    return error.split(": ", 1)[0]


def summarize(table: pa.Table) -> dict[str, Any]:
    """Counts of usable and skipped rows, with skipped rows grouped by reason."""
    errors = [e for e in table["error"].to_pylist() if e is not None]
    return {
        "total": table.num_rows,
        "ok": table.num_rows - len(errors),
        "skipped": len(errors),
        "reasons": dict(Counter(error_reason(e) for e in errors).most_common()),
    }
