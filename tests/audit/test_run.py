"""Upload-log audit (twostream/audit/: logread, catalogue, replay, outputs, run, report; `twostream audit`).

The expected blacklist intervals below are worked out by hand from SPEC 3 (CC +1 on a
rejected image, -1 otherwise, capped at 15, blacklisted at CC >= 3, released at CC == 0);
nothing here calls ``twostream.core.reputation.replay`` to compute an expectation.
"""

from __future__ import annotations

import io
import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twostream.audit.catalogue import scorer_score_fn
from twostream.audit.logread import AuditError, ColumnMapping, parse_mapping, parse_timestamps
from twostream.audit.replay import WhatIf
from twostream.audit.run import run_audit
from twostream.core.config import ConfigError, TwoStreamConfig, load_config
from twostream.core.labels import Verdict
from twostream.core.results import score_rows

T = 1_700_000_000  # 2023-11-14T22:13:20Z
R, A, E = "adversarial", "accepted", "error"

# source -> list of (timestamp, image_id, verdict); the hand-worked expectations follow.
SEQUENCES: dict[str, list[tuple[float, str, str]]] = {
    # R R R R R A A A A A R R R:
    # CC 1 2 3 4 5 4 3 2 1 0 1 2 3 -> joins at k=2, leaves at k=9 (CC 0), joins again at k=12.
    "10.0.0.1": [(T + k, f"a-{k:02d}", v) for k, v in enumerate("RRRRRAAAAARRR")],
    # 20 R then 15 A: CC capped at 15 after k=14, needs all 15 A to reach 0 (k=34).
    "10.0.0.2": [(T + 100 + k, f"c-{k:02d}", "R" if k < 20 else "A") for k in range(35)],
    # A R A A R A R A A A: CC never above 1.
    "10.0.0.3": [(T + 150 + k, f"b-{k:02d}", v) for k, v in enumerate("ARAARARAAA")],
    # two uploads at the same second: (timestamp, image_id) order puts d-02 (R) before d-03 (A):
    # R R R(d-02) A(d-03) -> CC 1 2 3 (joins at T+202) 2 (still listed).
    "10.0.0.4": [(T + 200, "d-00", "R"), (T + 201, "d-01", "R"), (T + 202, "d-03", "A"), (T + 202, "d-02", "R")],
    # an undecodable image is not an Algorithm-2 event: R R E R -> CC 1 2 (2) 3, joins at T+303.
    "10.0.0.5": [(T + 300, "e-00", "R"), (T + 301, "e-01", "R"), (T + 302, "e-02", "E"), (T + 303, "e-03", "R")],
}
EXPECTED = {
    "10.0.0.1": dict(intervals=[(T + 2, T + 9), (T + 12, None)], cc=3, blacklisted=True, standing="blacklisted",
                     uploads=13, rejected=8, errors=0, blocked=8),  # blocked: k=2..8 and k=12
    "10.0.0.2": dict(intervals=[(T + 102, T + 134)], cc=0, blacklisted=False, standing="released",
                     uploads=35, rejected=20, errors=0, blocked=32),  # blocked: k=2..33
    "10.0.0.3": dict(intervals=[], cc=0, blacklisted=False, standing="clean",
                     uploads=10, rejected=3, errors=0, blocked=0),
    "10.0.0.4": dict(intervals=[(T + 202, None)], cc=2, blacklisted=True, standing="blacklisted",
                     uploads=4, rejected=3, errors=0, blocked=2),
    "10.0.0.5": dict(intervals=[(T + 303, None)], cc=3, blacklisted=True, standing="blacklisted",
                     uploads=4, rejected=3, errors=1, blocked=1),
}
VERDICT = {"R": R, "A": A, "E": E}
# malformed lines appended after the good ones: (line text, expected reason)
BAD = [
    ("yesterday,10.0.0.9,/uploads/b-00.png,ua", "unparseable timestamp"),
    (",10.0.0.9,/uploads/b-00.png,ua", "missing timestamp"),
    ("1700000000,,/uploads/b-00.png,ua", "missing source"),
    ("1700000000,10.0.0.9,,ua", "missing image key"),
    ("1700000000,10.0.0.9,/uploads/nope.png,ua", "unknown image key"),
    ("1700000000,10.0.0.9", "unparseable line"),
    ("1700000000,10.0.0.9,/uploads/b-00.png,ua,extra", "unparseable line"),
]


def _cfg(overrides: list[str] = (), **audit) -> TwoStreamConfig:
    """A config with these ``audit`` settings (run_audit takes its settings from ``config.audit``)."""
    return load_config(None, list(overrides), {"audit": audit})


def _fmt_time(ts: float, style: int) -> str:
    """The same instant in the formats a log may use (all must parse back to ``ts``)."""
    utc = datetime.fromtimestamp(ts, tz=timezone.utc)
    if style == 0:
        return str(int(ts))
    if style == 1:
        return utc.strftime("%Y-%m-%dT%H:%M:%SZ")
    if style == 2:
        return utc.astimezone(timezone(timedelta(hours=1))).isoformat()
    if style == 3:  # common log format, in -0700
        return utc.astimezone(timezone(timedelta(hours=-7))).strftime("%d/%b/%Y:%H:%M:%S %z")
    return utc.strftime("%Y-%m-%d %H:%M:%S")  # naive ISO: UTC


def _events():
    rows = []
    for source, seq in SEQUENCES.items():
        for ts, image_id, v in seq:
            rows.append((source, ts, image_id, VERDICT[v]))
    return rows


def _write_scores(path: Path, extra: dict | None = None) -> Path:
    ids, verdicts = [], []
    for _, _, image_id, verdict in _events():
        ids.append(image_id)
        verdicts.append(verdict)
    table = pa.table({"image_id": ids, "verdict": verdicts,
                      "label": [("cat" if v == A else None) for v in verdicts]})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def _write_csv_log(path: Path, seed: int = 0) -> tuple[Path, dict[str, int]]:
    """Good lines shuffled (so the audit must sort), mixed timestamp formats, then the bad lines.

    Returns the path and {reason: count} of the bad lines, plus their line numbers via BAD order.
    """
    rng = random.Random(seed)
    good = []
    for k, (source, ts, image_id, _) in enumerate(_events()):
        good.append(f"{_fmt_time(ts, k % 5)},{source},/uploads/{image_id}.png?via=web,Mozilla/5.0 (X11) #{source[-1]}")
    rng.shuffle(good)
    lines = ["time,client_ip,request_uri,user_agent", *good, "", *(b for b, _ in BAD)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _sources(result) -> dict[str, dict]:
    return {r["source"]: r for r in result.sources.to_pylist()}


def _check_expected(result) -> None:
    got = _sources(result)
    assert set(got) == set(EXPECTED)
    for source, exp in EXPECTED.items():
        row = got[source]
        assert [(iv["start"], iv["end"]) for iv in row["blacklist_intervals"]] == exp["intervals"], source
        assert row["cc"] == exp["cc"], source
        assert row["blacklisted"] is exp["blacklisted"], source
        assert row["final_standing"] == exp["standing"], source
        assert row["times_blacklisted"] == len(exp["intervals"])
        for key in ("uploads", "rejected", "errors", "blocked"):
            assert row[key] == exp[key], (source, key)
        seq = SEQUENCES[source]
        assert row["first_seen"] == min(t for t, _, _ in seq)
        assert row["last_seen"] == max(t for t, _, _ in seq)
        assert row["scored"] == exp["uploads"] - exp["errors"]
        assert row["rejection_rate"] == pytest.approx(exp["rejected"] / row["scored"])
    # the most suspicious first: ever blacklisted, then rejected uploads
    order = result.sources.column("source").to_pylist()
    assert order[:2] == ["10.0.0.2", "10.0.0.1"] and order[-1] == "10.0.0.3"


@pytest.fixture()
def fixture_dir(tmp_path: Path) -> Path:
    _write_scores(tmp_path / "scores.parquet")
    _write_csv_log(tmp_path / "uploads.csv")
    return tmp_path


def test_hand_worked_blacklist_intervals_csv(fixture_dir: Path) -> None:
    out = fixture_dir / "out"
    result = run_audit(str(fixture_dir / "uploads.csv"), str(out), scores_uri=str(fixture_dir / "scores.parquet"),
                       config=_cfg(report=False))
    _check_expected(result)
    # timeline: one row per good upload with the CC after it and the response
    tl = pq.read_table(out / "timeline.parquet").to_pylist()
    assert len(tl) == sum(len(s) for s in SEQUENCES.values())
    a = [r for r in tl if r["source"] == "10.0.0.1"]
    assert [r["cc"] for r in a] == [1, 2, 3, 4, 5, 4, 3, 2, 1, 0, 1, 2, 3]
    assert [r["response"] for r in a] == [R, R] + ["blocked"] * 7 + ["cat", R, R, "blocked"]
    d = [r for r in tl if r["source"] == "10.0.0.4"]
    assert [r["image_id"] for r in d] == ["d-00", "d-01", "d-02", "d-03"]
    assert [r["cc"] for r in d] == [1, 2, 3, 2]
    e = [r for r in tl if r["source"] == "10.0.0.5"]
    assert [r["response"] for r in e] == [R, R, "error", "blocked"]
    assert e[2]["cc"] is None and e[2]["verdict"] == "error"
    # user agents are kept per source
    assert _sources(result)["10.0.0.1"]["user_agents"] == ["Mozilla/5.0 (X11) #1"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sources_ever_blacklisted"] == 4 and summary["sources_blacklisted_at_end"] == 3


def test_malformed_lines_are_counted_and_listed(fixture_dir: Path) -> None:
    out = fixture_dir / "out"
    result = run_audit(str(fixture_dir / "uploads.csv"), str(out), scores_uri=str(fixture_dir / "scores.parquet"))
    n_good = sum(len(s) for s in SEQUENCES.values())
    expected: dict[str, int] = {}
    for _, reason in BAD:
        expected[reason] = expected.get(reason, 0) + 1
    assert result.summary["bad_by_reason"] == expected
    assert result.summary["bad_lines"] == len(BAD)
    assert result.summary["good_lines"] == n_good
    assert result.summary["lines"] == n_good + len(BAD)  # the blank line is not a record
    bad = pq.read_table(out / "bad_lines.parquet").to_pylist()
    first_bad = 1 + n_good + 1 + 1  # header, good lines, blank line
    assert [(b["line"], b["reason"]) for b in bad] == [(first_bad + k, r) for k, (_, r) in enumerate(BAD)]
    assert [b["text"] for b in bad] == [t for t, _ in BAD]
    assert any("nope.png" in b["detail"] for b in bad if b["reason"] == "unknown image key")
    html = (out / "report.html").read_text()
    for _, reason in BAD:
        assert reason in html
    assert "yesterday,10.0.0.9" in html


def test_small_blocks_stream_to_the_same_result(fixture_dir: Path) -> None:
    """Tiny read blocks (lines split across reads) and several partitions give the same audit."""
    big = run_audit(str(fixture_dir / "uploads.csv"), str(fixture_dir / "o1"),
                    scores_uri=str(fixture_dir / "scores.parquet"), config=_cfg(report=False, partitions=1))
    small = run_audit(str(fixture_dir / "uploads.csv"), str(fixture_dir / "o2"),
                      scores_uri=str(fixture_dir / "scores.parquet"),
                      config=_cfg(report=False, block_bytes=97, partitions=7))
    _check_expected(small)
    assert big.sources.equals(small.sources)
    assert big.summary["bad_by_reason"] == small.summary["bad_by_reason"]
    b1 = pq.read_table(fixture_dir / "o1" / "bad_lines.parquet")
    b2 = pq.read_table(fixture_dir / "o2" / "bad_lines.parquet")
    assert b1.sort_by("line").equals(b2.sort_by("line"))
    t1 = pq.read_table(fixture_dir / "o1" / "timeline.parquet").sort_by([("source", "ascending"), ("line", "ascending")])
    t2 = pq.read_table(fixture_dir / "o2" / "timeline.parquet").sort_by([("source", "ascending"), ("line", "ascending")])
    assert t1.equals(t2)


def test_jsonl_parquet_and_clf_logs(tmp_path: Path) -> None:
    scores = _write_scores(tmp_path / "batch" / "images" / "part-0.parquet")
    rows = [{"ts": _fmt_time(ts, k % 5), "user": source, "key": image_id, "agent": "curl/8"}
            for k, (source, ts, image_id, _) in enumerate(_events())]
    random.Random(1).shuffle(rows)
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, "{not json")
    lines.insert(5, '{"ts": 1700000000, "user": "x", "key": "b-00", "agent": 7}')  # mixed types -> still read
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    # the batch job's output root (with images/) is accepted for --scores
    res = run_audit(str(tmp_path / "log.jsonl"), str(tmp_path / "oj"), scores_uri=str(tmp_path / "batch"),
                    config=_cfg(report=False, columns={"source": "user"}))
    got = _sources(res)
    assert got.pop("x")["uploads"] == 1
    for source, exp in EXPECTED.items():
        assert [(iv["start"], iv["end"]) for iv in got[source]["blacklist_intervals"]] == exp["intervals"]
    assert res.summary["bad_by_reason"] == {"unparseable line": 1}
    bad = pq.read_table(tmp_path / "oj" / "bad_lines.parquet").to_pylist()
    assert bad[0]["line"] == 4 and bad[0]["text"] == "{not json"

    # Parquet log with a real timestamp column and epoch-ms numbers under another name
    table = pa.table({
        "when": pa.array([datetime.fromtimestamp(ts, tz=timezone.utc) for _, ts, _, _ in _events()],
                         pa.timestamp("ms", tz="UTC")),
        "remote_addr": [s for s, _, _, _ in _events()],
        "object": [f"s3://bucket/uploads/{i}.jpg" for _, _, i, _ in _events()],
    })
    pq.write_table(table, tmp_path / "log.parquet")
    res = run_audit(str(tmp_path / "log.parquet"), str(tmp_path / "op"), scores_uri=str(scores),
                    config=_cfg(report=False, columns={"timestamp": "when", "image": "object"}))
    _check_expected(res)

    # raw combined log format (the image is the request path)
    clf = []
    for source, ts, image_id, _ in _events():
        when = _fmt_time(ts, 3)
        clf.append(f'{source} - - [{when}] "POST /upload/{image_id}.png HTTP/1.1" 200 512 "-" "python-requests/2.32"')
    clf.insert(2, "garbage that is not a log line")
    (tmp_path / "access.log").write_text("\n".join(clf) + "\n")
    res = run_audit(str(tmp_path / "access.log"), str(tmp_path / "oc"), scores_uri=str(scores), config=_cfg(report=False))
    _check_expected(res)
    assert res.summary["bad_by_reason"] == {"unparseable line": 1}
    assert _sources(res)["10.0.0.1"]["user_agents"] == ["python-requests/2.32"]


def test_parse_timestamps_formats() -> None:
    values = ["1700000000", "1700000000.5", "2023-11-14T22:13:20Z", "2023-11-14T23:13:20+01:00",
              "2023-11-14 22:13:20", "14/Nov/2023:15:13:20 -0700", "[14/Nov/2023:22:13:20 +0000]",
              "yesterday", "", None, "2023-13-45T00:00:00Z"]
    got = parse_timestamps(pa.array(values, pa.string())).to_pylist()
    assert got == [T, T + 0.5, T, T, T, T, T, None, None, None, None]
    assert parse_timestamps(pa.array([T * 1000], pa.int64()), "ms").to_pylist() == [T]
    stamps = pa.array([datetime(2023, 11, 14, 22, 13, 20)], pa.timestamp("s"))  # naive = UTC
    assert parse_timestamps(stamps).to_pylist() == [T]


def test_column_mapping_errors() -> None:
    with pytest.raises(AuditError, match="no source column"):
        ColumnMapping().resolve(["time", "path"])
    with pytest.raises(AuditError, match="not a log column"):
        ColumnMapping(source="who").resolve(["time", "ip", "path"])
    assert ColumnMapping().resolve(["Time", "REMOTE_ADDR", "request_uri"]) == {
        "timestamp": "Time", "source": "REMOTE_ADDR", "image": "request_uri", "user_agent": None}
    with pytest.raises(ConfigError):
        parse_mapping(["colour=red"])
    with pytest.raises(ConfigError):
        WhatIf.parse("p3=1")


# ---------------------------------------------------------------------------------------------
# Dirty logs: invalid UTF-8 and junk lines
# ---------------------------------------------------------------------------------------------
DIRTY = b"\xff\xfe\xc3("  # a lone 0xff, a lone 0xfe, a 2-byte sequence cut short by "("
DIRTY_TEXT = "\ufffd\ufffd\ufffd("  # what it reads as: one U+FFFD per bad sequence (Unicode's practice)
MARK = "@DIRTY@"
VICTIM = "10.0.0.3"  # its records carry the invalid bytes (the timestamp case adds one line instead)


def _dirty_log(tmp_path: Path, fmt: str, field: str) -> Path:
    """The test events in ``fmt`` with invalid UTF-8 in ``field`` of every VICTIM record (kept as
    records: in the source name, in the image key's query string, in the user agent), or, for
    the timestamp, one extra record whose timestamp holds it (a bad line, not a crash)."""
    recs = []
    for k, (source, ts, image_id, _) in enumerate(_events()):
        dirty = source == VICTIM
        recs.append({"timestamp": _fmt_time(ts, 3 if fmt == "clf" else k % 3),
                     "source": source + (MARK if dirty and field == "source" else ""),
                     "image": f"/uploads/{image_id}.png" + ("?v=" + MARK if dirty and field == "image" else ""),
                     "user_agent": "agent" + (MARK if dirty and field == "user_agent" else "")})
    if field == "timestamp":
        recs.append({"timestamp": _fmt_time(T, 3 if fmt == "clf" else 0) + MARK, "source": "10.0.0.9",
                     "image": "/uploads/b-00.png", "user_agent": "agent"})
    names = ["timestamp", "source", "image", "user_agent"]
    if fmt == "parquet":  # string columns holding invalid UTF-8 (Arrow does not check on write) and binary ones
        cols = {n: pa.array([r[n].encode().replace(MARK.encode(), DIRTY) for r in recs], pa.binary()) for n in names}
        cols["source"] = cols["source"].cast(pa.string(), safe=False)
        cols["user_agent"] = cols["user_agent"].cast(pa.string(), safe=False)
        path = tmp_path / "log.parquet"
        pq.write_table(pa.table(cols), path)
        return path
    if fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        text = [sep.join(names)] + [sep.join(r[n] for n in names) for r in recs]
    elif fmt == "jsonl":
        text = [json.dumps(r) for r in recs]
    else:  # combined log format
        text = [f'{r["source"]} - - [{r["timestamp"]}] "POST {r["image"]} HTTP/1.1" 200 512 "-" "{r["user_agent"]}"'
                for r in recs]
    path = tmp_path / f"log.{ {'clf': 'log'}.get(fmt, fmt) }"
    path.write_bytes(("\n".join(text) + "\n").encode().replace(MARK.encode(), DIRTY))
    return path


@pytest.mark.parametrize("field", ["source", "image", "timestamp", "user_agent"])
@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "clf", "parquet"])
def test_invalid_utf8_in_any_field_keeps_the_record(tmp_path: Path, fmt: str, field: str, capfd) -> None:
    log = _dirty_log(tmp_path, fmt, field)
    scores = _write_scores(tmp_path / "scores.parquet")
    res = run_audit(str(log), str(tmp_path / "out"), scores_uri=str(scores), config=_cfg(report=False))
    victim_lines = 1 if field == "timestamp" else len(SEQUENCES[VICTIM])
    assert res.summary["warnings"] == {"lines_with_invalid_utf8": victim_lines}
    got = _sources(res)
    if field == "source":
        got[VICTIM] = got.pop(VICTIM + DIRTY_TEXT)
    assert {s: (r["uploads"], r["rejected"], r["cc"]) for s, r in got.items()} == {
        s: (e["uploads"], e["rejected"], e["cc"]) for s, e in EXPECTED.items()}
    assert got[VICTIM]["user_agents"] == ["agent" + (DIRTY_TEXT if field == "user_agent" else "")]
    if field == "timestamp":
        assert res.summary["bad_by_reason"] == {"unparseable timestamp": 1}
        bad = pq.read_table(tmp_path / "out" / "bad_lines.parquet").to_pylist()
        assert DIRTY_TEXT in bad[0]["detail"] and DIRTY_TEXT in bad[0]["text"]
    else:
        assert res.summary["bad_lines"] == 0
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err


def test_csv_junk_lines_stay_on_the_fast_path(tmp_path: Path, monkeypatch) -> None:
    """Junk lines (binary noise, cut-off records, quotes opened and never closed, a CR inside)
    among good ones: every good record is read, every junk line is one bad line at its own line
    number, and pyarrow parses the block once (the junk lines are read apart, so none merges
    with the next record and none sends the block down a slow path)."""
    import csv

    import pyarrow.csv as pacsv

    rng = random.Random(3)
    good = [f"{ts},{source},/uploads/{image_id}.png,agent" for source, ts, image_id, _ in _events()]
    junk = [b'"1700000000,10.0.0.9,/uploads/b-0',  # cut off inside a quoted value (odd quotes)
            b'x",y,"z',  # a literal quote, then an unclosed one: even count, merges with the next line
            b"\x00\x8f\xfe,,\x07\xff",  # binary noise: wrong field count and invalid UTF-8
            b"1700000000,10.0.0.9",  # too few fields
            b"17000\r00000,10.0.0.9,/uploads/b-00.png,ua"]  # a CR inside, which pyarrow reads as a line end
    lines = [g.encode() for g in good]
    where = sorted(rng.sample(range(1, len(lines)), len(junk)))
    for offset, (k, j) in enumerate(zip(where, junk)):
        lines.insert(k + offset, j)
    (tmp_path / "log.csv").write_bytes(b"timestamp,ip,key,ua\n" + b"\n".join(lines) + b"\n")
    junk_lines = [2 + k + offset for offset, k in enumerate(where)]  # header is line 1
    calls, apart = [], []
    read_csv, reader = pacsv.read_csv, csv.reader
    monkeypatch.setattr(pacsv, "read_csv", lambda *a, **kw: calls.append(1) or read_csv(*a, **kw))
    monkeypatch.setattr(csv, "reader", lambda lines, **kw: apart.extend(lines) or reader(lines, **kw))
    res = run_audit(str(tmp_path / "log.csv"), str(tmp_path / "out"), scores_uri=str(_write_scores(tmp_path / "s.pq")),
                    config=_cfg(report=False))
    _check_expected(res)
    bad = pq.read_table(tmp_path / "out" / "bad_lines.parquet").to_pylist()
    assert [(b["line"], b["reason"]) for b in bad] == [(n, "unparseable line") for n in junk_lines]
    assert res.summary["warnings"]["lines_with_invalid_utf8"] == 1
    assert len(calls) == 2  # the header, then the block
    # read apart: the lines that could merge with the next (open quotes) or split (the CR); the
    # noise and the short line have no quote or CR: pyarrow's invalid-row handler takes them
    assert sorted(apart) == sorted(j.decode() for j in junk if b'"' in j or b"\r" in j)


# ---------------------------------------------------------------------------------------------
# Scoring only what is not scored yet
# ---------------------------------------------------------------------------------------------
def _png(seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


class CountingScorer:
    """Stands in for Scorer: counts the images it is asked to score (the model calls)."""

    def __init__(self, verdicts: dict[str, str]) -> None:
        self.verdicts = verdicts
        self.calls = 0
        self.images: list[str] = []

    def score(self, images, ids):
        self.calls += 1
        self.images += list(ids)
        verdicts = [self.verdicts[image_id] for image_id in ids]
        return score_rows(
            ids, [("cannot decode" if v == E else None) for v in verdicts], [(40, 40)] * len(ids),
            [[281, 0, 1, 2, 3]] * len(ids), [[0.5, 0.1, 0.1, 0.1, 0.1]] * len(ids),
            [([3, 0] if v == A else [0, 3]) for v in verdicts], [[0.9, 0.05]] * len(ids),
            TwoStreamConfig().thresholds,
        )


def _image_dir(tmp_path: Path) -> Path:
    images = tmp_path / "imgs" / "uploads"
    images.mkdir(parents=True)
    for k, (_, _, image_id, _) in enumerate(_events()):
        (images / f"{image_id}.png").write_bytes(_png(k))
    return images


def test_scores_reuse_skips_scoring(fixture_dir: Path) -> None:
    images = _image_dir(fixture_dir)
    verdicts = {i: v for _, _, i, v in _events()}
    log = str(fixture_dir / "uploads.csv")

    # 1. no scores: every image the log names is scored once (the unknown key stays a bad line)
    scorer = CountingScorer(verdicts)
    first = run_audit(log, str(fixture_dir / "o1"), images_uri=str(images),
                      score_fn=scorer_score_fn(scorer, chunk=16), config=_cfg(report=False))
    assert sorted(scorer.images) == sorted(verdicts) and scorer.calls == 5  # 66 images / 16
    _check_expected(first)
    assert first.summary["images_scored_now"] == len(verdicts)
    assert first.summary["bad_by_reason"]["unknown image key"] == 1

    # 2. the scores cover everything: no model call at all, same answer
    scorer = CountingScorer(verdicts)
    second = run_audit(log, str(fixture_dir / "o2"), images_uri=str(images),
                       scores_uri=str(fixture_dir / "o1" / "scored_images.parquet"),
                       score_fn=scorer_score_fn(scorer), config=_cfg(report=False))
    assert scorer.calls == 0 and scorer.images == []
    assert second.sources.equals(first.sources)
    assert second.summary["images_scored_now"] == 0

    # 3. the scores cover part: only the rest is scored
    part = pq.read_table(fixture_dir / "scores.parquet")
    keep = [i for i in part.column("image_id").to_pylist() if not i.startswith("c-")]
    pq.write_table(part.filter(pa.compute.is_in(part.column("image_id"), pa.array(keep))), fixture_dir / "part.parquet")
    scorer = CountingScorer(verdicts)
    third = run_audit(log, str(fixture_dir / "o3"), images_uri=str(images), scores_uri=str(fixture_dir / "part.parquet"),
                      score_fn=scorer_score_fn(scorer), config=_cfg(report=False))
    assert sorted(scorer.images) == sorted(i for i in verdicts if i.startswith("c-"))
    _check_expected(third)


def test_scores_reuse_with_real_scorer_counts_forward_calls(fixture_dir: Path) -> None:
    """The real Scorer (tiny random models): forward passes happen only without --scores."""
    from twostream.core.scoring import Scorer

    config = _cfg(["high.model=resnet10t", "high.weights=random", "low.model=cifar_resnet20",
                   "low.weights=random", "high.device=cpu", "low.device=cpu"], report=False)
    try:
        scorer = Scorer(config)
    except Exception as exc:  # pragma: no cover - model registry still in flux
        pytest.skip(f"cannot build tiny streams: {exc}")
    seen = {"high": 0, "low": 0}
    scorer.high.register_forward_hook(lambda m, i, o: seen.__setitem__("high", seen["high"] + len(o)))
    scorer.low.register_forward_hook(lambda m, i, o: seen.__setitem__("low", seen["low"] + len(o)))
    images = _image_dir(fixture_dir)
    # only three sources' images are named by this log
    lines = ["ts,ip,key"] + [f"{ts},{s},{i}" for s, ts, i, _ in _events() if s in ("10.0.0.4", "10.0.0.5", "10.0.0.3")]
    (fixture_dir / "small.csv").write_text("\n".join(lines) + "\n")
    first = run_audit(str(fixture_dir / "small.csv"), str(fixture_dir / "r1"), images_uri=str(images),
                      score_fn=scorer_score_fn(scorer), config=config)
    n = len(lines) - 1
    assert seen == {"high": n, "low": n}
    seen.update(high=0, low=0)
    second = run_audit(str(fixture_dir / "small.csv"), str(fixture_dir / "r2"), images_uri=str(images),
                       scores_uri=str(fixture_dir / "r1" / "scored_images.parquet"),
                       score_fn=scorer_score_fn(scorer), config=config)
    assert seen == {"high": 0, "low": 0}
    assert second.sources.equals(first.sources)


# ---------------------------------------------------------------------------------------------
# What-if
# ---------------------------------------------------------------------------------------------
def test_what_if_thresholds_and_cap(fixture_dir: Path) -> None:
    settings = ["threshold=1", "threshold=5", "threshold=4,cap=4"]
    res = run_audit(str(fixture_dir / "uploads.csv"), str(fixture_dir / "o"),
                    scores_uri=str(fixture_dir / "scores.parquet"), config=_cfg(report=False, what_if=settings, clean_rate=0.3))
    rows = {r["setting"]: r for r in res.what_if.to_pylist()}
    # clean-looking at rate <= 0.3: only 10.0.0.3 (3/10)
    assert {r["clean_sources"] for r in rows.values()} == {1}
    assert rows["baseline"]["sources_blocked"] == 4 and rows["baseline"]["clean_sources_hit"] == 0
    assert rows["baseline"]["blocked_uploads"] == sum(e["blocked"] for e in EXPECTED.values())
    # threshold 1: every source with a rejection is blacklisted, the clean one too
    assert rows["threshold=1"]["sources_blocked"] == 5 and rows["threshold=1"]["clean_sources_hit"] == 1
    # threshold 5: only runs reaching CC 5: 10.0.0.1 (k=4) and 10.0.0.2
    assert rows["threshold=5"]["sources_blocked"] == 2 and rows["threshold=5"]["clean_sources_hit"] == 0
    # cap 4 for 10.0.0.2: CC 4 from k=3, so 4 A (k=20..23) release it at k=23; blocked k=3..22 = 20
    assert rows["threshold=4,cap=4"]["sources_blocked"] == 2  # 10.0.0.1 (k=3) and 10.0.0.2
    assert rows["threshold=4,cap=4"]["blacklisted_at_end"] == 0
    # 10.0.0.1 with threshold 4, cap 4: CC 1 2 3 4 4 3 2 1 0 -> blocked k=3..7 (5); 10.0.0.2: 20
    assert rows["threshold=4,cap=4"]["blocked_uploads"] == 25


def test_what_if_p1_p2_recomputes_from_top_k(tmp_path: Path) -> None:
    # one source, five images; H-Net top-1 is 'tabby' (cat) at 0.15, L-Net says cat at 0.9:
    # accepted at p1=0.10, rejected at p1=0.2 (and at p2=0.95).
    ids = [f"i{k}" for k in range(5)]
    scores = pa.table({
        "image_id": ids, "verdict": [A] * 5, "label": ["cat"] * 5,
        "high_idx": [[281, 0, 1, 2, 4]] * 5, "high_prob": [[0.15, 0.1, 0.1, 0.1, 0.05]] * 5,
        "low_idx": [[3, 0]] * 5, "low_prob": [[0.9, 0.05]] * 5,
    })
    pq.write_table(scores, tmp_path / "s.parquet")
    (tmp_path / "log.csv").write_text("timestamp,source,image\n" + "".join(f"{T + k},u1,i{k}\n" for k in range(5)))
    res = run_audit(str(tmp_path / "log.csv"), str(tmp_path / "o"), scores_uri=str(tmp_path / "s.parquet"),
                    config=_cfg(report=False, what_if=["p1=0.2", "p2=0.95", "p1=0.15"]))
    rows = {r["setting"]: r for r in res.what_if.to_pylist()}
    assert rows["baseline"]["rejected_uploads"] == 0 and rows["baseline"]["sources_blocked"] == 0
    assert rows["p1=0.2"]["rejected_uploads"] == 5 and rows["p1=0.2"]["sources_blocked"] == 1
    assert rows["p1=0.2"]["blocked_uploads"] == 3  # CC 1 2 3(joins) 4 5
    assert rows["p2=0.95"]["rejected_uploads"] == 5
    assert rows["p1=0.15"]["rejected_uploads"] == 0  # thresholds are inclusive
    assert rows["p1=0.2"]["clean_sources_hit"] == 1

    # scores without the top-k columns cannot answer a p1/p2 what-if
    pq.write_table(scores.select(["image_id", "verdict"]), tmp_path / "v.parquet")
    with pytest.raises(AuditError, match="top-k"):
        run_audit(str(tmp_path / "log.csv"), str(tmp_path / "o2"), scores_uri=str(tmp_path / "v.parquet"),
                  config=_cfg(report=False, what_if=["p1=0.2"]))
    # ...but a reputation-only what-if works with verdicts alone
    res = run_audit(str(tmp_path / "log.csv"), str(tmp_path / "o3"), scores_uri=str(tmp_path / "v.parquet"),
                    config=_cfg(report=False, what_if=["threshold=2"]))
    assert res.what_if.num_rows == 2


# ---------------------------------------------------------------------------------------------
# CLI and report
# ---------------------------------------------------------------------------------------------
def test_cli_audit(fixture_dir: Path, capsys) -> None:
    from twostream.cli import main

    out = fixture_dir / "cli"
    rc = main(["audit", "--log", str(fixture_dir / "uploads.csv"), "--scores", str(fixture_dir / "scores.parquet"),
               "--output", str(out), "--what-if", "threshold=5", "--map", "source=client_ip",
               "--set", "reputation.cap=15"])
    assert rc == 0
    for name in ("sources.parquet", "timeline.parquet", "bad_lines.parquet", "summary.json", "report.html",
                 "what_if.parquet"):
        assert (out / name).is_file(), name
    assert "7 bad" in capsys.readouterr().out
    assert main(["audit", "--log", str(fixture_dir / "uploads.csv"), "--scores", str(fixture_dir / "scores.parquet"),
                 "--output", str(out), "--what-if", "p9=1"]) == 2
    assert main(["audit", "--log", str(fixture_dir / "missing.csv"), "--scores", str(fixture_dir / "scores.parquet"),
                 "--output", str(out)]) == 2


def test_report_escapes_log_strings(tmp_path: Path) -> None:
    pq.write_table(pa.table({"image_id": ["x1", "x2", "x3"], "verdict": [R, R, R]}), tmp_path / "s.parquet")
    evil = '<script>alert(1)</script>'
    (tmp_path / "log.jsonl").write_text("".join(
        json.dumps({"ts": T + k, "ip": evil, "key": f"x{k + 1}", "user_agent": '"><img src=x onerror=alert(2)>'}) + "\n"
        for k in range(3)) + '<b>not json</b>\n')
    res = run_audit(str(tmp_path / "log.jsonl"), str(tmp_path / "o"), scores_uri=str(tmp_path / "s.parquet"))
    html = (tmp_path / "o" / "report.html").read_text()
    assert evil not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "onerror=alert(2)>" not in html and "<b>not json</b>" not in html
    assert html.count('src="data:image/png;base64,') >= 2  # one CC plot + the rate plot
    assert res.summary["sources_ever_blacklisted"] == 1


# ---------------------------------------------------------------------------------------------
# A log from `twostream sample` (known attacker)
# ---------------------------------------------------------------------------------------------
def test_sample_log_known_attacker(tmp_path: Path) -> None:
    """8 sample images over 4 sources: src-00 sends the 4 FGSM copies plus 1 clean photo; the
    other three send one clean photo each. Verdicts = the sample's ground truth.

    With 4 rejected (R) and 1 accepted (A) upload, only the position p of the A in src-00's
    time order matters; worked out by hand (CC after each upload, blacklisted at CC 3):
      p=1: A R R R R -> 0 1 2 3 4  joins at upload 4, final CC 4
      p=2: R A R R R -> 1 0 1 2 3  joins at upload 5, final CC 3
      p=3: R R A R R -> 1 2 1 2 3  joins at upload 5, final CC 3
      p=4: R R R A R -> 1 2 3 2 3  joins at upload 3, final CC 3
      p=5: R R R R A -> 1 2 3 4 3  joins at upload 3, final CC 3
    and it is never released (CC never returns to 0 once listed).
    """
    import csv

    from twostream.demo.sample import Sender, generate

    config = _cfg(["high.model=resnet10t", "high.weights=random"], report=False)
    senders = [Sender("src-00", "attacker", "aacaa", "t1-fgsm"),
               *(Sender(f"src-0{k}", "honest", "c") for k in (1, 2, 3))]
    info = generate(tmp_path / "sample", senders, shards=0, config=config, progress=False)
    with open(info.manifest) as handle:
        manifest = list(csv.DictReader(handle))
    assert len(manifest) == 8
    pq.write_table(pa.table({
        "image_id": [r["image_id"] for r in manifest],
        "verdict": [R if r["attack"] else A for r in manifest],
    }), tmp_path / "scores.parquet")
    with open(tmp_path / "uploads.csv", "w") as handle:
        handle.write("timestamp,ip,key\n")
        for r in reversed(manifest):  # the log need not be in time order
            handle.write(f"{r['timestamp']},{r['source']},{r['key']}.jpg\n")
    res = run_audit(str(tmp_path / "uploads.csv"), str(tmp_path / "out"), scores_uri=str(tmp_path / "scores.parquet"),
                    images_uri=str(info.input_dir), config=config,
                    score_fn=lambda uris, ids: pytest.fail(f"scored {ids}"))
    got = _sources(res)
    assert set(got) == {"src-00", "src-01", "src-02", "src-03"}
    for clean in ("src-01", "src-02", "src-03"):
        assert got[clean]["rejected"] == 0 and got[clean]["blacklist_intervals"] == []
        assert got[clean]["final_standing"] == "clean"
    attacker = sorted(((float(r["timestamp"]), r["image_id"], "1" if r["attack"] else "0") for r in manifest
                       if r["source"] == "src-00"))
    assert [a for _, _, a in attacker].count("1") == 4 and len(attacker) == 5
    p = [a for _, _, a in attacker].index("0") + 1
    join, final_cc = {1: (4, 4), 2: (5, 3), 3: (5, 3), 4: (3, 3), 5: (3, 3)}[p]
    row = got["src-00"]
    assert [(iv["start"], iv["end"]) for iv in row["blacklist_intervals"]] == [(attacker[join - 1][0], None)]
    assert row["cc"] == final_cc and row["final_standing"] == "blacklisted" and row["rejected"] == 4
    assert res.summary["images_scored_now"] == 0  # all came from the scores
    assert res.sources.column("source").to_pylist()[0] == "src-00"


def test_images_are_read_as_stored_and_within_the_size_limit(tmp_path: Path) -> None:
    """The audit scores files as stored (a .gz is not decompressed) and at most limits.max_bytes
    each; an oversized file is an error row saying so, not a read of the whole file."""
    import gzip

    small, big = _png(0), _png(1) * 3
    zipped = gzip.compress(small)
    for name, data in (("small.png", small), ("big.png", big), ("z.png.gz", zipped)):
        (tmp_path / name).write_bytes(data)
    limit = len(big) - 1
    assert len(small) <= limit and len(zipped) <= limit

    seen: list[bytes] = []

    class RecordingScorer:
        def score(self, images, ids):
            seen.extend(images)
            return score_rows(ids, [None if blob else "empty" for blob in images], [(40, 40)] * len(ids),
                              [[281, 0, 1, 2, 3]] * len(ids), [[0.5, 0.1, 0.1, 0.1, 0.1]] * len(ids),
                              [[3, 0]] * len(ids), [[0.9, 0.05]] * len(ids), TwoStreamConfig().thresholds)

    uris = [str(tmp_path / n) for n in ("small.png", "big.png", "z.png.gz")]
    batch = scorer_score_fn(RecordingScorer(), max_bytes=limit)(uris, ["s", "b", "z"])
    assert seen == [small, b"", zipped]
    assert list(batch.error) == [None, f"file too large: more than {limit} bytes", None]
    assert [str(v) for v in batch.verdict] == [str(Verdict.ACCEPTED), str(Verdict.ERROR), str(Verdict.ACCEPTED)]
