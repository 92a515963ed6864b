"""The query detector in the audit (twostream/audit/clusters.py through ``run_audit`` over a log
file and an image folder): a hand-built query run (a photograph plus +-2/255 noise steps within
8/255) uploaded by several sources, some images twice, beside exact copies of another photograph
from many sources and distinct photographs. The images flagged are those an independent
QueryDetector run predicts in first-upload order; the cluster holds the run's images and every
source that uploaded one; flagged uploads are rejections in the replay and in the what-if;
without ``--images`` the clusters are said to be unavailable."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from conftest import demo_photo, png_bytes, texture_run
from twostream.audit.run import run_audit
from twostream.core.config import TwoStreamConfig, load_config
from twostream.core.query_detector import QueryDetector, QueryDetectorConfig
from twostream.core.results import ScoredBatch, score_rows

T = 1_700_000_000
STEPS = 12


def accept_all(uris: list[str], ids: list[str]) -> ScoredBatch:
    """Every image accepted as a cat (H-Net: tabby, L-Net: cat): rejections come from the detector."""
    n = len(ids)
    return score_rows(ids, [None] * n, [(72, 96)] * n, [[281, 0, 1, 2, 3]] * n, [[0.9, 0.02, 0.02, 0.02, 0.02]] * n,
                      [[3, 0]] * n, [[0.9, 0.05]] * n, TwoStreamConfig().thresholds)


def build(tmp: Path) -> tuple[Path, Path, list[tuple[float, str, str]]]:
    """The image folder, the CSV log and its records (timestamp, source, image id)."""
    images = tmp / "images"
    images.mkdir()
    rng = np.random.default_rng(3)
    x0 = demo_photo(1).astype(np.int16)
    x = x0.copy()
    records = []
    for k in range(STEPS):
        x = np.clip(x + rng.choice([-2, 2], size=x.shape), x0 - 8, x0 + 8).clip(0, 255)
        (images / f"att-{k:02d}.png").write_bytes(png_bytes(x.astype(np.uint8)))
        records.append((T + 10.0 * k, f"10.9.0.{k % 4}", f"att-{k:02d}"))
        if k % 3 == 0:  # uploaded again later, by another source
            records.append((T + 10.0 * k + 500, "10.9.9.9", f"att-{k:02d}"))
    popular = png_bytes(demo_photo(2))
    for k in range(8):  # one photograph's bytes under eight names, from eight sources
        (images / f"copy-{k}.png").write_bytes(popular)
        records.append((T + 7.0 * k + 3, f"10.1.0.{k}", f"copy-{k}"))
    for k in range(4):
        (images / f"photo-{k}.png").write_bytes(png_bytes(demo_photo(k + 3)))
        records.append((T + 11.0 * k + 1, "10.2.0.1", f"photo-{k}"))
    log = tmp / "uploads.csv"
    log.write_text("time,client_ip,request_uri\n" + "".join(f"{t},{s},/u/{i}.png\n" for t, s, i in records))
    return images, log, records


def predicted(images: Path, records: list[tuple[float, str, str]]) -> dict[str, list[str]]:
    """An independent QueryDetector over each image at its first upload, in (timestamp, id) order."""
    first: dict[str, tuple[float, str]] = {}
    for t, s, i in sorted(records):
        first.setdefault(i, (t, s))
    detector = QueryDetector(QueryDetectorConfig())
    flagged = {}
    for i, (t, s) in sorted(first.items(), key=lambda kv: (kv[1][0], kv[0])):
        pixels = np.asarray(Image.open(images / f"{i}.png").convert("RGB"))
        report, hit = detector.detect(pixels, source=s, query_id=i, now=t)
        if hit:
            flagged[i] = [m.query_id for m in report.matches]
    return flagged


def test_the_audit_reports_the_cluster_and_its_sources(tmp_path: Path) -> None:
    images, log, records = build(tmp_path)
    want = predicted(images, records)
    assert set(want) == {f"att-{k:02d}" for k in range(QueryDetectorConfig().min_matches, STEPS)}
    config = load_config(None, [], {"audit": {"what_if": ["p1=0.01", "threshold=5"]}})
    result = run_audit(str(log), str(tmp_path / "out"), images_uri=str(images), config=config, score_fn=accept_all)

    detector = result.summary["query_detector"]
    assert detector == {"available": True, "queries": STEPS + 8 + 4, "exact_reuploads": 7, "flagged": len(want),
                        "unreadable": 0, "clusters": 1}
    clusters = pq.read_table(tmp_path / "out" / "clusters.parquet").to_pylist()
    run_ids = {f"att-{k:02d}" for k in range(STEPS)}
    linked = set(want) | {m for ms in want.values() for m in ms}
    assert linked == run_ids  # every image of the run is matched by a flagged one
    (cluster,) = clusters
    assert cluster["images"] == sorted(run_ids) and cluster["flagged"] == sorted(want)
    senders = Counter(s for _, s, i in records if i in run_ids)
    assert dict(zip(cluster["sources"], cluster["source_uploads"])) == dict(senders)
    assert cluster["uploads"] == sum(senders.values())
    assert (cluster["first_seen"], cluster["last_seen"]) == (min(t for t, _, i in records if i in run_ids),
                                                             max(t for t, _, i in records if i in run_ids))

    # flagged uploads are rejections (every upload of a flagged image), answered query_attack unless blocked
    timeline = pq.read_table(tmp_path / "out" / "timeline.parquet").to_pylist()
    for r in timeline:
        assert r["verdict"] == ("query_attack" if r["image_id"] in want else "accepted")
        if r["verdict"] == "query_attack":
            assert r["response"] in ("query_attack", "blocked")
    rejected = Counter(s for _, s, i in records if i in want)
    sources = {r["source"]: r["rejected"] for r in pq.read_table(tmp_path / "out" / "sources.parquet").to_pylist()}
    assert sources == {s: rejected.get(s, 0) for s in sources}
    flagged_uploads = sum(rejected.values())
    assert result.summary["uploads_rejected"] == flagged_uploads
    what_if = {r["setting"]: r["rejected_uploads"] for r in result.what_if.to_pylist()}
    assert what_if == {"baseline": flagged_uploads, "p1=0.01": flagged_uploads, "threshold=5": flagged_uploads}
    report = (tmp_path / "out" / "report.html").read_text()
    assert 'id="clusters"' in report or "id=clusters" in report
    assert "10.9.9.9 (4)" in report

    # the same log without --images: the scores alone, clusters unavailable, said so
    again = run_audit(str(log), str(tmp_path / "out2"), scores_uri=str(tmp_path / "out" / "scored_images.parquet"),
                      config=TwoStreamConfig(), score_fn=accept_all)
    assert again.summary["query_detector"]["available"] is False
    assert "no --images" in again.summary["query_detector"]["reason"]
    assert json.loads((tmp_path / "out2" / "summary.json").read_text())["query_detector"]["available"] is False
    assert "id=clusters-unavailable" in (tmp_path / "out2" / "report.html").read_text()
    assert not (tmp_path / "out2" / "clusters.parquet").exists()


def test_rule_3_counts_per_network_under_the_audits_grouping(tmp_path: Path) -> None:
    """The texture-hidden run (only rule 3 catches it: image k has k near-duplicates, no match),
    each image uploaded once from a fresh address of one IPv6 /64. With
    ``reputation.group_by_prefix`` the audit's detector counts the addresses as one identity:
    images min_source_near (16) on are flagged, and the cluster holds all of them, its source the
    network (the audit's per-source tables are per key); without grouping nothing is flagged."""
    n = QueryDetectorConfig().min_source_near + 3
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for k, x in enumerate(texture_run(n)):
        (images / f"tx-{k:02d}.png").write_bytes(png_bytes(x))
        lines.append(f"{T + 10 * k},2001:db8:4:4::{k + 1:x},/u/tx-{k:02d}.png\n")
    log = tmp_path / "uploads.csv"
    log.write_text("time,client_ip,request_uri\n" + "".join(lines))
    grouped = load_config(None, [], {"reputation": {"group_by_prefix": {"ipv4": 24, "ipv6": 64}}})
    result = run_audit(str(log), str(tmp_path / "grouped"), images_uri=str(images), config=grouped, score_fn=accept_all)
    assert result.summary["query_detector"]["flagged"] == n - 16
    (cluster,) = pq.read_table(tmp_path / "grouped" / "clusters.parquet").to_pylist()
    assert cluster["flagged"] == [f"tx-{k:02d}" for k in range(16, n)]
    assert cluster["images"] == [f"tx-{k:02d}" for k in range(n)]
    assert (cluster["sources"], cluster["source_uploads"]) == (["2001:db8:4:4::/64"], [n])
    plain = run_audit(str(log), str(tmp_path / "plain"), images_uri=str(images), config=TwoStreamConfig(),
                      score_fn=accept_all)
    assert plain.summary["query_detector"]["flagged"] == 0 and plain.summary["query_detector"]["clusters"] == 0
