"""Reading upload logs: the column mapping, timestamps, and the bad lines.

The log (CSV/TSV, JSON Lines, Parquet, or a raw web-server access log in common/combined log
format) is read a block at a time by :mod:`twostream.core.records` (:func:`read_log`), the
reader batch manifests share; each record is mapped through
:class:`ColumnMapping` to (timestamp, source, image key, user agent). :func:`check_chunk`
parses the timestamps to UTC epoch seconds and resolves the image keys; every record that
fails a step becomes a :class:`BadLine` with its line number and reason, never dropped
silently. :class:`AuditError` is the audit's one error for unusable inputs.

Dirty logs stay on the fast path: invalid UTF-8 is replaced (U+FFFD) block by block before
parsing, and only the lines that have it are touched (counted in ``LogChunk.invalid_utf8``; the
record is kept); CSV lines outside the strict grammar are read apart from the block
(:mod:`twostream.core.records.delimited`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from twostream import storage
from twostream.core.config import ConfigError
from twostream.core.records import clf, formats, parquet
from twostream.core.records.blocks import BadLine, Chunk
from twostream.core.records.columns import FIELDS, IMAGE, normal
from twostream.core.records.formats import FORMATS, RecordsError
from twostream.core.records.reader import read_chunks
from twostream.core.timestamps import accepted, as_text, problem, seconds_array, value_at

LOG_FORMATS = FORMATS


class AuditError(ValueError):
    """The audit cannot run: an input is missing, unreadable or lacks required columns."""


# ---------------------------------------------------------------------------------------------
# Column mapping
# ---------------------------------------------------------------------------------------------
# the one table of column names (twostream.core.records.columns); the image by any of its aliases
ALIASES: dict[str, tuple[str, ...]] = {"timestamp": FIELDS["timestamp"], "source": FIELDS["source"], "image": IMAGE,
                                       "user_agent": FIELDS["user_agent"]}


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

    @classmethod
    def from_columns(cls, columns: dict[str, str]) -> "ColumnMapping":
        """``{"source": "user"}`` (the config's ``audit.columns``) -> mapping (ConfigError on bad keys)."""
        try:
            return cls.model_validate(columns)
        except Exception as exc:  # pydantic ValidationError -> a readable message
            raise ConfigError(f"invalid column mapping {columns}: {exc}") from None

    def resolve(self, columns: Sequence[str]) -> dict[str, str | None]:
        """Map each field to an existing column name (user_agent may be None): the column named
        exactly so, else the first named so but for case and blanks (a JSON line with another
        spelling then lacks the field: a bad line); AuditError when a CSV header gives one name
        twice (no mapping could choose)."""
        lower: dict[str, list[str]] = {}
        for c in columns:
            lower.setdefault(normal(c), []).append(c)

        def pick(wanted: str) -> str | None:
            if list(columns).count(wanted) > 1:
                raise AuditError(f"the log's header names the column {wanted!r} more than once {list(columns)}; "
                                 "rename all but one")
            return wanted if wanted in columns else next(iter(lower.get(normal(wanted), [])), None)

        out: dict[str, str | None] = {}
        for name in ("timestamp", "source", "image", "user_agent"):
            wanted = getattr(self, name)
            if wanted is not None:
                found = pick(wanted)
                if found is None:
                    raise AuditError(f"column mapping: {name}={wanted!r} is not a log column {list(columns)}")
            else:
                found = next((pick(a) for a in ALIASES[name] if a in lower), None)
            if found is None and name != "user_agent":
                raise AuditError(
                    f"the log has no {name} column (looked for {', '.join(ALIASES[name])}; "
                    f"columns are {list(columns)}); name it with --map {name}=COLUMN"
                )
            out[name] = found
        return out


def mapping_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``["source=user", "timestamp=when"]`` -> ``{"source": "user", ...}`` (ConfigError on a bad pair)."""
    data: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--map {pair!r} is not of the form field=column")
        key, value = pair.split("=", 1)
        data[key.strip()] = value.strip()
    return data


def parse_mapping(pairs: Sequence[str]) -> ColumnMapping:
    """``["source=user", "timestamp=when"]`` -> :class:`ColumnMapping` (ConfigError on bad keys)."""
    return ColumnMapping.from_columns(mapping_pairs(pairs))


# ---------------------------------------------------------------------------------------------
# Timestamps: read by twostream.core.timestamps, the product's one definition
# ---------------------------------------------------------------------------------------------
def parse_timestamps(column: pa.Array | pa.ChunkedArray, unit: str = "s") -> pa.Array:
    """Any log timestamp column -> float64 UTC epoch seconds (null where unparseable; the range is
    checked by :func:`check_chunk`): :func:`twostream.core.timestamps.seconds_array`.

    Accepts Arrow timestamps (naive ones are UTC), numbers (epoch in ``unit``), and strings:
    epoch numbers, ISO-8601 (``Z``/offsets; naive = UTC) and common log format
    (``10/Oct/2000:13:55:36 -0700``, with or without brackets).
    """
    return seconds_array(column, unit)


def unit_advice(unit: str) -> str:
    """What to pass to read numbers in ``unit`` (added to a "looks like milliseconds" bad line)."""
    return f" (read it with --map timestamp_unit={unit})"


# ---------------------------------------------------------------------------------------------
# Streaming log reader: twostream.core.records reads, the fields are mapped here
# ---------------------------------------------------------------------------------------------
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
    invalid_utf8: int = 0  # lines (rows) of this block whose invalid UTF-8 was replaced


def detect_format(uri: str) -> str:
    """The log format from the file name (:func:`twostream.core.records.formats.detect_format`);
    AuditError when unclear."""
    fmt = formats.detect_format(uri)
    if fmt is None:
        raise AuditError(f"cannot tell the log format of {uri!r}; pass --format {{{','.join(LOG_FORMATS)}}}")
    return fmt


def _mapped(table: pa.Table, cols: dict[str, str | None]) -> dict[str, pa.Array | None]:
    """The audit's fields of a block: the timestamp column as it is (nested values as JSON text),
    the others as strings (:func:`~twostream.core.timestamps.as_text`: never raises)."""
    out: dict[str, pa.Array | None] = {}
    for name in ("timestamp", "source", "image", "user_agent"):
        col = cols[name]
        if col is None or col not in table.column_names:
            out[name] = None if name == "user_agent" else pa.nulls(table.num_rows, pa.string())
            continue
        column = table.column(col)
        arr = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if name != "timestamp" or pa.types.is_nested(arr.type) or pa.types.is_binary(arr.type) \
                or pa.types.is_large_binary(arr.type):
            arr = as_text(arr)
        out[name] = arr
    return out


def _log_chunk(chunk: Chunk, cols: dict[str, str | None] | None) -> LogChunk:
    """A chunk as read -> its records mapped to the audit's fields (``cols``: None for a chunk of
    bad lines only)."""
    if chunk.table is None or cols is None:
        empty = pa.array([], pa.string())
        return LogChunk(chunk.line, empty, empty, empty, None, chunk.raw, chunk.bad, chunk.invalid_utf8)
    m = _mapped(chunk.table, cols)
    return LogChunk(chunk.line, m["timestamp"], m["source"], m["image"], m["user_agent"], chunk.raw, chunk.bad,
                    chunk.invalid_utf8)


def read_log(uri: str, fmt: str = "auto", mapping: ColumnMapping | None = None,
             block_bytes: int = 8 << 20, max_line_bytes: int | None = None) -> Iterator[LogChunk]:
    """Stream an upload log as :class:`LogChunk` blocks (bounded memory: one block at a time),
    read by :func:`twostream.core.records.reader.read_chunks`.

    CSV/TSV need a header line; one record per line (as in log files). JSON Lines: one object
    per line. ``clf``: Apache/Nginx common or combined log format (fields ``host``, ``user``,
    ``time``, ``method``, ``path``, ``status``, ``bytes``, ``referer``, ``user_agent``).
    Lines that cannot be parsed at all come back in ``LogChunk.bad``; so does a line longer
    than ``max_line_bytes`` (default ``block_bytes``), skipped while streaming ("line too long").
    A CSV/TSV header longer than that is an :class:`AuditError`. Parquet logs are read a
    batch of rows at a time; their memory is bounded by the file's largest row group.
    """
    mapping = mapping or ColumnMapping()
    fmt = detect_format(uri) if fmt == "auto" else fmt
    if fmt not in LOG_FORMATS:
        raise AuditError(f"unknown log format {fmt!r} (one of {', '.join(LOG_FORMATS)})")
    if not storage.exists(uri):
        raise AuditError(f"log not found: {uri}")
    cols: dict[str, str | None] | None = None
    wanted = None
    if fmt in ("parquet", "clf"):  # the columns are known before any record
        cols = mapping.resolve(parquet.column_names(uri) if fmt == "parquet" else clf.FIELDS)
        wanted = sorted({c for c in cols.values() if c})
    try:
        for chunk in read_chunks(uri, fmt, block_bytes, max_line_bytes, wanted):
            if chunk.table is not None and cols is None:
                cols = mapping.resolve(chunk.table.column_names)
            elif chunk.table is not None and cols["user_agent"] is None and fmt == "jsonl":
                try:  # a later block may name the optional column
                    cols["user_agent"] = mapping.resolve(
                        list(chunk.table.column_names) + ["timestamp", "source", "image"]).get("user_agent")
                except AuditError:
                    pass
            yield _log_chunk(chunk, cols)
    except RecordsError as exc:
        raise AuditError(f"{uri}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# Checking records
# ---------------------------------------------------------------------------------------------
@dataclass
class Records:
    """The good records of one chunk, plus all its bad lines sorted by line number."""

    line: np.ndarray  # int64
    timestamp: np.ndarray  # float64 UTC epoch seconds
    source: pa.Array  # string, trimmed
    image: np.ndarray  # int64: the resolved image (a catalogue row)
    user_agent: pa.Array | None
    bad: list[BadLine]


def check_chunk(chunk: LogChunk, lookup: Callable[[pa.Array], np.ndarray], unit: str) -> Records:
    """Parse timestamps, trim names and resolve image keys (``lookup``: key -> row, -1 unknown).

    A record failing several checks is listed under the first: missing image key, unknown
    image key, missing source, missing timestamp, unparseable timestamp (not read, or not
    finite), timestamp out of range (outside :mod:`twostream.core.timestamps`' range; the detail
    says why, and when the number looks like milli-, micro- or nanoseconds, which
    ``--map timestamp_unit=`` reads it).
    """
    n = len(chunk.line)
    if n == 0:
        return Records(chunk.line, np.zeros(0), pa.array([], pa.string()), np.zeros(0, np.int64), None,
                       sorted(chunk.bad, key=lambda b: b.line))
    seconds = parse_timestamps(chunk.timestamp, unit)
    ts = seconds.to_numpy(zero_copy_only=False).astype(np.float64)
    src = pc.utf8_trim_whitespace(chunk.source)
    img = pc.utf8_trim_whitespace(chunk.image)
    ts_text = as_text(chunk.timestamp)
    empty_src = np.asarray(pc.fill_null(pc.equal(src, ""), True))
    empty_img = np.asarray(pc.fill_null(pc.equal(img, ""), True))
    ts_missing = np.asarray(pc.is_null(chunk.timestamp)) | np.asarray(
        pc.fill_null(pc.equal(pc.utf8_trim_whitespace(ts_text), ""), False))
    found = lookup(img)

    reasons = np.full(n, None, dtype=object)
    details = np.full(n, "", dtype=object)
    for mask, reason in ((empty_img, "missing image key"), (found < 0, "unknown image key"),
                         (empty_src, "missing source"), (ts_missing, "missing timestamp")):
        sel = mask & (reasons == None)  # noqa: E711
        if sel.any():
            reasons[sel] = reason
            if reason == "unknown image key":
                details[sel] = [str(v)[:200] for v in pc.take(img, pa.array(np.flatnonzero(sel))).to_pylist()]
    # the timestamps refused, in the words of core/timestamps (as manifests and sidecars give them)
    refused = np.flatnonzero(~accepted(ts) & (reasons == None))  # noqa: E711
    if len(refused):
        read = np.asarray(seconds.is_valid())[refused]
        try:
            values = chunk.timestamp.take(pa.array(refused)).to_pylist()
        except (ValueError, OverflowError, pa.ArrowException):  # e.g. a date Python cannot hold
            values = [value_at(chunk.timestamp, int(k)) for k in refused]
        for k, value, ok in zip(refused, values, read):
            details[k] = problem(value, float(ts[k]) if ok else None, unit, unit_advice)
            reasons[k] = "timestamp out of range" if " the accepted range " in details[k] else "unparseable timestamp"
    bad = chunk.bad + [BadLine(int(chunk.line[k]), reasons[k], details[k], chunk.raw(int(k)))
                       for k in np.flatnonzero(reasons != None)]  # noqa: E711
    good = np.flatnonzero(reasons == None)  # noqa: E711
    take = pa.array(good)
    return Records(
        line=chunk.line[good], timestamp=ts[good], source=pc.take(src, take), image=found[good],
        user_agent=pc.take(chunk.user_agent, take) if chunk.user_agent is not None else None,
        bad=sorted(bad, key=lambda b: b.line),
    )
