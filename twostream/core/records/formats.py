"""Which format a file of records is in, from its name, and its bytes decompressed.

The suffix names the format, after any compression suffix (``.gz``, ``.bz2``, ``.zst``,
``.lz4``), which names the codec: ``.csv``; ``.tsv``; ``.jsonl``, ``.ndjson``, ``.json``;
``.parquet``, ``.pq``; ``.log``, ``.txt`` or a file name with ``access`` in it: a web server's
access log (common/combined log format).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

import pyarrow as pa

from twostream import storage

FORMATS = ("csv", "tsv", "jsonl", "parquet", "clf")


class RecordsError(ValueError):
    """A file of records cannot be read at all (its header, say); the message names the line."""


COMPRESSION = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".lz4": "lz4"}  # suffix -> Arrow codec


def compression(uri: str) -> str | None:
    """The Arrow codec the name's suffix says (``a.csv.gz`` -> ``gzip``); None when uncompressed."""
    name = str(uri).lower()
    return next((codec for suffix, codec in COMPRESSION.items() if name.endswith(suffix)), None)


def detect_format(uri: str) -> str | None:
    """The format of ``uri`` from its name (compression suffixes ignored); None when unclear."""
    name = str(uri).lower()
    for suffix in COMPRESSION:
        name = name.removesuffix(suffix)
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".log", ".txt")) or "access" in name.rsplit("/", 1)[-1]:
        return "clf"
    return None


def decompress(data: bytes, uri: str) -> bytes:
    """A file's bytes, as read, -> its content (decompressed when its name says so)."""
    codec = compression(uri)
    if codec is None:
        return data
    with pa.CompressedInputStream(pa.BufferReader(data), codec) as stream:
        return stream.read()


@contextmanager
def open_stream(source: str | bytes) -> Iterator[BinaryIO]:
    """A readable stream of ``source``'s content: a URI (decompressed by its suffix) or bytes."""
    if isinstance(source, bytes):
        with pa.BufferReader(source) as stream:
            yield stream
        return
    fs, path = storage.filesystem(source)
    with fs.open_input_stream(path, compression="detect") as stream:
        yield stream
