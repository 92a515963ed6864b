"""The one reader of upload records (twostream/core/records): a batch manifest and an audited log
accept and refuse the same timestamps and column spellings, in every format (CSV, TSV, JSON Lines,
a web server's access log, compressed or not), through their public entry points
(``read_manifest``; ``read_log`` + ``check_chunk``, and ``run_audit`` over an access log); a line
the audit lists as bad is the line a manifest is refused for."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from twostream.audit.logread import AuditError, check_chunk, read_log
from twostream.audit.run import run_audit
from twostream.batch.manifest import ManifestError, read_manifest
from twostream.core.config import load_config

# 2023-11-14T22:13:20Z is 1,700,000,000 s (worked out in tests/core/test_timestamps.py)
T = 1_700_000_000
# (timestamp text as an uploader's file gives it, seconds when accepted, None when refused)
TIMESTAMPS: list[tuple[str, float | None]] = [
    ("[14/Nov/2023:15:13:20 -0700]", T),  # an access log's time, brackets and all
    ("14/Nov/2023:15:13:20 -0700", T),  # ... without the brackets
    ("14/Nov/2023:22:13:20 +0000", T),
    ("14/nov/2023:22:13:20 +0000", T),  # month names in any case
    ("15/Nov/2023:00:13:20 +0200", T),  # the next day at +02:00
    ("14/Nov/2023:15:13:20 -07:00", T),  # a colon in the offset
    ("2023-11-14T22:13:20Z", T),
    ("2023-11-14T22:13:20", T),  # no zone: UTC
    ("2023-11-14 23:13:20+01:00", T),
    ("2023-11-14T22:13:20.250Z", T + 0.25),
    ("2023-11-14", T - 80_000),  # midnight: 22:13:20 is 80,000 s
    ("1700000000", T),
    ("1.7e9", T),
    (" 1700000000 ", T),  # blanks trimmed
    ("0", 0.0),  # the first second accepted
    ("14/Nov/2023:22:13:20", None),  # an access-log time without its zone
    ("[2023-11-14T22:13:20Z]", None),  # brackets belong to access-log times only
    ("14/Nov/2023 22:13:20 +0000", None),
    ("Tue, 14 Nov 2023 22:13:20 GMT", None),  # an HTTP date: not read
    ("1700000000000", None),  # milliseconds: after the range
    ("-1", None),  # before the range
    ("nan", None),
    ("soon", None),
]
IDS = [t for t, _ in TIMESTAMPS]


def _audit(path: Path, fmt: str = "auto") -> tuple[dict[int, float], dict[int, str]]:
    """The audit's pass over a log, every image known: {line: seconds} and {line: bad reason: detail}."""
    good, bad = {}, {}
    for chunk in read_log(str(path), fmt):
        records = check_chunk(chunk, lambda keys: np.zeros(len(keys), np.int64), "s")
        good.update(zip(records.line.tolist(), records.timestamp.tolist()))
        bad.update({b.line: f"{b.reason}: {b.detail}" for b in records.bad})
    return good, bad


def _manifest(path: Path) -> float | str:
    """The one row's timestamp of a manifest, or the refusal."""
    try:
        table, _ = read_manifest(str(path))
    except ManifestError as exc:
        return str(exc)
    return table.column("timestamp").to_pylist()[0]


def _clf_line(time: str, host: str = "203.0.113.9", path: str = "/up/a.jpg") -> str:
    return f'{host} - - [{time.strip("[]")}] "POST {path} HTTP/1.1" 200 512 "-" "curl/8.0"'


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "log"])
def test_manifest_and_audit_accept_and_refuse_the_same_timestamps(tmp_path: Path, fmt: str) -> None:
    """Every timestamp of TIMESTAMPS in one format: a manifest of one row reads it to the same
    seconds or is refused naming its line; the audit's log of all of them has it as a good line
    of the same seconds or as a bad line. An access log gives the time in brackets, so the
    bracketed and bare forms of one time are the same line there."""
    log: list[str] = {"csv": ["timestamp,source,image"], "tsv": ["timestamp\tsource\timage"]}.get(fmt, [])
    first = len(log) + 1
    expected = [dict(TIMESTAMPS)[text.strip("[]")] if fmt == "log" else seconds for text, seconds in TIMESTAMPS]
    for k, ((text, _), seconds) in enumerate(zip(TIMESTAMPS, expected)):
        if fmt == "csv":
            head, line = "image_id,source,timestamp", f'i{k},s,"{text}"'
            log.append(f'"{text}",s,img')
        elif fmt == "tsv":
            head, line = "image_id\tsource\ttimestamp", f"i{k}\ts\t{text}"
            log.append(f"{text}\ts\timg")
        elif fmt == "jsonl":
            head, line = "", json.dumps({"image_id": f"i{k}", "source": "s", "timestamp": text})
            log.append(json.dumps({"timestamp": text, "source": "s", "image": "img"}))
        else:
            head, line = "", _clf_line(text, path=f"/up/i{k}.jpg")
            log.append(_clf_line(text))
        manifest = tmp_path / f"m{k}.{fmt}"
        manifest.write_text((head + "\n" if head else "") + line + "\n")
        got = _manifest(manifest)
        if seconds is None:
            assert isinstance(got, str) and got.startswith(f"manifest line {2 if head else 1}: timestamp "), got
        else:
            assert got == seconds, (text, got)
    path = tmp_path / f"log.{fmt}"
    path.write_text("\n".join(log) + "\n")
    good, bad = _audit(path)
    for k, ((text, _), seconds) in enumerate(zip(TIMESTAMPS, expected)):
        if seconds is None:
            assert bad[first + k].startswith(("unparseable timestamp: timestamp ", "timestamp out of range: ")), text
        else:
            assert good[first + k] == seconds, text
    assert len(good) + len(bad) == len(TIMESTAMPS)


# column spellings as uploaders' files name them (any case, blanks around), and what each names
SPELLINGS = [
    ("timestamp", ["timestamp", "TS", "Time", "@timestamp", "datetime", "date", "time_local", "request_time",
                   "event_time", "uploaded_at", " created_at "]),
    ("source", ["source", "Source_ID", "sourceid", "IP", "client_ip", "clientip", "remote_addr", "remote_ip", "c-ip",
                "host", "remote_host", "user", "username", "user_id", "remote_user"]),
    ("image", ["image_id", "ID", "imageid", "image", "key", "image_key", "object_key", "uri", "url", "path",
               "request_uri", "request_path", "cs-uri-stem", "File"]),
]
CASES = [(field, name) for field, names in SPELLINGS for name in names]


@pytest.mark.parametrize("field, spelling", CASES, ids=[f"{f}={s.strip()}" for f, s in CASES])
def test_manifest_and_audit_read_the_same_column_spellings(tmp_path: Path, field: str, spelling: str) -> None:
    """One column named ``spelling``, the others by their plain names: a CSV manifest and a CSV log
    both read the value from it (a manifest's image is its image id, else key, else URI)."""
    names = {"timestamp": "timestamp", "source": "source", "image": "image_id", field: spelling}
    values = {"timestamp": "2023-11-14T22:13:20Z", "source": "198.51.100.7", "image": "a.jpg"}
    head, row = ",".join(names.values()), ",".join(values[f] for f in names)
    (tmp_path / "m.csv").write_text(f"{head}\n{row}\n")
    (tmp_path / "log.csv").write_text(f"{head}\n{row}\n")
    table, _ = read_manifest(str(tmp_path / "m.csv"))
    got = table.to_pylist()[0]
    assert (got["image_id"], got["source"], got["timestamp"]) == ("a.jpg", "198.51.100.7", float(T))
    chunk = next(read_log(str(tmp_path / "log.csv")))
    assert (chunk.image.to_pylist(), chunk.source.to_pylist()) == (["a.jpg"], ["198.51.100.7"])
    records = check_chunk(chunk, lambda keys: np.zeros(len(keys), np.int64), "s")
    assert records.timestamp.tolist() == [T]


def test_an_image_column_of_no_known_spelling_is_refused_by_both(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_text("picture,source,timestamp\na.jpg,s,1\n")
    (tmp_path / "log.csv").write_text("picture,source,timestamp\na.jpg,s,1\n")
    with pytest.raises(ManifestError, match=r"manifest needs an image_id \(or key\) column, or a uri column; "
                                            r"has \['picture', 'source', 'timestamp'\]"):
        read_manifest(str(tmp_path / "m.csv"))
    with pytest.raises(AuditError, match=r"the log has no image column \(looked for image_id, image, key, "):
        next(read_log(str(tmp_path / "log.csv")))


@pytest.mark.parametrize("suffix, compress", [(".gz", gzip.compress), ("", bytes)])
def test_a_web_servers_access_log_is_a_manifest_too(tmp_path: Path, suffix: str, compress) -> None:
    """The access log the audit reads, compressed or not, read as a manifest: each request's
    path is its image (matched by URI), its client its source, its time its timestamp."""
    text = "\n".join([_clf_line("14/Nov/2023:22:13:20 +0000", "203.0.113.9", "/up/a.jpg"),
                      "",  # blank lines are skipped
                      _clf_line("14/Nov/2023:22:13:21 +0000", "203.0.113.10", "/up/b.jpg")]) + "\n"
    path = tmp_path / f"access.log{suffix}"
    path.write_bytes(compress(text.encode()))
    table, _ = read_manifest(str(path))
    assert table.select(["image_id", "source", "timestamp", "key", "uri", "line"]).to_pylist() == [
        {"image_id": "/up/a.jpg", "source": "203.0.113.9", "timestamp": float(T), "key": None, "uri": "/up/a.jpg",
         "line": 1},
        {"image_id": "/up/b.jpg", "source": "203.0.113.10", "timestamp": T + 1.0, "key": None, "uri": "/up/b.jpg",
         "line": 3}]
    good, bad = _audit(path)
    assert (good, bad) == ({1: float(T), 3: T + 1.0}, {})


def test_the_audit_of_an_access_log_and_its_manifest_agree(tmp_path: Path) -> None:
    """``run_audit`` over an access log whose third line is no request: the line the audit
    lists as bad is the line the same file is refused for as a manifest."""
    lines = [_clf_line("14/Nov/2023:22:13:20 +0000", path="/up/a.jpg"),
             _clf_line("[14/Nov/2023:22:13:21 +0000]", path="/up/b.jpg"),
             "GET /nothing", _clf_line("14/Nov/2023:22:13:22 +0000", path="/up/c.jpg")]
    (tmp_path / "access.log").write_text("\n".join(lines) + "\n")
    pq.write_table(pa.table({"image_id": ["/up/a.jpg", "/up/b.jpg", "/up/c.jpg"], "verdict": ["accepted"] * 3,
                             "label": ["cat"] * 3}), tmp_path / "s.pq")
    run_audit(str(tmp_path / "access.log"), str(tmp_path / "out"), scores_uri=str(tmp_path / "s.pq"),
              config=load_config(None, [], {"audit": {"report": False}}))
    bad = pq.read_table(tmp_path / "out" / "bad_lines.parquet").to_pylist()
    assert [(b["line"], b["reason"], b["detail"]) for b in bad] == [
        (3, "unparseable line", "not in common/combined log format")]
    timeline = pq.read_table(tmp_path / "out" / "timeline.parquet", columns=["line", "timestamp"]).to_pydict()
    assert timeline == {"line": [1, 2, 4], "timestamp": [T, T + 1.0, T + 2.0]}
    with pytest.raises(ManifestError, match=r"^manifest line 3: not in common/combined log format$"):
        read_manifest(str(tmp_path / "access.log"))


# lines of a CSV body: records of the header's three fields, with good and bad timestamps, and junk
LINES = st.sampled_from([
    'IMG,s,1700000000', 'IMG,s,"[14/Nov/2023:22:13:20 +0000]"', "IMG,s,2023-11-14T22:13:20Z", "IMG,s,soon",
    "IMG,s,-5", 'IMG,"s,t",1', "IMG,s", "IMG,s,1,extra", 'IMG,"s,1', 'IMG,s"x,1', "IMG,s,1\r", "", "  ",
])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(LINES, min_size=1, max_size=8), st.sampled_from(["", ".gz"]))
def test_a_line_the_audit_lists_as_bad_refuses_the_manifest_naming_it(tmp_path: Path, body: list[str],
                                                                      suffix: str) -> None:
    """Any CSV body (each record's image id its own): the manifest is accepted exactly when the
    audit lists no bad line, then with the audit's timestamps; else it is refused naming the
    audit's first bad line."""
    lines = [line.replace("IMG", f"i{k}") for k, line in enumerate(body)]
    text = "\n".join(["image_id,source,timestamp", *lines]) + "\n"
    for name in ("m.csv", "log.csv"):
        raw = text.replace("image_id,", "image,") if name == "log.csv" else text
        (tmp_path / (name + suffix)).write_bytes(gzip.compress(raw.encode()) if suffix else raw.encode())
    good, bad = _audit(tmp_path / ("log.csv" + suffix))
    try:
        table, _ = read_manifest(str(tmp_path / ("m.csv" + suffix)))
    except ManifestError as exc:
        assert bad, str(exc)
        assert str(exc).startswith(f"manifest line {min(bad)}: "), (str(exc), bad)
        return
    assert not bad, bad
    assert dict(zip(table.column("line").to_pylist(), table.column("timestamp").to_pylist())) == good


def test_lines_ended_by_a_bare_cr_are_refused_by_both(tmp_path: Path) -> None:
    """A CSV file written with CR line ends is one line: its header holds the CRs. Both refuse
    it, naming line 1 (a reader that split at the CRs would read no or other records)."""
    for name in ("m.csv", "log.csv"):
        (tmp_path / name).write_bytes(b"image_id,source,timestamp\ri1,s,1\ri2,t,2\r")
    why = "line 1: the header holds a carriage return (CR); lines must end with LF or CR LF"
    with pytest.raises(ManifestError, match=f"^manifest {re.escape(why)}$"):
        read_manifest(str(tmp_path / "m.csv"))
    with pytest.raises(AuditError, match=f": {re.escape(why)}$"):
        next(read_log(str(tmp_path / "log.csv")))
