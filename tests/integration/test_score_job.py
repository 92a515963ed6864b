"""The Ray batch job end to end: `ray job submit` against a local head, input from the local S3
server, and every row and per-source state compared with an independent in-process computation
(``Scorer.score_batch`` + ``reputation.replay``). Also: order independence (pool sizes, shard
order, reputation sharding, streams returning rows in a different order), a crashed model actor,
resume after a job killed half way, and the error rows."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import SMALL_JOB, kill_ray_node, ray_start_node
from PIL import Image

pytestmark = [pytest.mark.ray, pytest.mark.own_process, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
SMALL = SMALL_JOB + ["thresholds.p2=0.0", "job.files_per_shard=6", "job.reputation_shards=2"]


def _jpeg(seed: int, size=(36, 44)) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)  # smooth-ish colour fields
    img = Image.fromarray(base).resize(size[::-1], Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_dataset(root: Path) -> tuple[list[dict], Path]:
    """Loose files (good and broken) + two tar shards + a CSV manifest; returns the truth."""
    truth = []
    (root / "in" / "loose").mkdir(parents=True)
    manifest = ["key,image_id,source,timestamp"]
    for i in range(14):
        key = f"loose/img{i:03d}"
        data = _jpeg(i)
        (root / "in" / f"{key}.jpg").write_bytes(data)
        src, ts = f"src-{i % 3}", float((i * 7) % 5)  # ties in timestamp: image id breaks them
        manifest.append(f"{key},L{i:03d},{src},{ts}")
        truth.append(dict(key=key, image_id=f"L{i:03d}", source=src, timestamp=ts, data=data))
    broken = {
        "loose/zero.jpg": b"",
        "loose/notes.txt": b"not an image at all",
        "loose/trunc.jpg": _jpeg(99)[:150],
        "loose/huge.png": b"\x89PNG" + b"\0" * 5000,  # over the max_bytes limit set below
    }
    for name, data in broken.items():
        (root / "in" / name).write_bytes(data)
        truth.append(dict(key=name, image_id=name, source="unknown", timestamp=0.0, data=data))
    for t in range(2):
        with tarfile.open(root / "in" / f"shard-{t:03d}.tar", "w") as tar:
            for i in range(5):
                key = f"t{t}-{i:02d}"
                data = _jpeg(100 + 10 * t + i)
                meta = json.dumps({"source": f"src-{i % 2 + 3}", "timestamp": 10 + i}).encode()
                for name, blob in ((f"{key}.jpg", data), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(name)
                    info.size = len(blob)
                    tar.addfile(info, io.BytesIO(blob))
                member = f"shard-{t:03d}.tar#{key}.jpg"  # a member's key names its tar
                truth.append(dict(key=member, image_id=member, source=f"src-{i % 2 + 3}",
                                  timestamp=float(10 + i), data=data))
    (root / "manifest.csv").write_text("\n".join(manifest) + "\n")
    return truth, root / "manifest.csv"


def expected(truth: list[dict], overrides: list[str]):
    """Independent in-process computation: Scorer.score_batch + replay."""
    from twostream.core.config import load_config
    from twostream.core.reputation import Upload, replay
    from twostream.core.scoring import Scorer

    import torch

    from twostream.core.models import build_stream

    cfg = load_config(None, overrides)
    torch.manual_seed(0)  # random weights built exactly as each job actor builds them
    high = build_stream(cfg.high, "high")
    torch.manual_seed(0)
    low = build_stream(cfg.low, "low")
    results = Scorer(cfg, high=high, low=low).score_batch([t["data"] for t in truth], [t["image_id"] for t in truth])
    uploads, index = [], []
    for k, (t, r) in enumerate(zip(truth, results)):
        if r.verdict != "error":
            uploads.append(Upload(t["source"], t["timestamp"], t["image_id"], r.rejected,
                                  "adversarial" if r.rejected else r.label))
            index.append(k)
    responses, ledger = replay(uploads, cfg.reputation)
    by_id = {t["image_id"]: (t, r, None) for t, r in zip(truth, results)}
    for k, resp in zip(index, responses):
        t, r, _ = by_id[truth[k]["image_id"]]
        by_id[t["image_id"]] = (t, r, resp)
    return by_id, ledger


def check_output(out: Path, by_id: dict, ledger) -> None:
    images = pq.read_table(out / "images").to_pylist()
    assert len(images) == len(by_id), "one row per input, none lost, none duplicated"
    assert len({r["image_id"] for r in images}) == len(images)
    for row in images:
        truth, result, resp = by_id[row["image_id"]]
        assert row["source"] == truth["source"] and row["timestamp"] == truth["timestamp"]
        assert row["verdict"] == result.verdict, row["image_id"]
        if result.verdict == "error":
            assert row["error"] and row["response"] == "error"
            continue
        assert row["error"] is None
        assert row["label"] == result.label
        assert row["high_idx"] == result.high_idx and row["low_idx"] == result.low_idx
        np.testing.assert_allclose(row["high_prob"], result.high_prob, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(row["low_prob"], result.low_prob, rtol=1e-4, atol=1e-6)
        assert row["high_labels"] == result.high_labels and row["low_labels"] == result.low_labels
        assert (row["response"], row["cc"], row["blacklisted"]) == (resp.response, resp.cc, resp.blacklisted)
    sources = {r["source"]: r for r in pq.read_table(out / "sources").to_pylist()}
    for name, state in ledger.items():
        row = sources[name]
        assert (row["images"], row["rejected"], row["blocked"], row["cc"], row["blacklisted"]) == (
            state.images, state.rejected, state.blocked, state.cc, state.blacklisted)
        assert [[i["joined"], i["left"]] for i in row["blacklist_intervals"]] == state.intervals
    summary = json.loads((out / "summary.json").read_text())
    assert summary["inputs"] == len(by_id) == sum(summary["verdicts"].values())
    assert sum(summary["responses"].values()) == len(by_id) and summary["counts_add_up"]
    errors = [r for r in images if r["verdict"] == "error"]
    assert {r["key"] for r in errors} >= {"loose/zero.jpg", "loose/notes.txt", "loose/trunc.jpg", "loose/huge.png"}


@pytest.fixture(scope="module")
def s3():
    from twostream.storage.local_s3 import LocalStore, create_bucket

    with LocalStore() as store:
        old = {k: os.environ.get(k) for k in store.env}
        os.environ.update(store.env)
        create_bucket("twostream-test", store.endpoint)
        yield store
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _free_port() -> int:
    from twostream.storage.local_s3 import free_port

    return free_port()


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, s3):
    """A local Ray head (2 CPUs) with a dashboard for `ray job submit`; stopped afterwards."""
    temp = tmp_path_factory.mktemp("ray")
    port, dash = _free_port(), _free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "RAY_AUTH_MODE": "disabled"}
    ray_start_node(["--head", "--num-cpus", "2", "--port", str(port), "--dashboard-host", "127.0.0.1",
                    "--dashboard-port", str(dash), "--include-dashboard", "true",
                    "--ray-client-server-port", str(_free_port())], str(temp), env)
    info = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dash}", "env": env}
    try:
        yield info
    finally:
        import ray

        if ray.is_initialized():
            ray.shutdown()
        kill_ray_node(str(temp))  # not `ray stop`: it would stop every Ray on the machine


@pytest.fixture(scope="module")
def data(tmp_path_factory, s3):
    from twostream.storage.local_s3 import upload_tree

    root = tmp_path_factory.mktemp("data")
    truth, manifest = make_dataset(root)
    upload_tree(root / "in", "s3://twostream-test/in")
    import boto3

    boto3.client("s3", endpoint_url=s3.endpoint).upload_file(str(manifest), "twostream-test", "manifest.csv")
    overrides = SMALL + ["limits.max_bytes=4000"]
    by_id, ledger = expected(truth, overrides)
    return {"root": root, "truth": truth, "overrides": overrides, "by_id": by_id, "ledger": ledger}


def _run_in_cluster(ray_head, output: Path, overrides: list[str], parts=None,
                    input_uri: str = "s3://twostream-test/in", manifest: str = "s3://twostream-test/manifest.csv"):
    """run_job in this process as a Ray client of the test head (same code as the job); ``parts``:
    what phase 1 runs (``jobs.score.Phase1``), the job's own by default."""
    import ray

    from jobs.score import Phase1, run_job
    from twostream.core.config import load_config

    if not ray.is_initialized():
        ray.init(address=ray_head["address"], runtime_env={"env_vars": _aws_env()})
    return run_job(load_config(None, overrides), input_uri, str(output), manifest, progress=False,
                   parts=parts or Phase1())


def permuting_stage(crash_marker: Path | None = None):
    """A stream actor class that permutes its output rows (and, given ``crash_marker``, kills its
    process on the high stream's first batch, once: Ray restarts the actor and retries the batch).
    Defined here, so Ray pickles it by value for the workers."""
    from twostream.batch.stages import StreamStage

    class Permuting(StreamStage):
        calls = 0

        def __call__(self, table):
            self.calls += 1
            if crash_marker is not None and self.kind == "high" and self.calls == 1:
                marker = crash_marker / "crashed"
                if not marker.exists():
                    crash_marker.mkdir(parents=True, exist_ok=True)
                    marker.touch()
                    os._exit(1)
            table = super().__call__(table)
            order = np.random.default_rng(self.calls + os.getpid()).permutation(table.num_rows)
            return table.take(order)

    return Permuting


def stopping_sink(after: int):
    """A phase-1 sink whose write tasks fail once ``after`` shards are committed, as a job killed
    there would (the commits before it stay)."""
    from jobs.score import ShardDatasink
    from twostream import storage

    class Stopping(ShardDatasink):
        def committed(self, shard_id):
            done = len(storage.list_files(storage.join(self.output, "_progress"), (".done",)))
            if done >= after:
                raise RuntimeError(f"injected fault: stopping after {done} shards")

    return Stopping


def shuffled(seed: int):
    """An order of shards (for phase 1, then phase 2's reads) shuffled with ``seed``."""
    import random

    rng = random.Random(seed)
    return lambda items: rng.sample(list(items), len(items))


def _aws_env() -> dict:
    keys = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION",
            "AWS_REGION", "AWS_EC2_METADATA_DISABLED", "PYTHONPATH")
    env = {k: os.environ[k] for k in keys if k in os.environ}
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def test_ray_job_submit_matches_in_process(ray_head, data, tmp_path):
    out = tmp_path / "out"
    cmd = [str(Path(sys.executable).with_name("ray")), "job", "submit", "--address", ray_head["dashboard"],
           "--working-dir", str(REPO), "--runtime-env-json", json.dumps({"env_vars": _aws_env()}),
           "--", "python", "-m", "jobs.score", "--input", "s3://twostream-test/in",
           "--manifest", "s3://twostream-test/manifest.csv", "--output", str(out), "--no-progress"]
    for o in data["overrides"]:
        cmd += ["--set", o]
    proc = subprocess.run(cmd, env=ray_head["env"], capture_output=True, text=True, timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "counts add up: True" in proc.stdout
    check_output(out, data["by_id"], data["ledger"])


def test_order_independent_and_actor_crash(ray_head, data, tmp_path):
    """Other pool sizes, shard order, reputation sharding, rows permuted by every stream actor,
    JPEGs decoded by the high stream's actors (job.decode=device; the CPU device's decoder gives
    Pillow's pixels), and the first high-stream batch crashes its actor: the same rows and source
    states."""
    from jobs.score import Phase1

    overrides = data["overrides"] + [
        "high.pool_size=2", "low.pool_size=2", "job.reputation_shards=3",
        "high.batch_size=4", "job.files_per_shard=4", "job.decode=device",
    ]
    marker = tmp_path / "crash"
    summary = _run_in_cluster(ray_head, tmp_path / "out", overrides,
                              Phase1(stream=permuting_stage(marker), order=shuffled(7)))
    assert (marker / "crashed").exists(), "the injected actor crash happened"
    assert summary["counts_add_up"]
    check_output(tmp_path / "out", data["by_id"], data["ledger"])


def test_resume_after_kill(ray_head, data, tmp_path):
    import ray

    from jobs.score import Phase1

    out = tmp_path / "out"
    with pytest.raises(Exception, match="injected fault"):
        _run_in_cluster(ray_head, out, data["overrides"], Phase1(sink=stopping_sink(2)))
    # The failed job's driver goes away, as a killed `ray job submit` driver does: its actor pools
    # with it (in one driver, an actor of the failed dataset can hold the CPU the rerun's pools need).
    ray.shutdown()
    done = sorted(p.name for p in (out / "_progress").glob("*.done"))
    assert 2 <= len(done) < 5 and not (out / "summary.json").exists()
    summary = _run_in_cluster(ray_head, out, data["overrides"])
    assert summary["shards"]["resumed_done"] == len(done)
    assert summary["shards"]["scored_now"] == summary["shards"]["total"] - len(done)
    check_output(out, data["by_id"], data["ledger"])


def test_datasource_and_datasink_every_row_once(ray_head, tmp_path):
    """The job's Ray Data input and output alone: one read task per work unit, and every row of
    every shard written once and committed, whatever the blocks; the driver reads no block."""
    import ray

    from jobs.score import ShardDatasink, WorkUnits
    from twostream.batch.outputs import STAGE_TIMES, staging_uri
    from twostream.batch.planning import plan_input, work_units
    from twostream.core.config import load_config
    from twostream.core.scoring import input_spec

    if not ray.is_initialized():
        ray.init(address=ray_head["address"], runtime_env={"env_vars": _aws_env()})
    root = tmp_path / "in"
    root.mkdir()
    for k in range(23):
        (root / f"{k:02d}.jpg").write_bytes(_jpeg(k))
    (root / "bad.jpg").write_bytes(b"no image")
    cfg = load_config(None, SMALL + ["job.files_per_shard=7", "job.rows_per_task=3", "job.decode_batch_size=2"])
    out = str(tmp_path / "out")
    plan = plan_input(str(root), cfg.job.files_per_shard, spool=str(tmp_path / "out" / "_progress" / "entries"))
    units = work_units(plan.shards, cfg.job.rows_per_task)
    specs = ray.put({kind: input_spec(cfg, kind) for kind in ("high", "low")})
    source = WorkUnits(units, cfg, specs)
    assert len(source.get_read_tasks(1)) == len(units) == 10  # shards of 7, 7, 7, 3 rows: units of 3+3+1 (x3), 3

    def scored(table):  # the streams' columns, as the stream actors add them (no model needed here)
        import pyarrow as pa

        n = table.num_rows
        for kind, k in (("high", 5), ("low", 2)):
            offsets = pa.array([i * k for i in range(n + 1)], pa.int32())
            for name, value, type_ in (("idx", 0, pa.int32()), ("prob", 0.5, pa.float32())):
                column = pa.ListArray.from_arrays(offsets, pa.array([value] * n * k, type_))
                table = table.append_column(f"{kind}_{name}", column)
            table = table.append_column(f"t_{kind}_ms", pa.array([0.0] * n))
        return table.drop_columns(["high_input", "low_input", "encoded"])

    sink = ShardDatasink(cfg, out, plan.shards)
    ds = ray.data.read_datasource(source, override_num_blocks=len(units))
    ds.map_batches(scored, batch_size=4, batch_format="pyarrow").write_datasink(sink)
    assert sink.rows == 24 and set(sink.stage_ms) == set(STAGE_TIMES)
    for shard in plan.shards:
        rows = pq.read_table(staging_uri(out, shard.shard_id))
        assert rows.column("row").to_pylist() == list(range(shard.rows))
    keys = [k for s in plan.shards for k in pq.read_table(staging_uri(out, s.shard_id)).column("key").to_pylist()]
    assert sorted(keys) == sorted([f"{k:02d}.jpg" for k in range(23)] + ["bad.jpg"])
    assert not list((tmp_path / "out" / "_progress").rglob("parts/**/*.parquet"))  # the parts removed


def test_hostile_folder_every_object_one_row(ray_head, tmp_path):
    """Links and a loop, colliding names, an orphan sidecar, a name that is not UTF-8, a tiny image,
    a tar with a destroyed header in the middle and a link member: one row per listed object (the
    listing below is written out by hand), each error with its reason, the summary's accounting."""
    root = tmp_path / "in"
    (root / "d").mkdir(parents=True)
    good = {name: _jpeg(k) for k, name in enumerate(["a.jpg", "a.b.jpg", "d/x.jpg"])}
    for name, data in good.items():
        (root / name).write_bytes(data)
    png = io.BytesIO()
    Image.open(io.BytesIO(_jpeg(7))).save(png, "PNG")
    (root / "a.png").write_bytes(png.getvalue())
    tiny = io.BytesIO()
    Image.new("RGB", (4, 4)).save(tiny, "PNG")
    (root / "tiny.png").write_bytes(tiny.getvalue())
    (root / "orphan.json").write_text("{}")
    (root / "d" / "x.jpg.json").write_text(json.dumps({"source": "side", "timestamp": 3}))
    os.symlink("..", root / "d" / "loop")
    os.symlink(tmp_path / "elsewhere.jpg", root / "out.jpg")
    with open(os.path.join(os.fsencode(root), b"n\xe4me.jpg"), "wb") as handle:
        handle.write(_jpeg(8))
    members = [("t1.jpg", _jpeg(10)), ("t2.jpg", _jpeg(11)), ("t3.jpg", _jpeg(12)), ("t4.jpg", _jpeg(13))]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
        link = tarfile.TarInfo("t5.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with tarfile.open(fileobj=io.BytesIO(buf.getvalue())) as tar:
        at = {m.name: m.offset for m in tar}
    data = bytearray(buf.getvalue())
    data[at["t2.jpg"] : at["t2.jpg"] + 64] = b"\x01" * 64  # t2's header destroyed
    (root / "s.tar").write_bytes(bytes(data))
    manifest = tmp_path / "m.csv"
    manifest.write_text("image_id,key,source,timestamp\nA,a.jpg,src-a,2024-01-01T00:00:00\n"
                        "GONE,gone.jpg,src-g,1\n")
    overrides = SMALL + ["job.files_per_shard=4"]
    summary = _run_in_cluster(ray_head, tmp_path / "out", overrides, input_uri=str(root), manifest=str(manifest))
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "images").to_pylist()}
    damage = f"s.tar##damaged@{at['t2.jpg']}"
    assert {k: r["error"] for k, r in rows.items()} == {
        "a.jpg": None, "a.b.jpg": None, "a.png": None, "d/x.jpg": None, "s.tar#t1.jpg": None,
        "s.tar#t3.jpg": None, "s.tar#t4.jpg": None,
        "tiny.png": "image too small: 4x4 px (limits.min_side = 8)",
        "orphan.json": "sidecar without its file (orphan): no file named like it without .json or .<ext>.json",
        "d/loop": "symbolic link to '..': links are not followed",
        "out.jpg": f"symbolic link to '{tmp_path / 'elsewhere.jpg'}': links are not followed",
        "n%E4me.jpg": "file name is not valid UTF-8 (shown %XX-escaped): b'n\\xe4me.jpg'",
        damage: f"damaged tar: bytes {at['t2.jpg']}-{at['t3.jpg']} hold no valid member header; "
                "any member stored there is lost",
        "s.tar#t5.jpg": "symbolic link member (to '/etc/passwd'): links are not followed",
    }
    assert (rows["a.jpg"]["image_id"], rows["a.jpg"]["source"], rows["a.jpg"]["timestamp"]) == (
        "A", "src-a", 1704067200.0)
    assert (rows["d/x.jpg"]["source"], rows["d/x.jpg"]["timestamp"]) == ("side", 3.0)
    assert all(rows[k]["response"] == "error" and rows[k]["cc"] is None for k, r in rows.items() if r["error"])
    # 9 loose objects + 1 sidecar travelling with d/x.jpg; the tar: 4 members, 1 damaged region, 1 link
    assert summary["accounting"] == {"objects_listed": 15, "folders": 1, "tar_directories": 0,
                                     "sidecars_attached": 1, "planned_errors": 6, "rows_expected": 14,
                                     "rows_written": 14}
    assert summary["inputs"] == 14 and summary["counts_add_up"]
    assert summary["manifest_rows"] == {"rows": 2, "matched": 1, "unmatched": 1,
                                        "unmatched_first": ["line 3: key 'gone.jpg'"]}


@pytest.mark.parametrize(("override", "setting", "extra"), [
    # fails the geometry task, then the decode tasks that wait for it
    ("high.model=efficientnet_nonexistent", "high.model", []),
    # fails the L-Net actors' constructors (the job fails at the first: faster, the same message)
    ("low.weights=/nonexistent/low.pt", "low.weights", ["job.actor_init_deaths=0"]),
])
def test_model_and_weights_errors_are_one_line(ray_head, tmp_path, override, setting, extra):
    """A wrong model name or weights file fails the job with the builder's own message under its
    setting's name (main prints it as one line), not with Ray's traceback."""
    from twostream.core.config import ConfigError, load_config
    from twostream.core.models import UnknownModelError, WeightsError, build_stream

    kind = setting.split(".")[0]
    with pytest.raises((UnknownModelError, WeightsError)) as built:  # what the builder says, here
        build_stream(getattr(load_config(None, SMALL + [override]), kind), kind)
    root = tmp_path / "in"
    root.mkdir()
    for k in range(3):
        (root / f"{k}.jpg").write_bytes(_jpeg(k))
    with pytest.raises(ConfigError) as failed:
        _run_in_cluster(ray_head, tmp_path / "out", SMALL + [override] + extra, input_uri=str(root), manifest=None)
    assert str(failed.value) == f"{setting}: {built.value}"
