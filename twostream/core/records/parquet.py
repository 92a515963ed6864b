"""Parquet: rows numbered from 1, columns as stored. :func:`read_parquet` streams a batch of rows
at a time (memory bounded by the file's largest row group) with invalid UTF-8 in text and binary
columns replaced (U+FFFD) and counted; :func:`read_table` reads a whole file's bytes as stored
(a manifest refuses what the audit repairs)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from twostream import storage
from twostream.core.records.blocks import TRUNC, Chunk, repair_utf8
from twostream.core.timestamps import value_at


def _file(source: str | bytes) -> pq.ParquetFile:
    if isinstance(source, bytes):
        return pq.ParquetFile(pa.BufferReader(source))
    fs, path = storage.filesystem(source)
    return pq.ParquetFile(path, filesystem=fs)


def column_names(source: str | bytes) -> list[str]:
    """The names of a Parquet file's columns (its schema only is read)."""
    return _file(source).schema_arrow.names


def read_table(data: bytes) -> pa.Table:
    """A whole Parquet file's bytes -> its table, as stored."""
    return pq.read_table(io.BytesIO(data))


def read_parquet(source: str | bytes, columns: Sequence[str] | None = None) -> Iterator[Chunk]:
    """The rows of ``columns`` (default all) a batch at a time (see the module docstring)."""
    row = 1
    for batch in _file(source).iter_batches(batch_size=65536, columns=columns):
        table, invalid_utf8 = _repair_table(pa.Table.from_batches([batch]))
        n = table.num_rows

        def raw(k: int, _t=table) -> str:
            values = {name: value_at(_t.column(name), k) for name in _t.column_names}  # never raises
            return json.dumps(values, default=str, ensure_ascii=False)[:TRUNC]

        yield Chunk(table, np.arange(row, row + n, dtype=np.int64), raw, [], invalid_utf8)
        row += n


def _repair_table(table: pa.Table) -> tuple[pa.Table, int]:
    """String and binary columns as valid UTF-8 strings (invalid bytes replaced); the number of
    rows that had invalid UTF-8 in any of them. Only a column that fails validation is repaired
    value by value."""
    fixed_rows: set[int] = set()
    for i, f in enumerate(table.schema):
        large = pa.types.is_large_string(f.type) or pa.types.is_large_binary(f.type)
        if not (large or pa.types.is_string(f.type) or pa.types.is_binary(f.type)):
            continue
        raw = table.column(i).combine_chunks().cast(pa.large_binary() if large else pa.binary())
        try:
            column = raw.cast(pa.string())  # validates UTF-8
        except pa.ArrowInvalid:
            values = raw.to_pylist()
            fixed_rows.update(repair_utf8(values))
            column = pa.array(values, pa.binary()).cast(pa.string())
        table = table.set_column(i, f.name, column)
    return table, len(fixed_rows)
