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
  without a zone is UTC, whatever the host's time zone. Default 0.

An input matches a row by ``key`` when that column has values, else by ``uri``, else by
``image_id == key``. Checks, each failure a :class:`ManifestError` naming its rows (``line N``,
1-based, for CSV and JSON Lines; ``row N`` for Parquet): unreadable rows, an unparseable or
non-finite timestamp, a row without an image id, the same image id (or key, or URI when rows
match by it) on two rows, one row matching two inputs. Rows that match no input are counted and
listed in the job's summary (:func:`match`). The table stays columnar (pyarrow): millions of
rows cost tens of MB.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from twostream import storage

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


def parse_timestamp(value: object) -> float:
    """Seconds (a number or numeric text) or ISO-8601 text (no zone = UTC) -> float seconds;
    raises ``ValueError`` saying why."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                stamp = datetime.fromisoformat(text.replace("Z", "+00:00"))
            except ValueError:
                raise ValueError(f"timestamp {value!r} is neither seconds nor ISO-8601") from None
            if stamp.tzinfo is None:
                stamp = stamp.replace(tzinfo=timezone.utc)
            seconds = stamp.timestamp()
    if not math.isfinite(seconds):
        raise ValueError(f"timestamp {value!r} is not a finite number")
    return seconds


def _to_seconds(column: pa.ChunkedArray, where: list[str]) -> pa.Array:
    if pa.types.is_timestamp(column.type):  # a naive Arrow timestamp holds UTC wall time
        return pc.divide(pc.cast(column.cast(pa.timestamp("us")), pa.int64()), 1e6)
    values = []
    for k, value in enumerate(column.to_pylist()):
        if value is None or value == "":
            values.append(0.0)
            continue
        try:
            values.append(parse_timestamp(value))
        except ValueError as exc:
            raise ManifestError(f"manifest {where[k]}: {exc}") from None
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
    columns = {}
    for target, aliases in _ALIASES.items():
        found = next((lower[a] for a in aliases if a in lower), None)
        columns[target] = table.column(found) if found is not None else None
    if columns["image_id"] is None:
        if columns["key"] is None:
            raise ManifestError(f"manifest needs an image_id (or key) column; has {table.column_names}")
        columns["image_id"] = columns["key"]

    def text(name: str) -> pa.ChunkedArray | pa.Array:
        return pc.cast(columns[name], pa.string()) if columns[name] is not None else pa.nulls(n, pa.string())

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


def _read_jsonl(data: bytes) -> tuple[pa.Table, list[int]]:
    """JSON Lines -> a table of text columns (blank lines skipped) and each row's line number."""
    rows, lines = [], []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except ValueError as exc:
            raise ManifestError(f"manifest line {number}: not valid JSON: {exc}") from None
        if not isinstance(row, dict):
            raise ManifestError(f"manifest line {number}: not a JSON object")
        rows.append(row)
        lines.append(number)
    names = sorted({k for r in rows for k in r})
    columns = {name: pa.array([None if r.get(name) is None else str(r[name]) for r in rows], pa.string())
               for name in names}
    return pa.table(columns), lines


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
            table, lines = _read_jsonl(data)
            return normalise(table, lines), digest
        if name.endswith((".csv", ".tsv")):
            text_columns = [a for aliases in _ALIASES.values() for a in aliases]
            options = pacsv.ParseOptions(delimiter="\t" if name.endswith(".tsv") else ",", ignore_empty_lines=False)
            table = pacsv.read_csv(io.BytesIO(data), parse_options=options,
                                   convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in text_columns}))
            # one row per line (a quoted newline is a parse error by default); line 1 is the header
            return normalise(table, range(2, table.num_rows + 2)), digest
    except pa.ArrowInvalid as exc:
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
