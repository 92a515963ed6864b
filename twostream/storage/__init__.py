"""Object storage by URI: local paths and ``s3://bucket/key``, through pyarrow filesystems.

S3 reads and listings use pyarrow's S3FileSystem (the AWS C++ SDK); whole-object writes use
boto3's managed upload (one PutObject, multipart above 8 MiB). Both take the standard AWS
credential chain and region lookup; an S3-compatible endpoint (MinIO, moto, ...) comes from
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``). Transient S3 errors are retried by the
SDKs' standard retry strategy (``TWOSTREAM_S3_RETRIES`` attempts, default 8).

Why boto3 for writes: every object this package writes is built in memory first, so nothing
is lost by handing the bytes to boto3, and its multipart path is the one that can be tested
locally: the local S3 server (moto 5.2.x) answers CompleteMultipartUpload with a wrong XML root
element (getmoto/moto#10055), which the AWS C++ SDK inside pyarrow rejects and botocore accepts;
on AWS both work.
"""

from __future__ import annotations

import errno
import io
import os
import posixpath
import stat
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

S3_PREFIX = "s3://"


def is_s3(uri: str) -> bool:
    return str(uri).startswith(S3_PREFIX)


def s3_endpoint() -> str | None:
    """The S3 endpoint override from the environment, if any."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, retries: int) -> pafs.S3FileSystem:
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=retries)}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
        kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        kwargs["allow_bucket_creation"] = True
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def _retries() -> int:
    return int(os.environ.get("TWOSTREAM_S3_RETRIES", "8"))


def _region() -> str | None:
    return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")


@lru_cache(maxsize=8)
def _s3_client(endpoint: str | None, region: str | None, retries: int):
    import boto3
    from botocore.config import Config

    config = Config(retries={"max_attempts": retries, "mode": "standard"})
    return boto3.client("s3", endpoint_url=endpoint, region_name=region, config=config)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for ``uri`` and the path inside it."""
    uri = str(uri)
    if is_s3(uri):
        return _s3_filesystem(s3_endpoint(), _region(), _retries()), uri[len(S3_PREFIX) :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"unsupported URI scheme in {uri!r} (use a local path or s3://)")
    return pafs.LocalFileSystem(), str(Path(uri.removeprefix("file://")).resolve())


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an S3 URI."""
    if is_s3(uri):
        return S3_PREFIX + posixpath.join(str(uri)[len(S3_PREFIX) :].rstrip("/"), *parts)
    return str(Path(uri, *parts))


class TooLargeError(OSError):
    """An object holds more than the bytes a read allows; the message says how many."""


READ_CHUNK = 1 << 20
PATH_MAX = os.pathconf("/", "PC_PATH_MAX") if hasattr(os, "pathconf") else 4096  # the kernel's path limit  # bytes per read call when a limit applies


# Magic bytes of compressed data (none is a prefix of an accepted image format's signature).
COMPRESSED_MAGIC = (
    (b"\x1f\x8b", "gzip"),
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x04\x22\x4d\x18", "lz4"),
    (b"PK\x03\x04", "zip"),
)


def compressed_kind(data: bytes) -> str | None:
    """The compression whose magic bytes ``data`` starts with (``gzip``, ``bzip2``, ``zstd``,
    ``xz``, ``lz4``, ``zip``), else None. Brotli has no magic bytes: never recognised."""
    for magic, name in COMPRESSED_MAGIC:
        if data.startswith(magic):
            return name
    return None


def open_local(path: str | bytes, flags: int = os.O_RDONLY) -> int:
    """``os.open`` of a local path, also past the kernel's path-length limit (``PATH_MAX``):
    then opened a folder at a time, each relative to the one before (``dir_fd``), links not
    followed on the way. Returns the file descriptor."""
    try:
        return os.open(path, flags | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    parts = [p for p in os.fsencode(path).split(b"/") if p]
    fd = os.open(b"/" if os.fsencode(path).startswith(b"/") else b".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def _open_regular(path: str) -> int:
    """:func:`open_local` of a file that must be a regular file (an upload: a FIFO put in its
    place must not block the reader); raises ``OSError`` otherwise."""
    fd = open_local(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"not a regular file: {path}")
    os.set_blocking(fd, True)
    return fd


def open_input_file(uri: str) -> pa.NativeFile:
    """A seekable reader of the object's raw bytes (never decompressed); local paths of any
    length (:func:`open_local`)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem) and len(os.fsencode(path)) >= PATH_MAX:
        return pa.PythonFile(os.fdopen(open_local(path), "rb"), mode="r")
    return fs.open_input_file(path)  # (pyarrow's native reader: faster for tarfile's many small reads)


def read_bytes(uri: str, max_bytes: int | None = None) -> bytes:
    """The object's bytes as stored: never decompressed (pyarrow's input *streams* decompress by
    extension, ``.gz .bz2 .zst .lz4 .br``; this reads the raw file). ``max_bytes``: read at most
    that many bytes plus one, whatever the listing said, and raise :class:`TooLargeError` when
    there are more; with ``max_bytes``, a local path must be a regular file. Local paths of any
    length (:func:`open_local`)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        stream = open(_open_regular(path) if max_bytes is not None else open_local(path), "rb")  # noqa: SIM115
    else:
        stream = fs.open_input_stream(path, compression=None)
    with stream:
        if max_bytes is None:
            return stream.read()
        return read_limited(stream, max_bytes)


def read_limited(handle, max_bytes: int) -> bytes:
    """The bytes of a file-like ``handle`` from where it stands to its end, reading
    ``max_bytes + 1`` at most; raises :class:`TooLargeError` when there are more than
    ``max_bytes``."""
    parts, held = [], 0
    while held <= max_bytes:
        chunk = handle.read(min(READ_CHUNK, max_bytes + 1 - held))
        if not chunk:
            break
        parts.append(chunk)
        held += len(chunk)
    if held > max_bytes:
        raise TooLargeError(f"file too large: more than {max_bytes} bytes")
    return b"".join(parts)


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object: on S3 with boto3 (see the module docstring); local writes go through
    a temporary file and a rename."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
        return
    bucket, _, key = path.partition("/")
    _s3_client(s3_endpoint(), _region(), _retries()).upload_fileobj(io.BytesIO(data), bucket, key)


def remove(uri: str) -> None:
    """Delete one object or file (no error when it does not exist)."""
    fs, path = filesystem(uri)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All files under ``uri`` (recursive), as URIs of the same kind, sorted.

    ``uri`` may also name a single file. ``suffixes`` filters by lower-cased extension.
    """
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or prefix: {uri}")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = [i for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if i.is_file]
    base = S3_PREFIX if is_s3(uri) else ""
    found = [base + i.path for i in infos]
    if suffixes:
        found = [f for f in found if f.lower().endswith(tuple(s.lower() for s in suffixes))]
    return sorted(found)


def write_parquet(table: pa.Table, uri: str, compression: str = "snappy", row_group_size: int | None = None) -> None:
    """Write ``table`` as one Parquet object at ``uri`` (whole-object write, see :func:`write_bytes`)."""
    write_parquet_parts([table], table.schema, uri, compression, row_group_size)


def write_parquet_parts(tables: Iterable[pa.Table], schema: pa.Schema, uri: str, compression: str = "snappy",
                        row_group_size: int | None = None) -> None:
    """Write ``tables`` one after another as one Parquet object, without holding them at once
    (the encoded file is what is held, for the whole-object write of :func:`write_bytes`)."""
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, schema, compression=compression) as writer:
        for table in tables:
            writer.write_table(table, row_group_size=row_group_size)
    write_bytes(uri, sink.getvalue())


def iter_parquet(uri: str, batch_size: int) -> Iterator[pa.RecordBatch]:
    """One Parquet object's rows ``batch_size`` at a time (memory bounded by a row group)."""
    with open_input_file(uri) as handle:
        yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_size)


def read_parquet(uri: str) -> pa.Table:
    """Read one Parquet object (schema metadata kept)."""
    return pq.read_table(io.BytesIO(read_bytes(uri)))
