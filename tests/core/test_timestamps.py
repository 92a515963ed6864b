"""The one range of timestamps (twostream/core/timestamps.py): hand-worked values at its edges,
likely milli/micro/nanosecond epochs said so, the manifest, the sidecar and the audit accepting and
refusing the same timestamps (one list), the scalar and Arrow parsers agreeing on any text, and the
reports total over any stored float (NaN, infinities, 1e300, negative, milliseconds)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twostream.audit.run import run_audit
from twostream.batch import planning
from twostream.batch.manifest import ManifestError, read_manifest
from twostream.batch.report import write_batch_report
from twostream.core import timestamps
from twostream.core.config import load_config
from twostream.core.timestamps import TimestampError, format_utc, parse_timestamp, seconds_array
from twostream.reporting import RateBins, SourceSeries, cc_plot, fmt_time, rate_plot

RANGE = "1970-01-01T00:00:00Z .. 9999-12-31T23:59:59Z"
AFTER, BEFORE = f"is after the accepted range {RANGE}", f"is before the accepted range {RANGE}"
# 2023-11-14T22:13:20Z is 1,700,000,000 s: 19,675 days (53 years, 13 of them leap, to 2023-01-01 = 19,358
# days; + 317 days to Nov 14) * 86,400 + 22:13:20 (80,000 s) = 1,699,920,000 + 80,000.
T = 1_700_000_000
# 9999-12-31T23:59:59Z: 2,932,897 days from 1970-01-01 to 10000-01-01 (ordinals of 9999-12-31 and
# 1970-01-01: 3,652,059 - 719,163, plus that last day), times 86,400, minus 1 s.
LAST = 2_932_897 * 86_400 - 1
assert LAST == 253_402_300_799 == timestamps.LAST

# (the value as a JSON document writes it, seconds when accepted, else how the refusal ends: it
# starts "timestamp <the value>", quoted as the input gave it)
CASES: list[tuple[str, float | str]] = [
    ("0", 0.0),  # the first accepted second
    ('"1970-01-01T00:00:00Z"', 0.0),
    ("-1", BEFORE),  # one before it
    ('"1969-12-31T23:59:59Z"', BEFORE),
    (str(LAST), float(LAST)),  # the last accepted second
    ('"9999-12-31T23:59:59Z"', float(LAST)),
    ("253402300799.5", 253402300799.5),  # within that second
    (str(LAST + 1), AFTER + "; it looks like milliseconds since the epoch: 1978-01-11T21:31:40.800000Z "
                           "if divided by 1,000"),  # one after it: 253,402,300.8 s is 1978-01-11
    ('"9999-12-31T23:59:59+14:00"', float(LAST - 14 * 3600)),  # 14 h before the last second
    ('"9999-12-31T23:59:59-12:00"', AFTER),  # 10000-01-01T11:59:59Z
    ('"0001-01-01T00:00:00+14:00"', BEFORE),  # 0000-12-31T10:00:00Z
    ('"0001-01-01T00:00:00-12:00"', BEFORE),
    ('"2023-11-14T22:13:20"', float(T)),  # no zone: UTC
    ('"2023-11-14T23:13:20+01:00"', float(T)),
    ('"14/Nov/2023:15:13:20 -0700"', float(T)),  # common log format
    (f'"{T}.25"', T + 0.25),
    ("1700000000000", AFTER + "; it looks like milliseconds since the epoch: 2023-11-14T22:13:20Z if divided by 1,000"),
    ("1700000000000000", AFTER + "; it looks like microseconds since the epoch: 2023-11-14T22:13:20Z if divided "
                                 "by 1,000,000"),
    ("1700000000000000000", AFTER + "; it looks like nanoseconds since the epoch: 2023-11-14T22:13:20Z if divided "
                                    "by 1,000,000,000"),
    ("1e300", AFTER),
    ("9" * 400, AFTER),  # a JSON integer that no float holds
    ("-" + "9" * 400, BEFORE),
    ('"nan"', "is not a finite number"),
    ('"-Infinity"', "is not a finite number"),
    ('"soon"', "is neither seconds nor ISO-8601"),
]
IDS = [c[0][:24] for c in CASES]


def _refusal(expected: float | str, got: str) -> None:
    assert isinstance(expected, str), f"refused: {got}"
    assert got.startswith("timestamp ") and got.endswith(" " + expected), got


@pytest.mark.parametrize("doc, expected", CASES, ids=IDS)
def test_scalar_parser_at_the_edges(doc: str, expected: float | str) -> None:
    value = json.loads(doc)
    if isinstance(expected, float):
        assert parse_timestamp(value) == expected
    else:
        with pytest.raises(TimestampError) as info:
            parse_timestamp(value)
        _refusal(expected, str(info.value))


def test_refusals_quote_the_value_shortly() -> None:
    with pytest.raises(TimestampError) as info:
        parse_timestamp(json.loads("9" * 400))
    assert str(info.value) == f"timestamp {'9' * 20}... (400 digits) {AFTER}"
    with pytest.raises(TimestampError) as info:
        parse_timestamp("x" * 5000)
    assert str(info.value) == f"timestamp '{'x' * 79}... (5,002 characters) is neither seconds nor ISO-8601"
    with pytest.raises(TimestampError) as info:
        parse_timestamp(1.7e12)
    assert str(info.value) == f"timestamp 1700000000000.0 {AFTER}; it looks like milliseconds since the epoch: " \
                              "2023-11-14T22:13:20Z if divided by 1,000"


def test_manifest_sidecar_and_audit_accept_and_refuse_the_same_timestamps(tmp_path: Path) -> None:
    """Every value of CASES through the three front doors: a manifest (JSON Lines and CSV, one
    file per value, refused naming line 2 / line 1), a sidecar (an error row), an audited log (a
    bad line, its detail the same text, the audit's unit option named after a finer unit)."""
    log = ["timestamp,source,image"]
    for k, (doc, expected) in enumerate(CASES):
        value = json.loads(doc)
        text = doc.strip('"')
        # manifest, CSV (text) and JSON Lines (the JSON value)
        (tmp_path / f"m{k}.csv").write_text(f"image_id,key,timestamp\ni{k},a.jpg,{text}\n")
        (tmp_path / f"m{k}.jsonl").write_text(f'{{"image_id": "i{k}", "key": "a.jpg", "timestamp": {doc}}}\n')
        for name, line in ((f"m{k}.csv", 2), (f"m{k}.jsonl", 1)):
            if isinstance(expected, float):
                table, _ = read_manifest(str(tmp_path / name))
                assert table.column("timestamp").to_pylist() == [expected]
            else:
                with pytest.raises(ManifestError) as info:
                    read_manifest(str(tmp_path / name))
                assert str(info.value).startswith(f"manifest line {line}: ")
                _refusal(expected, str(info.value).removeprefix(f"manifest line {line}: "))
        # sidecar
        row = planning.attach_identity({"key": "a.jpg", "ident": None, "meta": {"timestamp": value},
                                        "read_error": None})
        if isinstance(expected, float):
            assert (row["timestamp"], row["read_error"]) == (expected, None)
        else:
            assert row["timestamp"] == 0.0 and row["read_error"].startswith("sidecar: ")
            _refusal(expected, row["read_error"].removeprefix("sidecar: "))
        log.append(f"{text},src,img")
    (tmp_path / "log.csv").write_text("\n".join(log) + "\n")
    pq.write_table(pa.table({"image_id": ["img"], "verdict": ["accepted"], "label": ["cat"]}), tmp_path / "s.pq")
    res = run_audit(str(tmp_path / "log.csv"), str(tmp_path / "out"), scores_uri=str(tmp_path / "s.pq"),
                    config=load_config(None, [], {"audit": {"report": False}}))
    bad = {b["line"]: b for b in pq.read_table(tmp_path / "out" / "bad_lines.parquet").to_pylist()}
    good = dict(zip(*pq.read_table(tmp_path / "out" / "timeline.parquet", columns=["line", "timestamp"])
                    .to_pydict().values()))
    for k, (_, expected) in enumerate(CASES):
        line = k + 2
        if isinstance(expected, float):
            assert good[line] == expected and line not in bad
        else:
            assert line not in good
            detail = bad[line]["detail"]
            unit = re.search(r"looks like (milli|micro|nano)seconds", detail)
            if unit:
                flag = {"milli": "ms", "micro": "us", "nano": "ns"}[unit.group(1)]
                assert detail.endswith(f" (read it with --map timestamp_unit={flag})")
                detail = detail.removesuffix(f" (read it with --map timestamp_unit={flag})")
            _refusal(expected, detail)
            assert bad[line]["reason"] == ("timestamp out of range" if "range" in detail else "unparseable timestamp")
    assert res.summary["good_lines"] + res.summary["bad_lines"] == len(CASES)


def test_audit_unit_option_reads_milliseconds(tmp_path: Path) -> None:
    """A millisecond log: refused with the hint under the default unit, read with --map timestamp_unit=ms."""
    (tmp_path / "log.csv").write_text("timestamp,source,image\n" + "".join(
        f"{(T + k) * 1000},src,img\n" for k in range(3)))
    pq.write_table(pa.table({"image_id": ["img"], "verdict": ["accepted"], "label": ["cat"]}), tmp_path / "s.pq")
    res = run_audit(str(tmp_path / "log.csv"), str(tmp_path / "o1"), scores_uri=str(tmp_path / "s.pq"))
    assert res.summary["bad_by_reason"] == {"timestamp out of range": 3}
    assert json.loads((tmp_path / "o1" / "summary.json").read_text())["bad_lines"] == 3
    assert (tmp_path / "o1" / "report.html").exists()
    res = run_audit(str(tmp_path / "log.csv"), str(tmp_path / "o2"), scores_uri=str(tmp_path / "s.pq"),
                    config=load_config(None, [], {"audit": {"columns": {"timestamp_unit": "ms"}}}))
    assert res.summary["bad_lines"] == 0
    assert (res.summary["first_seen"], res.summary["last_seen"]) == (T, T + 2)


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    st.text(max_size=40),
    st.from_regex(r"[ \"]?[-+]?[0-9]{0,22}(\.[0-9]{0,8})?([eE][-+]?[0-9]{1,3})?[ \"]?", fullmatch=True),
    st.builds(lambda d, off: d.isoformat() + off,
              st.datetimes(), st.sampled_from(["", "Z", "+14:00", "-12:00", "+05:30"])),
))
def test_scalar_and_arrow_parsers_agree_on_any_text(text: str) -> None:
    """The audit's vectorised parser and the manifest's scalar one: the same seconds, or both refuse."""
    try:
        scalar: float | None = parse_timestamp(text)
    except TimestampError:
        scalar = None
    arrow = seconds_array(pa.array([text], pa.string())).to_numpy(zero_copy_only=False).astype(np.float64)
    ok = timestamps.accepted(arrow)
    if scalar is None:
        assert not ok[0]
    else:
        assert ok[0] and arrow[0] == scalar


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-10**30, max_value=10**30)))
def test_numbers_agree_and_refusals_are_worded(number: float | int) -> None:
    """Numbers in an Arrow column (the audit) and as JSON values (sidecars) are accepted alike; a
    refusal says why in one sentence, never raising anything but TimestampError."""
    try:
        scalar = parse_timestamp(number)
    except TimestampError as exc:
        scalar = None
        assert str(exc).startswith(f"timestamp {timestamps.show(number)} is ")
    arrow = seconds_array(pa.array([float(number)], pa.float64())).to_numpy(zero_copy_only=False)
    assert bool(timestamps.accepted(arrow)[0]) == (scalar is not None)
    if scalar is not None:
        assert arrow[0] == float(number) == scalar


@pytest.mark.parametrize("value, text", [
    (None, ""), (float("nan"), ""), (0.0, "1970-01-01 00:00:00 UTC"), (T, "2023-11-14 22:13:20 UTC"),
    (-5.0, "1969-12-31 23:59:55 UTC"), (float(LAST), "9999-12-31 23:59:59 UTC"),
    (-62135596800.0, "0001-01-01 00:00:00 UTC"),  # 719,162 days before the epoch
    (1.7e12, "1.7e+12 s (not a date)"), (1e300, "1e+300 s (not a date)"), (-1e300, "-1e+300 s (not a date)"),
    (float("inf"), "inf s (not a date)"), (float("-inf"), "-inf s (not a date)"), ("junk", "'junk'"),
])
def test_report_time_format_is_total(value, text) -> None:
    assert format_utc(value) == fmt_time(value) == text


HOSTILE = [float("nan"), float("inf"), float("-inf"), 1e300, -1e300, -5.0, 1.7e12, float(LAST), -62135596800.0]


@pytest.mark.parametrize("times", [HOSTILE, [1.7e12, 1.7e12 + 1], [float(LAST) - 10, float(LAST)], [-1e308, 1e308],
                                   [float("nan")], []])
def test_plots_are_total(times: list[float]) -> None:
    ts = np.array(times, np.float64)
    series = SourceSeries("s", ts, np.arange(len(ts)), [[1e300, None], [float("inf"), float("nan")], [-5.0, 1.7e9]], 3)
    assert cc_plot(series, 15).startswith("data:image/png;base64,")
    finite = ts[np.isfinite(ts)]
    rates = RateBins.over(finite.min() if len(finite) else np.inf, finite.max() if len(finite) else -np.inf)
    rates.add(ts, np.ones(len(ts), bool), np.ones(len(ts), bool), np.array(["cat"] * len(ts)))
    assert int(rates.scored.sum()) == len(ts)  # every upload counted in some bin
    assert rate_plot(rates).startswith("data:image/png;base64,")


def test_batch_report_over_stored_hostile_times(tmp_path: Path) -> None:
    """An output folder whose images/ and sources/ hold the values an older run could store:
    report.html is written, and each source's first/last seen and intervals read as format_utc says."""
    from tests.batch.test_report import table_rows, write_run

    out = write_run(tmp_path / "run")
    images = pq.read_table(out / "images" / "shard-0.parquet")
    stamps = [HOSTILE[k % len(HOSTILE)] for k in range(images.num_rows)]
    pq.write_table(images.set_column(images.column_names.index("timestamp"), "timestamp",
                                     pa.array(stamps, pa.float64())), out / "images" / "shard-0.parquet")
    sources = pq.read_table(out / "sources").to_pylist()
    for k, r in enumerate(sources):
        r["first_seen"], r["last_seen"] = HOSTILE[k % len(HOSTILE)], HOSTILE[(k + 3) % len(HOSTILE)]
        for iv in r["blacklist_intervals"]:
            iv["joined"], iv["left"] = 1.7e12, (None if iv["left"] is None else float("nan"))
    schema = pq.read_schema(out / "sources" / "part-00000.parquet")
    pq.write_table(pa.Table.from_pylist(sources, schema=schema), out / "sources" / "part-00000.parquet")
    doc = Path(write_batch_report(str(out))).read_text()
    listed = {r[0]: r for r in table_rows(doc, "blacklisted")}
    assert listed
    for r in sources:
        if r["source"] in listed:
            row = listed[r["source"]]
            assert row[-2:] == [format_utc(r["first_seen"]), format_utc(r["last_seen"])]
            assert row[8] == "; ".join(f"1.7e+12 s (not a date) \u2192 {'end' if iv['left'] is None else ''}"
                                       for iv in r["blacklist_intervals"])
    assert doc.count('src="data:image/png;base64,') >= 3


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(min_value=-10**400, max_value=10**400),
                 st.none(), st.text(max_size=5)))
def test_format_utc_never_raises(value) -> None:
    """Any stored value formats: a date inside years 1-9999, else the number, else its repr."""
    text = format_utc(value)
    if isinstance(value, float) and math.isfinite(value) and -62135596800.0 <= value < 253402300800.0:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", text), text
    elif isinstance(value, float) and not math.isnan(value):
        assert text.endswith(" s (not a date)"), text
