"""Bad manifests: every error names its row; duplicates, one row matching two inputs, rows that
match no input; timestamps without a zone are UTC whatever the host's time zone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twostream.batch import planning
from twostream.batch.manifest import ManifestError, match, read_manifest

REPO = Path(__file__).resolve().parents[2]


def _csv(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "m.csv"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize("lines, message", [
    (["image_id,key,source,timestamp", "i1,a.jpg,s,1", "i2,b.jpg,s,soon"],
     "manifest line 3: timestamp 'soon' is neither seconds nor ISO-8601"),
    (["image_id,key,source,timestamp", "i1,a.jpg,s,1", "i1,b.jpg,s,2", "i3,c.jpg,s,3", "i1,d.jpg,s,4"],
     "manifest: duplicate image_ids: image_id 'i1' on line 2, line 3, line 5"),
    (["image_id,key,source,timestamp", "i1,a.jpg,s,1", "i2,b.jpg,s,2", "i3,a.jpg,s,3"],
     "manifest: duplicate keys: key 'a.jpg' on line 2, line 4"),
    (["image_id,key,source,timestamp", "i1,a.jpg,s,1", ",b.jpg,s,2"],
     "manifest rows without an image_id: line 3"),
    (["image_id,key,source,timestamp", "i1,a.jpg,s,inf"],
     "manifest line 2: timestamp 'inf' is not a finite number"),
    (["source,timestamp", "s,1"], "manifest needs an image_id (or key) column"),
])
def test_csv_errors_name_their_line(tmp_path, lines, message):
    with pytest.raises(ManifestError) as info:
        read_manifest(_csv(tmp_path, lines))
    assert message in str(info.value)


def test_jsonl_and_parquet_errors_name_their_row(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"image_id": "i1", "key": "a.jpg"}\n\n{"image_id": "i2", "key": "b.jpg"}\n{oops\n')
    with pytest.raises(ManifestError, match="manifest line 4: not valid JSON"):
        read_manifest(str(path))
    path.write_text('{"image_id": "i1", "timestamp": 1}\n\n{"image_id": "i2", "timestamp": "x"}\n')
    with pytest.raises(ManifestError, match="manifest line 3: timestamp 'x'"):  # blank line 2 counted
        read_manifest(str(path))
    pq.write_table(pa.table({"image_id": ["i1", "i2", "i1"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="image_id 'i1' on row 1, row 3"):
        read_manifest(str(tmp_path / "m.parquet"))


def test_one_row_matching_two_inputs_and_unmatched_rows(tmp_path):
    table, _ = read_manifest(_csv(tmp_path, ["image_id,key", "A,a", "B,b.jpg", "Z,zzz.jpg", "Y,yyy"]))
    with pytest.raises(ManifestError, match=r"line 2: key 'a' matches 2 inputs \(a.jpg, a.png\)"):
        match(table, ["a.jpg", "a.png", "b.jpg"], ["", "", ""])
    found = match(table, ["a.jpg", "a.b.jpg", "b.jpg"], ["", "", ""])  # a.b.jpg's stem is a.b, not a
    assert found.rows == [0, -1, 1]
    assert found.summary() == {"rows": 4, "matched": 2, "unmatched": 2,
                               "unmatched_first": ["line 4: key 'zzz.jpg'", "line 5: key 'yyy'"]}


def test_identity_from_the_manifest_wins_over_the_sidecar(tmp_path):
    root = tmp_path / "in"
    root.mkdir()
    (root / "a.jpg").write_bytes(b"1")
    (root / "a.jpg.json").write_text(json.dumps({"source": "sidecar", "timestamp": 5}))
    (root / "b.jpg").write_bytes(b"2")
    (root / "b.jpg.json").write_text(json.dumps({"source": "sidecar-b", "timestamp": 6}))
    table, _ = read_manifest(_csv(tmp_path, ["image_id,key,source,timestamp", "A,a.jpg,man,7"]))
    plan = planning.plan_input(str(root), manifest=table)
    found = plan.match
    rows = {r["key"]: planning.attach_identity(r) for u in planning.work_units(plan.shards, 10)
            for r in planning.read_unit(u, 100)}
    assert (rows["a.jpg"]["image_id"], rows["a.jpg"]["source"], rows["a.jpg"]["timestamp"]) == ("A", "man", 7.0)
    assert (rows["b.jpg"]["image_id"], rows["b.jpg"]["source"], rows["b.jpg"]["timestamp"]) == ("b.jpg", "sidecar-b", 6.0)
    assert found.unmatched == 0


def test_naive_timestamps_are_utc_whatever_the_host_zone(tmp_path):
    """Mixed formats (ISO with and without a zone, seconds) read in a process whose TZ is UTC-10
    (and DST-free), so reading naive times as local time would be off by 36000 s."""
    path = _csv(tmp_path, ["image_id,timestamp", "a,2024-01-01T00:00:00", "b,2024-01-01T00:00:00+01:00",
                           "c,1704067200", "d,2024-01-01 00:00:00Z"])
    code = ("import json, sys; from twostream.batch.manifest import read_manifest; "
            "print(json.dumps(read_manifest(sys.argv[1])[0].column('timestamp').to_pylist()))")
    env = {**os.environ, "TZ": "Pacific/Honolulu", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code, path], env=env, capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == [1704067200.0, 1704063600.0, 1704067200.0, 1704067200.0]
