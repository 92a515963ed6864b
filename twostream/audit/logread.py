"""Reading upload logs: the formats, the column mapping, timestamps, and the bad lines.

The log (CSV/TSV, JSON Lines, Parquet, or a raw web-server access log in common/combined log
format) is read a block at a time (:func:`read_log`); each record is mapped through
:class:`ColumnMapping` to (timestamp, source, image key, user agent). :func:`check_chunk`
parses the timestamps to UTC epoch seconds and resolves the image keys; every record that
fails a step becomes a :class:`BadLine` with its line number and reason, never dropped
silently. :class:`AuditError` is the audit's one error for unusable inputs.

Dirty logs stay on the fast path: invalid UTF-8 is replaced (U+FFFD) block by block before
parsing, and only the lines that have it are touched (counted in ``LogChunk.invalid_utf8``; the
record is kept); CSV lines outside the strict grammar (a quote left open, a CR inside) are read
apart from the block, one by one, so that they cannot merge with the next record.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict

from twostream import storage
from twostream.core.config import ConfigError
from twostream.core.jsontext import load_object
from twostream.core.timestamps import accepted, as_text, problem, seconds_array, value_at

LOG_FORMATS = ("csv", "tsv", "jsonl", "parquet", "clf")


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
            lower.setdefault(c.lower().strip(), []).append(c)

        def pick(wanted: str) -> str | None:
            if list(columns).count(wanted) > 1:
                raise AuditError(f"the log's header names the column {wanted!r} more than once {list(columns)}; "
                                 "rename all but one")
            return wanted if wanted in columns else next(iter(lower.get(wanted.lower().strip(), [])), None)

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
    invalid_utf8: int = 0  # lines (rows) of this block whose invalid UTF-8 was replaced


_CLF_RE = (
    r'^(?P<host>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<method>[A-Z]+) (?P<path>\S+)(?: (?P<protocol>[^"]*))?" (?P<status>\d{3}|-) (?P<bytes>\d+|-)'
    r'(?: "(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)")?.*$'
)
_CLF_FIELDS = ["host", "ident", "user", "time", "method", "path", "protocol", "status", "bytes",
               "referer", "user_agent"]
_TRUNC = 300
_HEAD = 4 * _TRUNC  # bytes kept of a too-long line (its text is the first _TRUNC characters)


def detect_format(uri: str) -> str:
    """The log format from the file name (compression suffixes ignored); AuditError when unclear."""
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


def repair_utf8(values: list[bytes | None]) -> list[int]:
    """Replace invalid UTF-8 in ``values`` in place (U+FFFD per bad sequence); their indices."""
    fixed = []
    for k, value in enumerate(values):
        if value is None or value.isascii():
            continue
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            values[k] = value.decode("utf-8", "replace").encode("utf-8")
            fixed.append(k)
    return fixed


def size_text(n: int) -> str:
    """``8388608`` -> ``"8 MiB"``, ``1024`` -> ``"1 KiB"``, else ``"1,000 bytes"``."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:,} bytes"


@dataclass
class _Block:
    """Lines of a text log: ``lines[k]`` is line ``first + k``; a line longer than the limit is
    an empty placeholder and listed in ``long`` as (index, length in bytes, its first bytes)."""

    first: int
    lines: list[bytes]
    invalid_utf8: int
    long: list[tuple[int, int, bytes]] = field(default_factory=list)

    def long_lines(self, limit: int) -> list[BadLine]:
        """The too-long lines as bad lines (``line 3: 314,572,800 bytes, longer than the 8 MiB limit``)."""
        return [BadLine(self.first + k, "line too long", f"{length:,} bytes, longer than the {size_text(limit)} limit",
                        _decode(head)) for k, length, head in self.long]


def _line_blocks(uri: str, block_bytes: int, max_line_bytes: int | None = None) -> Iterator[_Block]:
    """The log's lines a block at a time, valid UTF-8 (invalid bytes replaced); gzip etc. by extension.

    Memory stays within about two blocks whatever the lines: a line longer than ``max_line_bytes``
    (default: the block size) is not kept but skipped while streaming (through decompression
    too: the stream is read ``block_bytes`` decompressed bytes at a time), and comes back as a
    placeholder with its length and first bytes (:class:`_Block`); the lines after it read normally.
    """
    limit = max_line_bytes or block_bytes
    fs, path = storage.filesystem(uri)
    lineno = 1
    carry = b""
    skipping: list | None = None  # [length so far, first bytes] of the too-long line being skipped
    with fs.open_input_stream(path, compression="detect") as stream:
        while True:
            data = stream.read(block_bytes)
            if not data:
                break
            if skipping is not None:
                cut = data.find(b"\n")
                if cut < 0:
                    skipping[0] += len(data)
                    continue
                yield _Block(lineno, [b""], 0, [(0, skipping[0] + cut, skipping[1])])
                lineno += 1
                skipping, data = None, data[cut + 1 :]
            data = carry + data
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
            else:
                carry = data[cut + 1 :]
                lines = data[:cut].split(b"\n")
                long = [(k, len(ln), ln[:_HEAD]) for k, ln in enumerate(lines) if len(ln) > limit] \
                    if cut > limit else []
                for k, _, _ in long:
                    lines[k] = b""
                invalid = 0 if _is_utf8(data, cut) else len(repair_utf8(lines))
                yield _Block(lineno, lines, invalid, long)
                lineno += len(lines)
            if len(carry) > limit:
                skipping, carry = [len(carry), carry[:_HEAD]], b""
    if skipping is not None:
        yield _Block(lineno, [b""], 0, [(0, skipping[0], skipping[1])])
    elif carry:
        lines = [carry]
        yield _Block(lineno, lines, len(repair_utf8(lines)))


def _is_utf8(data: bytes, end: int) -> bool:
    """Whether ``data[:end]`` is valid UTF-8 (the whole block at C speed, no per-line work)."""
    if data.isascii():
        return True
    try:
        data[:end].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _nonblank_blocks(uri: str, block_bytes: int,
                     max_line_bytes: int | None = None) -> Iterator[tuple[list[bytes], np.ndarray, int, list[BadLine]]]:
    """(non-blank lines, their 1-based line numbers, lines with invalid UTF-8, the too-long
    lines as bad lines) per block."""
    limit = max_line_bytes or block_bytes
    for block in _line_blocks(uri, block_bytes, max_line_bytes):
        lines = block.lines
        numbers = np.arange(block.first, block.first + len(lines), dtype=np.int64)
        keep = [k for k, ln in enumerate(lines) if ln.strip(b" \t\r")]
        if keep or block.long:
            yield [lines[k] for k in keep], numbers[keep], block.invalid_utf8, block.long_lines(limit)


def _bad_chunk(bad: list[BadLine], invalid_utf8: int = 0) -> LogChunk:
    """A chunk with no records, only bad lines (a block that held nothing but too-long lines)."""
    empty = pa.array([], pa.string())
    return LogChunk(np.zeros(0, np.int64), empty, empty, empty, None, lambda k: "", bad, invalid_utf8)


def _decode(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r")[:_TRUNC]


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


def _to_chunk(table: pa.Table, cols: dict[str, str | None], lines: np.ndarray,
              raw: Callable[[int], str], bad: list[BadLine], invalid_utf8: int) -> LogChunk:
    m = _mapped(table, cols)
    return LogChunk(lines, m["timestamp"], m["source"], m["image"], m["user_agent"], raw, bad, invalid_utf8)


def _line_chunk(table: pa.Table, cols: dict[str, str | None], lines: list[bytes], numbers: np.ndarray,
                good: np.ndarray, bad: list[BadLine], invalid_utf8: int) -> LogChunk:
    """A chunk of a line-based log: the table holds the lines ``good`` (indices into ``lines``)."""

    def raw(k: int) -> str:
        return _decode(lines[good[k]])

    return _to_chunk(table, cols, numbers[good], raw, bad, invalid_utf8)


def read_log(uri: str, fmt: str = "auto", mapping: ColumnMapping | None = None,
             block_bytes: int = 8 << 20, max_line_bytes: int | None = None) -> Iterator[LogChunk]:
    """Stream an upload log as :class:`LogChunk` blocks (bounded memory: one block at a time).

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
    if fmt == "parquet":
        yield from _read_parquet(uri, mapping)
    elif fmt in ("csv", "tsv"):
        yield from _read_csv(uri, mapping, "\t" if fmt == "tsv" else ",", block_bytes, max_line_bytes)
    elif fmt == "jsonl":
        yield from _read_jsonl(uri, mapping, block_bytes, max_line_bytes)
    else:
        yield from _read_clf(uri, mapping, block_bytes, max_line_bytes)


def _read_parquet(uri: str, mapping: ColumnMapping) -> Iterator[LogChunk]:
    fs, path = storage.filesystem(uri)
    pf = pq.ParquetFile(path, filesystem=fs)
    cols = mapping.resolve(pf.schema_arrow.names)
    wanted = sorted({c for c in cols.values() if c})
    row = 1
    for batch in pf.iter_batches(batch_size=65536, columns=wanted):
        table, invalid_utf8 = _repair_table(pa.Table.from_batches([batch]))
        n = table.num_rows

        def raw(k: int, _t=table) -> str:
            row = {name: value_at(_t.column(name), k) for name in _t.column_names}  # never raises
            return json.dumps(row, default=str, ensure_ascii=False)[:_TRUNC]

        yield _to_chunk(table, cols, np.arange(row, row + n, dtype=np.int64), raw, [], invalid_utf8)
        row += n


def _repair_table(table: pa.Table) -> tuple[pa.Table, int]:
    """String and binary columns as valid UTF-8 strings (invalid bytes replaced); the number of
    rows that had invalid UTF-8 in any of them. Only a column that fails validation is repaired
    value by value."""
    fixed_rows: set[int] = set()
    for i, f in enumerate(table.schema):
        large = pa.types.is_large_string(f.type) or pa.types.is_large_binary(f.type)
        if not (large or pa.types.is_string(f.type) or pa.types.is_binary(f.type)):
            continue
        raw = table.column(i).combine_chunks().cast(pa.large_binary() if large else pa.binary())
        try:
            column = raw.cast(pa.string())  # validates UTF-8
        except pa.ArrowInvalid:
            values = raw.to_pylist()
            fixed_rows.update(repair_utf8(values))
            column = pa.array(values, pa.binary()).cast(pa.string())
        table = table.set_column(i, f.name, column)
    return table, len(fixed_rows)


# ---- CSV / TSV ----
def _read_csv(uri: str, mapping: ColumnMapping, delimiter: str, block_bytes: int,
              max_line_bytes: int | None = None) -> Iterator[LogChunk]:
    header: bytes | None = None
    names: list[str] = []
    cols: dict[str, str | None] = {}
    limit = max_line_bytes or block_bytes
    for block in _line_blocks(uri, block_bytes, max_line_bytes):
        lines, invalid_utf8, long = block.lines, block.invalid_utf8, block.long_lines(limit)
        numbers = np.arange(block.first, block.first + len(lines), dtype=np.int64)
        if header is None:
            too_long = {k for k, _, _ in block.long}
            nonempty = [k for k, ln in enumerate(lines) if ln.strip() or k in too_long]
            if not nonempty:
                continue
            k0 = nonempty[0]
            if k0 in too_long:
                raise AuditError(f"{uri}: line {numbers[k0]}: the header is {long[0].detail}")
            header = lines[k0].rstrip(b"\r")
            names = _csv_header(header, delimiter)
            cols = mapping.resolve(names)
            lines, numbers = lines[k0 + 1 :], numbers[k0 + 1 :]
        keep = [k for k, ln in enumerate(lines) if ln.strip(b" \t\r")]
        if keep or invalid_utf8 or long:
            yield _csv_chunk(header, names, cols, delimiter, [lines[k] for k in keep], numbers[keep], invalid_utf8,
                             long)


def _csv_header(header: bytes, delimiter: str) -> list[str]:
    return pacsv.read_csv(
        io.BytesIO(header + b"\n"), parse_options=pacsv.ParseOptions(delimiter=delimiter),
        read_options=pacsv.ReadOptions(use_threads=False),
    ).column_names


def _csv_record_re(delimiter: str) -> str:
    """A line that is one CSV record by the strict grammar: fields unquoted (no quote, no CR) or
    fully quoted (quotes doubled inside, no CR), an optional CR at the end."""
    field_re = f'(?:"(?:[^"\r]|"")*"|[^"{delimiter}\r]*)'
    return f"^{field_re}(?:{delimiter}{field_re})*\r?$"


def _csv_chunk(header: bytes, names: list[str], cols: dict[str, str | None], delimiter: str,
               lines: list[bytes], numbers: np.ndarray, invalid_utf8: int, long: list[BadLine]) -> LogChunk:
    """One block of CSV lines as a chunk; a line that is not a record of the header's fields is
    a bad line.

    The lines that follow the strict grammar (:func:`_csv_record_re`, checked vectorised) are
    parsed by pyarrow in one piece; the others (a quote left open, which pyarrow would continue
    on the next line, merging two records; a CR inside the line, which it would split) are read
    one by one with Python's csv module, at C speed, so junk lines cost no extra pass.
    """
    wellformed = np.asarray(pc.match_substring_regex(pa.array(lines, pa.binary()), _csv_record_re(delimiter)),
                            dtype=bool)
    main, rest = np.flatnonzero(wellformed), np.flatnonzero(~wellformed)
    pieces: list[tuple[np.ndarray, pa.Table]] = []
    invalid: list[tuple[int, str]] = []
    for group, parse in ((main, _parse_csv), (rest, _csv_records)):
        if len(group):
            rows, table, failed = parse(header, lines, group, names, delimiter)
            pieces.append((rows, table))
            invalid += failed
    if pieces:
        good = np.concatenate([rows for rows, _ in pieces])
        table = pa.concat_tables([t for _, t in pieces])
        if len(pieces) > 1:  # back to line order
            order = np.argsort(good, kind="stable")
            good, table = good[order], table.take(pa.array(order))
    else:
        good, table = np.zeros(0, np.int64), _csv_table([[] for _ in names], names)
    bad = long + [BadLine(int(numbers[k]), "unparseable line", detail, _decode(lines[k]))
                  for k, detail in sorted(invalid)]
    return _line_chunk(table, cols, lines, numbers, good, bad, invalid_utf8)


def _csv_table(columns: list[list[str | None]], names: list[str]) -> pa.Table:
    return pa.Table.from_arrays([pa.array(c, pa.string()) for c in columns], names=names)


def _parse_csv(header: bytes, lines: list[bytes], idx: np.ndarray, names: list[str],
               delimiter: str) -> tuple[np.ndarray, pa.Table, list[tuple[int, str]]]:
    """pyarrow over the lines ``idx`` of ``lines``: (indices of the rows, the rows, (index, detail)
    of the lines with the wrong number of fields). Should pyarrow not return one row or one
    invalid row per line, the lines are read by :func:`_csv_records` instead."""
    invalid: list[tuple[int, str]] = []

    def handler(row) -> str:
        invalid.append((row.number, f"expected {row.expected_columns} fields, got {row.actual_columns}"))
        return "skip"

    body = header + b"\n" + b"\n".join([lines[k] for k in idx]) + b"\n"
    try:
        table = pacsv.read_csv(
            io.BytesIO(body),
            read_options=pacsv.ReadOptions(use_threads=False, block_size=len(body) + 1),
            parse_options=pacsv.ParseOptions(delimiter=delimiter, invalid_row_handler=handler),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in names}, strings_can_be_null=True, null_values=[""],
                quoted_strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid:
        table = None
    if table is None or table.num_rows + len(invalid) != len(idx) or not all(
            n is not None and 2 <= n < len(idx) + 2 for n, _ in invalid):
        return _csv_records(header, lines, idx, names, delimiter)
    skipped = np.zeros(len(idx), dtype=bool)
    skipped[[n - 2 for n, _ in invalid]] = True
    return idx[~skipped], table, [(int(idx[n - 2]), detail) for n, detail in invalid]


def _csv_records(header: bytes, lines: list[bytes], idx: np.ndarray, names: list[str],
                 delimiter: str) -> tuple[np.ndarray, pa.Table, list[tuple[int, str]]]:
    """The lines ``idx`` read one by one with Python's csv module (strict quoting), as
    :func:`_parse_csv` returns them; an empty field is null."""
    columns: list[list[str | None]] = [[] for _ in names]
    ok: list[int] = []
    invalid: list[tuple[int, str]] = []
    for k in idx:
        try:
            fields = next(csv.reader([lines[k].decode("utf-8")], delimiter=delimiter, strict=True))
        except csv.Error as exc:
            invalid.append((int(k), f"CSV: {exc}"[:200]))
            continue
        if len(fields) != len(names):
            invalid.append((int(k), f"expected {len(names)} fields, got {len(fields)}"))
            continue
        for column, value in zip(columns, fields):
            column.append(value or None)
        ok.append(int(k))
    return np.array(ok, dtype=np.int64), _csv_table(columns, names), invalid


# ---- JSON Lines ----
def _read_jsonl(uri: str, mapping: ColumnMapping, block_bytes: int,
                max_line_bytes: int | None = None) -> Iterator[LogChunk]:
    cols: dict[str, str | None] | None = None
    for lines, numbers, invalid_utf8, long in _nonblank_blocks(uri, block_bytes, max_line_bytes):
        if not lines:
            yield _bad_chunk(long, invalid_utf8)
            continue
        bad: list[BadLine] = []
        good = np.arange(len(lines))
        try:
            table = pajson.read_json(io.BytesIO(b"\n".join(lines)))
            if table.num_rows != len(lines):
                raise pa.ArrowInvalid("row count mismatch")
            if any(pa.types.is_nested(f.type) for f in table.schema):  # e.g. [null, null]: a list<null>
                table.validate(full=True)  # array pyarrow's reader builds malformed (ArrowInvalid)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            table, good, bad = _jsonl_line_by_line(lines, numbers)
        if cols is None:
            cols = mapping.resolve(table.column_names)
        elif cols["user_agent"] is None:  # a later block may name the optional column
            try:
                cols["user_agent"] = mapping.resolve(
                    list(table.column_names) + ["timestamp", "source", "image"]).get("user_agent")
            except AuditError:
                pass
        yield _line_chunk(table, cols, lines, numbers, good, long + bad, invalid_utf8)


def _jsonl_line_by_line(lines: list[bytes], numbers: np.ndarray) -> tuple[pa.Table, np.ndarray, list[BadLine]]:
    """A block pyarrow could not read as a whole (bad JSON, mixed types): object by object."""
    rows, ok, bad = [], [], []
    for k, ln in enumerate(lines):
        try:
            obj = load_object(ln)
        except ValueError as exc:
            bad.append(BadLine(int(numbers[k]), "unparseable line", str(exc)[:200], _decode(ln)))
            continue
        rows.append({_unicode(key): (v if v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                                     else _unicode(v) if isinstance(v, str) else json.dumps(v))
                     for key, v in obj.items()})
        ok.append(k)
    data = {}
    for name in sorted({key for r in rows for key in r}):
        values = [r.get(name) for r in rows]
        if any(isinstance(v, str) for v in values):
            values = [None if v is None else str(v) for v in values]
        try:
            data[name] = pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # e.g. an integer beyond int64
            data[name] = pa.array([None if v is None else str(v) for v in values], pa.string())
    table = pa.table(data) if data else pa.table({"_": pa.nulls(len(rows))})
    return table, np.array(ok, dtype=np.int64), bad


def _unicode(text: str) -> str:
    """``text`` with lone surrogates (valid JSON escapes, not Unicode) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")


# ---- common / combined log format ----
def _read_clf(uri: str, mapping: ColumnMapping, block_bytes: int,
              max_line_bytes: int | None = None) -> Iterator[LogChunk]:
    cols = mapping.resolve(_CLF_FIELDS)
    for lines, numbers, invalid_utf8, long in _nonblank_blocks(uri, block_bytes, max_line_bytes):
        if not lines:
            yield _bad_chunk(long, invalid_utf8)
            continue
        text = pc.utf8_normalize(pa.array([ln.rstrip(b"\r") for ln in lines], pa.binary()).cast(pa.string()), "NFC")
        parsed = pc.extract_regex(text, _CLF_RE)
        ok = np.asarray(pc.is_valid(parsed))
        good = np.flatnonzero(ok)
        bad = long + [BadLine(int(numbers[k]), "unparseable line", "not in common/combined log format",
                              _decode(lines[k])) for k in np.flatnonzero(~ok)]
        parsed = pc.take(parsed, pa.array(good, pa.int64()))
        table = pa.table({n: pc.struct_field(parsed, n) for n in _CLF_FIELDS})
        for n in ("user", "user_agent", "referer"):
            table = table.set_column(table.column_names.index(n), n,
                                     pc.if_else(pc.is_in(table.column(n), pa.array(["-", ""])), None,
                                                table.column(n)))
        yield _line_chunk(table, cols, lines, numbers, good, bad, invalid_utf8)


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
