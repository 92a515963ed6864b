"""The batch run's report (twostream/batch/report.py) over a hand-built output folder.

The folder holds what the job writes (``images/`` in two shard files, ``sources/``,
``summary.json``). Its CC columns follow SPEC 3 (CC +1 on a rejected image, -1 on an accepted
one, capped at 15, blacklisted at CC >= 3, released at CC == 0; error rows are no events), run
here by a few lines of the test itself; every expected value of the report is computed from
those Parquet files and the summary, never by the report's code.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twostream.batch.outputs import IMAGES_SCHEMA
from twostream.batch.report import write_batch_report
from twostream.core.config import TwoStreamConfig
from twostream.core.sources import SOURCES_SCHEMA

T0 = 1_714_550_400.0  # 2024-05-01T08:00:00Z
EVIL = '<img src=x onerror="alert(1)">'
# source -> (role, share of adversarial images, share of error rows, images)
SENDERS = {
    "honest-a": ("honest", 0.05, 0.05, 40),
    "honest-b": ("honest", 0.0, 0.1, 30),
    "outside": ("honest-out-of-scope", 0.9, 0.0, 25),
    "attacker-fgsm": ("attacker-fgsm", 0.85, 0.0, 50),
    "attacker-slow": ("attacker-interleave", 0.4, 0.0, 40),
    "adaptive": ("attacker-adaptive", 0.7, 0.05, 15),
}
ERRORS = ["cannot identify image file", "truncated tar member: 1000 of 3000 bytes present", "over limits.max_pixels"]
STAGES = {"read": 812.5, "decode": 240.25, "high": 31.0, "low": 95.75, "compare": 5000.0}


def _replay(verdicts: list[str]) -> tuple[list, list, list, list]:
    """SPEC 3 over one source's verdicts in order: cc, blacklisted, response per row, intervals (row indices)."""
    cc, listed, joined = 0, False, None
    ccs, bls, responses, intervals = [], [], [], []
    for k, v in enumerate(verdicts):
        if v == "error":
            ccs.append(None), bls.append(None), responses.append("error")
            continue
        cc = min(cc + 1, 15) if v == "adversarial" else max(cc - 1, 0)
        if not listed and cc >= 3:
            listed, joined = True, k
        elif listed and cc == 0:
            listed = False
            intervals.append((joined, k))
        ccs.append(cc), bls.append(listed)
        responses.append("blocked" if listed else ("cat" if v == "accepted" else "adversarial"))
    if listed:
        intervals.append((joined, None))
    return ccs, bls, responses, intervals


def write_run(out: Path, ground_truth: bool = True, evil: bool = False, seed: int = 0) -> Path:
    """A batch output folder: images/ (two shards), sources/, summary.json; ``evil``: the adaptive
    attacker's source id is HTML."""
    rng = np.random.default_rng(seed)
    rows, srows = [], []
    senders = {EVIL if evil and s == "adaptive" else s: v for s, v in SENDERS.items()}
    for s, (role, adv, err, n) in senders.items():
        ts = np.sort(T0 + rng.uniform(0, 2 * 86400, n)).round(3)
        draw = rng.random(n)
        verdicts = ["error" if d < err else "adversarial" if d < err + adv else "accepted" for d in draw]
        ccs, bls, responses, intervals = _replay(verdicts)
        for k in range(n):
            rows.append({"image_id": f"{s[:8]}-{k:03d}", "key": f"k{k}", "uri": f"s3://b/{k}", "shard": f"shard-{k % 2}",
                         "source": s, "timestamp": float(ts[k]), "verdict": verdicts[k],
                         "label": "cat" if verdicts[k] == "accepted" else None,
                         "error": ERRORS[k % len(ERRORS)] if verdicts[k] == "error" else None,
                         "response": responses[k], "cc": ccs[k], "blacklisted": bls[k],
                         "high_idx": [], "high_prob": [], "high_labels": [], "low_idx": [], "low_prob": [],
                         "low_labels": []})
        scored = [k for k in range(n) if verdicts[k] != "error"]
        srows.append({"source": s, "images": len(scored), "rejected": verdicts.count("adversarial"),
                      "blocked": responses.count("blocked"), "errors": verdicts.count("error"),
                      "cc": ccs[scored[-1]], "blacklisted": bool(bls[scored[-1]]),
                      "first_seen": float(ts[scored[0]]), "last_seen": float(ts[scored[-1]]),
                      "blacklist_intervals": [{"joined": float(ts[a]), "left": None if b is None else float(ts[b])}
                                              for a, b in intervals],
                      "times_blacklisted": len(intervals)})
    (out / "images").mkdir(parents=True)
    (out / "sources").mkdir()
    images = pa.Table.from_pylist(rows, schema=pa.schema([f for f in IMAGES_SCHEMA]))
    for shard in ("shard-0", "shard-1"):
        pq.write_table(images.filter(pa.compute.equal(images.column("shard"), shard)), out / "images" / f"{shard}.parquet")
    pq.write_table(pa.Table.from_pylist(srows, schema=SOURCES_SCHEMA), out / "sources" / "part-00000.parquet")
    verdicts = Counter(r["verdict"] for r in rows)
    summary = {
        "input": "s3://uploads/2024-05/", "manifest": "s3://uploads/manifest.csv", "output": str(out),
        "inputs": len(rows), "verdicts": dict(verdicts), "responses": dict(Counter(r["response"] for r in rows)),
        "sources": len(srows), "blacklisted_sources": sum(r["blacklisted"] for r in srows),
        "throughput": {"images_scored_this_run": len(rows), "scoring_images_per_s": 12.5,
                       "end_to_end_images_per_s": 9.25, "per_stage_images_per_worker_s": STAGES},
        "wall_s": {"total": 30.5, "scoring": 20.0, "reputation": 6.0, "final": 4.5},
        "config": TwoStreamConfig().model_dump(mode="json"),
        "versions": {"twostream": "test"},
    }
    if ground_truth:
        summary["ground_truth"] = {
            "sources": [{"source": r["source"], "role": senders[r["source"]][0], "images": r["images"],
                         "accepted": r["images"] - r["rejected"], "rejected": r["rejected"], "blocked": r["blocked"],
                         "errors": r["errors"], "blacklisted": r["blacklisted"],
                         "joined_at": [k + 1 for k in range(len(r["blacklist_intervals"]))],
                         "since_image": 7 if r["blacklisted"] else None} for r in srows],
            "roles": {"honest": {"sources": 2, "ever_blacklisted": 0, "blacklisted": 0, "images": 60,
                                 "accepted": 58, "rejected": 2, "blocked": 0}},
            "lines": ["attackers caught: 3 of 3", "honest in-scope senders blacklisted: 0 of 2"],
        }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return out


# ---------------------------------------------------------------------------------------------
# Expected values, from the files
# ---------------------------------------------------------------------------------------------
def expected(out: Path) -> dict:
    images = pa.concat_tables([pq.read_table(p) for p in sorted((out / "images").glob("*.parquet"))]).to_pylist()
    sources = pq.read_table(out / "sources").to_pylist()
    return {
        "verdicts": Counter(r["verdict"] for r in images),
        "responses": Counter(r["response"] for r in images),
        "errors": Counter(r["error"] for r in images if r["error"] is not None),
        "ever": {r["source"]: r for r in sources if r["blacklist_intervals"]},
        "summary": json.loads((out / "summary.json").read_text()),
    }


def table_rows(doc: str, table_id: str) -> list[list[str]]:
    """The body rows of ``<table id=table_id>`` as unescaped cell texts."""
    body = re.search(rf'<table id="{table_id}">.*?<tbody>(.*?)</tbody>', doc, re.S).group(1)
    return [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr, re.S)]
            for tr in re.findall(r"<tr[^>]*>(.*?)</tr>", body, re.S)]


def check_tables(doc: str, exp: dict) -> None:
    """The counts, errors, blacklisted sources, throughput and ground truth tables against ``exp``."""
    assert {r[0]: int(r[1]) for r in table_rows(doc, "verdicts")} == {
        v: exp["verdicts"].get(v, 0) for v in ("accepted", "adversarial", "query_attack", "error")}
    assert {r[0]: int(r[1]) for r in table_rows(doc, "responses")} == dict(exp["responses"])
    assert {r[0]: int(r[1]) for r in table_rows(doc, "errors")} == dict(exp["errors"])
    listed = table_rows(doc, "blacklisted")
    assert {r[0] for r in listed} == set(exp["ever"])
    for r in listed:
        src = exp["ever"][r[0]]
        assert [int(x) for x in (r[1], r[2], r[3], r[4], r[5], r[7])] == [
            src["images"], src["rejected"], src["blocked"], src["errors"], src["cc"], len(src["blacklist_intervals"])]
        assert r[6] == ("yes" if src["blacklisted"] else "released")
    stages = exp["summary"]["throughput"]["per_stage_images_per_worker_s"]
    assert {r[0]: float(r[1].replace(",", "")) for r in table_rows(doc, "throughput")} == pytest.approx(
        stages, abs=0.051)  # shown to 0.1
    gt = exp["summary"].get("ground_truth")
    if gt:
        got = table_rows(doc, "ground-truth")
        assert [(r[0], r[1], int(r[2]), int(r[4])) for r in got] == [
            (s["source"], s["role"], s["images"], s["rejected"]) for s in gt["sources"]]
        for line in gt["lines"]:
            assert f"<li>{html.escape(line)}</li>" in doc
    else:
        assert 'id="ground-truth"' not in doc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    out = write_run(tmp_path_factory.mktemp("batch_report") / "run", evil=True)
    write_batch_report(str(out))
    return out


def test_report_tables_match_the_output_files(run_dir: Path) -> None:
    doc = (run_dir / "report.html").read_text()
    exp = expected(run_dir)
    assert len(exp["ever"]) >= 3 and exp["errors"] and len(exp["responses"]) >= 3  # the fixture covers the cases
    check_tables(doc, exp)
    # the config is shown; the page is self-contained, and the log's strings escaped
    assert '"p1"' in html.unescape(re.search(r'<pre id="config">(.*?)</pre>', doc, re.S).group(1))
    assert not re.search(r'(src|href)="(?!data:)', doc) and "<script" not in doc and "<link" not in doc
    assert EVIL not in doc and html.escape(EVIL) in doc


def test_report_lists_the_first_sources_of_many(run_dir: Path, tmp_path: Path) -> None:
    """With more sources ever blacklisted than it lists, the table holds the first ones (listed at
    the end first, then most rejected, then by id) and says how many there are in all."""
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    exp = expected(out)
    order = sorted(exp["ever"].values(), key=lambda r: (not r["blacklisted"], -r["rejected"], r["source"]))
    assert len(order) >= 3
    doc = Path(write_batch_report(str(out), listed_rows=2)).read_text()
    assert [r[0] for r in table_rows(doc, "blacklisted")] == [r["source"] for r in order[:2]]
    assert f"the first 2 of {len(order)}" in doc
    assert f"<b>{len(order):,}</b>ever blacklisted" in doc


def test_report_without_ground_truth_errors_or_blacklisting(tmp_path: Path) -> None:
    """A summary without ground truth (a manifest without roles), no error rows, nobody blacklisted."""
    out = write_run(tmp_path / "run", ground_truth=False)
    images = pq.read_table(out / "images")
    for path in (out / "images").glob("*.parquet"):  # every row accepted: no errors, CC stays 0
        t = pq.read_table(path)
        n = t.num_rows
        for name, values in (("verdict", ["accepted"] * n), ("response", ["cat"] * n), ("error", [None] * n),
                             ("cc", [0] * n), ("blacklisted", [False] * n)):
            t = t.set_column(t.column_names.index(name), name, pa.array(values, t.schema.field(name).type))
        pq.write_table(t, path)
    src = pq.read_table(out / "sources")
    empty = pa.array([[]] * src.num_rows, src.schema.field("blacklist_intervals").type)
    src = src.set_column(src.column_names.index("blacklist_intervals"), "blacklist_intervals", empty)
    src = src.set_column(src.column_names.index("times_blacklisted"), "times_blacklisted",
                         pa.array([0] * src.num_rows, pa.int32()))
    src = src.set_column(src.column_names.index("blacklisted"), "blacklisted", pa.array([False] * src.num_rows))
    pq.write_table(src, out / "sources" / "part-00000.parquet")
    doc = (Path(write_batch_report(str(out)))).read_text()
    assert 'id="ground-truth"' not in doc and "id=no-errors" in doc and "id=no-blacklisted" in doc
    assert {r[0]: int(r[1]) for r in table_rows(doc, "verdicts")} == {
        "accepted": images.num_rows, "adversarial": 0, "query_attack": 0, "error": 0}
    assert doc.count('src="data:image/png;base64,') == 3  # rate, responses, throughput; no CC plot


def test_report_of_an_empty_run(tmp_path: Path) -> None:
    """No input at all: the report still renders (zero counts, no plots of sources)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "sources").mkdir()
    (tmp_path / "summary.json").write_text(json.dumps({"input": "x", "output": str(tmp_path), "inputs": 0}))
    doc = Path(write_batch_report(str(tmp_path))).read_text()
    assert {r[0]: int(r[1]) for r in table_rows(doc, "verdicts")} == {"accepted": 0, "adversarial": 0, "query_attack": 0, "error": 0}
    assert "id=no-blacklisted" in doc
