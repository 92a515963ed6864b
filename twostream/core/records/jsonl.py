"""JSON Lines: one JSON object per line (:func:`~twostream.core.jsontext.load_object`: a key given
twice is refused), blank lines skipped. A block is read by pyarrow in one piece; a block it
cannot read as a whole (a bad line, values of mixed types) is read object by object, each line
that is no object a bad line, the values kept as they are (numbers) or as text (nested values as
JSON text, lone surrogates replaced by U+FFFD)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.json as pajson

from twostream.core.jsontext import load_object
from twostream.core.records.blocks import BadLine, Chunk, bad_only, decode, line_raw, nonblank_blocks


def objects(lines: list[bytes]) -> tuple[list[tuple[int, dict]], list[tuple[int, str]]]:
    """Each line -> its object: ([(index, object)], [(index, why it is none)])."""
    found, failed = [], []
    for k, line in enumerate(lines):
        try:
            found.append((k, load_object(line)))
        except ValueError as exc:
            failed.append((k, str(exc)))
    return found, failed


def read_jsonl(source: str | bytes, block_bytes: int, max_line_bytes: int | None = None) -> Iterator[Chunk]:
    """The records of a JSON Lines file a block at a time (see the module docstring)."""
    for lines, numbers, invalid_utf8, long in nonblank_blocks(source, block_bytes, max_line_bytes):
        if not lines:
            yield bad_only(long, invalid_utf8)
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
            table, good, bad = _object_by_object(lines, numbers)
        yield Chunk(table, numbers[good], line_raw(lines, good), long + bad, invalid_utf8)


def _object_by_object(lines: list[bytes], numbers: np.ndarray) -> tuple[pa.Table, np.ndarray, list[BadLine]]:
    """A block pyarrow could not read as a whole (bad JSON, mixed types): object by object."""
    found, failed = objects(lines)
    bad = [BadLine(int(numbers[k]), "unparseable line", detail[:200], decode(lines[k])) for k, detail in failed]
    rows = [{_unicode(key): (v if v is None or isinstance(v, (int, float)) and not isinstance(v, bool)
                             else _unicode(v) if isinstance(v, str) else json.dumps(v))
             for key, v in obj.items()} for _, obj in found]
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
    return table, np.array([k for k, _ in found], dtype=np.int64), bad


def _unicode(text: str) -> str:
    """``text`` with lone surrogates (valid JSON escapes, not Unicode) replaced by U+FFFD."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
