"""The query detector in the batch job, run as users run it (``twostream score`` over a folder,
then again over the next folder with ``--state``): a hand-built query run (a photograph plus
+-2/255 noise steps within 8/255, each query from one of seven sources) split over two runs,
exact re-uploads of another photograph from ten sources and distinct photographs. The images
flagged are exactly those an independent QueryDetector run over the decoded pixels in (timestamp,
image_id) order predicts, in both runs; the second catches the run's continuation only through the
carried window; flagged images count as rejections for Algorithm 2; the counts add up."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import SMALL_JOB, demo_photo, png_bytes
from twostream.core.config import ReputationConfig
from twostream.core.query_detector import QueryDetector, QueryDetectorConfig
from twostream.core.reputation import Upload, replay

pytestmark = [pytest.mark.ray, pytest.mark.own_process, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[2]
SMALL = SMALL_JOB + ["thresholds.p2=0.3", "reputation.threshold=2", "job.files_per_shard=8"]
STEPS, SPLIT = 20, 12  # queries of the run; the first SPLIT go to the first job


def uploads() -> dict[str, list[tuple[str, str, float, bytes]]]:
    """(image id, source, timestamp, PNG bytes) per job: 'first' and 'second'."""
    rng = np.random.default_rng(7)
    x0 = demo_photo(1).astype(np.int16)
    x = x0.copy()
    out: dict[str, list] = {"first": [], "second": []}
    for k in range(STEPS):
        x = np.clip(x + rng.choice([-2, 2], size=x.shape), x0 - 8, x0 + 8).clip(0, 255)
        half = "first" if k < SPLIT else "second"
        out[half].append((f"att-{k:02d}", f"attacker-{k % 7}", 100.0 + 10 * k, png_bytes(x.astype(np.uint8))))
    popular = png_bytes(demo_photo(2))
    for k in range(10):  # the same bytes from ten accounts, across both jobs
        out["first" if k < 5 else "second"].append((f"copy-{k}", f"fan-{k}", 105.0 + 20 * k, popular))
    for k in range(6):  # distinct photographs
        out["first" if k < 3 else "second"].append((f"photo-{k}", "honest", 103.0 + 30 * k, png_bytes(demo_photo(k + 3))))
    return out


def predicted(images: list[tuple[str, str, float, bytes]]) -> dict[str, list[str]]:
    """The independent computation: one QueryDetector (its MemoryStore) over the decoded pixels
    in (timestamp, image_id) order -> flagged image id: the ids it matched, closest first."""
    detector = QueryDetector(QueryDetectorConfig())
    flagged = {}
    for image_id, source, ts, data in sorted(images, key=lambda r: (r[2], r[0])):
        pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        report, hit = detector.detect(pixels, source=source, query_id=image_id, now=ts)
        if hit:
            flagged[image_id] = [m.query_id for m in report.matches]
    return flagged


def score(tmp: Path, name: str, state: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    sets = [a for s in SMALL for a in ("--set", s)]
    extra = ["--state", str(state)] if state else []
    proc = subprocess.run([sys.executable, "-m", "twostream.cli", "score", "--input", str(tmp / name), "--output",
                           str(tmp / f"out-{name}"), "--no-progress", *extra, *sets], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_query_runs_are_caught_within_a_job_and_across_jobs(tmp_path: Path) -> None:
    jobs = uploads()
    for name, images in jobs.items():
        (tmp_path / name).mkdir()
        for image_id, source, ts, data in images:
            (tmp_path / name / f"{image_id}.png").write_bytes(data)
            (tmp_path / name / f"{image_id}.json").write_text(
                json.dumps({"image_id": image_id, "source": source, "timestamp": ts}))
    everything = predicted(jobs["first"] + jobs["second"])
    assert predicted(jobs["second"]) == {}, "the second job alone holds too short a run"
    min_matches = QueryDetectorConfig().min_matches
    assert set(everything) == {f"att-{k:02d}" for k in range(min_matches, STEPS)}

    proc1 = score(tmp_path, "first")
    proc2 = score(tmp_path, "second", state=tmp_path / "out-first")
    seen = []
    for name, proc in (("first", proc1), ("second", proc2)):
        out = tmp_path / f"out-{name}"
        rows = pq.read_table(out / "images").to_pylist()
        want = {i: m for i, m in everything.items() if i in {r[0] for r in jobs[name]}}
        got = {r["image_id"]: r["query_matches"] for r in rows if r["verdict"] == "query_attack"}
        assert got == want and want, name
        assert all(r["query_matches"] is None for r in rows if r["verdict"] != "query_attack")
        for r in rows:  # a detection is answered as such unless the source is blocked
            if r["verdict"] == "query_attack":
                assert r["label"] is None and r["response"] == ("blocked" if r["blacklisted"] else "query_attack")
        assert list((out / "detector").rglob("*.parquet")) == [out / "detector" / "window.parquet"]  # parts removed
        summary = json.loads((out / "summary.json").read_text())
        verdicts = Counter(r["verdict"] for r in rows)
        assert summary["counts_add_up"] and summary["inputs"] == len(jobs[name]) == sum(verdicts.values())
        assert summary["verdicts"] == {v: verdicts.get(v, 0) for v in summary["verdicts"]}
        assert summary["verdicts"]["query_attack"] == summary["detector"]["query_attacks"] == len(want)
        copies = sum(1 for r in jobs[name] if r[0].startswith("copy-"))
        assert summary["detector"]["exact_reuploads"] == copies - (name == "first")  # the first copy is new
        assert f"query_attack {len(want)}" in proc.stdout
        report = (out / "report.html").read_text()
        assert "id=query-attack-count" in report and f"{len(want):,} uploads were near-identical" in report
        seen += rows

    # Algorithm 2 over both jobs with a detection as a rejection: the reference replay agrees
    seen.sort(key=lambda r: (r["timestamp"], r["image_id"]))
    ups = [Upload(r["source"], r["timestamp"], r["image_id"], r["verdict"] != "accepted",
                  r["label"] or r["verdict"]) for r in seen]
    responses, ledger = replay(ups, ReputationConfig(threshold=2))
    assert [(r["response"], r["cc"], r["blacklisted"]) for r in seen] == [
        (x.response, x.cc, x.blacklisted) for x in responses]
    sources = {r["source"]: r for r in pq.read_table(tmp_path / "out-second" / "sources").to_pylist()}
    assert {s: r["rejected"] for s, r in sources.items()} == {s: ledger.get(s).rejected for s in sources}
    # the window each job carries: its distinct images (exact re-uploads once), bounded by the config
    windows = [pq.read_table(tmp_path / f"out-{n}" / "detector" / "window.parquet") for n in ("first", "second")]
    assert [w.num_rows for w in windows] == [SPLIT + 1 + 3, STEPS + 1 + 6]
