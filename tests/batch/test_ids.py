"""Keys, URIs and image ids unique over the whole input, by construction (issue 29), and uploads
read as stored: the batch job's Ray-free path over a folder (planning, reading, decoding, both
streams, Algorithm 1, then the image-id check of :mod:`twostream.batch.ids`), with the expected
rows worked out by hand; a generated test over names at the planning level."""

from __future__ import annotations

import bz2
import gzip
import json
import os
import tempfile
import urllib.parse

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.batch.test_hostile_inputs import SMALL, _jpeg, _tar_bytes
from twostream.batch import ids, planning, stages
from twostream.core.config import load_config
from twostream.core.scoring import input_spec

LIMIT = 1 << 20  # limits.max_bytes in these runs


def _job(folder, cfg) -> dict[str, dict]:
    """Phase 1 over every shard, then the image-id check: the rows by key."""
    specs = {kind: input_spec(cfg, kind) for kind in stages.KINDS}
    plan = planning.plan_input(str(folder))
    stagings = {}
    for shard in plan.shards:
        blocks = [b for u in planning.work_units([shard], 256) for b in stages.read_decode(u, cfg, specs)]
        table = pa.concat_tables(blocks)
        for kind in stages.KINDS:
            table = stages.StreamStage(cfg, kind)(table)
        stagings[shard.shard_id] = stages.compare(table, cfg)
    rows = [r for t in ids.resolve(stagings).values() for r in t.to_pylist()]
    assert len(rows) == plan.rows
    return {r["key"]: r for r in rows}


def _deep(root, depth: int, name: str, data: bytes, *more: tuple[str, bytes]) -> str:
    """Write ``data`` at ``root/d.../name`` (and ``more`` files beside it), ``depth`` folders of
    200 characters (past PATH_MAX); returns the first file's path relative to ``root``."""
    fd = os.open(root, os.O_RDONLY)
    for _ in range(depth):
        os.mkdir("d" * 200, dir_fd=fd)
        nxt = os.open("d" * 200, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nxt
    for file, blob in ((name, data), *more):
        out = os.open(file, os.O_WRONLY | os.O_CREAT, dir_fd=fd)
        os.write(out, blob)
        os.close(out)
    os.close(fd)
    return "/".join(["d" * 200] * depth + [name])


def test_colliding_names_each_get_their_own_row(tmp_path):
    """Every collision of issue 29 in one folder, run as the job runs it."""
    root = tmp_path / "in"
    root.mkdir()
    img = {k: _jpeg((24, 24), seed=k) for k in range(12)}
    # a loose file named like a tar member's URI, beside that tar
    (root / "x.tar#a.jpg").write_bytes(img[0])
    (root / "x.tar").write_bytes(_tar_bytes([("a.jpg", img[1])]))
    # a loose file and members of two tars with the same name
    (root / "a.jpg").write_bytes(img[2])
    (root / "y.tar").write_bytes(_tar_bytes([("a.jpg", img[3])]))
    # one name three times in a tar, beside an innocent member named like the old renamed copy
    (root / "t.tar").write_bytes(_tar_bytes([("d.jpg", img[4]), ("d.jpg", img[5]), ("d.jpg~2", img[6]),
                                             ("d.jpg", img[7])]))
    # three sidecars claiming one image id, and one claiming another input's key
    for name, seed, ts in (("s1.jpg", 8, 30), ("s2.jpg", 9, 10), ("s3.jpg", 10, 10)):
        (root / name).write_bytes(img[seed])
        (root / f"{name}.json").write_text(json.dumps({"image_id": "SAME", "timestamp": ts}))
    (root / "k.jpg").write_bytes(img[11])
    (root / "k.jpg.json").write_text(json.dumps({"image_id": "a.jpg"}))
    # names holding the escape characters
    (root / "p%23q.jpg").write_bytes(img[0])
    (root / "p#q.jpg").write_bytes(img[1])
    # an image and a tar past the path-length limit
    deep = _deep(root, 21, "deep.jpg", img[2], ("deep.tar", _tar_bytes([("in.jpg", img[3])])))
    assert len(str(root / deep)) > 4096

    rows = _job(root, load_config(None, SMALL + [f"limits.max_bytes={LIMIT}"]))
    same = ("image id 'SAME' claimed by its sidecar or manifest row is also claimed by s2.jpg, which keeps it "
            "(first in (timestamp, key) order)")
    want = {  # key: (image_id, uri relative to the input, error)
        "x.tar%23a.jpg": ("x.tar%23a.jpg", "x.tar%23a.jpg", None),
        "x.tar#a.jpg": ("x.tar#a.jpg", "x.tar#a.jpg", None),
        "a.jpg": ("a.jpg", "a.jpg", None),
        "y.tar#a.jpg": ("y.tar#a.jpg", "y.tar#a.jpg", None),
        "t.tar#d.jpg": ("t.tar#d.jpg", "t.tar#d.jpg", None),
        "t.tar#d.jpg#2": ("t.tar#d.jpg#2", "t.tar#d.jpg#2", "tar member name 'd.jpg' is stored 3 times in t.tar: "
                                                            "this is copy 2, only the first is scored"),
        "t.tar#d.jpg~2": ("t.tar#d.jpg~2", "t.tar#d.jpg~2", None),  # the innocent member
        "t.tar#d.jpg#3": ("t.tar#d.jpg#3", "t.tar#d.jpg#3", "tar member name 'd.jpg' is stored 3 times in t.tar: "
                                                            "this is copy 3, only the first is scored"),
        "s2.jpg": ("SAME", "s2.jpg", None),  # (10, s2.jpg) comes first
        "s3.jpg": ("s3.jpg", "s3.jpg", same),
        "s1.jpg": ("s1.jpg", "s1.jpg", same),
        "k.jpg": ("k.jpg", "k.jpg", "image id 'a.jpg' claimed by its sidecar or manifest row is the key of "
                                    "another input (a.jpg): an input may not take another input's name"),
        "p%2523q.jpg": ("p%2523q.jpg", "p%2523q.jpg", None),
        "p%23q.jpg": ("p%23q.jpg", "p%23q.jpg", None),
        deep: (deep, deep, None),
        f"{deep[:-4]}.tar#in.jpg": (f"{deep[:-4]}.tar#in.jpg", f"{deep[:-4]}.tar#in.jpg", None),
    }
    got = {k: (r["image_id"], r["uri"][len(str(root)) + 1:], r["error"]) for k, r in rows.items()}
    assert got == want
    assert all((rows[k]["verdict"] == "error") == (e is not None) for k, (_, _, e) in want.items())
    assert rows["s3.jpg"]["high_idx"] is None and rows["s2.jpg"]["high_idx"] is not None
    # the rewritten rows are the scorer's error rows: nothing of their scores is left
    assert (rows["s1.jpg"]["label"], rows["s1.jpg"]["width"], rows["s1.jpg"]["agreement"]) == (None, None, 0.0)


def test_id_check_is_stable_on_a_rerun():
    """A loser, once rewritten, claims nothing: resolving the result again changes nothing."""
    def staging(rows):
        return pa.table({"key": [r[0] for r in rows], "image_id": [r[1] for r in rows],
                         "timestamp": [float(r[2]) for r in rows], "row": pa.array(range(len(rows)), pa.int32()),
                         "verdict": ["accepted"] * len(rows), "error": pa.nulls(len(rows), pa.string())})
    first = ids.resolve({"a": staging([("a1", "X", 5), ("a2", "b1", 0), ("a3", "Y", 1)]),
                         "b": staging([("b1", "X", 5), ("b2", "Y", 0)])})
    assert {r["key"]: (r["image_id"], r["verdict"]) for t in first.values() for r in t.to_pylist()} == {
        "a1": ("X", "accepted"), "b1": ("b1", "error"),  # (5, a1) < (5, b1)
        "a2": ("a2", "error"),  # b1 is an input's key
        "a3": ("a3", "error"), "b2": ("Y", "accepted"),  # (0, b2) < (1, a3)
    }
    again = ids.resolve(first)
    assert {s: t.to_pylist() for s, t in again.items()} == {s: t.to_pylist() for s, t in first.items()}


# --- uploads are bytes -------------------------------------------------------------------------
def _tar_gz() -> bytes:
    return gzip.compress(_tar_bytes([("in.jpg", _jpeg())]))


def test_compressed_uploads_are_read_as_stored(tmp_path):
    """Compression bombs named like images, compressed tars, a gzip posing as a .tar, and a file
    that grew past the limit after planning: each one row with its true reason, nothing
    decompressed."""
    root = tmp_path / "in"
    root.mkdir()
    zeros = bz2.BZ2Compressor(9)
    bomb_bz2 = b"".join(zeros.compress(bytes(1 << 20)) for _ in range(200)) + zeros.flush()  # 200 MiB of zeros
    (root / "bomb.png.bz2").write_bytes(bomb_bz2)
    (root / "bomb.jpg").write_bytes(gzip.compress(bytes(200 << 20), 9))
    (root / "pic.jpg.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(40))
    (root / "x.tar.gz").write_bytes(_tar_gz())
    (root / "y.tgz").write_bytes(_tar_gz())
    (root / "fake.tar").write_bytes(_tar_gz())
    (root / "grows.jpg").write_bytes(_jpeg())
    cfg = load_config(None, SMALL + [f"limits.max_bytes={LIMIT}"])
    plan = planning.plan_input(str(root))
    (root / "grows.jpg").write_bytes(bytes(3 * LIMIT))  # after planning: listed small, now 3 MiB
    specs = {kind: input_spec(cfg, kind) for kind in stages.KINDS}
    table = pa.concat_tables([b for u in planning.work_units(plan.shards, 256)
                              for b in stages.read_decode(u, cfg, specs)])
    errors = dict(zip(table.column("key").to_pylist(), table.column("error").to_pylist()))
    stored = "not an image (uploads are read as stored, never decompressed)"
    tar_advice = ("compressed tars are not read (uploads are read as stored, never decompressed); upload it "
                  "uncompressed as .tar, or its files loose")
    assert errors == {
        "bomb.png.bz2": f"bzip2-compressed data, {stored}",
        "bomb.jpg": f"gzip-compressed data, {stored}",
        "pic.jpg.zst": f"zstd-compressed data, {stored}",
        "x.tar.gz": f"compressed tar (named .tar.gz): {tar_advice}",
        "y.tgz": f"compressed tar (named .tgz): {tar_advice}",
        "fake.tar": f"compressed tar (gzip data in a file named .tar): {tar_advice}",
        "grows.jpg": f"file too large: more than {LIMIT} bytes (limits.max_bytes; listed with {len(_jpeg())})",
    }


def test_s3_reads_are_raw():
    """On S3 too: an object named .gz comes back as stored, byte for byte, the limit holds while
    reading, and a name with ``#`` is escaped in its key and URI and still read."""
    from conftest import local_s3_env

    with local_s3_env("raw-test"):
        _s3_reads()


def _s3_reads() -> None:
    from twostream import storage

    packed = gzip.compress(b'{"source": "hidden"}')
    storage.write_bytes("s3://raw-test/in/a.json.gz", packed)
    assert storage.read_bytes("s3://raw-test/in/a.json.gz") == packed
    assert storage.read_bytes("s3://raw-test/in/a.json.gz", len(packed)) == packed
    with pytest.raises(storage.TooLargeError, match=f"file too large: more than {len(packed) - 1} bytes"):
        storage.read_bytes("s3://raw-test/in/a.json.gz", len(packed) - 1)
    storage.write_bytes("s3://raw-test/in/b.jpg.gz", gzip.compress(_jpeg()))
    storage.write_bytes("s3://raw-test/in/b.jpg.gz.json", packed)  # its sidecar, gzip named .json
    storage.write_bytes("s3://raw-test/in/c#d.jpg", _jpeg())
    plan = planning.plan_input("s3://raw-test/in")
    rows = {r["key"]: r for u in planning.work_units(plan.shards, 256) for r in planning.read_unit(u, LIMIT)}
    assert rows["a.json.gz"]["data"] == packed  # as stored
    assert rows["b.jpg.gz"]["read_error"].startswith("sidecar b.jpg.gz.json is not valid JSON")
    assert rows["c%23d.jpg"]["data"] == _jpeg() and rows["c%23d.jpg"]["uri"] == "s3://raw-test/in/c%23d.jpg"


# --- generated: any names give one row per object with unique keys, URIs and ids ----------------
_chars = st.sampled_from(list("ab#%.~2") + ["é"])
_name = st.text(_chars, min_size=1, max_size=6).filter(lambda n: n not in (".", ".."))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(loose=st.sets(_name, max_size=6),
       tars=st.lists(st.lists(_name, max_size=5), max_size=3),
       claims=st.lists(st.tuples(st.sampled_from(["I", "J", "a", "x.tar#a"]), st.integers(0, 3)), max_size=6),
       deep=st.booleans())
def test_any_names_give_unique_keys_uris_and_ids(loose, tars, claims, deep):
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "in")
        os.mkdir(root)
        with open(os.path.join(root, "zz.jpg"), "wb") as f:  # never an empty input
            f.write(b"z")
        objects = 1  # files written, tar members and sidecars included
        for name in loose:
            with open(os.path.join(root, name), "wb") as f:
                f.write(name.encode())
            objects += 1
        for t, members in enumerate(tars):
            with open(os.path.join(root, f"x{'#' * t}.tar"), "wb") as f:
                f.write(_tar_bytes([(m, m.encode()) for m in members] or [("e", b"")]))
            objects += max(len(members), 1)
        for k, (image_id, ts) in enumerate(claims):  # sidecars claiming ids
            with open(os.path.join(root, f"c{k}.jpg"), "wb") as f:
                f.write(b"c")
            with open(os.path.join(root, f"c{k}.jpg.json"), "w") as f:
                json.dump({"image_id": image_id, "timestamp": ts}, f)
            objects += 2
        if deep:
            _deep(root, 21, "z.jpg", b"z")
            objects += 1
        plan = planning.plan_input(root, files_per_shard=3)
        rows = [planning.attach_identity(r) for u in planning.work_units(plan.shards, 2)
                for r in planning.read_unit(u, LIMIT)]
        keys = [r["key"] for r in rows]
        uris = [r["uri"] for r in rows]
        assert sum(s.listed - s.directories for s in plan.shards) == objects  # every object listed
        assert len(rows) == plan.rows == objects - sum(s.sidecars for s in plan.shards)  # one row each
        assert len(set(keys)) == len(keys) and len(set(uris)) == len(uris)
        # a loose file's key and URI decode to its path (one-to-one); its bytes are that file's
        for r in rows:
            if "#" not in r["key"] and r["read_error"] is None and len(r["uri"]) < 4000:
                path = os.fsencode(root) + b"/" + urllib.parse.unquote_to_bytes(r["key"])
                assert r["uri"] == f"{root}/{r['key']}"
                with open(path, "rb") as f:
                    assert f.read() == r["data"]
        by_shard: dict[str, list] = {}
        for r in rows:
            by_shard.setdefault(r["uri"].split("#")[0], []).append(r)
        stagings = {s: pa.table({"key": [r["key"] for r in rs], "image_id": [r["image_id"] for r in rs],
                                 "timestamp": [r["timestamp"] for r in rs],
                                 "row": pa.array(range(len(rs)), pa.int32()),
                                 "verdict": ["error" if r["read_error"] else "accepted" for r in rs],
                                 "error": pa.array([r["read_error"] for r in rs], pa.string())})
                    for s, rs in by_shard.items()}
        final = [r for t in ids.resolve(stagings).values() for r in t.to_pylist()]
        assert len(final) == len(rows)
        assert len({r["image_id"] for r in final}) == len(final)
        kept = {r["image_id"] for r in final if r["image_id"] != r["key"]}
        assert kept <= {c for c, _ in claims} and not kept & set(keys)


def test_manifest_names_a_member_by_its_full_key(tmp_path):
    """A manifest row naming ``a.jpg`` where a loose ``a.jpg`` and a member ``a.jpg`` of x.tar
    both exist is refused, and the advice can be followed: the member's full key ``x.tar#a.jpg``
    tells them apart. A member named by its name alone (or its stem, as the demo's manifest does)
    still matches when nothing else has that name."""
    from twostream.batch.manifest import ManifestError, read_manifest

    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"loose")
    (root / "x.tar").write_bytes(_tar_bytes([("a.jpg", b"member"), ("img-7.jpg", b"seven")]))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,key,source\nA,a.jpg,s1\n")
    with pytest.raises(ManifestError, match=r"key 'a.jpg' matches 2 inputs \(x.tar#a.jpg, a.jpg\); give each "
                                            r"input's full name"):
        planning.plan_input(str(root), manifest=read_manifest(str(manifest))[0])
    manifest.write_text("image_id,key,source\nA,a.jpg,s1\nM,x.tar#a.jpg,s2\nS,img-7,s3\n")
    plan = planning.plan_input(str(root), manifest=read_manifest(str(manifest))[0])
    rows = {r["key"]: planning.attach_identity(r)
            for u in planning.work_units(plan.shards, 256) for r in planning.read_unit(u, LIMIT)}
    assert {k: (r["image_id"], r["source"]) for k, r in rows.items()} == {
        "a.jpg": ("A", "s1"), "x.tar#a.jpg": ("M", "s2"), "x.tar#img-7.jpg": ("S", "s3")}
    assert plan.match.summary()["unmatched"] == 0
