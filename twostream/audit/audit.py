"""Audit of upload logs: which sources sent adversarial images, and when (docs/audit.md).

Pipeline (plain Python + pyarrow; no Ray needed, ``jobs/audit.py`` only adds Ray for scoring):

1. **Catalogue** of known images: the rows of an earlier batch job's Parquet (``--scores``;
   needs ``image_id`` and ``verdict``, plus the top-k columns for ``--what-if`` on p1/p2) and
   the image files under ``--images`` that no score row describes. Sorted by image id, so an
   index into it orders like the id itself.
2. **Log pass** (streaming): the upload log (CSV/TSV, JSON Lines, Parquet, or a raw web-server
   access log in common/combined log format) is read a block at a time; each record is mapped
   through :class:`ColumnMapping` to (timestamp, source, image key, user agent), its timestamp
   parsed to UTC epoch seconds and its image key resolved against the catalogue. Records that
   fail any step are *bad lines*, each written with its line number and reason, never dropped
   silently. Good records are appended as fixed-size binary rows to on-disk spill files,
   partitioned by source, so memory stays bounded by the largest partition, not the log.
3. **Scoring** of the referenced images that no ``--scores`` row covers (through a
   ``score_fn``; nothing that has a score is scored again).
4. **Replay**: each partition is sorted by ``(source, timestamp, image_id, line)`` and fed to
   :class:`twostream.core.reputation.ReputationLedger` (Algorithm 2, SPEC 3); the per-upload
   timeline is streamed to Parquet, per-source rows collected.
5. **What-if**: the same partitions replayed under other (p1, p2, threshold, cap); verdicts
   for other p1/p2 are recomputed from the stored top-k columns with
   :func:`twostream.core.scoring.verdict_columns` (no rescoring).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.json as pajson
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from twostream import storage
from twostream.core.config import ConfigError, ReputationConfig, ThresholdsConfig, TwoStreamConfig
from twostream.core.reputation import ReputationLedger, Upload

log = logging.getLogger("twostream.audit")

ACCEPTED, ADVERSARIAL, ERROR, BLOCKED = "accepted", "adversarial", "error", "blocked"
LOG_FORMATS = ("csv", "tsv", "jsonl", "parquet", "clf")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
TOP_K_COLUMNS = ("high_idx", "high_prob", "low_idx", "low_prob")


class AuditError(ValueError):
    """The audit cannot run: an input is missing, unreadable or lacks required columns."""


# ---------------------------------------------------------------------------------------------
# Column mapping
# ---------------------------------------------------------------------------------------------
ALIASES: dict[str, tuple[str, ...]] = {
    "timestamp": ("timestamp", "time", "ts", "@timestamp", "datetime", "date", "time_local",
                  "request_time", "event_time", "uploaded_at", "created_at"),
    "source": ("source", "source_id", "ip", "client_ip", "clientip", "remote_addr", "remote_ip",
               "c-ip", "host", "remote_host", "user", "username", "user_id", "remote_user"),
    "image": ("image_id", "image", "key", "image_key", "object_key", "uri", "url", "path",
              "request_uri", "request_path", "cs-uri-stem", "file"),
    "user_agent": ("user_agent", "useragent", "http_user_agent", "agent", "cs(user-agent)", "ua"),
}


class ColumnMapping(BaseModel):
    """Which log column holds each field; ``None`` picks the first alias present (case-insensitive).

    ``user_agent`` is optional; the other three are required. ``timestamp_unit`` applies to
    numeric timestamps (epoch seconds by default).
    """

    model_config = ConfigDict(extra="forbid")

    timestamp: str | None = None
    source: str | None = None
    image: str | None = None
    user_agent: str | None = None
    timestamp_unit: Literal["s", "ms", "us", "ns"] = "s"

    def resolve(self, columns: Sequence[str]) -> dict[str, str | None]:
        """Map each field to an existing column name (user_agent may be None)."""
        lower = {c.lower().strip(): c for c in columns}
        out: dict[str, str | None] = {}
        for name in ("timestamp", "source", "image", "user_agent"):
            wanted = getattr(self, name)
            if wanted is not None:
                found = lower.get(wanted.lower().strip())
                if found is None:
                    raise AuditError(f"column mapping: {name}={wanted!r} is not a log column {list(columns)}")
            else:
                found = next((lower[a] for a in ALIASES[name] if a in lower), None)
            if found is None and name != "user_agent":
                raise AuditError(
                    f"the log has no {name} column (looked for {', '.join(ALIASES[name])}; "
                    f"columns are {list(columns)}); name it with --map {name}=COLUMN"
                )
            out[name] = found
        return out


def parse_mapping(pairs: Sequence[str]) -> ColumnMapping:
    """``["source=user", "timestamp=when"]`` -> :class:`ColumnMapping` (ConfigError on bad keys)."""
    data: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--map {pair!r} is not of the form field=column")
        key, value = pair.split("=", 1)
        data[key.strip()] = value.strip()
    try:
        return ColumnMapping.model_validate(data)
    except Exception as exc:  # pydantic ValidationError -> a readable message
        raise ConfigError(f"invalid column mapping {data}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Timestamps
# ---------------------------------------------------------------------------------------------
_NUMERIC = r"^\s*[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*$"
_CLF_TIME = "%d/%b/%Y:%H:%M:%S %z"
_UNIT_SCALE = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}


def _iso_to_epoch(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text[:-1] + "+00:00" if text.endswith(("Z", "z")) else text)
    except ValueError:
        try:  # common log format, parsed by hand when pyarrow's strptime did not take it
            value = datetime.strptime(text, _CLF_TIME)
        except ValueError:
            return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


def parse_timestamps(column: pa.Array | pa.ChunkedArray, unit: str = "s") -> pa.Array:
    """Any log timestamp column -> float64 UTC epoch seconds (null where unparseable).

    Accepts Arrow timestamps (naive ones are UTC), numbers (epoch in ``unit``), and strings:
    epoch numbers, ISO-8601 (``Z``/offsets; naive = UTC) and common log format
    (``10/Oct/2000:13:55:36 -0700``, with or without brackets).
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_timestamp(column.type):
        return pc.divide(pc.cast(column.cast(pa.timestamp("us", tz=column.type.tz)), pa.int64()), 1e6)
    if pa.types.is_date(column.type):
        return parse_timestamps(pc.cast(column, pa.timestamp("s")))
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
        if pa.types.is_boolean(column.type):
            return pa.nulls(len(column), pa.float64())
        return pc.multiply(pc.cast(column, pa.float64()), _UNIT_SCALE[unit])
    text = pc.utf8_trim(pc.cast(column, pa.string()), "[] \t\"")
    numeric = pc.fill_null(pc.match_substring_regex(text, _NUMERIC), False)
    numbers = pc.multiply(pc.cast(pc.if_else(numeric, text, None), pa.float64()), _UNIT_SCALE[unit])
    clf = pc.divide(
        pc.cast(pc.strptime(text, format=_CLF_TIME, unit="s", error_is_null=True), pa.int64()), 1.0
    )
    out = pc.coalesce(numbers, clf)
    rest = pc.and_(pc.is_null(out), pc.is_valid(text))
    if pc.any(rest).as_py():
        values = out.to_numpy(zero_copy_only=False).astype(np.float64)
        valid = ~np.asarray(pc.is_null(out))
        idx = np.flatnonzero(np.asarray(rest))
        pending = pc.take(text, pa.array(idx))
        uniq = pc.unique(pending)
        parsed = {s: _iso_to_epoch(s) for s in uniq.to_pylist()}
        for k, s in zip(idx, pending.to_pylist()):
            v = parsed[s]
            if v is not None:
                values[k] = v
                valid[k] = True
        return pa.array(values, pa.float64(), mask=~valid)
    return out


# ---------------------------------------------------------------------------------------------
# Streaming log reader
# ---------------------------------------------------------------------------------------------
@dataclass
class BadLine:
    line: int  # 1-based physical line (CSV/JSONL/CLF) or 1-based row (Parquet)
    reason: str  # a short category, e.g. "unparseable timestamp"
    detail: str  # the offending value or parser message
    text: str  # the raw line (truncated)


@dataclass
class LogChunk:
    """A block of log records mapped to the audit's fields (all string except the timestamp)."""

    line: np.ndarray  # int64, 1-based
    timestamp: pa.Array
    source: pa.Array
    image: pa.Array
    user_agent: pa.Array | None
    raw: Callable[[int], str]  # row index in this chunk -> raw text
    bad: list[BadLine] = field(default_factory=list)


_CLF_RE = (
    r'^(?P<host>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<method>[A-Z]+) (?P<path>\S+)(?: (?P<protocol>[^"]*))?" (?P<status>\d{3}|-) (?P<bytes>\d+|-)'
    r'(?: "(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)")?.*$'
)
_TRUNC = 300


def detect_format(uri: str) -> str:
    name = str(uri).lower()
    for suffix in (".gz", ".bz2", ".zst", ".lz4"):
        name = name.removesuffix(suffix)
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".jsonl", ".ndjson", ".json")):
        return "jsonl"
    if name.endswith(".tsv"):
        return "tsv"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".log", ".txt")) or "access" in name.rsplit("/", 1)[-1]:
        return "clf"
    raise AuditError(f"cannot tell the log format of {uri!r}; pass --format {{{','.join(LOG_FORMATS)}}}")


def _line_blocks(uri: str, block_bytes: int) -> Iterator[tuple[int, list[bytes]]]:
    """Yield (line number of the first line, non-empty lines) blocks; gzip etc. by extension."""
    fs, path = storage.filesystem(uri)
    lineno = 1
    carry = b""
    with fs.open_input_stream(path, compression="detect") as stream:
        while True:
            data = stream.read(block_bytes)
            if not data:
                break
            data = carry + data
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            carry = data[cut + 1 :]
            lines = data[:cut].split(b"\n")
            yield lineno, lines
            lineno += len(lines)
    if carry:
        yield lineno, [carry]


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r")[:_TRUNC]


def _mapped(table: pa.Table, cols: dict[str, str | None]) -> dict[str, pa.Array | None]:
    out: dict[str, pa.Array | None] = {}
    for name in ("timestamp", "source", "image", "user_agent"):
        col = cols[name]
        if col is None or col not in table.column_names:
            out[name] = None if name == "user_agent" else pa.nulls(table.num_rows, pa.string())
            continue
        arr = table.column(col).combine_chunks()
        if name != "timestamp":
            if pa.types.is_nested(arr.type):
                arr = pa.array([json.dumps(v) if v is not None else None for v in arr.to_pylist()], pa.string())
            arr = pc.cast(arr, pa.string())
        out[name] = arr
    return out


def _to_chunk(table: pa.Table, cols, lines: np.ndarray, raw, bad) -> LogChunk:
    m = _mapped(table, cols)
    return LogChunk(lines, m["timestamp"], m["source"], m["image"], m["user_agent"], raw, bad)


def read_log(uri: str, fmt: str = "auto", mapping: ColumnMapping | None = None,
             block_bytes: int = 8 << 20) -> Iterator[LogChunk]:
    """Stream an upload log as :class:`LogChunk` blocks (bounded memory: one block at a time).

    CSV/TSV need a header line; one record per line (as in log files). JSON Lines: one object
    per line. ``clf``: Apache/Nginx common or combined log format (fields ``host``, ``user``,
    ``time``, ``method``, ``path``, ``status``, ``bytes``, ``referer``, ``user_agent``).
    Lines that cannot be parsed at all come back in ``LogChunk.bad``.
    """
    mapping = mapping or ColumnMapping()
    fmt = detect_format(uri) if fmt == "auto" else fmt
    if fmt not in LOG_FORMATS:
        raise AuditError(f"unknown log format {fmt!r} (one of {', '.join(LOG_FORMATS)})")
    if not storage.exists(uri):
        raise AuditError(f"log not found: {uri}")
    if fmt == "parquet":
        yield from _read_parquet(uri, mapping)
    elif fmt in ("csv", "tsv"):
        yield from _read_csv(uri, mapping, "\t" if fmt == "tsv" else ",", block_bytes)
    elif fmt == "jsonl":
        yield from _read_jsonl(uri, mapping, block_bytes)
    else:
        yield from _read_clf(uri, mapping, block_bytes)


def _read_parquet(uri: str, mapping: ColumnMapping) -> Iterator[LogChunk]:
    fs, path = storage.filesystem(uri)
    pf = pq.ParquetFile(path, filesystem=fs)
    cols = mapping.resolve(pf.schema_arrow.names)
    wanted = sorted({c for c in cols.values() if c})
    row = 1
    for batch in pf.iter_batches(batch_size=65536, columns=wanted):
        table = pa.Table.from_batches([batch])
        n = table.num_rows
        lines = np.arange(row, row + n, dtype=np.int64)

        def raw(k: int, _t=table) -> str:
            return json.dumps(_t.slice(k, 1).to_pylist()[0], default=str)[:_TRUNC]

        yield _to_chunk(table, cols, lines, raw, [])
        row += n


def _read_csv(uri: str, mapping: ColumnMapping, delimiter: str, block_bytes: int) -> Iterator[LogChunk]:
    header: bytes | None = None
    header_names: list[str] = []
    cols: dict[str, str | None] = {}
    for first, lines in _line_blocks(uri, block_bytes):
        numbers = np.arange(first, first + len(lines), dtype=np.int64)
        if header is None:
            nonempty = [k for k, ln in enumerate(lines) if ln.strip()]
            if not nonempty:
                continue
            k0 = nonempty[0]
            header = lines[k0].rstrip(b"\r")
            header_names = pacsv.read_csv(
                io.BytesIO(header + b"\n"), parse_options=pacsv.ParseOptions(delimiter=delimiter),
                read_options=pacsv.ReadOptions(use_threads=False),
            ).column_names
            cols = mapping.resolve(header_names)
            lines, numbers = lines[k0 + 1 :], numbers[k0 + 1 :]
        keep = [k for k, ln in enumerate(lines) if ln.strip(b" \t\r")]
        if not keep:
            continue
        lines = [lines[k] for k in keep]
        numbers = numbers[keep]
        invalid: list[tuple[int, str]] = []

        def handler(row, _inv=invalid) -> str:
            _inv.append((row.number, f"expected {row.expected_columns} fields, got {row.actual_columns}"))
            return "skip"

        body = header + b"\n" + b"\n".join(lines) + b"\n"
        bad: list[BadLine] = []
        try:
            table = pacsv.read_csv(
                io.BytesIO(body),
                read_options=pacsv.ReadOptions(use_threads=False, block_size=len(body) + 1),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=handler),
                convert_options=pacsv.ConvertOptions(
                    column_types={c: pa.string() for c in header_names}, strings_can_be_null=True,
                    quoted_strings_can_be_null=False,
                ),
            )
        except pa.ArrowInvalid as exc:  # e.g. an unterminated quote: fall back line by line
            table, invalid = _csv_line_by_line(header, lines, header_names, delimiter, str(exc))
        bad_rows = set()
        for number, detail in invalid:
            k = (number - 2) if number is not None and number >= 2 else None
            if k is None or not 0 <= k < len(lines):
                continue
            bad_rows.add(k)
            bad.append(BadLine(int(numbers[k]), "unparseable line", detail, _decode(lines[k])))
        good = np.array([k for k in range(len(lines)) if k not in bad_rows], dtype=np.int64)
        if len(good) != table.num_rows:  # pragma: no cover - defensive, should not happen
            raise AuditError(f"CSV block at line {first}: {table.num_rows} rows for {len(good)} lines")

        def raw(k: int, _l=lines, _g=good) -> str:
            return _decode(_l[_g[k]])

        yield _to_chunk(table, cols, numbers[good], raw, bad)


def _csv_line_by_line(header, lines, names, delimiter, message):
    tables, invalid = [], []
    for k, ln in enumerate(lines):
        try:
            t = pacsv.read_csv(
                io.BytesIO(header + b"\n" + ln + b"\n"),
                read_options=pacsv.ReadOptions(use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter=delimiter),
                convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in names}),
            )
            if t.num_rows != 1:
                raise pa.ArrowInvalid(f"{t.num_rows} records on one line")
            tables.append(t)
        except pa.ArrowInvalid as exc:
            invalid.append((k + 2, str(exc).splitlines()[0][:200]))
    schema = pa.schema([(c, pa.string()) for c in names])
    return (pa.concat_tables(tables) if tables else schema.empty_table()), invalid


def _read_jsonl(uri: str, mapping: ColumnMapping, block_bytes: int) -> Iterator[LogChunk]:
    cols: dict[str, str | None] | None = None
    for first, lines in _line_blocks(uri, block_bytes):
        numbers = np.arange(first, first + len(lines), dtype=np.int64)
        keep = [k for k, ln in enumerate(lines) if ln.strip(b" \t\r")]
        lines = [lines[k] for k in keep]
        numbers = numbers[keep]
        if not lines:
            continue
        bad: list[BadLine] = []
        good = np.arange(len(lines))
        try:
            table = pajson.read_json(io.BytesIO(b"\n".join(lines)))
            if table.num_rows != len(lines):
                raise pa.ArrowInvalid("row count mismatch")
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            rows, ok = [], []
            for k, ln in enumerate(lines):
                try:
                    obj = json.loads(ln)
                    if not isinstance(obj, dict):
                        raise ValueError(f"a JSON {type(obj).__name__}, not an object")
                except ValueError as exc:
                    bad.append(BadLine(int(numbers[k]), "unparseable line", f"invalid JSON: {exc}"[:200],
                                       _decode(ln)))
                    continue
                rows.append({key: (v if v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                                   else v if isinstance(v, str) else json.dumps(v))
                             for key, v in obj.items()})
                ok.append(k)
            good = np.array(ok, dtype=np.int64)
            names = sorted({key for r in rows for key in r})
            data = {}
            for name in names:
                values = [r.get(name) for r in rows]
                if any(isinstance(v, str) for v in values):
                    values = [None if v is None else str(v) for v in values]
                try:
                    data[name] = pa.array(values)
                except (pa.ArrowInvalid, pa.ArrowTypeError):
                    data[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
            table = pa.table(data) if data else pa.table({"_": pa.nulls(len(rows))})
        if cols is None:
            cols = mapping.resolve(table.column_names)
        else:  # later blocks may lack optional columns or name new ones; keep the mapping
            for name, col in list(cols.items()):
                if col is None and name == "user_agent":
                    try:
                        cols[name] = mapping.resolve(list(table.column_names) + ["timestamp", "source", "image"]
                                                     ).get("user_agent")
                    except AuditError:
                        pass

        def raw(k: int, _l=lines, _g=good) -> str:
            return _decode(_l[_g[k]])

        yield _to_chunk(table, cols, numbers[good], raw, bad)


def _read_clf(uri: str, mapping: ColumnMapping, block_bytes: int) -> Iterator[LogChunk]:
    names = ["host", "ident", "user", "time", "method", "path", "protocol", "status", "bytes",
             "referer", "user_agent"]
    cols = mapping.resolve(names)
    for first, lines in _line_blocks(uri, block_bytes):
        numbers = np.arange(first, first + len(lines), dtype=np.int64)
        keep = [k for k, ln in enumerate(lines) if ln.strip(b" \t\r")]
        lines = [lines[k] for k in keep]
        numbers = numbers[keep]
        if not lines:
            continue
        text = pa.array([ln.rstrip(b"\r") for ln in lines], pa.binary()).cast(pa.string(), safe=False)
        try:
            text = pc.utf8_normalize(text, "NFC")
        except pa.ArrowInvalid:
            text = pa.array([_decode(ln) for ln in lines], pa.string())
        parsed = pc.extract_regex(text, _CLF_RE)
        ok = np.asarray(pc.is_valid(parsed))
        good = np.flatnonzero(ok)
        bad = [BadLine(int(numbers[k]), "unparseable line", "not in common/combined log format",
                       _decode(lines[k])) for k in np.flatnonzero(~ok)]
        parsed = pc.take(parsed, pa.array(good, pa.int64()))
        table = pa.table({n: pc.struct_field(parsed, n) for n in names})
        for n in ("user", "user_agent", "referer"):
            table = table.set_column(table.column_names.index(n), n,
                                     pc.if_else(pc.is_in(table.column(n), pa.array(["-", ""])), None,
                                                table.column(n)))

        def raw(k: int, _l=lines, _g=good) -> str:
            return _decode(_l[_g[k]])

        yield _to_chunk(table, cols, numbers[good], raw, bad)


# ---------------------------------------------------------------------------------------------
# Catalogue of images (scores + image files)
# ---------------------------------------------------------------------------------------------
@dataclass
class Catalogue:
    """Every image the log may name, sorted by id; score columns filled where known."""

    ids: pa.Array  # string, sorted
    uri: list[str | None]
    scored: np.ndarray  # bool: has a verdict (from --scores or scored by this audit)
    from_scores: np.ndarray  # bool: the verdict came from --scores
    verdict: np.ndarray  # object: accepted | adversarial | error | None (not scored yet)
    label: np.ndarray  # object
    high_idx: np.ndarray  # (N, 5) int32, -1 unknown
    high_prob: np.ndarray  # (N, 5) float32, nan unknown
    low_idx: np.ndarray  # (N, 2) int32
    low_prob: np.ndarray  # (N, 2) float32
    has_topk: np.ndarray  # bool
    aliases: pa.Array = None  # strings that name an image (id, key, uri, relative path)
    alias_index: np.ndarray = None  # int64: catalogue row of each alias

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, values: pa.Array) -> np.ndarray:
        """Catalogue row of each value (-1 when unknown); tries the value as given, then
        without scheme/host/query/leading slash, then without extension, then its basename."""
        n = len(values)
        out = np.full(n, -1, dtype=np.int64)
        if len(self.aliases) == 0 or n == 0:
            return out
        current = pc.cast(values, pa.string())
        if isinstance(current, pa.ChunkedArray):
            current = current.combine_chunks()
        forms = [current]
        for pattern in (r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/]*", r"[?#].*$", r"^/+", r"\.[A-Za-z0-9]{1,5}$", r"^.*/"):
            current = pc.replace_substring_regex(current, pattern, "")
            forms.append(current)
        # one hash-set build per block: all candidate forms probed at once, the first match wins
        pos = pc.index_in(pa.concat_arrays(forms), value_set=self.aliases)
        valid = np.asarray(pc.is_valid(pos)).reshape(len(forms), n)
        posv = pc.fill_null(pos, 0).to_numpy().reshape(len(forms), n)
        hit = valid.any(axis=0)
        first = valid.argmax(axis=0)
        rows = np.flatnonzero(hit)
        out[rows] = self.alias_index[posv[first[rows], rows]]
        return out


def _scores_path(uri: str) -> str:
    """An earlier batch job's output root holds its per-image rows under images/."""
    images = storage.join(uri, "images")
    fs, path = storage.filesystem(images)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        return images
    return uri


def read_scores(uri: str) -> pa.Table:
    """Read score rows (``image_id``, ``verdict`` required; key/uri/label/top-k if present)."""
    uri = _scores_path(uri)
    fs, path = storage.filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise AuditError(f"--scores not found: {uri}")
    dataset = pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=True)
    names = dataset.schema.names
    missing = [c for c in ("image_id", "verdict") if c not in names]
    if missing:
        raise AuditError(f"--scores {uri} lacks column(s) {missing}; it has {names}")
    wanted = [c for c in ("image_id", "key", "uri", "verdict", "label", *TOP_K_COLUMNS) if c in names]
    return dataset.to_table(columns=wanted)


def _topk_matrix(column: pa.ChunkedArray | None, n: int, k: int, dtype, fill) -> tuple[np.ndarray, np.ndarray]:
    out = np.full((n, k), fill, dtype=dtype)
    ok = np.zeros(n, dtype=bool)
    if column is None:
        return out, ok
    col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy()
    good = lengths == k
    if good.any():
        flat = pc.list_flatten(pc.filter(col, pa.array(good))).to_numpy(zero_copy_only=False)
        out[good] = np.asarray(flat, dtype=dtype).reshape(-1, k)
        ok = good
    return out, ok


def _objects(column: pa.ChunkedArray) -> np.ndarray:
    """A low-cardinality string column as an object array sharing one str per distinct value."""
    encoded = pc.dictionary_encode(pc.cast(column, pa.string()).combine_chunks())
    values = np.array(encoded.dictionary.to_pylist() + [None], dtype=object)
    return values[pc.fill_null(encoded.indices, len(encoded.dictionary)).to_numpy()]


def _strip_ext(path: str) -> str:
    head, _, tail = path.rpartition("/")
    stem = tail.split(".", 1)[0] if not tail.startswith(".") else tail
    return f"{head}/{stem}" if head else stem


def build_catalogue(scores_uri: str | None, images_uri: str | None) -> Catalogue:
    """The images a log may name: score rows (deduplicated by image id, the last row winning),
    then the files under ``images_uri`` that no score row names (id = path without extension,
    relative to the prefix, as the batch job keys loose files). Vectorised with pyarrow."""
    scores = None
    if scores_uri:
        scores = read_scores(scores_uri)
        scores = scores.filter(pc.is_valid(scores.column("image_id")))
        # one row per image id, the last one winning (found by a stable sort, no hash table)
        sid = pc.cast(scores.column("image_id"), pa.string()).combine_chunks()
        if len(sid) > 1:
            order_s = pc.sort_indices(sid).to_numpy()
            sorted_ids = pc.take(sid, pa.array(order_s))
            last = np.append(np.asarray(pc.not_equal(sorted_ids[1:], sorted_ids[:-1])), True)
            if not last.all():
                scores = scores.take(pa.array(np.sort(order_s[last])))
            del sorted_ids, order_s
    score_names: pa.Array = pa.array([], pa.string())
    if scores is not None:
        named = [pc.cast(scores.column(c), pa.string()).combine_chunks()
                 for c in ("image_id", "key", "uri") if c in scores.column_names]
        score_names = pa.concat_arrays([a.filter(pc.is_valid(a)) for a in named])
    files: list[tuple[str, str, str]] = []  # (key, relative path, uri) of files no score row names
    covered: list[tuple[str, str, str]] = []  # files a score row names (they resolve to that row)
    if images_uri:
        try:
            listed = storage.list_files(images_uri)
        except FileNotFoundError as exc:
            raise AuditError(f"--images not found: {images_uri}") from exc
        _, base = storage.filesystem(images_uri)
        entries = []
        for u in listed:
            name = u.rsplit("/", 1)[-1]
            if name.startswith((".", "_")) or not name.lower().endswith(IMAGE_SUFFIXES):
                continue
            _, p = storage.filesystem(u)
            rel = p[len(base):].lstrip("/") if p != base else name
            entries.append((_strip_ext(rel), rel, u))
        if entries:
            keys = pa.array([e[0] for e in entries], pa.string())
            hit = pc.is_in(keys, value_set=score_names)
            for alt in (pa.array([e[1] for e in entries], pa.string()), pa.array([e[2] for e in entries], pa.string()),
                        pa.array([e[0].rsplit("/", 1)[-1] for e in entries], pa.string())):
                hit = pc.or_(hit, pc.is_in(alt, value_set=score_names))
            seen: set[str] = set()
            for e, h in zip(entries, hit.to_pylist()):
                if h:
                    covered.append(e)
                elif e[0] not in seen:
                    seen.add(e[0])
                    files.append(e)
    n_s = scores.num_rows if scores is not None else 0
    ids_all = pa.concat_arrays([
        pc.cast(scores.column("image_id"), pa.string()).combine_chunks() if scores is not None else pa.array([], pa.string()),
        pa.array([e[0] for e in files], pa.string()),
    ])
    order = pc.sort_indices(ids_all).to_numpy()  # catalogue row r holds input row order[r]
    n = len(ids_all)
    ids = pc.take(ids_all, pa.array(order))
    pos = np.empty(n, dtype=np.int64)  # input row -> catalogue row
    pos[order] = np.arange(n)
    cat = Catalogue(
        ids=ids, uri=[None] * n, scored=np.zeros(n, bool), from_scores=np.zeros(n, bool),
        verdict=np.full(n, None, dtype=object), label=np.full(n, None, dtype=object),
        high_idx=np.full((n, 5), -1, np.int32), high_prob=np.full((n, 5), np.nan, np.float32),
        low_idx=np.full((n, 2), -1, np.int32), low_prob=np.full((n, 2), np.nan, np.float32),
        has_topk=np.zeros(n, bool),
    )
    alias_parts: list[pa.Array] = []
    alias_rows: list[np.ndarray] = []
    if scores is not None and n_s:
        t = pos[:n_s]  # catalogue rows of the score rows
        cols = scores.column_names
        cat.scored[t] = True
        cat.from_scores[t] = True
        cat.verdict[t] = _objects(scores.column("verdict"))
        if "label" in cols:
            cat.label[t] = _objects(scores.column("label"))
        uri_col = scores.column("uri").to_pylist() if "uri" in cols else None
        if uri_col is not None:
            for r, u in zip(t.tolist(), uri_col):
                cat.uri[r] = u
        mats = [_topk_matrix(scores.column(c) if c in cols else None, n_s, k, dt, fill)
                for c, k, dt, fill in (("high_idx", 5, np.int32, -1), ("high_prob", 5, np.float32, np.nan),
                                       ("low_idx", 2, np.int32, -1), ("low_prob", 2, np.float32, np.nan))]
        cat.high_idx[t], cat.high_prob[t], cat.low_idx[t], cat.low_prob[t] = (m[0] for m in mats)
        cat.has_topk[t] = mats[0][1] & mats[1][1] & mats[2][1] & mats[3][1]
        # aliases: image ids first (they win over a key or URI that happens to equal another id)
        for c in ("image_id", "key", "uri"):
            if c in cols:
                a = pc.cast(scores.column(c), pa.string()).combine_chunks()
                valid = np.asarray(pc.is_valid(a))
                alias_parts.append(a.filter(pa.array(valid)))
                alias_rows.append(t[valid])
    if files:
        t = pos[n_s:]
        for r, (key, rel, u) in zip(t.tolist(), files):
            cat.uri[r] = u
        for k in range(3):
            alias_parts.append(pa.array([e[k] for e in files], pa.string()))
            alias_rows.append(t)
    if covered:  # a file a score row describes: its path names that row too
        # the row the file's key, path, URI or bare name names (score aliases first)
        names = pa.concat_arrays(alias_parts) if alias_parts else pa.array([], pa.string())
        rows_of = np.concatenate(alias_rows) if alias_rows else np.zeros(0, np.int64)
        index = [None] * len(covered)
        for form in (0, 1, 2, 3):
            probe = pa.array([e[0].rsplit("/", 1)[-1] if form == 3 else e[form] for e in covered], pa.string())
            for k, hit in enumerate(pc.index_in(probe, value_set=names).to_pylist()):
                if index[k] is None and hit is not None:
                    index[k] = int(rows_of[hit])
        for (key, rel, u), r in zip(covered, index):
            if r is None:
                continue
            alias_parts.append(pa.array([key, rel, u], pa.string()))
            alias_rows.append(np.array([r, r, r], np.int64))
            if cat.uri[r] is None:
                cat.uri[r] = u
    cat.aliases = pa.concat_arrays(alias_parts) if alias_parts else pa.array([], pa.string())
    cat.alias_index = np.concatenate(alias_rows).astype(np.int64) if alias_rows else np.zeros(0, np.int64)
    return cat


def rejected_for(cat: Catalogue, thresholds: ThresholdsConfig | None) -> tuple[np.ndarray, np.ndarray]:
    """(rejected bool, verdict text) per catalogue row: the stored verdict when ``thresholds``
    is None, else Algorithm 1 recomputed from the top-k columns (rows without them: AuditError)."""
    verdict = cat.verdict.copy()
    if thresholds is not None:
        need = cat.scored & (cat.verdict != ERROR)
        lacking = need & ~cat.has_topk
        if lacking.any():
            raise AuditError(
                f"{int(lacking.sum())} scored image(s) have no top-k columns (high_idx, high_prob, "
                "low_idx, low_prob), so p1/p2 cannot be changed for them"
            )
        rows = np.flatnonzero(need)
        if len(rows):
            args = (cat.high_idx[rows], cat.high_prob[rows], cat.low_idx[rows], cat.low_prob[rows])
            try:
                from twostream.core.scoring import verdict_columns
            except ImportError:  # scoring needs the model registry (torch, timm); Algorithm 1 does not
                from twostream.core.comparator import compare
                from twostream.core.mapping import load_mapping

                accepted = compare(*args, load_mapping().array, thresholds.p1, thresholds.p2).accepted
                verdict[rows] = np.where(accepted, ACCEPTED, ADVERSARIAL)
            else:
                verdict[rows] = verdict_columns(*args, thresholds)["verdict"]
    rejected = verdict == ADVERSARIAL
    return rejected, verdict


# ---------------------------------------------------------------------------------------------
# Spill files: good log records as fixed-size rows, partitioned by source
# ---------------------------------------------------------------------------------------------
RECORD = np.dtype([("src", "<i4"), ("img", "<i4"), ("ts", "<f8"), ("line", "<i8")])


class _Spill:
    def __init__(self, directory: str, partitions: int) -> None:
        self.dir = directory
        self.partitions = partitions
        self.handles = [open(os.path.join(directory, f"part-{p:04d}.bin"), "wb") for p in range(partitions)]
        self.rows = np.zeros(partitions, np.int64)

    def append(self, rec: np.ndarray) -> None:
        part = rec["src"] % self.partitions
        order = np.argsort(part, kind="stable")
        rec, part = rec[order], part[order]
        bounds = np.searchsorted(part, np.arange(self.partitions + 1))
        for p in range(self.partitions):
            a, b = bounds[p], bounds[p + 1]
            if b > a:
                rec[a:b].tofile(self.handles[p])
                self.rows[p] += b - a

    def close(self) -> None:
        for h in self.handles:
            h.close()

    def partitions_sorted(self) -> Iterator[np.ndarray]:
        """Each partition's records sorted by (source, timestamp, image id, line)."""
        for p in range(self.partitions):
            if not self.rows[p]:
                continue
            rec = np.fromfile(os.path.join(self.dir, f"part-{p:04d}.bin"), dtype=RECORD)
            yield rec[np.lexsort((rec["line"], rec["img"], rec["ts"], rec["src"]))]


# ---------------------------------------------------------------------------------------------
# Replay and outputs
# ---------------------------------------------------------------------------------------------
TIMELINE_SCHEMA = pa.schema([
    ("line", pa.int64()),  # line (row for Parquet logs) of the upload in the log
    ("source", pa.string()),
    ("timestamp", pa.float64()),  # UTC epoch seconds
    ("image_id", pa.string()),
    ("verdict", pa.string()),  # accepted | adversarial | error
    ("label", pa.string()),  # CIFAR-10 label when accepted
    ("cc", pa.int32()),  # the source's counter after this upload (null for error images)
    ("blacklisted", pa.bool_()),  # the source's standing after this upload (null for errors)
    ("response", pa.string()),  # a label, adversarial, blocked, or error
])
INTERVAL = pa.struct([("start", pa.float64()), ("end", pa.float64())])
SOURCES_SCHEMA = pa.schema([
    ("rank", pa.int32()),  # 1 = most suspicious
    ("source", pa.string()),
    ("uploads", pa.int64()),  # log lines of this source that resolved to an image
    ("scored", pa.int64()),  # Algorithm-2 events (uploads minus error images)
    ("rejected", pa.int64()),
    ("errors", pa.int64()),  # undecodable images (not Algorithm-2 events)
    ("blocked", pa.int64()),  # uploads answered "blocked"
    ("rejection_rate", pa.float64()),  # rejected / scored
    ("first_seen", pa.float64()),
    ("last_seen", pa.float64()),
    ("blacklist_intervals", pa.list_(INTERVAL)),  # end null: still listed at the end of the log
    ("times_blacklisted", pa.int32()),
    ("blacklisted_seconds", pa.float64()),  # open intervals counted up to last_seen
    ("cc", pa.int32()),  # final counter
    ("blacklisted", pa.bool_()),  # final standing
    ("final_standing", pa.string()),  # blacklisted | released | clean
    ("user_agents", pa.list_(pa.string())),  # up to 5 distinct user agents seen
])
BAD_LINES_SCHEMA = pa.schema([("line", pa.int64()), ("reason", pa.string()), ("detail", pa.string()),
                              ("text", pa.string())])
WHAT_IF_SCHEMA = pa.schema([
    ("setting", pa.string()), ("p1", pa.float64()), ("p2", pa.float64()), ("threshold", pa.int32()),
    ("cap", pa.int32()), ("rejected_uploads", pa.int64()), ("blocked_uploads", pa.int64()),
    ("sources_blocked", pa.int64()), ("blacklisted_at_end", pa.int64()),
    ("clean_sources_hit", pa.int64()), ("clean_sources", pa.int64()),
])


@dataclass
class WhatIf:
    """One alternative setting; None fields keep the audit's own value."""

    p1: float | None = None
    p2: float | None = None
    threshold: int | None = None
    cap: int | None = None

    @classmethod
    def parse(cls, text: str) -> "WhatIf":
        """``"p1=0.05,threshold=5"`` -> WhatIf (ConfigError on unknown keys or bad values)."""
        out = cls()
        for part in filter(None, (p.strip() for p in re.split(r"[,;\s]+", text))):
            if "=" not in part:
                raise ConfigError(f"--what-if {text!r}: {part!r} is not key=value")
            key, value = (s.strip() for s in part.split("=", 1))
            if key not in ("p1", "p2", "threshold", "cap"):
                raise ConfigError(f"--what-if {text!r}: unknown key {key!r} (p1, p2, threshold, cap)")
            try:
                setattr(out, key, float(value) if key in ("p1", "p2") else int(value))
            except ValueError:
                raise ConfigError(f"--what-if {text!r}: {key}={value!r} is not a number") from None
        return out

    def configs(self, base: TwoStreamConfig) -> tuple[ThresholdsConfig, ReputationConfig]:
        try:
            th = ThresholdsConfig(p1=base.thresholds.p1 if self.p1 is None else self.p1,
                                  p2=base.thresholds.p2 if self.p2 is None else self.p2)
            rep = base.reputation.model_copy()
            rep = ReputationConfig(**{**rep.model_dump(),
                                      **({"threshold": self.threshold} if self.threshold is not None else {}),
                                      **({"cap": self.cap} if self.cap is not None else {})})
        except Exception as exc:
            raise ConfigError(f"--what-if {self.label()}: {exc}") from None
        return th, rep

    def label(self) -> str:
        parts = [f"{k}={getattr(self, k)}" for k in ("p1", "p2", "threshold", "cap") if getattr(self, k) is not None]
        return ",".join(parts) or "baseline"


@dataclass
class SourceSeries:
    source: str
    timestamp: np.ndarray
    cc: np.ndarray
    intervals: list[list[float | None]]
    threshold: int


@dataclass
class AuditResult:
    output: str
    summary: dict[str, Any]
    sources: pa.Table  # SOURCES_SCHEMA, sorted by rank
    top_series: list[SourceSeries]
    rate_bins: np.ndarray  # bin edges (epoch seconds)
    rate_scored: np.ndarray
    rate_rejected: np.ndarray
    rate_blocked: np.ndarray
    bad_counts: dict[str, int]
    bad_sample: list[BadLine]
    what_if: pa.Table | None
    files: dict[str, str]


class _ParquetSink:
    """A Parquet file written a table at a time (local or s3://)."""

    def __init__(self, uri: str, schema: pa.Schema) -> None:
        fs, path = storage.filesystem(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        self.writer = pq.ParquetWriter(path, schema, filesystem=fs, compression="zstd")
        self.schema = schema
        self.rows = 0

    def write(self, columns: dict[str, Any]) -> None:
        table = pa.Table.from_pydict(columns, schema=self.schema)
        if table.num_rows:
            self.writer.write_table(table, row_group_size=1 << 20)
            self.rows += table.num_rows

    def close(self) -> None:
        self.writer.close()


def _suspicion_order(times_bl: np.ndarray, blocked: np.ndarray, rejected: np.ndarray,
                     rate: np.ndarray, names: Sequence[str]) -> list[int]:
    return sorted(range(len(names)), key=lambda k: (-int(times_bl[k] > 0), -int(rejected[k]), -float(rate[k]),
                                                     -int(blocked[k]), names[k]))


ScoreFn = Callable[[list[str], list[str]], list[dict[str, Any]]]


def scorer_score_fn(scorer: Any, chunk: int = 32) -> ScoreFn:
    """A score function over a :class:`twostream.core.scoring.Scorer` (in-process)."""

    def score(uris: list[str], ids: list[str]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for start in range(0, len(uris), chunk):
            blobs, keep = [], []
            for u, i in zip(uris[start:start + chunk], ids[start:start + chunk]):
                try:
                    blobs.append(storage.read_bytes(u))
                except OSError as exc:
                    blobs.append(b"")
                    log.warning("cannot read %s: %s", u, exc)
                keep.append(i)
            out.extend(r.to_dict() for r in scorer.score_batch(blobs, ids=keep))
        return out

    return score


def run_audit(
    log_uri: str,
    output_uri: str,
    *,
    images_uri: str | None = None,
    scores_uri: str | None = None,
    config: TwoStreamConfig | None = None,
    log_format: str = "auto",
    mapping: ColumnMapping | None = None,
    score_fn: ScoreFn | None = None,
    what_if: Sequence[WhatIf] = (),
    clean_rate: float = 0.1,
    top: int = 10,
    partitions: int = 16,
    block_bytes: int = 8 << 20,
    spill_dir: str | None = None,
    report: bool = True,
) -> AuditResult:
    """Run the whole audit and write its outputs under ``output_uri`` (see module docstring).

    ``score_fn(uris, ids) -> [dict(verdict, label, high_idx, ...)]`` scores the referenced
    images that no ``--scores`` row covers; when None, an in-process
    :class:`twostream.core.scoring.Scorer` is built from ``config`` (only if something needs it).
    """
    started = time.perf_counter()
    config = config or TwoStreamConfig()
    mapping = mapping or ColumnMapping()
    if not scores_uri and not images_uri:
        raise AuditError("give --scores and/or --images: the audit needs to know the images")
    cat = build_catalogue(scores_uri, images_uri)
    t_catalogue = time.perf_counter() - started
    files = {name: storage.join(output_uri, name) for name in
             ("sources.parquet", "timeline.parquet", "bad_lines.parquet", "summary.json", "report.html")}
    bad_sink = _ParquetSink(files["bad_lines.parquet"], BAD_LINES_SCHEMA)
    bad_counts: Counter[str] = Counter()
    bad_sample: list[BadLine] = []

    def add_bad(rows: list[BadLine]) -> None:
        if not rows:
            return
        for b in rows:
            bad_counts[b.reason] += 1
        room = 200 - len(bad_sample)
        if room > 0:
            bad_sample.extend(rows[:room])
        bad_sink.write({"line": [b.line for b in rows], "reason": [b.reason for b in rows],
                        "detail": [b.detail for b in rows], "text": [b.text for b in rows]})

    tmp = tempfile.mkdtemp(prefix="twostream-audit-", dir=spill_dir)
    try:
        spill = _Spill(tmp, partitions)
        source_code: dict[str, int] = {}
        source_names: list[str] = []
        agents: list[set[str]] = []
        referenced = np.zeros(len(cat), dtype=bool)
        lines_total = good_total = 0
        tmin, tmax = math.inf, -math.inf
        fmt = detect_format(log_uri) if log_format == "auto" else log_format
        for chunk in read_log(log_uri, fmt, mapping, block_bytes):
            n = len(chunk.line)
            lines_total += n + len(chunk.bad)
            if n == 0:
                add_bad(sorted(chunk.bad, key=lambda b: b.line))
                continue
            ts = parse_timestamps(chunk.timestamp, mapping.timestamp_unit)
            src = pc.utf8_trim_whitespace(chunk.source)
            img = pc.utf8_trim_whitespace(chunk.image)
            empty_src = np.asarray(pc.fill_null(pc.equal(src, ""), True))
            empty_img = np.asarray(pc.fill_null(pc.equal(img, ""), True))
            raw_ts_missing = np.asarray(pc.is_null(chunk.timestamp)) | (
                np.asarray(pc.fill_null(pc.equal(pc.utf8_trim_whitespace(pc.cast(chunk.timestamp, pa.string())), ""),
                                        False)))
            ts_np = ts.to_numpy(zero_copy_only=False).astype(np.float64)
            bad_ts = np.isnan(ts_np) | ~np.isfinite(ts_np)
            found = cat.lookup(img) if n else np.zeros(0, np.int64)
            unknown = found < 0
            reasons = np.full(n, None, dtype=object)
            details = np.full(n, "", dtype=object)
            ts_text = pc.cast(chunk.timestamp, pa.string())
            img_text = img
            # first failing check names the reason
            for mask, reason, detail in (
                (empty_img, "missing image key", None),
                (unknown & ~empty_img, "unknown image key", img_text),
                (empty_src, "missing source", None),
                (raw_ts_missing, "missing timestamp", None),
                (bad_ts & ~raw_ts_missing, "unparseable timestamp", ts_text),
            ):
                sel = mask & (reasons == None)  # noqa: E711
                if sel.any():
                    reasons[sel] = reason
                    if detail is not None:
                        details[sel] = [str(v)[:200] for v in pc.take(detail, pa.array(np.flatnonzero(sel)))
                                        .to_pylist()]
            bad_idx = np.flatnonzero(reasons != None)  # noqa: E711
            add_bad(sorted(chunk.bad + [BadLine(int(chunk.line[k]), reasons[k], details[k], chunk.raw(int(k)))
                                        for k in bad_idx], key=lambda b: b.line))
            ok = reasons == None  # noqa: E711
            good = np.flatnonzero(ok)
            if not len(good):
                continue
            good_total += len(good)
            take = pa.array(good)
            src_good = pc.take(src, take)
            uniq = pc.unique(src_good)
            codes_u = np.empty(len(uniq), dtype=np.int32)
            for k, name in enumerate(uniq.to_pylist()):
                code = source_code.get(name)
                if code is None:
                    code = source_code[name] = len(source_names)
                    source_names.append(name)
                    agents.append(set())
                codes_u[k] = code
            codes = codes_u[pc.index_in(src_good, value_set=uniq).to_numpy()]
            if chunk.user_agent is not None:
                ua = pc.take(chunk.user_agent, take)
                pairs = pa.table({"s": codes, "ua": ua}).filter(pc.is_valid(ua)).group_by(["s", "ua"]).aggregate([])
                for s, a in zip(pairs.column("s").to_pylist(), pairs.column("ua").to_pylist()):
                    if len(agents[s]) < 5 and a:
                        agents[s].add(a[:200])
            rec = np.empty(len(good), dtype=RECORD)
            rec["src"] = codes
            rec["img"] = found[good]
            rec["ts"] = ts_np[good]
            rec["line"] = chunk.line[good]
            referenced[found[good]] = True
            tmin, tmax = min(tmin, float(rec["ts"].min())), max(tmax, float(rec["ts"].max()))
            spill.append(rec)
        spill.close()
        bad_sink.close()
        t_log = time.perf_counter() - started - t_catalogue

        # ---- score what the log needs and nobody has scored ----
        need = np.flatnonzero(referenced & ~cat.scored)
        newly_scored = 0
        if len(need):
            if score_fn is None:
                from twostream.core.scoring import Scorer

                score_fn = scorer_score_fn(Scorer(config))
            uris = [cat.uri[k] for k in need]
            ids = pc.take(cat.ids, pa.array(need)).to_pylist()
            results = score_fn(uris, ids)
            if len(results) != len(need):
                raise AuditError(f"scoring returned {len(results)} results for {len(need)} images")
            rows = {"image_id": [], "uri": [], "verdict": [], "label": [], "high_idx": [], "high_prob": [],
                    "low_idx": [], "low_prob": [], "error": []}
            for k, u, r in zip(need, uris, results):
                cat.scored[k] = True
                cat.verdict[k] = r["verdict"]
                cat.label[k] = r.get("label")
                if len(r.get("high_idx") or []) == 5 and len(r.get("low_idx") or []) == 2:
                    cat.high_idx[k], cat.high_prob[k] = r["high_idx"], r["high_prob"]
                    cat.low_idx[k], cat.low_prob[k] = r["low_idx"], r["low_prob"]
                    cat.has_topk[k] = True
                rows["image_id"].append(ids[len(rows["image_id"])])
                rows["uri"].append(u)
                for c in ("verdict", "label", "high_idx", "high_prob", "low_idx", "low_prob", "error"):
                    rows[c].append(r.get(c))
            newly_scored = len(need)
            files["scored_images.parquet"] = storage.join(output_uri, "scored_images.parquet")
            sink = _ParquetSink(files["scored_images.parquet"], pa.schema([
                ("image_id", pa.string()), ("uri", pa.string()), ("verdict", pa.string()), ("label", pa.string()),
                ("high_idx", pa.list_(pa.int32())), ("high_prob", pa.list_(pa.float32())),
                ("low_idx", pa.list_(pa.int32())), ("low_prob", pa.list_(pa.float32())), ("error", pa.string())]))
            sink.write(rows)
            sink.close()
        t_score = time.perf_counter() - started - t_catalogue - t_log

        # ---- replay (Algorithm 2) ----
        rejected, verdicts = rejected_for(cat, None)
        is_error = (cat.verdict == ERROR) | (cat.verdict == None)  # noqa: E711
        nbins = 60
        if math.isfinite(tmin):
            hi = tmax if tmax > tmin else tmin + 1.0
            edges = np.linspace(tmin, hi, nbins + 1)
        else:
            edges = np.linspace(0.0, 1.0, nbins + 1)
        rate_scored = np.zeros(nbins, np.int64)
        rate_rejected = np.zeros(nbins, np.int64)
        rate_blocked = np.zeros(nbins, np.int64)
        timeline = _ParquetSink(files["timeline.parquet"], TIMELINE_SCHEMA)
        srows: dict[str, list] = {f.name: [] for f in SOURCES_SCHEMA}
        candidates: list[SourceSeries] = []
        rep = config.reputation
        ids_str = cat.ids
        for rec in spill.partitions_sorted():
            ledger = ReputationLedger(rep)
            m = len(rec)
            src, img, ts = rec["src"], rec["img"], rec["ts"]
            cc_out = np.zeros(m, np.int32)
            bl_out = np.zeros(m, bool)
            resp_out = np.empty(m, dtype=object)
            err_row = is_error[img]
            rej_row = rejected[img]
            label_row = cat.label[img]
            src_names = [source_names[c] for c in src.tolist()]
            img_ids = pc.take(ids_str, pa.array(img)).to_pylist()
            observe = ledger.observe
            for k, (name, t, image_id, er, r, lab) in enumerate(zip(
                    src_names, ts.tolist(), img_ids, err_row.tolist(), rej_row.tolist(), label_row.tolist())):
                if er:
                    resp_out[k] = ERROR
                    continue
                resp = observe(Upload(name, t, image_id, r, ADVERSARIAL if r else (lab or ACCEPTED)))
                resp_out[k] = resp.response
                cc_out[k] = resp.cc
                bl_out[k] = resp.blacklisted
            ok = ~err_row
            timeline.write({
                "line": rec["line"], "source": src_names, "timestamp": ts,
                "image_id": img_ids,
                "verdict": verdicts[img].tolist(),
                "label": [lab if not rj and not er else None for lab, rj, er in zip(label_row, rej_row, err_row)],
                "cc": pa.array(cc_out, pa.int32(), mask=err_row),
                "blacklisted": pa.array(bl_out, pa.bool_(), mask=err_row),
                "response": resp_out.tolist(),
            })
            b = np.clip(np.searchsorted(edges, ts, side="right") - 1, 0, nbins - 1)
            np.add.at(rate_scored, b[ok], 1)
            np.add.at(rate_rejected, b[ok & rej_row], 1)
            np.add.at(rate_blocked, b[resp_out == BLOCKED], 1)
            # per source in this partition
            starts = np.flatnonzero(np.r_[True, src[1:] != src[:-1]])
            ends = np.r_[starts[1:], m]
            part_series = []
            for a, e in zip(starts, ends):
                name = source_names[src[a]]
                st = ledger.get(name)
                uploads = int(e - a)
                errors = int(err_row[a:e].sum())
                scored = uploads - errors
                intervals = [[x, y] for x, y in st.intervals]
                last = float(ts[e - 1])
                secs = sum(((y if y is not None else last) - x) for x, y in intervals)
                standing = "blacklisted" if st.blacklisted else "released" if intervals else "clean"
                srows["source"].append(name)
                srows["uploads"].append(uploads)
                srows["scored"].append(scored)
                srows["rejected"].append(st.rejected)
                srows["errors"].append(errors)
                srows["blocked"].append(st.blocked)
                srows["rejection_rate"].append(st.rejected / scored if scored else 0.0)
                srows["first_seen"].append(float(ts[a]))
                srows["last_seen"].append(last)
                srows["blacklist_intervals"].append([{"start": x, "end": y} for x, y in intervals])
                srows["times_blacklisted"].append(len(intervals))
                srows["blacklisted_seconds"].append(float(secs))
                srows["cc"].append(st.cc)
                srows["blacklisted"].append(st.blacklisted)
                srows["final_standing"].append(standing)
                srows["user_agents"].append(sorted(agents[src[a]]))
                sel = np.arange(a, e)[ok[a:e]]
                part_series.append((len(intervals), st.blocked, st.rejected,
                                    st.rejected / scored if scored else 0.0, name, sel, intervals))
            part_series.sort(key=lambda t: (-(t[0] > 0), -t[2], -t[3], -t[1], t[4]))
            for t in part_series[:top]:
                candidates.append(SourceSeries(t[4], ts[t[5]].copy(), cc_out[t[5]].copy(), t[6], rep.threshold))
        timeline.close()

        n_src = len(srows["source"])
        order = _suspicion_order(np.array(srows["times_blacklisted"]), np.array(srows["blocked"]),
                                 np.array(srows["rejected"]), np.array(srows["rejection_rate"]),
                                 srows["source"]) if n_src else []
        srows["rank"] = [0] * n_src
        sorted_cols = {k: [v[i] for i in order] for k, v in srows.items() if k != "rank"}
        sorted_cols["rank"] = list(range(1, n_src + 1))
        sources = pa.Table.from_pydict(sorted_cols, schema=SOURCES_SCHEMA)
        storage.write_parquet(sources, files["sources.parquet"], compression="zstd")
        top_names = sources.column("source").to_pylist()[:top]
        by_name = {s.source: s for s in candidates}
        top_series = [by_name[n] for n in top_names if n in by_name]
        t_replay = time.perf_counter() - started - t_catalogue - t_log - t_score

        # ---- what-if ----
        what_if_table = None
        if what_if:
            what_if_table = _what_if(spill, cat, config, [WhatIf(), *what_if], sources, clean_rate,
                                     source_names)
            files["what_if.parquet"] = storage.join(output_uri, "what_if.parquet")
            storage.write_parquet(what_if_table, files["what_if.parquet"], compression="zstd")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    elapsed = time.perf_counter() - started
    summary = {
        "log": log_uri, "format": fmt, "images": images_uri, "scores": scores_uri,
        "lines": lines_total, "good_lines": good_total, "bad_lines": int(sum(bad_counts.values())),
        "bad_by_reason": dict(sorted(bad_counts.items())),
        "sources": int(sources.num_rows),
        "sources_ever_blacklisted": int(pc.sum(pc.greater(sources.column("times_blacklisted"), 0)).as_py() or 0),
        "sources_blacklisted_at_end": int(pc.sum(pc.cast(sources.column("blacklisted"), pa.int64())).as_py() or 0),
        "uploads_rejected": int(rate_rejected.sum()), "uploads_blocked": int(rate_blocked.sum()),
        "images_known": len(cat), "images_scored_from_scores": int((referenced & cat.from_scores).sum()),
        "images_scored_now": newly_scored,
        "first_seen": tmin if math.isfinite(tmin) else None, "last_seen": tmax if math.isfinite(tmax) else None,
        "thresholds": config.thresholds.model_dump(), "reputation": config.reputation.model_dump(),
        "clean_rate": clean_rate,
        "seconds": {"catalogue": round(t_catalogue, 3), "log": round(t_log, 3), "score": round(t_score, 3),
                    "replay": round(t_replay, 3), "total": round(elapsed, 3)},
        "lines_per_second": round(lines_total / elapsed, 1) if elapsed > 0 else None,
        "files": {},
    }
    result = AuditResult(output_uri, summary, sources, top_series, edges, rate_scored, rate_rejected,
                         rate_blocked, dict(bad_counts), bad_sample, what_if_table, files)
    if report:
        from twostream.audit.report import render_report

        storage.write_bytes(files["report.html"], render_report(result).encode())
    else:
        files.pop("report.html")
    summary["files"] = dict(files)
    storage.write_bytes(files["summary.json"], json.dumps(summary, indent=2).encode())
    return result


def _what_if(spill: _Spill, cat: Catalogue, base: TwoStreamConfig, settings: Sequence[WhatIf],
             sources: pa.Table, clean_rate: float, source_names: list[str]) -> pa.Table:
    """Replay the spilled log under each setting; count blocked sources and collateral hits.

    A *clean-looking* source is one whose rejection rate under the audit's own thresholds is at
    most ``clean_rate`` (and has at least one scored upload); ``clean_sources_hit`` counts those
    a setting would have blacklisted at least once.
    """
    rates = dict(zip(sources.column("source").to_pylist(), sources.column("rejection_rate").to_pylist()))
    scored = dict(zip(sources.column("source").to_pylist(), sources.column("scored").to_pylist()))
    clean = {s for s, r in rates.items() if scored[s] > 0 and r <= clean_rate}
    is_error = (cat.verdict == ERROR) | (cat.verdict == None)  # noqa: E711
    out: dict[str, list] = {f.name: [] for f in WHAT_IF_SCHEMA}
    verdict_cache: dict[tuple[float, float], np.ndarray] = {}
    for setting in settings:
        th, rep = setting.configs(base)
        key = (th.p1, th.p2)
        if key not in verdict_cache:
            same = th.p1 == base.thresholds.p1 and th.p2 == base.thresholds.p2
            verdict_cache[key] = rejected_for(cat, None if same else th)[0]
        rejected = verdict_cache[key]
        n_rej = n_blocked = 0
        ever: set[str] = set()
        at_end = 0
        for rec in spill.partitions_sorted():
            ledger = ReputationLedger(rep)
            src, img, ts = rec["src"], rec["img"], rec["ts"]
            err_row, rej_row = is_error[img], rejected[img]
            observe = ledger.observe
            for name, t, image_id, er, r in zip([source_names[c] for c in src.tolist()], ts.tolist(),
                                                 pc.take(cat.ids, pa.array(img)).to_pylist(), err_row.tolist(),
                                                 rej_row.tolist()):
                if er:
                    continue
                resp = observe(Upload(name, t, image_id, r, ADVERSARIAL if r else ACCEPTED))
                n_rej += r
                n_blocked += resp.response == BLOCKED
            for name, st in ledger.items():
                if st.intervals:
                    ever.add(name)
                at_end += st.blacklisted
        out["setting"].append(setting.label())
        out["p1"].append(th.p1)
        out["p2"].append(th.p2)
        out["threshold"].append(rep.threshold)
        out["cap"].append(rep.cap)
        out["rejected_uploads"].append(n_rej)
        out["blocked_uploads"].append(n_blocked)
        out["sources_blocked"].append(len(ever))
        out["blacklisted_at_end"].append(at_end)
        out["clean_sources_hit"].append(len(ever & clean))
        out["clean_sources"].append(len(clean))
    return pa.Table.from_pydict(out, schema=WHAT_IF_SCHEMA)
