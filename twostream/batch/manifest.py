"""Upload manifests: which source sent each image, and when; read, checked, and matched to inputs.

A manifest is read by :mod:`twostream.core.records`, the reader the audit shares (docs/records.md):
CSV/TSV, JSON Lines, Parquet or a web server's access log, by suffix, compressed or not, local or
``s3://``. Columns (spelled as :data:`~twostream.core.records.columns.FIELDS` has them, any case;
extra ones ignored):

- ``image_id`` (or ``id``, ...): the image's identity in the output. Required (or ``key``, else
  ``uri``, used as the id).
- ``key``: the input key the row describes: the object's full name relative to the input prefix
  (``loose/a.jpg``) or a tar member's name, extension included. For manifests written before
  keys kept their extension, a key equal to an input's key without its last extension
  (``loose/a``) matches too, when exactly one input has that stem. Optional.
- ``uri``: the object's full URI or path (or its path relative to the input). Optional.
- ``source`` (or ``source_id``, ``ip``, ...): who sent it (the uploader's IP in the paper); default
  ``unknown``.
- ``timestamp`` (or ``time``, ``ts``, ...): upload time, seconds (a number), ISO-8601 or an access
  log's time (``14/Nov/2023:15:13:20 -0700``); an ISO time without a zone is UTC, whatever the
  host's time zone. Default 0. Read and range-checked by :mod:`twostream.core.timestamps`
  (1970-01-01T00:00:00Z .. 9999-12-31T23:59:59Z; a likely millisecond epoch is said so).

Image ids and sources are text or integers (JSON Lines; Parquet: string or integer columns), at
most :data:`MAX_TEXT_CHARS` characters, without control characters (:func:`identity_text`); a
JSON Lines row gives each key once. Every line of a text manifest is valid UTF-8 and a record
(blank lines skipped): where the audit lists a bad line, a manifest is refused naming it.

An input matches a row by ``key`` when that column has values, else by ``uri``, else by
``image_id == key``. Checks, each failure a :class:`ManifestError` naming its rows (``line N``,
1-based, for text; ``row N`` for Parquet): unreadable rows (invalid JSON or UTF-8, a key given
twice, a CSV line of the wrong number of fields, a line of no access-log format), a timestamp
not read or outside the range, an id or source of the wrong type, a row without an image id, the
same image id (or key, or URI when rows match by it) on two rows, one row matching two inputs
(a line that is no record is named once the rows before it passed). Rows that match no input are
counted and listed in the job's summary (:func:`match`). The table stays columnar (pyarrow):
millions of rows cost tens of MB.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream import storage
from twostream.core.records import parquet
from twostream.core.records.blocks import nonblank_blocks, utf8_error
from twostream.core.records.columns import FIELD_OF, FIELDS, first_present, normal
from twostream.core.records.formats import RecordsError, decompress, detect_format
from twostream.core.records.jsonl import objects
from twostream.core.records.reader import read_chunks
from twostream.core.timestamps import accepted, as_text, parse_timestamp, problem, seconds_array, show, value_at

UNKNOWN_SOURCE = "unknown"
UNMATCHED_LISTED = 20  # unmatched manifest rows named in the summary
SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source", pa.string()),
        ("timestamp", pa.float64()),
        ("key", pa.string()),
        ("uri", pa.string()),
        ("line", pa.int64()),  # where the row is in the file (1-based; see ManifestIndex.where)
    ]
)
MANIFEST_FIELDS = ("image_id", "source", "timestamp", "key", "uri")  # the columns a manifest reads


class ManifestError(ValueError):
    """The manifest cannot be read, or a row of it is wrong; the message names the row."""


MAX_TEXT_CHARS = 1024  # longest image id or source accepted (a manifest's or a sidecar's)
_CONTROL = r"[\x00-\x1f\x7f]"  # C0 controls and DEL: refused in image ids and sources
_CONTROL_RE = re.compile(_CONTROL)


def identity_text(name: str, value: object) -> str:
    """An image id or source (``name``) from a manifest or sidecar -> its text; raises
    ``ValueError`` saying what is wrong. Text or an integer (as its decimal digits) only; no
    control characters, no lone surrogates, at most :data:`MAX_TEXT_CHARS` characters."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = str(value) if abs(value) < 10 ** MAX_TEXT_CHARS else "9" * (MAX_TEXT_CHARS + 1)
    elif isinstance(value, str):
        text = value
    else:
        kind = next((word for t, word in ((bool, "a boolean"), (float, "a number with a fraction"),
                                          (list, "a list"), (dict, "an object")) if isinstance(value, t)),
                    type(value).__name__)
        raise ValueError(f"{name} {show(value)} is {kind}, not text or an integer")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"{name} {show(value)} is {len(text):,} characters long (at most {MAX_TEXT_CHARS:,})")
    bad = _CONTROL_RE.search(text)
    if bad:
        raise ValueError(f"{name} {show(value)} holds the control character U+{ord(bad.group()):04X}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{name} {show(value)} holds a lone surrogate "
                         f"U+{ord(text[exc.start]):04X} (not valid Unicode)") from None
    return text


def _to_seconds(column: pa.ChunkedArray, where: list[str]) -> pa.Array:
    """A timestamp column -> float seconds (missing: 0); the first refused value raises naming its row."""
    seconds = seconds_array(column)
    values = seconds.to_numpy(zero_copy_only=False).astype(np.float64)
    text = as_text(column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column)
    missing = np.asarray(pc.fill_null(pc.equal(text, ""), True))
    refused = np.flatnonzero(~accepted(values) & ~missing)
    if len(refused):
        k = int(refused[0])
        chunk = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        more = f" (and {len(refused) - 1} more such rows)" if len(refused) > 1 else ""
        raise ManifestError(f"manifest {where[k]}: {problem(value_at(chunk, k), seconds[k].as_py())}{more}")
    values[missing] = 0.0
    return pa.array(values, pa.float64())


def _duplicates(column: pa.ChunkedArray, what: str, where: list[str]) -> None:
    """Raise naming the rows of the first values that appear more than once (nulls ignored)."""
    counts = pc.value_counts(pc.drop_null(column))
    repeated = [v.as_py() for v, n in zip(counts.field("values"), counts.field("counts")) if n.as_py() > 1]
    if not repeated:
        return
    values = column.to_pylist()
    parts = []
    for value in repeated[:5]:
        rows = [where[k] for k, v in enumerate(values) if v == value]
        parts.append(f"{what} {value!r} on {', '.join(rows)}")
    more = f" (and {len(repeated) - 5} more)" if len(repeated) > 5 else ""
    raise ManifestError(f"manifest: duplicate {what}s: " + "; ".join(parts) + more)


def normalise(table: pa.Table, lines: Sequence[int] | None = None, unit: str = "line") -> pa.Table:
    """Rename aliases, coerce types, fill defaults and check the rows: a table with :data:`SCHEMA`.
    ``lines``: each row's 1-based line in its file (default: its 1-based row number)."""
    n = table.num_rows
    line = list(lines) if lines is not None else list(range(1, n + 1))
    where = [f"{unit} {k}" for k in line]
    known = [name for name in table.column_names if FIELD_OF.get(normal(name)) in MANIFEST_FIELDS]
    twice = sorted({normal(name) for name in known if len(table.schema.get_all_field_indices(name)) > 1
                    or sum(normal(k) == normal(name) for k in known) > 1})
    if twice:
        raise ManifestError(f"manifest has the column {twice[0]!r} more than once (columns are {table.column_names})")
    columns = {}
    for target in MANIFEST_FIELDS:
        found = first_present(FIELDS[target], table.column_names)
        columns[target] = table.column(found) if found is not None else None
    if columns["image_id"] is None:
        if columns["key"] is None and columns["uri"] is None:
            raise ManifestError("manifest needs an image_id (or key) column, or a uri column; "
                                f"has {table.column_names}")
        columns["image_id"] = columns["key"] if columns["key"] is not None else columns["uri"]

    def text(name: str) -> pa.ChunkedArray | pa.Array:
        return _text_column(name, columns[name], where) if columns[name] is not None else pa.nulls(n, pa.string())

    out = {
        "image_id": text("image_id"),
        "source": pc.fill_null(text("source"), UNKNOWN_SOURCE),
        "timestamp": _to_seconds(columns["timestamp"], where)
        if columns["timestamp"] is not None
        else pa.array(np.zeros(n), pa.float64()),
        "key": text("key"),
        "uri": text("uri"),
        "line": pa.array(line, pa.int64()),
    }
    result = pa.table(out, schema=SCHEMA.with_metadata({"unit": unit}))
    for name in ("image_id", "source"):
        _check_identity(name, result.column(name), where)
    ids = result.column("image_id").to_pylist()
    missing = [where[k] for k, v in enumerate(ids) if v is None or v == ""]
    if missing:
        raise ManifestError(f"manifest rows without an image_id: {', '.join(missing[:10])}"
                            + (f" (and {len(missing) - 10} more)" if len(missing) > 10 else ""))
    _duplicates(result.column("image_id"), "image_id", where)
    mode = match_mode(result)
    if mode in ("key", "uri"):
        _duplicates(result.column(mode), mode, where)
    return result


def _text_column(name: str, column: pa.ChunkedArray, where: list[str]) -> pa.Array:
    """A manifest column of text or integers -> strings; any other type is refused naming a row."""
    kind = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind) \
            or pa.types.is_null(kind):
        return pc.cast(column, pa.string())
    valid = np.flatnonzero(np.asarray(pc.is_valid(column)))
    at = where[int(valid[0])] if len(valid) else where[0] if where else "row 1"
    raise ManifestError(f"manifest {at}: column {name} holds {kind} values, not text or integers")


def _check_identity(name: str, column: pa.ChunkedArray, where: list[str]) -> None:
    """Refuse, naming the first such row, an image id or source with a control character or
    longer than :data:`MAX_TEXT_CHARS` (:func:`identity_text` words why)."""
    bad = pc.or_(pc.match_substring_regex(column, _CONTROL), pc.greater(pc.utf8_length(column), MAX_TEXT_CHARS))
    rows = np.flatnonzero(np.asarray(pc.fill_null(bad, False)))
    if len(rows):
        k = int(rows[0])
        more = f" (and {len(rows) - 1} more such rows)" if len(rows) > 1 else ""
        try:
            identity_text(name, column[k].as_py())
        except ValueError as exc:
            raise ManifestError(f"manifest {where[k]}: {exc}{more}") from None


def _jsonl_value(field: str, value: object) -> object:
    """One JSON value of a known manifest column -> what its column holds; ValueError if refused."""
    if value is None or value == "":
        return None
    if field == "timestamp":
        return parse_timestamp(value)
    if field in ("image_id", "source"):
        return identity_text(field, value)
    if not isinstance(value, str):
        raise ValueError(f"{field} {show(value)} is not text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{field} {show(value)} holds a lone surrogate U+{ord(value[exc.start]):04X}") from None
    return value


def _read_jsonl(text: bytes) -> tuple[pa.Table, list[int]]:
    """JSON Lines -> a table of the columns the manifest reads (timestamps as seconds, the rest
    as text) and each row's line number; the first line refused (no object, a column given in two
    spellings, a refused value of a column read) raises naming it."""
    rows: list[dict] = []
    lines: list[int] = []
    for block, numbers, _, _ in nonblank_blocks(text, 8 << 20, len(text) + 1):
        found, failed = objects(block)
        stop = failed[0][0] if failed else len(block)
        for k, obj in found:
            if k > stop:
                break
            keys = {key: name for key in obj if FIELD_OF.get(name := normal(key)) in MANIFEST_FIELDS}
            names = list(keys.values())
            same = [key for key, name in keys.items() if names.count(name) > 1]
            if same:
                _jsonl_table(rows, lines)  # an earlier line's refused value first
                raise ManifestError(f"manifest line {numbers[k]}: the columns {', '.join(map(repr, same))} "
                                    "are one column")
            rows.append({key: obj[key] for key in keys})
            lines.append(int(numbers[k]))
        if failed:
            _jsonl_table(rows, lines)
            raise ManifestError(f"manifest line {numbers[stop]}: {failed[0][1]}")
    return _jsonl_table(rows, lines), lines


def _jsonl_table(rows: list[dict], lines: list[int]) -> pa.Table:
    """The JSON Lines rows' values of the columns the manifest reads (the first alias of each
    field, :func:`~twostream.core.records.columns.first_present`) as a table; the first refused
    value raises naming its line."""
    names = list(dict.fromkeys(key for row in rows for key in row))  # in order of first appearance
    chosen = {name: target for target in MANIFEST_FIELDS if (name := first_present(FIELDS[target], names)) is not None}
    columns: dict[str, list] = {name: [] for name in chosen}
    for row, line in zip(rows, lines):
        for name, target in chosen.items():
            try:
                columns[name].append(_jsonl_value(target, row.get(name)))
            except ValueError as exc:
                raise ManifestError(f"manifest line {line}: {exc}") from None
    arrays = {name: pa.array(values, pa.float64() if chosen[name] == "timestamp" else pa.string())
              for name, values in columns.items()}
    return pa.table(arrays) if arrays else pa.table({"_": pa.nulls(len(rows))})


def _read_lines(text: bytes, fmt: str) -> tuple[pa.Table, list[int]]:
    """CSV/TSV or an access log -> a table of text columns and each row's line number; the first
    line that is not a record raises naming it."""
    tables, lines = [], []
    for chunk in read_chunks(text, fmt, 8 << 20, len(text) + 1):
        if chunk.table is not None:
            tables.append(chunk.table)
            lines += chunk.line.tolist()
        if chunk.bad:
            first = min(chunk.bad, key=lambda b: b.line)
            before = sum(line < first.line for line in lines)
            if before:  # an earlier row's refusal first
                normalise(pa.concat_tables(tables).slice(0, before), lines[:before])
            raise ManifestError(f"manifest line {first.line}: {first.detail}")
    return (pa.concat_tables(tables) if tables else pa.table({})), lines


def read_manifest(uri: str) -> tuple[pa.Table, str]:
    """Read, normalise and check a manifest (see the module docstring): (table, sha256 of its bytes)."""
    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    fmt = detect_format(uri)
    if fmt is None:
        raise ManifestError(f"unknown manifest format for {uri!r} (use .csv, .tsv, .jsonl, .parquet or .log)")
    try:
        text = decompress(data, uri)
        if fmt == "parquet":
            return normalise(parquet.read_table(text), unit="row"), digest
        bad = utf8_error(text)
        if bad is not None:
            raise ManifestError(f"manifest line {bad[0]}: {bad[1]}")
        table, lines = _read_jsonl(text) if fmt == "jsonl" else _read_lines(text, fmt)
        return normalise(table, lines), digest
    except RecordsError as exc:
        raise ManifestError(f"manifest {exc}") from None
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"cannot parse manifest {uri}: {exc}") from None


def match_mode(table: pa.Table) -> str:
    """How rows match inputs: ``key`` when that column has values, else ``uri``, else ``image_id``."""
    if table.column("key").null_count < table.num_rows:
        return "key"
    if table.column("uri").null_count < table.num_rows:
        return "uri"
    return "image_id"


def stem(key: str) -> str | None:
    """``key`` without its last extension (``a/b.c.jpg`` -> ``a/b.c``); None when it has none."""
    head, _, tail = key.rpartition("/")
    if "." not in tail.lstrip("."):
        return None
    return (f"{head}/" if head else "") + tail[: tail.rindex(".")]


@dataclass
class Match:
    """The manifest row of each input (-1: none) and the rows no input matched."""

    rows: list[int]
    manifest_rows: int = 0
    unmatched: int = 0
    unmatched_first: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        return {"rows": self.manifest_rows, "matched": self.manifest_rows - self.unmatched,
                "unmatched": self.unmatched, "unmatched_first": self.unmatched_first}


class Matcher:
    """Matches inputs to manifest rows a group (a shard) at a time, so that the inputs never need
    to be held at once: :meth:`rows` per group, then :meth:`result` checks that no row matched
    two inputs and counts the rows no input matched."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.mode = match_mode(table)
        self.unit = (table.schema.metadata or {}).get(b"unit", b"line").decode()
        self.values = table.column(self.mode).to_pylist()
        self.by_value = {v: k for k, v in enumerate(self.values) if v is not None}
        self.owner: dict[int, str] = {}  # manifest row -> the first input that matched it
        self.shared: dict[int, list[str]] = {}  # manifest row -> every input that matched it (2+)

    def rows(self, keys: Sequence[str], uris: Sequence[str], shown: Sequence[str] | None = None) -> list[int]:
        """Each input's manifest row (by key, its stem, URI or image id, see the module docstring);
        ``shown``: each input's name in errors (default: its key)."""
        found = []
        for key, uri, label in zip(keys, uris, shown if shown is not None else keys):
            if self.mode == "uri":
                row = self.by_value.get(uri, self.by_value.get(key, -1))
            else:
                row = self.by_value.get(key, -1)
                if row < 0 and stem(key) is not None:
                    row = self.by_value.get(stem(key), -1)
            if row >= 0:
                if row in self.owner:
                    self.shared.setdefault(row, [self.owner[row]]).append(label)
                else:
                    self.owner[row] = label
            found.append(row)
        return found

    def result(self, rows: list[int] | None = None) -> Match:
        """The match so far; raises :class:`ManifestError` when one row matched two inputs."""
        lines = self.table.column("line")
        if self.shared:
            row, keys = next(iter(self.shared.items()))
            more = len(self.shared) - 1
            raise ManifestError(f"manifest {self.unit} {lines[row].as_py()}: {self.mode} {self.values[row]!r} matches "
                                f"{len(keys)} inputs ({', '.join(keys[:5])}); give each input's full name "
                                "(extension included)" + (f"; {more} more such rows" if more else ""))
        unmatched = [k for k in range(self.table.num_rows) if k not in self.owner]
        return Match(rows or [], self.table.num_rows, len(unmatched),
                     [f"{self.unit} {lines[k].as_py()}: {self.mode} {self.values[k]!r}"
                      for k in unmatched[:UNMATCHED_LISTED]])


def match(table: pa.Table | None, keys: Sequence[str], uris: Sequence[str]) -> Match:
    """Each input's manifest row, all inputs at once (:class:`Matcher`); raises
    :class:`ManifestError` when one row would match two inputs."""
    if table is None:
        return Match([-1] * len(keys))
    matcher = Matcher(table)
    return matcher.result(matcher.rows(keys, uris))
