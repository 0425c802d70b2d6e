"""A scores directory as its readers see it: the table, each map found under the directory
it is read from, not where it was written (a directory may be copied or synced to a
bucket after scoring)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from sfda_ray import storage

# The source model with target BatchNorm statistics that scored, when scoring used AdaBN.
ADABN_FILE = "source_adabn.pt"
# Each map's path column in the table -> its file-name suffix.
MAP_SUFFIXES = {"pseudo_label_path": "label", "confidence_path": "conf", "uncertainty_path": "unc"}


def map_name(image_id: str, fingerprint: str, suffix: str) -> str:
    """A map's path under ``OUT/maps``: named by fingerprint too, so a rerun with other
    settings never overwrites the maps of rows it has not replaced yet."""
    return f"{image_id}_{fingerprint[:12]}_{suffix}.png"


def read_scores(scores: str) -> pa.Table:
    """``SCORES/scores.parquet`` with its map paths under ``SCORES/maps``."""
    table = storage.read_parquet(storage.join(scores, "scores.parquet"))
    maps = storage.join(scores, "maps")
    ids, fingerprints = table["image_id"].to_pylist(), table["fingerprint"].to_pylist()
    for column, suffix in MAP_SUFFIXES.items():
        written = table[column].to_pylist()
        here = [
            None if path is None else storage.join(maps, map_name(i, fp, suffix))
            for i, fp, path in zip(ids, fingerprints, written, strict=True)
        ]
        table = table.set_column(
            table.schema.get_field_index(column), column, pa.array(here, pa.string())
        )
    return table


def scored_rows(scores: str) -> pa.Table:
    """The rows of images that were scored (not those recorded with an error)."""
    table = read_scores(scores)
    return table.filter(pc.is_null(table["error"]))
