"""Ray-free stage helpers of the batch job: input planning, tar/loose reading, manifests,
identity, reputation sharding, and the pinned output schemas (SPEC 6, docs/batch.md)."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pytest

from twostream.batch import outputs, planning, reputation
from twostream.core.config import ReputationConfig
from twostream.batch.manifest import ManifestError, match, normalise, read_manifest
from twostream.core.reputation import Upload, replay


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def _rows(plan, max_bytes=10**9):
    return [planning.attach_identity(r) for u in planning.work_units(plan.shards, 3)
            for r in planning.read_unit(u, max_bytes)]


def test_plan_and_read(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(5):
        (tmp_path / "a" / f"x{i}.jpg").write_bytes(b"img%d" % i)
    (tmp_path / "a" / "x1.json").write_text(json.dumps({"source": "s9", "timestamp": 4}))
    (tmp_path / "a" / "readme.txt").write_bytes(b"hello")
    (tmp_path / "_hidden").write_bytes(b"x")
    _tar(tmp_path / "s.tar", [("k1.jpg", b"one"), ("k1.json", b'{"source": "t"}'), ("k2.png", b"two"),
                              ("k3.json", b"{}")])
    plan = planning.plan_input(str(tmp_path), files_per_shard=4)
    assert [s.kind for s in plan.shards] == ["tar", "files", "files"]
    again = planning.plan_input(str(tmp_path), 4)
    assert [s.to_json() for s in again.shards] == [s.to_json() for s in plan.shards]
    rows = _rows(plan)
    keys = {r["key"]: r for r in rows}
    assert len(keys) == len(rows) == plan.rows
    assert set(keys) == {"s.tar#k1.jpg", "s.tar#k2.png", "s.tar#k3.json", "_hidden", "a/readme.txt",
                         *(f"a/x{i}.jpg" for i in range(5))}
    assert keys["s.tar#k3.json"]["read_error"].startswith("sidecar without its file")
    assert keys["s.tar#k1.jpg"]["data"] == b"one" and keys["s.tar#k1.jpg"]["uri"].endswith("s.tar#k1.jpg")
    assert keys["a/readme.txt"]["data"] == b"hello"  # a non-image is an input (an error row later)
    assert (keys["a/x1.jpg"]["source"], keys["a/x1.jpg"]["timestamp"]) == ("s9", 4.0)
    assert (keys["s.tar#k1.jpg"]["source"], keys["s.tar#k2.png"]["source"]) == ("t", "unknown")
    assert keys["a/x2.jpg"]["image_id"] == "a/x2.jpg"


def test_truncated_tar_and_oversize(tmp_path):
    _tar(tmp_path / "s.tar", [("k1.jpg", b"1" * 3000), ("k2.jpg", b"2" * 3000)])
    data = (tmp_path / "s.tar").read_bytes()
    (tmp_path / "s.tar").write_bytes(data[:2000])  # k1's data cut off; k2 gone
    rows = _rows(planning.plan_input(str(tmp_path)))
    assert [(r["key"], r["read_error"]) for r in rows] == [
        ("s.tar#k1.jpg", "truncated tar member: 1488 of 3000 bytes present")]
    (tmp_path / "s.tar").unlink()
    (tmp_path / "big.jpg").write_bytes(b"x" * 100)
    rows = _rows(planning.plan_input(str(tmp_path)), max_bytes=10)
    assert rows[0]["read_error"] == "file too large: 100 bytes > limit 10"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_manifest_formats(tmp_path, fmt):
    rows = [{"image_id": "i1", "key": "a/x1", "source": "s1", "timestamp": "2024-01-01T00:00:00Z"},
            {"image_id": "i2", "key": "a/x2.png", "source": "s2", "timestamp": "12.5"}]
    path = tmp_path / f"m.{fmt}"
    if fmt == "csv":
        path.write_text("image_id,key,source,timestamp\n" + "".join(
            f"{r['image_id']},{r['key']},{r['source']},{r['timestamp']}\n" for r in rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    table, _ = read_manifest(str(path))
    found = match(table, ["a/x2.png", "a/x1.jpg", "zz"], ["", "", ""])  # a/x1: the stem of a/x1.jpg
    assert found.rows == [1, 0, -1] and found.unmatched == 0
    assert table.column("source").to_pylist() == ["s1", "s2"]
    assert table.column("timestamp").to_pylist() == [1704067200.0, 12.5]


def test_manifest_by_uri_and_errors():
    table = normalise(pa.table({"id": ["a"], "uri": ["s3://b/in/x.jpg"], "ip": ["1.2.3.4"]}))
    assert match(table, ["x.jpg"], ["s3://b/in/x.jpg"]).rows == [0]
    assert table.column("source").to_pylist() == ["1.2.3.4"]
    with pytest.raises(ManifestError):
        normalise(pa.table({"source": ["s"]}))


def test_reputation_shard_is_stable_and_spread():
    assert reputation.reputation_shard("10.0.0.1", 8) == reputation.reputation_shard("10.0.0.1", 8)
    counts = [0] * 8
    for i in range(4000):
        counts[reputation.reputation_shard(f"10.0.{i // 256}.{i % 256}", 8)] += 1
    assert min(counts) > 350  # no shard is a hot spot


def test_sharded_replay_equals_global_replay():
    """Each partition's columnar reduce answers its events as the global replay does (more cases:
    tests/batch/test_reputation.py)."""
    import random

    rnd = random.Random(0)
    uploads = [Upload(f"s{rnd.randrange(20)}", float(rnd.randrange(50)), f"i{k}", rnd.random() < 0.4,
                      "cat") for k in range(600)]
    want, ledger = replay(uploads, ReputationConfig())
    events = pa.table({"source": [u.source for u in uploads], "timestamp": [u.timestamp for u in uploads],
                       "image_id": [u.image_id for u in uploads], "rejected": [u.rejected for u in uploads],
                       "error": [False] * 600, "shard": [0] * 600, "row": list(range(600))},
                      schema=reputation.EVENTS_SCHEMA)
    for parts in (1, 3, 7):
        for part in reputation.partition(events, parts):
            table, got = reputation.reduce_partition(part, None, ReputationConfig())
            for r in got.to_pylist():
                assert (r["cc"], r["blacklisted"]) == (want[r["row"]].cc, want[r["row"]].blacklisted)
            for row in table.to_pylist():
                st = ledger.get(row["source"])
                assert (row["cc"], row["blacklisted"], row["images"]) == (st.cc, st.blacklisted, st.images)


def test_output_schemas_are_pinned():
    """The documented schema (docs/batch.md): change both together."""
    assert [(f.name, str(f.type)) for f in outputs.IMAGES_SCHEMA] == [
        ("image_id", "string"), ("key", "string"), ("uri", "string"), ("shard", "string"),
        ("source", "string"), ("timestamp", "double"), ("width", "int32"), ("height", "int32"),
        ("verdict", "string"), ("label", "string"), ("imagenet_index", "int32"),
        ("agreement", "double"), ("high_idx", "list<item: int32>"),
        ("high_prob", "list<item: float>"), ("high_labels", "list<item: string>"),
        ("low_idx", "list<item: int32>"), ("low_prob", "list<item: float>"),
        ("low_labels", "list<item: string>"), ("error", "string"), ("query_matches", "list<item: string>"),
        ("response", "string"),
        ("cc", "int32"), ("blacklisted", "bool"),
    ]
    assert [(f.name, str(f.type)) for f in outputs.SOURCES_SCHEMA] == [
        ("source", "string"), ("images", "int64"), ("rejected", "int64"), ("blocked", "int64"),
        ("errors", "int64"), ("cc", "int32"), ("blacklisted", "bool"), ("first_seen", "double"),
        ("last_seen", "double"),
        ("blacklist_intervals", "list<item: struct<joined: double, left: double>>"),
        ("times_blacklisted", "int32"),
    ]


def test_shard_chunks_group_shards_by_their_rows_in_the_given_order():
    def shards(*rows):
        return [planning.Shard(f"s{k}", "tar", rows=n) for k, n in enumerate(rows)]

    # rows 400, 300, 300, 1000 (a tar shard of 1,000 members), 0, 200 at 1,000 rows a task
    six = shards(400, 300, 300, 1000, 0, 200)
    assert planning.shard_chunks(six, 1000) == [[0, 1, 2], [3, 4], [5]]
    # in a given order: 200 + 300 + 400 = 900, then 1000 alone, then 300 + 0
    assert planning.shard_chunks(six, 1000, [5, 1, 0, 3, 2, 4]) == [[5, 1, 0], [3], [2, 4]]
    # a shard larger than a task is a task of its own; no shards, no tasks
    assert planning.shard_chunks(shards(5, 50, 5), 10) == [[0], [1], [2]]
    assert planning.shard_chunks([], 1000) == []
