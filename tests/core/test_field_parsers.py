"""Every field parser is total: any value in any field of a sidecar, a manifest (CSV, JSON Lines,
Parquet) or a log line (CSV, TSV, JSON Lines, common log format, Parquet) ends as that input's
error row, a refusal naming its row, or a bad line naming its line; never an exception that
escapes. Property tests throw arbitrary JSON values, text and numbers at each field; the end-to-end
tests run the batch job over a folder of hostile sidecars and the audit over a hostile log, as
their users run them (the command line)."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from twostream.audit.logread import BadLine, check_chunk, read_log
from twostream.batch import planning
from twostream.batch.manifest import MAX_TEXT_CHARS, ManifestError, read_manifest
from twostream.core.timestamps import END, FIRST

REPO = Path(__file__).resolve().parents[2]
SMALL = ["high.model=resnet10t", "high.weights=random", "low.model=cifar_resnet20", "low.weights=random"]
FIELDS = ("image_id", "id", "source", "source_id", "timestamp")
HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])

# Hostile JSON: huge integers, NaN and infinities, bools, null, nested values, text with NUL,
# control characters, lone surrogates, very long text.
TEXT = st.one_of(
    st.text(max_size=30),
    st.text(alphabet=st.characters(codec="utf-8"), max_size=10),
    st.sampled_from(["", " ", "\x00", "a\x00b", "\x1b[31m", "\ud800", "x\udfff", "\u2028", "\ufeff", "NaN", "null",
                     "inf", "1e400", "9" * 400, "1700000000000", "2023-11-14T22:13:20Z", "[1]", "x" * 5000]),
)
NUMBER = st.one_of(
    st.integers(), st.integers(min_value=-10**400, max_value=10**400), st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 253402300799, 253402300800, 1.7e12, 1.7e15, 1.7e18, 1e300, 2**63, 2**64 - 1]),
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
VALUE = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(st.text(max_size=5), inner, max_size=3)),
                     max_leaves=6)


def _json(value: object) -> str:
    """JSON text for any value hypothesis makes: NaN/Infinity literals, lone surrogates escaped."""
    return json.dumps(value, allow_nan=True, ensure_ascii=True)


def _text_ok(value: object) -> bool:
    """The rule for image ids and sources, written out independently: text or an integer, at most
    MAX_TEXT_CHARS characters, no C0 control character or DEL, no lone surrogate."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return False
    text = str(value) if isinstance(value, str) or abs(value) < 10**5000 else "x" * 5000
    return (len(text) <= MAX_TEXT_CHARS and not any(ord(c) < 0x20 or ord(c) == 0x7F for c in text)
            and not any(0xD800 <= ord(c) <= 0xDFFF for c in text))


def _number_ok(value: object) -> bool | None:
    """Whether a number is an accepted timestamp (None: not a number, left to test_timestamps)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return FIRST <= value < END


def _given(value: object) -> bool:
    return value is not None and value != ""


def _csv_text(header: tuple[str, ...], rows: list[tuple[str, ...]], delimiter: str = ",") -> str:
    """``rows`` under ``header`` as CSV text, one line each (line breaks in values made spaces)."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(tuple(v.replace("\n", " ").replace("\r", " ") for v in r) for r in rows)
    return buf.getvalue()


def _parquet_or_skip(path: Path, columns: dict[str, pa.Array], field: str, column: pa.Array) -> None:
    """``columns`` with ``field`` replaced by ``column`` as a Parquet file; skip when Parquet cannot
    store the column's type."""
    try:
        pq.write_table(pa.table({**columns, field: column}), path)
    except (pa.ArrowException, ValueError):
        pytest.skip(f"Parquet cannot store {column.type}")


# ---------------------------------------------------------------------------------------------
# Sidecars
# ---------------------------------------------------------------------------------------------
@HYPO
@given(st.dictionaries(st.sampled_from(FIELDS + ("other",)), VALUE, max_size=6), st.booleans())
def test_any_sidecar_is_one_row_with_its_identity_or_an_error(meta: dict, repeat: bool) -> None:
    """_parse_sidecar + attach_identity (the job's read path) on any sidecar: no exception; a row
    whose identity Arrow can hold (the job's DECODED_SCHEMA columns), else an error saying why."""
    text = "{" + ", ".join(f"{_json(k)}: {_json(v)}" for k, v in meta.items()) + "}"
    if repeat and meta:
        key = next(iter(meta))
        text = text[:-1] + f", {_json(key)}: 1}}"
    parsed, error = planning._parse_sidecar(text.encode(), "x.json")
    row = planning.attach_identity({"key": "k.jpg", "ident": None, "meta": parsed, "read_error": error})
    pa.table({"image_id": [row["image_id"]], "source": [row["source"]], "timestamp": [row["timestamp"]]},
             schema=pa.schema([("image_id", pa.string()), ("source", pa.string()), ("timestamp", pa.float64())]))
    assert FIRST <= row["timestamp"] < END
    if repeat and meta:
        assert row["read_error"] == f"sidecar x.json: the key {next(iter(meta))!r} is given more than once"
        return
    ident = next((meta[k] for k in ("image_id", "id") if _given(meta.get(k))), None)
    source = next((meta[k] for k in ("source", "source_id") if _given(meta.get(k))), None)
    ok = all(v is None or _text_ok(v) for v in (ident, source))
    stamp = _number_ok(meta.get("timestamp")) if _given(meta.get("timestamp")) else True
    if stamp is None:  # text, nested, bool: accepted only as core/timestamps reads it
        stamp = row["read_error"] is None or "timestamp" not in row["read_error"]
    assert (row["read_error"] is None) == (ok and stamp), (meta, row["read_error"])
    if row["read_error"] is None:
        assert row["image_id"] == (str(ident) if ident is not None else "k.jpg")
        assert row["source"] == (str(source) if source is not None else "unknown")
    else:
        assert row["read_error"].startswith("sidecar: ")


@pytest.mark.parametrize("text, error", [
    (b"[" * 100_000, "sidecar x.json is not valid JSON: nested too deeply"),
    (b'{"source": "a", "source": "b"}', "sidecar x.json: the key 'source' is given more than once"),
    (b"[1, 2]", "sidecar x.json is not a JSON object (a JSON list)"),
    (b'{"timestamp": ' + b"9" * 5000 + b"}", "sidecar x.json is not valid JSON: Exceeds the limit (4300 digits) "
                                             "for integer string conversion: value has 5000 digits; use "
                                             "sys.set_int_max_str_digits() to increase the limit"),
    (b'{"a": 1}\xff', "sidecar x.json is not valid JSON: 'utf-8' codec can't decode byte 0xff in position 8: "
                      "invalid start byte"),
])
def test_sidecar_documents_refused(text: bytes, error: str) -> None:
    assert planning._parse_sidecar(text, "x.json") == ({}, error)


# ---------------------------------------------------------------------------------------------
# Manifests
# ---------------------------------------------------------------------------------------------
def _refused_naming_a_row(exc: ManifestError, unit: str = "line") -> None:
    text = str(exc)
    assert text.startswith((f"manifest {unit} ", "manifest: duplicate", "manifest rows without", "manifest has the column",
                            "manifest needs")), text


@HYPO
@given(st.lists(st.dictionaries(st.sampled_from(("image_id", "key", "source", "timestamp", "uri", "extra")),
                                VALUE, max_size=5), min_size=1, max_size=4))
def test_any_jsonl_manifest_is_read_or_refused_naming_its_line(tmp_path_factory, rows: list[dict]) -> None:
    path = tmp_path_factory.mktemp("m") / "m.jsonl"
    path.write_text("\n".join(_json(r) for r in rows) + "\n")
    try:
        table, _ = read_manifest(str(path))
    except ManifestError as exc:
        _refused_naming_a_row(exc)
        return
    assert table.num_rows == len(rows)
    for r, got in zip(rows, table.to_pylist()):
        assert FIRST <= got["timestamp"] < END
        if _given(r.get("image_id")):
            assert _text_ok(r["image_id"]) and got["image_id"] == str(r["image_id"])


@HYPO
@given(VALUE, VALUE, VALUE)
def test_manifest_and_sidecar_accept_the_same_identity(image_id, source, timestamp) -> None:
    """One row's image_id, source and timestamp: accepted by a JSON Lines manifest exactly when a
    sidecar holding them gives a row without error (an id missing from a manifest row aside)."""
    if not _given(image_id):
        return
    meta = {"image_id": image_id, "source": source, "timestamp": timestamp}
    row = planning.attach_identity({"key": "a.jpg", "ident": None, "meta": meta, "read_error": None})
    data = _json({**meta, "key": "a.jpg"}).encode()
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "m.jsonl").write_bytes(data)
        try:
            table, _ = read_manifest(str(Path(tmp, "m.jsonl")))
        except ManifestError as exc:
            assert row["read_error"] is not None, str(exc)
            assert str(exc).startswith("manifest line 1: ")
            assert str(exc).removeprefix("manifest line 1: ") in row["read_error"]
            return
    assert row["read_error"] is None
    got = table.to_pylist()[0]
    assert (got["image_id"], got["source"], got["timestamp"]) == (row["image_id"], row["source"], row["timestamp"])


@HYPO
@given(st.lists(st.tuples(TEXT, TEXT, TEXT), min_size=1, max_size=4))
def test_any_csv_manifest_is_read_or_refused_naming_its_line(tmp_path_factory, rows) -> None:
    path = tmp_path_factory.mktemp("m") / "m.csv"
    path.write_bytes(_csv_text(("image_id", "source", "timestamp"), rows).encode("utf-8", "surrogatepass"))
    try:
        table, _ = read_manifest(str(path))
    except ManifestError as exc:
        _refused_naming_a_row(exc)
        return
    assert table.num_rows == len(rows)
    assert all(FIRST <= t < END for t in table.column("timestamp").to_pylist())


ARROW_COLUMNS = [
    pa.array([1, None], pa.int64()), pa.array([2**64 - 1, 5], pa.uint64()), pa.array([1.5, math.nan]),
    pa.array([True, False]), pa.array([{"a": 1}, None]), pa.array([[1], []]), pa.array([b"\xff", b"x"]),
    pa.array([10**15, 0], pa.timestamp("s")), pa.array([-10**18, 10**18], pa.timestamp("ns")),
    pa.array([0, 2932897], pa.date32()), pa.array(["x", "y"]).dictionary_encode(), pa.nulls(2),
    pa.array(["a\x00", "b"]), pa.array([1, 2], pa.duration("s")),
]


@pytest.mark.parametrize("field", ["image_id", "source", "timestamp", "key"])
@pytest.mark.parametrize("column", ARROW_COLUMNS, ids=[str(c.type) for c in ARROW_COLUMNS])
def test_any_parquet_manifest_column_is_read_or_refused_naming_its_row(tmp_path: Path, field, column) -> None:
    base = {"image_id": pa.array(["i1", "i2"]), "key": pa.array(["a.jpg", "b.jpg"]),
            "source": pa.array(["s", "t"]), "timestamp": pa.array([1.0, 2.0])}
    _parquet_or_skip(tmp_path / "m.parquet", base, field, column)
    try:
        table, _ = read_manifest(str(tmp_path / "m.parquet"))
    except ManifestError as exc:
        _refused_naming_a_row(exc, "row")
        return
    assert all(FIRST <= t < END for t in table.column("timestamp").to_pylist())


@pytest.mark.parametrize("text, error", [
    (b'{"image_id": "i1", "Image_ID": "i2"}\n', "manifest line 1: the columns 'image_id', 'Image_ID' are one column"),
    (b'{"image_id": "i1", "image_id": "i2"}\n', "manifest line 1: the key 'image_id' is given more than once"),
    (b'{"image_id": ["i1"]}\n', "manifest line 1: image_id ['i1'] is a list, not text or an integer"),
    (b'{"image_id": 1.5}\n', "manifest line 1: image_id 1.5 is a number with a fraction, not text or an integer"),
    (b'{"image_id": "a\\u0000b"}\n', "manifest line 1: image_id 'a\\x00b' holds the control character U+0000"),
    (b'{"image_id": "i", "source": "\\ud800"}\n',
     "manifest line 1: source '\\ud800' holds a lone surrogate U+D800 (not valid Unicode)"),
    (b'{"image_id": "i"}\n{"image_id": "j", "key": 5}\n', "manifest line 2: key 5 is not text"),
    (b'{"image_id": "i", "timestamp": true}\n', "manifest line 1: timestamp True is a boolean, not seconds or ISO-8601"),
    (b'{"image_id": "i"}\n\xff\n', "manifest line 2: not valid UTF-8 (invalid start byte at byte 18)"),
])
def test_jsonl_manifest_refusals(tmp_path: Path, text: bytes, error: str) -> None:
    (tmp_path / "m.jsonl").write_bytes(text)
    with pytest.raises(ManifestError) as info:
        read_manifest(str(tmp_path / "m.jsonl"))
    assert str(info.value) == error


@pytest.mark.parametrize("text, error", [
    ("image_id,source,Source\ni,a,b\n", "manifest has the column 'source' more than once"),
    ("image_id,source\ni,a\nj," + "s" * (MAX_TEXT_CHARS + 1) + "\n",
     f"manifest line 3: source '{'s' * 79}... (1,027 characters) is 1,025 characters long (at most 1,024)"),
    ("image_id,source\ni,\x01\n", "manifest line 2: source '\\x01' holds the control character U+0001"),
])
def test_csv_manifest_refusals(tmp_path: Path, text: str, error: str) -> None:
    (tmp_path / "m.csv").write_text(text)
    with pytest.raises(ManifestError) as info:
        read_manifest(str(tmp_path / "m.csv"))
    assert str(info.value).startswith(error), str(info.value)


# ---------------------------------------------------------------------------------------------
# Logs: every format
# ---------------------------------------------------------------------------------------------
def _audit_pass(path: Path, fmt: str) -> tuple[dict[int, float], dict[int, BadLine]]:
    """The audit's pass over a log (read_log + check_chunk), every image known: good line ->
    timestamp, bad line -> BadLine; no line in both."""
    good, bad = {}, {}
    for chunk in read_log(str(path), fmt):
        records = check_chunk(chunk, lambda keys: np.zeros(len(keys), np.int64), "s")
        good.update(zip(records.line.tolist(), records.timestamp.tolist()))
        for b in records.bad:
            assert b.line not in bad
            bad[b.line] = b
    assert not set(good) & set(bad)
    assert all(FIRST <= t < END for t in good.values())
    return good, bad


LOG_FIELDS = ("timestamp", "source", "image")


@HYPO
@given(st.lists(st.fixed_dictionaries({f: VALUE for f in LOG_FIELDS}), min_size=1, max_size=5))
def test_any_jsonl_log_line_is_good_or_bad(tmp_path_factory, records: list[dict]) -> None:
    path = tmp_path_factory.mktemp("log") / "log.jsonl"
    path.write_text("".join(_json(r) + "\n" for r in records))
    good, bad = _audit_pass(path, "jsonl")
    assert sorted([*good, *bad]) == list(range(1, len(records) + 1))


@HYPO
@given(st.lists(st.tuples(TEXT, TEXT, TEXT), min_size=1, max_size=5), st.sampled_from(["csv", "tsv"]))
def test_any_csv_log_line_is_good_or_bad(tmp_path_factory, records, fmt: str) -> None:
    text = _csv_text(LOG_FIELDS, records, "," if fmt == "csv" else "\t")
    path = tmp_path_factory.mktemp("log") / f"log.{fmt}"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    good, bad = _audit_pass(path, fmt)
    written = text.split("\n")[1:-1]
    blank = {k + 2 for k, line in enumerate(written) if not line.strip(" \t")}  # only blanks and tabs: no record
    assert sorted([*good, *bad]) == sorted(set(range(2, len(records) + 2)) - blank)


@HYPO
@given(st.lists(st.tuples(TEXT, st.text(alphabet=st.characters(blacklist_characters=" \n\r\"", codec="utf-8"),
                                        min_size=1, max_size=20)), min_size=1, max_size=5))
def test_any_clf_log_line_is_good_or_bad(tmp_path_factory, records) -> None:
    lines = [f'1.2.3.4 - - [{t.replace("]", "").replace(chr(10), " ").replace(chr(13), " ")}] "POST /{p} HTTP/1.1" 200 5'
             for t, p in records]
    path = tmp_path_factory.mktemp("log") / "access.log"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogatepass"))
    good, bad = _audit_pass(path, "clf")
    assert sorted([*good, *bad]) == list(range(1, len(lines) + 1))


@pytest.mark.parametrize("field", LOG_FIELDS)
@pytest.mark.parametrize("column", ARROW_COLUMNS, ids=[str(c.type) for c in ARROW_COLUMNS])
def test_any_parquet_log_column_is_good_or_bad(tmp_path: Path, field: str, column: pa.Array) -> None:
    base = {"timestamp": pa.array([1.7e9, 1.7e9 + 1]), "source": pa.array(["s", "t"]), "image": pa.array(["i", "j"])}
    _parquet_or_skip(tmp_path / "log.parquet", base, field, column)
    good, bad = _audit_pass(tmp_path / "log.parquet", "parquet")
    assert sorted([*good, *bad]) == [1, 2]


# ---------------------------------------------------------------------------------------------
# End to end, as the users run them
# ---------------------------------------------------------------------------------------------
def _jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


RANGE = "1970-01-01T00:00:00Z .. 9999-12-31T23:59:59Z"
# image -> (its sidecar's text, the row's error)
SIDECARS = {
    "big.jpg": ('{"timestamp": ' + "9" * 400 + "}",  # the 411-byte sidecar of issue 29
                f"sidecar: timestamp {'9' * 20}... (400 digits) is after the accepted range {RANGE}"),
    "ms.jpg": ('{"timestamp": 1700000000000, "source": "s1"}',
               f"sidecar: timestamp 1700000000000 is after the accepted range {RANGE}; it looks like milliseconds "
               "since the epoch: 2023-11-14T22:13:20Z if divided by 1,000"),
    "e300.jpg": ('{"timestamp": 1e300}', f"sidecar: timestamp 1e+300 is after the accepted range {RANGE}"),
    "nan.jpg": ('{"timestamp": NaN}', "sidecar: timestamp nan is not a finite number"),
    "y1.jpg": ('{"timestamp": "0001-01-01T00:00:00+14:00"}',
               f"sidecar: timestamp '0001-01-01T00:00:00+14:00' is before the accepted range {RANGE}"),
    "y9999.jpg": ('{"timestamp": "9999-12-31T23:59:59-12:00"}',
                  f"sidecar: timestamp '9999-12-31T23:59:59-12:00' is after the accepted range {RANGE}"),
    "surrogate.jpg": ('{"source": "\\ud800"}', "sidecar: source '\\ud800' holds a lone surrogate U+D800 (not valid Unicode)"),
    "nul.jpg": ('{"image_id": "a\\u0000b"}', "sidecar: image_id 'a\\x00b' holds the control character U+0000"),
    "nested.jpg": ('{"image_id": {"a": [1]}, "source": true}',
                   "sidecar: image_id {'a': [1]} is an object, not text or an integer; "
                   "source True is a boolean, not text or an integer"),
    "long.jpg": ('{"source": "' + "s" * 5000 + '"}',
                 f"sidecar: source '{'s' * 79}... (5,002 characters) is 5,000 characters long (at most 1,024)"),
    "twice.jpg": ('{"source": "a", "source": "b"}', "sidecar twice.json: the key 'source' is given more than once"),
    "deep.jpg": ("[" * 50_000, "sidecar deep.json is not valid JSON: nested too deeply"),
    "ok.jpg": ('{"timestamp": "2023-11-14T22:13:20Z", "source": "s1", "image_id": 17}', None),
    "edge.jpg": ('{"timestamp": 253402300799, "source": "s1"}', None),
}


@pytest.mark.ray
@pytest.mark.timeout(900)
def test_batch_job_over_hostile_sidecars(tmp_path: Path) -> None:
    """``twostream score --input folder``: one row per image, each hostile sidecar's error text, the
    good ones' identity, report.html and the one-screen summary (exit 0)."""
    root = tmp_path / "in"
    root.mkdir()
    for k, (name, (sidecar, _)) in enumerate(SIDECARS.items()):
        (root / name).write_bytes(_jpeg(k))
        (root / name.replace(".jpg", ".json")).write_text(sidecar)
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    sets = [a for s in SMALL for a in ("--set", s)]
    proc = subprocess.run([sys.executable, "-m", "twostream.cli", "score", "--input", str(root), "--output",
                           str(tmp_path / "out"), "--no-progress", *sets], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = {r["key"]: r for r in pq.read_table(tmp_path / "out" / "images").to_pylist()}
    assert {k: r["error"] for k, r in rows.items()} == {k: e for k, (_, e) in SIDECARS.items()}
    assert (rows["ok.jpg"]["image_id"], rows["ok.jpg"]["source"], rows["ok.jpg"]["timestamp"]) == (
        "17", "s1", 1_700_000_000.0)
    assert rows["edge.jpg"]["timestamp"] == 253_402_300_799.0
    assert all(r["timestamp"] == 0.0 and r["response"] == "error" for r in rows.values() if r["error"])
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["inputs"] == len(SIDECARS) and summary["counts_add_up"]
    assert summary["verdicts"]["error"] == sum(e is not None for _, e in SIDECARS.values())
    assert (tmp_path / "out" / "report.html").stat().st_size > 0
    assert f"inputs {len(SIDECARS)}:" in proc.stdout and "rows written 14 of 14" in proc.stdout


def test_audit_over_a_hostile_log(tmp_path: Path) -> None:
    """``twostream audit`` over a JSON Lines log of hostile values: exit 0, each bad line with its
    reason and detail, summary.json strict JSON, report.html written."""
    from twostream.cli import main

    pq.write_table(pa.table({"image_id": ["i0", "i1"], "verdict": ["adversarial", "accepted"],
                             "label": [None, "cat"]}), tmp_path / "s.parquet")
    lines = [
        '{"timestamp": 1700000000, "source": "s", "image": "i0"}',  # good
        '{"timestamp": 1700000000000, "source": "s", "image": "i0"}',
        '{"timestamp": ' + "9" * 400 + ', "source": "s", "image": "i1"}',
        '{"timestamp": NaN, "source": "s", "image": "i1"}',
        '{"timestamp": [1], "source": "s", "image": "i1"}',
        '{"timestamp": "0001-01-01T00:00:00+14:00", "source": "s", "image": "i1"}',
        '{"timestamp": 1700000001, "source": "s", "source": "t", "image": "i1"}',
        '{"timestamp": 1700000002, "source": "\\ud800", "image": "i1"}',  # kept: U+FFFD, as invalid UTF-8
        '{"timestamp": true, "source": "s", "image": "i1"}',
        "[" * 50_000,
    ]
    (tmp_path / "log.jsonl").write_text("\n".join(lines) + "\n")
    assert main(["audit", "--log", str(tmp_path / "log.jsonl"), "--scores", str(tmp_path / "s.parquet"),
                 "--output", str(tmp_path / "out")]) == 0
    bad = {b["line"]: (b["reason"], b["detail"]) for b in pq.read_table(tmp_path / "out" / "bad_lines.parquet")
           .to_pylist()}
    after = f"is after the accepted range {RANGE}"
    assert bad == {  # (a line with text beside numbers: the log's column is text, values quoted)
        2: ("timestamp out of range", f"timestamp '1700000000000' {after}; it looks like milliseconds since the "
                                      "epoch: 2023-11-14T22:13:20Z if divided by 1,000 (read it with "
                                      "--map timestamp_unit=ms)"),
        3: ("timestamp out of range", f"timestamp '{'9' * 79}... (402 characters) {after}"),
        4: ("unparseable timestamp", "timestamp 'nan' is not a finite number"),
        5: ("unparseable timestamp", "timestamp '[1]' is neither seconds nor ISO-8601"),
        6: ("timestamp out of range", f"timestamp '0001-01-01T00:00:00+14:00' is before the accepted range {RANGE}"),
        7: ("unparseable line", "the key 'source' is given more than once"),
        9: ("unparseable timestamp", "timestamp 'true' is neither seconds nor ISO-8601"),
        10: ("unparseable line", "not valid JSON: nested too deeply"),
    }
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())  # strict JSON
    assert (summary["good_lines"], summary["bad_lines"], summary["sources"]) == (2, 8, 2)
    assert set(summary["files"]) >= {"summary.json", "report.html", "bad_lines.parquet"}
    assert (tmp_path / "out" / "report.html").stat().st_size > 0
    sources = pq.read_table(tmp_path / "out" / "sources.parquet").column("source").to_pylist()
    assert sorted(sources) == ["s", "\ufffd\ufffd\ufffd"]


def test_csv_manifest_columns_are_text_whatever_their_case(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("Image_ID,Source,TimeStamp\n007,s,1.5\n")
    table, _ = read_manifest(str(tmp_path / "m.csv"))
    assert [(r["image_id"], r["source"], r["timestamp"]) for r in table.to_pylist()] == [("007", "s", 1.5)]


def test_log_headers_naming_a_column_twice(tmp_path: Path) -> None:
    """A CSV header with one name twice: refused saying so; spellings that differ in case: the
    exact name, else the first; a line with only another spelling lacks the field (a bad line)."""
    from twostream.audit.logread import AuditError

    (tmp_path / "dup.csv").write_text("timestamp,timestamp,source,image\n1700000000,1,s,i0\n")
    with pytest.raises(AuditError) as info:
        list(read_log(str(tmp_path / "dup.csv")))
    assert str(info.value) == ("the log's header names the column 'timestamp' more than once "
                               "['timestamp', 'timestamp', 'source', 'image']; rename all but one")
    known = lambda keys: np.zeros(len(keys), np.int64)  # noqa: E731
    (tmp_path / "case.csv").write_text("time,Source,SOURCE,image\n1700000000,a,b,i0\n")
    (chunk,) = read_log(str(tmp_path / "case.csv"))
    assert check_chunk(chunk, known, "s").source.to_pylist() == ["a"]  # the first of the spellings
    (tmp_path / "case.jsonl").write_text('{"timestamp": 1700000000, "Source": "t", "source": "s", "image": "i0"}\n'
                                         '{"timestamp": 1700000001, "SOURCE": "u", "image": "i0"}\n')
    (chunk,) = read_log(str(tmp_path / "case.jsonl"))
    records = check_chunk(chunk, known, "s")
    assert records.source.to_pylist() == ["s"]  # the exact name
    assert [(b.line, b.reason) for b in records.bad] == [(2, "missing source")]
