"""The batch job end to end on a local Ray over a folder of colliding names and claimed ids
(issue 29): every image id in ``images/`` unique, the refused claims error rows naming the other
input, Algorithm 2 over the rest, and a rerun on the same output (resume) giving the same rows."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from tests.batch.test_hostile_inputs import SMALL, _jpeg, _tar_bytes

pytestmark = [pytest.mark.ray, pytest.mark.own_process]  # a Ray Data job in this process (tests/plugins/own_process.py)

SAME = ("image id 'SAME' claimed by its sidecar or manifest row is also claimed by s2.jpg, which keeps it "
        "(first in (timestamp, key) order)")


@pytest.fixture(scope="module")
def cluster():
    import ray

    from jobs.ray_cluster import connect

    connect(num_cpus=2)
    try:
        yield
    finally:
        ray.shutdown()


def test_claimed_ids_unique_through_the_job(cluster, tmp_path):
    from jobs.score import run_job
    from twostream.core.config import load_config

    root = tmp_path / "in"
    root.mkdir()
    for name, seed, ts in (("s1.jpg", 1, 30), ("s2.jpg", 2, 10), ("s3.jpg", 3, 10)):
        (root / name).write_bytes(_jpeg((24, 24), seed))
        (root / f"{name}.json").write_text(json.dumps({"image_id": "SAME", "source": "u", "timestamp": ts}))
    (root / "a.jpg").write_bytes(_jpeg((24, 24), 4))
    (root / "k.jpg").write_bytes(_jpeg((24, 24), 5))
    (root / "k.jpg.json").write_text(json.dumps({"image_id": "a.jpg", "source": "u", "timestamp": 1}))
    (root / "x.tar").write_bytes(_tar_bytes([("a.jpg", _jpeg((24, 24), 6)),
                                             ("a.json", b'{"image_id": "SAME", "timestamp": 50}')]))
    out = tmp_path / "out"
    cfg = load_config(None, SMALL + ["job.files_per_shard=2", "job.reputation_shards=3"])
    summary = run_job(cfg, str(root), str(out), progress=False)
    images = pq.read_table(out / "images").sort_by("key")
    rows = {r["key"]: r for r in images.to_pylist()}
    assert {k: (r["image_id"], r["error"]) for k, r in rows.items()} == {
        "s2.jpg": ("SAME", None),  # (10, s2.jpg) is the first claim
        "s3.jpg": ("s3.jpg", SAME), "s1.jpg": ("s1.jpg", SAME), "x.tar#a.jpg": ("x.tar#a.jpg", SAME),
        "a.jpg": ("a.jpg", None),
        "k.jpg": ("k.jpg", "image id 'a.jpg' claimed by its sidecar or manifest row is the key of another "
                           "input (a.jpg): an input may not take another input's name"),
    }
    assert all(r["verdict"] == "error" and r["response"] == "error" and r["cc"] is None
               for r in rows.values() if r["error"])
    assert summary["inputs"] == 6 and summary["counts_add_up"] and summary["verdicts"]["error"] == 4
    sources = {r["source"]: r for r in pq.read_table(out / "sources").to_pylist()}
    assert (sources["u"]["images"], sources["u"]["errors"]) == (1, 3)  # s2 scored; s1, s3, k refused
    assert sources["unknown"]["errors"] == 1 and sources["unknown"]["images"] == 1  # x.tar#a.jpg; a.jpg
    # a rerun on the same output: every shard done, the check decides the same
    again = run_job(cfg, str(root), str(out), progress=False)
    assert again["shards"]["resumed_done"] == again["shards"]["total"]
    assert pq.read_table(out / "images").sort_by("key").equals(images)
