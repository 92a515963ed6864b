"""Upload manifests: which source sent each image, and when.

A manifest is CSV, JSON Lines or Parquet (chosen by suffix: ``.csv``, ``.jsonl``/``.ndjson``/
``.json``, ``.parquet``/``.pq``), local or ``s3://``. Columns (case-insensitive, extra ones
ignored):

- ``image_id`` (or ``id``): the image's identity in the output. Required.
- ``key``: the input key the row describes (path relative to the input prefix without its
  extension, or a tar member's key). Optional.
- ``uri``: the object's full URI or path. Optional.
- ``source`` (or ``source_id``): who sent it (the uploader's IP in the paper); default ``unknown``.
- ``timestamp`` (or ``ts``, ``time``): upload time, seconds (float) or an ISO-8601 string;
  default 0.

An input matches a manifest row by ``key`` when that column exists, else by ``uri``, else by
``image_id == key``. Inputs with no row keep ``image_id = key`` and ``source = unknown``.
The table stays columnar (pyarrow) so that millions of rows cost tens of MB and it can be
shared read-only with every Ray task through the object store.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from twostream import storage

UNKNOWN_SOURCE = "unknown"
SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("timestamp", pa.float64()),
        ("key", pa.string()),
        ("uri", pa.string()),
    ]
)
_ALIASES = {
    "image_id": ("image_id", "id", "imageid"),
    "source": ("source", "source_id", "sourceid", "ip"),
    "timestamp": ("timestamp", "ts", "time"),
    "key": ("key",),
    "uri": ("uri", "url", "path"),
}


class ManifestError(ValueError):
    """The manifest cannot be read or lacks a required column."""


def _to_seconds(column: pa.ChunkedArray) -> pa.Array:
    if pa.types.is_timestamp(column.type):
        return pc.divide(pc.cast(column.cast(pa.timestamp("us")), pa.int64()), 1e6)
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
        return pc.cast(column, pa.float64())
    values = []
    for value in column.to_pylist():
        if value is None or value == "":
            values.append(None)
            continue
        try:
            values.append(float(value))
        except ValueError:
            try:
                values.append(datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp())
            except ValueError as exc:
                raise ManifestError(f"timestamp {value!r} is neither seconds nor ISO-8601") from exc
    return pa.array(values, pa.float64())


def normalise(table: pa.Table) -> pa.Table:
    """Rename aliases, coerce types and fill defaults: a table with :data:`SCHEMA`."""
    lower = {name.lower().strip(): name for name in table.column_names}
    columns = {}
    for target, aliases in _ALIASES.items():
        found = next((lower[a] for a in aliases if a in lower), None)
        columns[target] = table.column(found) if found is not None else None
    if columns["image_id"] is None:
        if columns["key"] is None:
            raise ManifestError(f"manifest needs an image_id (or key) column; has {table.column_names}")
        columns["image_id"] = columns["key"]
    n = table.num_rows
    out = {
        "image_id": pc.cast(columns["image_id"], pa.string()),
        "source": pc.fill_null(pc.cast(columns["source"], pa.string()), UNKNOWN_SOURCE)
        if columns["source"] is not None
        else pa.array([UNKNOWN_SOURCE] * n, pa.string()),
        "timestamp": pc.fill_null(_to_seconds(columns["timestamp"]), 0.0)
        if columns["timestamp"] is not None
        else pa.array(np.zeros(n), pa.float64()),
        "key": pc.cast(columns["key"], pa.string()) if columns["key"] is not None else pa.nulls(n, pa.string()),
        "uri": pc.cast(columns["uri"], pa.string()) if columns["uri"] is not None else pa.nulls(n, pa.string()),
    }
    result = pa.table(out, schema=SCHEMA)
    if result.column("image_id").null_count:
        raise ManifestError("manifest has rows without an image_id")
    return result


def read_manifest(uri: str) -> pa.Table:
    """Read and normalise a manifest (see the module docstring)."""
    data = storage.read_bytes(uri)
    name = str(uri).lower()
    try:
        if name.endswith((".parquet", ".pq")):
            table = pq.read_table(io.BytesIO(data))
        elif name.endswith((".jsonl", ".ndjson", ".json")):
            table = pajson.read_json(io.BytesIO(data))
        elif name.endswith((".csv", ".tsv")):
            options = pacsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",")
            convert = pacsv.ConvertOptions(
                column_types={c: pa.string() for c in ("image_id", "id", "key", "uri", "source", "source_id")}
            )
            table = pacsv.read_csv(io.BytesIO(data), parse_options=options, convert_options=convert)
        else:
            raise ManifestError(f"unknown manifest format for {uri!r} (use .csv, .jsonl or .parquet)")
    except pa.ArrowInvalid as exc:
        raise ManifestError(f"cannot parse manifest {uri}: {exc}") from exc
    return normalise(table)


class ManifestIndex:
    """Look up manifest rows for input keys/URIs (vectorised with pyarrow)."""

    def __init__(self, table: pa.Table | None) -> None:
        self.table = table
        if table is None:
            self.mode = None
        elif table.column("key").null_count < table.num_rows:
            self.mode = "key"
        elif table.column("uri").null_count < table.num_rows:
            self.mode = "uri"
        else:
            self.mode = "image_id"

    def lookup(
        self, keys: Sequence[str], uris: Sequence[str]
    ) -> tuple[list[str], list[str], list[float], list[bool]]:
        """(image_id, source, timestamp, matched) for each input."""
        n = len(keys)
        if self.table is None or n == 0:
            return list(keys), [UNKNOWN_SOURCE] * n, [0.0] * n, [False] * n
        probe = uris if self.mode == "uri" else keys
        column = self.table.column(self.mode)
        index = pc.index_in(pa.array(list(probe), pa.string()), value_set=column).to_pylist()
        if self.mode == "uri":  # also accept a manifest holding paths relative to the prefix
            missing = [k for k, i in enumerate(index) if i is None]
            if missing:
                tails = pc.index_in(pa.array([keys[k] for k in missing], pa.string()), value_set=column)
                for k, i in zip(missing, tails.to_pylist()):
                    index[k] = i
        ids = self.table.column("image_id")
        sources = self.table.column("source")
        stamps = self.table.column("timestamp")
        out_ids, out_src, out_ts, matched = [], [], [], []
        for k, i in enumerate(index):
            if i is None:
                out_ids.append(keys[k])
                out_src.append(UNKNOWN_SOURCE)
                out_ts.append(0.0)
                matched.append(False)
            else:
                out_ids.append(ids[i].as_py())
                out_src.append(sources[i].as_py())
                out_ts.append(float(stamps[i].as_py()))
                matched.append(True)
        return out_ids, out_src, out_ts, matched
