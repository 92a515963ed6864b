"""Upload manifests: which source sent each image, and when; read, checked, and matched to inputs.

A manifest is CSV, JSON Lines or Parquet (chosen by suffix: ``.csv``/``.tsv``, ``.jsonl``/
``.ndjson``/``.json``, ``.parquet``/``.pq``), local or ``s3://``. Columns (case-insensitive,
extra ones ignored):

- ``image_id`` (or ``id``): the image's identity in the output. Required (or ``key``, used as
  the id).
- ``key``: the input key the row describes: the object's full name relative to the input prefix
  (``loose/a.jpg``) or a tar member's name, extension included. For manifests written before
  keys kept their extension, a key equal to an input's key without its last extension
  (``loose/a``) matches too, when exactly one input has that stem. Optional.
- ``uri``: the object's full URI or path (or its path relative to the input). Optional.
- ``source`` (or ``source_id``, ``ip``): who sent it (the uploader's IP in the paper); default
  ``unknown``.
- ``timestamp`` (or ``ts``, ``time``): upload time, seconds (a number) or ISO-8601; an ISO time
  without a zone is UTC, whatever the host's time zone. Default 0. Read and range-checked by
  :mod:`twostream.core.timestamps` (1970-01-01T00:00:00Z .. 9999-12-31T23:59:59Z; a likely
  millisecond epoch is said so).

Image ids and sources are text or integers (JSON Lines; Parquet: string or integer columns), at
most :data:`MAX_TEXT_CHARS` characters, without control characters (:func:`identity_text`); a
JSON Lines row gives each key once.

An input matches a row by ``key`` when that column has values, else by ``uri``, else by
``image_id == key``. Checks, each failure a :class:`ManifestError` naming its rows (``line N``,
1-based, for CSV and JSON Lines; ``row N`` for Parquet): unreadable rows (invalid JSON or UTF-8,
a key given twice), a timestamp not read or outside the range, an id or source of the wrong type,
a row without an image id, the same image id (or key, or URI when rows match by it) on two rows,
one row matching two inputs. Rows that match no input are counted and
listed in the job's summary (:func:`match`). The table stays columnar (pyarrow): millions of
rows cost tens of MB.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from twostream import storage
from twostream.core.jsontext import load_object
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
_ALIASES = {
    "image_id": ("image_id", "id", "imageid"),
    "source": ("source", "source_id", "sourceid", "ip"),
    "timestamp": ("timestamp", "ts", "time"),
    "key": ("key",),
    "uri": ("uri", "url", "path"),
}


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
    lower = {name.lower().strip(): name for name in table.column_names}
    known = [name for name in table.column_names if any(name.lower().strip() in a for a in _ALIASES.values())]
    twice = sorted({name.lower().strip() for name in known if len(table.schema.get_all_field_indices(name)) > 1
                    or sum(k.lower().strip() == name.lower().strip() for k in known) > 1})
    if twice:
        raise ManifestError(f"manifest has the column {twice[0]!r} more than once (columns are {table.column_names})")
    columns = {}
    for target, aliases in _ALIASES.items():
        found = next((lower[a] for a in aliases if a in lower), None)
        columns[target] = table.column(found) if found is not None else None
    if columns["image_id"] is None:
        if columns["key"] is None:
            raise ManifestError(f"manifest needs an image_id (or key) column; has {table.column_names}")
        columns["image_id"] = columns["key"]

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


_FIELD_OF = {alias: target for target, aliases in _ALIASES.items() for alias in aliases}


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


def _read_jsonl(data: bytes) -> tuple[pa.Table, list[int]]:
    """JSON Lines -> a table of the known columns (blank lines skipped; timestamps as seconds,
    the rest as text) and each row's line number; a refused value names its line."""
    rows, lines = [], []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            obj = load_object(raw)
        except ValueError as exc:
            raise ManifestError(f"manifest line {number}: {exc}") from None
        keys = [k for k in obj if k.lower().strip() in _FIELD_OF]
        same = [k for k in keys if sum(o.lower().strip() == k.lower().strip() for o in keys) > 1]
        if same:
            raise ManifestError(f"manifest line {number}: the columns {', '.join(map(repr, same))} are one column")
        row = {}
        for key in keys:
            try:
                row[key] = _jsonl_value(_FIELD_OF[key.lower().strip()], obj[key])
            except ValueError as exc:
                raise ManifestError(f"manifest line {number}: {exc}") from None
        rows.append(row)
        lines.append(number)
    names = sorted({k for r in rows for k in r})
    columns = {name: pa.array([r.get(name) for r in rows],
                              pa.float64() if _FIELD_OF[name.lower().strip()] == "timestamp" else pa.string())
               for name in names}
    return pa.table(columns) if columns else pa.table({"_": pa.nulls(len(rows))}), lines


def _utf8_line(data: bytes) -> None:
    """Refuse text that is not UTF-8, naming its first such line."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ManifestError(f"manifest line {line}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None


def read_manifest(uri: str) -> tuple[pa.Table, str]:
    """Read, normalise and check a manifest (see the module docstring): (table, sha256 of its bytes)."""
    import hashlib

    data = storage.read_bytes(uri)
    digest = hashlib.sha256(data).hexdigest()
    name = str(uri).lower()
    try:
        if name.endswith((".parquet", ".pq")):
            return normalise(pq.read_table(io.BytesIO(data)), unit="row"), digest
        if name.endswith((".jsonl", ".ndjson", ".json")):
            _utf8_line(data)
            table, lines = _read_jsonl(data)
            return normalise(table, lines), digest
        if name.endswith((".csv", ".tsv")):
            _utf8_line(data)
            options = pacsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",", ignore_empty_lines=False)
            header = pacsv.read_csv(io.BytesIO(data.split(b"\n", 1)[0] + b"\n"), parse_options=options).column_names
            # every column as text, whatever its case (``Image_ID`` of 007 stays "007")
            table = pacsv.read_csv(io.BytesIO(data), parse_options=options,
                                   convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in header}))
            # one row per line (a quoted newline is a parse error by default); line 1 is the header
            return normalise(table, range(2, table.num_rows + 2)), digest
    except (pa.ArrowException, OSError) as exc:
        raise ManifestError(f"cannot parse manifest {uri}: {exc}") from None
    raise ManifestError(f"unknown manifest format for {uri!r} (use .csv, .jsonl or .parquet)")


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
