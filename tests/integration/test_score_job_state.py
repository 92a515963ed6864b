"""The batch job's reputation across runs, with outputs on the local S3 server: two runs over the
uploads before and after a point in time, the second started from the first's ``sources/``
(``--state``), give the ``sources/`` of one run over all of them (exact equality, sorted by
source), which also equals the reference replay of that run's verdicts. One local Ray for the
module; tiny random models. (Late events and bad states: tests/batch/test_reputation.py.)"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import SMALL_JOB, local_s3_env

pytestmark = [pytest.mark.ray, pytest.mark.own_process, pytest.mark.timeout(900)]

SMALL = SMALL_JOB + ["thresholds.p2=0.3", "reputation.threshold=2", "job.files_per_shard=8"]
SPLIT = 10.0  # the point in time between the two runs


def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).resize((40, 36), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes, dict]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, data, meta in members:
            for name, blob in ((f"{key}.jpg", data), (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(blob)
                tar.addfile(info, io.BytesIO(blob))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """40 uploads of 6 sources at times 0-19 (ties included) and one unreadable one, in tars
    split at SPLIT: ``first/`` before it, ``second/`` after, ``all/`` both."""
    root = tmp_path_factory.mktemp("state")
    rnd = random.Random(3)
    halves: dict[str, list] = {"first": [], "second": []}
    for i in range(40):
        ts = float(rnd.randrange(20))
        meta = {"image_id": f"u{i:03d}", "source": f"10.0.0.{rnd.randrange(6)}", "timestamp": ts}
        halves["first" if ts < SPLIT else "second"].append((f"u{i:03d}", _jpeg(i), meta))
    halves["first"].append(("bad", b"not an image", {"image_id": "bad", "source": "10.0.0.1", "timestamp": 1.0}))
    for name, members in halves.items():
        for t in range(2):
            part = members[t::2]
            _tar(root / name / f"{name}-{t}.tar", part)
            _tar(root / "all" / f"{name}-{t}.tar", part)
    return root


@pytest.fixture(scope="module")
def cluster():
    """The local S3 server (outputs go there) and a local Ray with 2 CPUs."""
    import ray

    from jobs.ray_cluster import connect

    with local_s3_env("state-test") as store:
        connect(num_cpus=2)
        try:
            yield store
        finally:
            ray.shutdown()


def _run(input_dir: Path, output: str, overrides: list[str], state: str | None = None) -> dict:
    from jobs.score import run_job, with_state
    from twostream.core.config import load_config

    return run_job(with_state(load_config(None, SMALL + overrides), state), str(input_dir), output, progress=False)


def _table(uri: str, folder: str) -> pa.Table:
    from twostream import storage

    files = storage.list_files(storage.join(uri, folder), (".parquet",))
    return pa.concat_tables([storage.read_parquet(f) for f in files])


def test_two_runs_with_state_equal_one_run(cluster, inputs, tmp_path):
    from twostream.core.config import ReputationConfig
    from twostream.core.reputation import SourceState, Upload, replay
    from twostream.core.sources import source_table

    whole = "s3://state-test/runs/whole"  # outputs on S3, end to end
    summary = _run(inputs / "all", whole, ["job.reputation_shards=3"])
    assert summary["inputs"] == 41 and summary["counts_add_up"]
    _run(inputs / "first", str(tmp_path / "first"), ["job.reputation_shards=2"])
    second = _run(inputs / "second", str(tmp_path / "second"), [], state=str(tmp_path / "first"))
    assert second["counts_add_up"]

    want = _table(whole, "sources").sort_by("source")
    got = pq.read_table(tmp_path / "second" / "sources").sort_by("source")
    assert got.equals(want), (got.to_pylist(), want.to_pylist())
    assert pc_sum(want, "times_blacklisted") > 0 and pc_sum(want, "rejected") > 0, "a test that blacklists"
    assert want.to_pylist()[[r["source"] for r in want.to_pylist()].index("10.0.0.1")]["errors"] == 1

    # the reference: a sequential replay of the whole run's verdicts
    images = _table(whole, "images").to_pylist()
    scored = [r for r in images if r["verdict"] != "error"]
    uploads = [Upload(r["source"], r["timestamp"], r["image_id"], r["verdict"] != "accepted",
                      r["label"] or "adversarial") for r in scored]
    responses, ledger = replay(uploads, ReputationConfig(threshold=2))
    assert [(r["response"], r["cc"], r["blacklisted"]) for r in scored] == [
        (x.response, x.cc, x.blacklisted) for x in responses]
    names = sorted({r["source"] for r in images})
    errors = {s: sum(1 for r in images if r["source"] == s and r["verdict"] == "error") for s in names}
    assert source_table((s, ledger.get(s) if s in ledger else SourceState(), errors[s]) for s in names).equals(want)
    # the second run answered its images as the whole run did
    by_id = {r["image_id"]: (r["response"], r["cc"], r["blacklisted"]) for r in images}
    for r in pq.read_table(tmp_path / "second" / "images").to_pylist():
        assert (r["response"], r["cc"], r["blacklisted"]) == by_id[r["image_id"]]



def pc_sum(table: pa.Table, column: str) -> int:
    return int(np.sum(table.column(column).to_numpy()))


def test_grouped_by_network_and_forgetting_the_default(cluster, inputs, tmp_path):
    """``reputation.group_by_prefix``: the six 10.0.0.x sources count as 10.0.0.0/24 (images keep
    their own source); ``forget_default``: a second run from that state does not carry a row at
    CC 0 and not listed. Responses equal the reference replay on the network key."""
    from twostream.core.config import ReputationConfig
    from twostream.core.reputation import SourceState, Upload, replay
    from twostream.core.sources import source_table

    grouped = ["reputation.group_by_prefix={ipv4: 24, ipv6: 64}", "reputation.forget_default=true"]
    out = tmp_path / "grouped"
    assert _run(inputs / "all", str(out), grouped)["counts_add_up"]
    images = pq.read_table(out / "images").to_pylist()
    sent = {r["source"] for r in images}
    assert len(sent) > 1 and sent <= {f"10.0.0.{k}" for k in range(6)}  # each image keeps its own source
    sources = pq.read_table(out / "sources").to_pylist()
    assert [r["source"] for r in sources] == ["10.0.0.0/24"]
    scored = sorted((r for r in images if r["verdict"] != "error"), key=lambda r: (r["timestamp"], r["image_id"]))
    uploads = [Upload("10.0.0.0/24", r["timestamp"], r["image_id"], r["verdict"] != "accepted",
                      r["label"] or "adversarial") for r in scored]
    responses, ledger = replay(uploads, ReputationConfig(threshold=2))
    assert [(r["response"], r["cc"], r["blacklisted"]) for r in scored] == [
        (x.response, x.cc, x.blacklisted) for x in responses]
    assert (sources[0]["images"], sources[0]["cc"], sources[0]["blacklisted"], sources[0]["errors"]) == (
        len(scored), ledger.get("10.0.0.0/24").cc, ledger.get("10.0.0.0/24").blacklisted, 1)

    # the next run, with no image of those networks, from that state plus two hand-made rows: a row
    # at CC 0 and not listed is not carried, one at CC 1 is
    state = pa.concat_tables([pq.read_table(out / "sources"), source_table([
        ("203.0.113.0/24", SourceState(images=5, rejected=2, first_seen=1.0, last_seen=2.0), 0),
        ("198.51.100.0/24", SourceState(cc=1, images=1, rejected=1, first_seen=1.0, last_seen=1.0), 0)])])
    pq.write_table(state, tmp_path / "state.parquet")
    later = tmp_path / "later"
    _tar(later / "other.tar", [("o", _jpeg(999), {"image_id": "o", "source": "2001:db8::5", "timestamp": 30.0})])
    _run(later, str(tmp_path / "next"), grouped, state=str(tmp_path / "state.parquet"))
    carried = {r["source"] for r in pq.read_table(tmp_path / "next" / "sources").to_pylist()}
    network = {"10.0.0.0/24"} if (sources[0]["cc"], sources[0]["blacklisted"]) != (0, False) else set()
    assert carried == {"198.51.100.0/24", "2001:db8::/64"} | network
