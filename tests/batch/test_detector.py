"""The batch job's query-detector phase without Ray (twostream/batch/detector.py): fingerprints
computed a strip at a time where images are decoded equal the library's; the run's detections
equal a plain QueryDetector run over the same images in (timestamp, image_id) order; a window
carried to a second run gives the detections of one run over both; detections become verdicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import texture_run
from twostream.batch.detector import (DETECTIONS_SCHEMA, QUERIES_SCHEMA, WindowError, apply_detections,
                                      detect_run, in_order, query_rows)
from twostream.batch.stages import fingerprint_columns
from twostream.core.config import PrefixGrouping
from twostream.core.query_detector import QueryDetector, QueryDetectorConfig, fingerprint

DEMO = sorted((Path(__file__).resolve().parents[2] / "twostream" / "demo" / "data").glob("*.jpg"))
CONFIG = QueryDetectorConfig()


def photo(k: int, size: tuple[int, int] = (96, 72)) -> np.ndarray:
    with Image.open(DEMO[k]) as im:
        return np.asarray(im.convert("RGB").resize(size, Image.BILINEAR))


def noise_run(image: np.ndarray, steps: int, seed: int = 0) -> list[np.ndarray]:
    """+-2/255 per value per query, within 8/255 of the photograph."""
    rng = np.random.default_rng(seed)
    x0 = image.astype(np.int16)
    x, run = x0.copy(), []
    for _ in range(steps):
        x = np.clip(x + rng.choice([-2, 2], size=x.shape), x0 - 8, x0 + 8).clip(0, 255)
        run.append(x.astype(np.uint8))
    return run


def queries(images: list[tuple[str, str, float, np.ndarray]], shard: int) -> pa.Table:
    """QUERIES_SCHEMA rows of (image_id, source, timestamp, pixels), rows numbered in order."""
    cols = {n: [] for n in QUERIES_SCHEMA.names}
    for row, (image_id, source, ts, pixels) in enumerate(images):
        digest, sample, hashes = fingerprint_columns(pixels, CONFIG)
        for name, value in zip(QUERIES_SCHEMA.names, (shard, row, image_id, source, ts, pixels.shape[0],
                                                      pixels.shape[1], digest, sample, hashes)):
            cols[name].append(value)
    return pa.table(cols, schema=QUERIES_SCHEMA)


def expected(images: list[tuple[str, str, float, np.ndarray]]) -> dict[str, list[str]]:
    """The independent computation: one QueryDetector over the images in (timestamp, id) order."""
    detector = QueryDetector(CONFIG)
    flagged = {}
    for image_id, source, ts, pixels in sorted(images, key=lambda r: (r[2], r[0])):
        report, hit = detector.detect(pixels, source=source, query_id=image_id, now=ts)
        if hit:
            flagged[image_id] = [m.query_id for m in report.matches]
    return flagged


def got(detections: pa.Table, tables: list[pa.Table]) -> dict[str, list[str]]:
    ids = {(t.column("shard")[0].as_py(), r): i for t in tables for r, i in enumerate(t.column("image_id").to_pylist())}
    return {ids[(d["shard"], d["row"])]: d["query_matches"] for d in detections.to_pylist()}


def test_fingerprint_columns_equal_the_library_fingerprint_for_strips_arrays_and_tensors() -> None:
    with Image.open(DEMO[0]) as im:
        big = im.convert("RGB").resize((300, 700))  # 700 rows: three strips of STRIP_ROWS
    pixels = np.asarray(big)
    fp = fingerprint(pixels, CONFIG)
    want = (fp.digest, fp.sample.tobytes(), np.asarray(fp.hashes, "<i8").tobytes())
    assert fingerprint_columns(big, CONFIG) == want
    assert fingerprint_columns(pixels, CONFIG) == want
    assert fingerprint_columns(torch.from_numpy(pixels.copy()).permute(2, 0, 1), CONFIG) == want


def test_a_run_over_shards_equals_one_detector_in_time_order() -> None:
    base = photo(1)
    run = noise_run(base, 14)
    images = [(f"att-{k:02d}", f"src-{k % 5}", 100.0 + k, x) for k, x in enumerate(run)]
    images += [(f"copy-{k}", f"fan-{k}", 100.5 + k, photo(2)) for k in range(10)]  # one photograph, 10 sources
    images += [(f"photo-{k}", "honest", 101.5 + k, photo(k + 3)) for k in range(6)]
    order = np.random.default_rng(0).permutation(len(images))  # shards hold them in any order
    shards = [[images[i] for i in order[:15]], [images[i] for i in order[15:]]]
    tables = [queries(s, k) for k, s in enumerate(shards)]
    detections, window, counts = detect_run(tables, None, CONFIG)
    want = expected(images)
    assert detections.schema == DETECTIONS_SCHEMA
    assert got(detections, tables) == want
    assert set(want) == {f"att-{k:02d}" for k in range(CONFIG.min_matches, 14)}  # the independent run agrees
    assert counts["queries"] == 30 and counts["exact_reuploads"] == 9 and counts["query_attacks"] == 6
    assert window.num_rows == 30 - 9 == counts["window_carried_out"]


def test_sorted_parts_read_in_small_batches_equal_one_detector_in_time_order(tmp_path: Path) -> None:
    """The job's way: each shard's queries sorted (``in_order``), written as Parquet in row groups,
    read back two rows at a time and merged; the same detections and counts as the independent
    run, and the shards' rows are held a batch at a time, never concatenated."""
    run = noise_run(photo(1), 14)
    images = [(f"att-{k:02d}", f"src-{k % 5}", 100.0 + k, x) for k, x in enumerate(run)]
    images += [(f"copy-{k}", f"fan-{k}", 100.5 + k, photo(2)) for k in range(10)]
    images += [(f"photo-{k}", "honest", 100.0 + k, photo(k + 3)) for k in range(6)]  # ties on the time: by id
    order = np.random.default_rng(3).permutation(len(images))
    tables = [queries([images[i] for i in part], k) for k, part in enumerate(np.array_split(order, 3))]
    streams = []
    for k, table in enumerate(tables):
        pq.write_table(in_order(table), tmp_path / f"part-{k}.parquet", row_group_size=2)
        streams.append(pq.ParquetFile(tmp_path / f"part-{k}.parquet").iter_batches(batch_size=2))
    detections, window, counts = detect_run(streams, None, CONFIG)
    assert got(detections, tables) == expected(images)
    assert counts["queries"] == 30 and counts["exact_reuploads"] == 9 and counts["query_attacks"] == 6
    assert window.num_rows == 21


def test_a_carried_window_catches_the_continuation_of_a_run() -> None:
    run = noise_run(photo(4), 16, seed=1)
    images = [(f"q{k:02d}", f"src-{k}", float(k), x) for k, x in enumerate(run)]
    first, second = queries(images[:6], 0), queries(images[6:], 1)
    _, window, _ = detect_run([first], None, CONFIG)
    alone, _, _ = detect_run([second], None, CONFIG)
    carried, window2, counts = detect_run([second], window, CONFIG)
    assert got(alone, [second]) == expected(images[6:]) == {f"q{k:02d}": got(alone, [second])[f"q{k:02d}"]
                                                            for k in range(6 + CONFIG.min_matches, 16)}
    want = {k: v for k, v in expected(images).items()}
    assert got(carried, [second]) == want and set(want) == {f"q{k:02d}" for k in range(CONFIG.min_matches, 16)}
    assert counts["window_carried_in"] == 6 and window2.num_rows == 16


def test_an_image_id_the_window_already_holds_is_remembered_under_a_new_name() -> None:
    run = noise_run(photo(5), 12, seed=2)
    _, window, _ = detect_run([queries([("same", "a", 0.0, run[0])], 0)], None, CONFIG)
    later = queries([("same" if k == 1 else f"n{k}", "b", float(k), x) for k, x in enumerate(run[1:], 1)], 0)
    detections, window2, _ = detect_run([later], window, CONFIG)
    assert window2.column("query_id").to_pylist()[:2] == ["same", "same#2"]
    assert all("same" in d and "same#2" in d for d in detections.column("query_matches").to_pylist())


def test_a_window_of_another_config_is_refused_by_name() -> None:
    _, window, _ = detect_run([queries([("a", "s", 0.0, photo(6))], 0)], None, CONFIG)
    with pytest.raises(WindowError, match="entry 'a' was made with another detector config"):
        detect_run([], window, QueryDetectorConfig(windows=256))
    with pytest.raises(WindowError, match="missing column"):
        detect_run([], window.drop_columns(["fp_sample"]), CONFIG)


def test_detections_become_query_attack_verdicts_with_their_matches() -> None:
    staging = pa.table({"row": pa.array([0, 1, 2], pa.int32()), "verdict": ["accepted", "adversarial", "error"],
                        "label": ["cat", None, None], "imagenet_index": pa.array([281, None, None], pa.int32()),
                        "fp_digest": pa.array([b"x", b"y", None], pa.binary())})
    detections = pa.table({"shard": pa.array([0], pa.int32()), "row": pa.array([0], pa.int32()),
                           "query_matches": [["m1", "m2"]]}, schema=DETECTIONS_SCHEMA)
    out = apply_detections(staging, detections)
    assert out.column("verdict").to_pylist() == ["query_attack", "adversarial", "error"]
    assert out.column("label").to_pylist() == [None, None, None]
    assert out.column("imagenet_index").to_pylist() == [None, None, None]
    assert out.column("query_matches").to_pylist() == [["m1", "m2"], None, None]
    assert apply_detections(staging, DETECTIONS_SCHEMA.empty_table()).column("verdict").equals(staging.column("verdict"))
    assert query_rows(staging.append_column("image_id", pa.array(["a", "b", "c"])).append_column(
        "source", pa.array(["s"] * 3)).append_column("timestamp", pa.array([0.0] * 3)).append_column(
        "height", pa.array([1] * 3, pa.int32())).append_column("width", pa.array([1] * 3, pa.int32())).append_column(
        "fp_sample", pa.array([b""] * 3, pa.binary())).append_column("fp_hashes", pa.array([b""] * 3, pa.binary())),
        4).column("row").to_pylist() == [0, 1]


def test_fingerprints_travel_in_the_decoded_rows_on_both_decode_paths(tmp_path: Path) -> None:
    """``read_decode`` fingerprints what it decodes; with JPEGs decoded on the device (here the
    CPU device), the high stream's actor fingerprints the device decoder's pixels."""
    import io

    import pyarrow.compute as pc

    from twostream.batch import planning, stages
    from twostream.core.config import load_config
    from twostream.core.device_decode import decode_on_device
    from twostream.core.scoring import input_spec

    for k in range(3):
        buf = io.BytesIO()
        Image.fromarray(photo(k)).save(buf, "JPEG", quality=90)
        (tmp_path / f"p{k}.jpg").write_bytes(buf.getvalue())
    (tmp_path / "q.png").write_bytes(b"not an image")
    small = ["high.model=resnet10t", "high.weights=random", "low.model=cifar_resnet20", "low.weights=random"]
    (unit,) = planning.work_units(planning.plan_input(str(tmp_path)).shards, 256)
    for decode in ("cpu", "device"):
        cfg = load_config(None, small + [f"job.decode={decode}"])
        specs = {kind: input_spec(cfg, kind) for kind in stages.KINDS}
        table = pa.concat_tables(stages.read_decode(unit, cfg, specs))
        if decode == "device":
            assert table.column("fp_digest").null_count == 4  # the JPEGs travel encoded
            table = stages.StreamStage(cfg, "high")(table)
        by_key = dict(zip(table.column("key").to_pylist(), table.column("fp_sample").to_pylist()))
        assert by_key["q.png"] is None
        for k in range(3):
            data = (tmp_path / f"p{k}.jpg").read_bytes()
            if decode == "cpu":
                pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            else:
                pixels = decode_on_device([data], cfg.limits, "cpu")[0][0].permute(1, 2, 0).numpy()
            assert by_key[f"p{k}.jpg"] == fingerprint(pixels, CONFIG).sample.tobytes(), (decode, k)
        off = load_config(None, small + [f"job.decode={decode}", "detector.enabled=false"])
        assert pc.all(pc.is_null(pa.concat_tables(stages.read_decode(unit, off, specs)).column("fp_digest"))).as_py()


def test_rule_3_counts_per_network_under_the_jobs_grouping_and_across_a_carried_window() -> None:
    """The texture-hidden run (only rule 3 catches it: query k has k near-duplicates, no match)
    from a fresh address of one IPv6 /64 per query, over two shards in time order. With the
    job's ``reputation.group_by_prefix`` the addresses are one identity: the rows from query
    min_source_near (16) on are flagged, each with its earlier queries as evidence, newest first;
    without it, none. The window keeps the raw addresses, and a second run carrying the first
    ten queries' window flags the same queries."""
    n = CONFIG.min_source_near + 3
    images = [(f"q{k:02d}", f"2001:db8:9:9::{k + 1:x}", 100.0 + k, x) for k, x in enumerate(texture_run(n))]
    tables = [queries(images[1::2], 0), queries(images[::2], 1)]
    grouping = PrefixGrouping(ipv4=24, ipv6=64)
    want = {f"q{k:02d}": [f"q{j:02d}" for j in reversed(range(k))] for k in range(16, n)}
    detections, window, _ = detect_run(tables, None, CONFIG, grouping)
    assert got(detections, tables) == want
    assert window.column("source").to_pylist() == [s for _, s, _, _ in images]
    assert detect_run(tables, None, CONFIG)[0].num_rows == 0
    first, second = queries(images[:10], 0), queries(images[10:], 1)
    _, carried, _ = detect_run([first], None, CONFIG, grouping)
    again, _, counts = detect_run([second], carried, CONFIG, grouping)
    assert got(again, [second]) == want and counts["window_carried_in"] == 10
