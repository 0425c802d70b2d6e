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
_REQUIRED = [f.name for f in MANIFEST_SCHEMA if not f.nullable]


def to_manifest_table(table_or_rows: pa.Table | Iterable[Mapping[str, Any]]) -> pa.Table:
    """Validated table in MANIFEST_SCHEMA column order (extra columns are dropped)."""
    if isinstance(table_or_rows, pa.Table):
        missing = [n for n in MANIFEST_SCHEMA.names if n not in table_or_rows.column_names]
        if missing:
            raise ValueError(f"manifest table is missing columns {missing}")
        table = table_or_rows.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    else:
        table = pa.Table.from_pylist(list(table_or_rows), schema=MANIFEST_SCHEMA)
    for name in _REQUIRED:
        if table[name].null_count:
            raise ValueError(f"manifest column {name!r} has {table[name].null_count} null values")
    return table


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
    missing = [n for n in MANIFEST_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not a manifest, missing columns {missing}")
    table = table.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    if split is not None:
        table = table.filter(pc.equal(table["split"], split))
    if not include_errors:
        table = table.filter(pc.is_null(table["error"]))
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
