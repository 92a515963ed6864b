"""One entry point over every format: :func:`read_chunks` streams any file of upload records as
:class:`~twostream.core.records.blocks.Chunk` s."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from twostream.core.records.blocks import Chunk
from twostream.core.records.clf import read_clf
from twostream.core.records.delimited import read_delimited
from twostream.core.records.formats import FORMATS
from twostream.core.records.jsonl import read_jsonl
from twostream.core.records.parquet import read_parquet


def read_chunks(source: str | bytes, fmt: str, block_bytes: int = 8 << 20, max_line_bytes: int | None = None,
                columns: Sequence[str] | None = None) -> Iterator[Chunk]:
    """The records of ``source`` (a URI, decompressed by its suffix, or its content as bytes) in
    format ``fmt`` (one of :data:`~twostream.core.records.formats.FORMATS`) a block at a time.
    Text formats: blocks of ``block_bytes``, a line longer than ``max_line_bytes`` (default the
    block size) a bad line; Parquet: only ``columns`` (default all) are read."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt == "parquet":
        return read_parquet(source, columns)
    if fmt in ("csv", "tsv"):
        return read_delimited(source, "\t" if fmt == "tsv" else ",", block_bytes, max_line_bytes)
    if fmt == "jsonl":
        return read_jsonl(source, block_bytes, max_line_bytes)
    return read_clf(source, block_bytes, max_line_bytes)
