"""twostream.storage against a real S3-speaking server on 127.0.0.1 (moto_server)."""

from __future__ import annotations

import os

import pyarrow as pa
import pytest

from conftest import local_s3_env
from twostream import storage


@pytest.fixture(scope="module")
def s3():
    with local_s3_env("storage-test") as store:
        yield store


def test_read_list_exists(s3):
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint)
    for key in ("p/a.jpg", "p/sub/b.png", "p/c.txt", "q/d.jpg"):
        client.put_object(Bucket="storage-test", Key=key, Body=key.encode())
    assert storage.list_files("s3://storage-test/p") == [
        "s3://storage-test/p/a.jpg", "s3://storage-test/p/c.txt", "s3://storage-test/p/sub/b.png"]
    assert storage.list_files("s3://storage-test/p", (".jpg", ".PNG")) == [
        "s3://storage-test/p/a.jpg", "s3://storage-test/p/sub/b.png"]
    assert storage.read_bytes("s3://storage-test/p/sub/b.png") == b"p/sub/b.png"
    assert storage.exists("s3://storage-test/q/d.jpg") and not storage.exists("s3://storage-test/q/zz")
    assert storage.join("s3://storage-test/p/", "x", "y.json") == "s3://storage-test/p/x/y.json"
    with pytest.raises(FileNotFoundError):
        storage.list_files("s3://storage-test/none")


def test_write_roundtrip(s3):
    """Whole-object writes, small (one PutObject) and over boto3's multipart threshold (8 MiB): the
    multipart upload that pyarrow's own writer cannot complete against moto 5.2.x
    (getmoto/moto#10055, see twostream/storage), read back through pyarrow."""
    os.environ["TWOSTREAM_S3_RETRIES"] = "2"  # fail fast if the server mis-answers
    try:
        storage.write_bytes("s3://storage-test/w/out.bin", b"x" * 1000)
        big = os.urandom(9 << 20)
        storage.write_bytes("s3://storage-test/w/big.bin", big)
    finally:
        os.environ.pop("TWOSTREAM_S3_RETRIES", None)
    assert storage.read_bytes("s3://storage-test/w/out.bin") == b"x" * 1000
    assert storage.read_bytes("s3://storage-test/w/big.bin") == big
    table = pa.table({"a": list(range(1000))})
    storage.write_parquet(table, "s3://storage-test/w/t.parquet")
    assert storage.read_parquet("s3://storage-test/w/t.parquet").equals(table)
    storage.remove("s3://storage-test/w/t.parquet")
    storage.remove("s3://storage-test/w/t.parquet")  # gone already: no error
    assert not storage.exists("s3://storage-test/w/t.parquet")


def test_many_keys_paged_listing(s3):
    import boto3

    client = boto3.client("s3", endpoint_url=s3.endpoint)
    for i in range(1100):  # more than one ListObjectsV2 page (1000)
        client.put_object(Bucket="storage-test", Key=f"many/{i:05d}.jpg", Body=b"")
    assert len(storage.list_files("s3://storage-test/many")) == 1100


def test_upload_reads_are_raw_bounded_and_never_block(tmp_path):
    """``read_bytes`` with a limit: the bytes as stored (a .gz is not decompressed), at most the
    limit (one byte over is refused, however large the file), and a FIFO where a file was listed
    is refused at once instead of blocking the reader."""
    import gzip
    import os

    import pytest

    packed = gzip.compress(bytes(1 << 20))
    (tmp_path / "a.png.gz").write_bytes(packed)
    assert storage.read_bytes(str(tmp_path / "a.png.gz")) == packed
    assert storage.read_bytes(str(tmp_path / "a.png.gz"), len(packed)) == packed
    with pytest.raises(storage.TooLargeError, match=f"^file too large: more than {len(packed) - 1} bytes$"):
        storage.read_bytes(str(tmp_path / "a.png.gz"), len(packed) - 1)
    os.mkfifo(tmp_path / "pipe.jpg")
    with pytest.raises(OSError, match="not a regular file"):
        storage.read_bytes(str(tmp_path / "pipe.jpg"), 100)
