"""CSV and TSV: a header line, then one record per line (as in log files; a newline inside
quotes is no part of a record), every field read as text (an empty field is null, ``""`` is
empty text); blank lines skipped.

A line that is not a record of the header's fields is a bad line. The lines that follow the
strict grammar (:func:`record_re`, checked vectorised) are parsed by pyarrow in one piece; the
others (a quote left open, which pyarrow would continue on the next line, merging two records; a
CR inside the line, which it would split) are read one by one with Python's csv module, at C
speed, so junk lines cost no extra pass.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from twostream.core.records.blocks import BadLine, Chunk, decode, line_blocks, line_raw
from twostream.core.records.formats import RecordsError


def read_delimited(source: str | bytes, delimiter: str, block_bytes: int,
                   max_line_bytes: int | None = None) -> Iterator[Chunk]:
    """The records of a CSV (``,``) or TSV (``\\t``) file a block at a time; the block of the
    header always yields a chunk (perhaps of no rows) so that its columns are known. A header
    longer than the line limit, or with a CR inside, is a :class:`RecordsError`."""
    header: bytes | None = None
    names: list[str] = []
    limit = max_line_bytes or block_bytes
    for block in line_blocks(source, block_bytes, max_line_bytes):
        lines, numbers, long, first = block.lines, block.numbers(), block.long_lines(limit), header is None
        if first:
            too_long = {k for k, _, _ in block.long}
            nonempty = [k for k, ln in enumerate(lines) if ln.strip() or k in too_long]
            if not nonempty:
                continue
            k0 = nonempty[0]
            if k0 in too_long:
                raise RecordsError(f"line {numbers[k0]}: the header is {long[0].detail}")
            header = lines[k0].rstrip(b"\r")
            if b"\r" in header:  # lines ended by a bare CR: the whole file on one line
                raise RecordsError(f"line {numbers[k0]}: the header holds a carriage return (CR); lines must end "
                                   "with LF or CR LF")
            names = _header(header, delimiter)
            lines, numbers = lines[k0 + 1 :], numbers[k0 + 1 :]
        keep = [k for k, ln in enumerate(lines) if ln.strip(b" \t\r")]
        if first or keep or block.invalid_utf8 or long:
            yield _chunk(header, names, delimiter, [lines[k] for k in keep], numbers[keep], block.invalid_utf8, long)


def _header(header: bytes, delimiter: str) -> list[str]:
    return pacsv.read_csv(
        io.BytesIO(header + b"\n"), parse_options=pacsv.ParseOptions(delimiter=delimiter),
        read_options=pacsv.ReadOptions(use_threads=False),
    ).column_names


def record_re(delimiter: str) -> str:
    """A line that is one CSV record by the strict grammar: fields unquoted (no quote, no CR) or
    fully quoted (quotes doubled inside, no CR), an optional CR at the end."""
    field_re = f'(?:"(?:[^"\r]|"")*"|[^"{delimiter}\r]*)'
    return f"^{field_re}(?:{delimiter}{field_re})*\r?$"


def _chunk(header: bytes, names: list[str], delimiter: str, lines: list[bytes], numbers: np.ndarray,
           invalid_utf8: int, long: list[BadLine]) -> Chunk:
    """One block of lines as a chunk (see the module docstring)."""
    wellformed = np.asarray(pc.match_substring_regex(pa.array(lines, pa.binary()), record_re(delimiter)),
                            dtype=bool)
    main, rest = np.flatnonzero(wellformed), np.flatnonzero(~wellformed)
    pieces: list[tuple[np.ndarray, pa.Table]] = []
    invalid: list[tuple[int, str]] = []
    for group, parse in ((main, _parse), (rest, _records)):
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
        good, table = np.zeros(0, np.int64), _table([[] for _ in names], names)
    bad = long + [BadLine(int(numbers[k]), "unparseable line", detail, decode(lines[k]))
                  for k, detail in sorted(invalid)]
    return Chunk(table, numbers[good], line_raw(lines, good), bad, invalid_utf8)


def _table(columns: list[list[str | None]], names: list[str]) -> pa.Table:
    return pa.Table.from_arrays([pa.array(c, pa.string()) for c in columns], names=names)


def _parse(header: bytes, lines: list[bytes], idx: np.ndarray, names: list[str],
           delimiter: str) -> tuple[np.ndarray, pa.Table, list[tuple[int, str]]]:
    """pyarrow over the lines ``idx`` of ``lines``: (indices of the rows, the rows, (index, detail)
    of the lines with the wrong number of fields). Should pyarrow not return one row or one
    invalid row per line, the lines are read by :func:`_records` instead."""
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
        return _records(header, lines, idx, names, delimiter)
    skipped = np.zeros(len(idx), dtype=bool)
    skipped[[n - 2 for n, _ in invalid]] = True
    return idx[~skipped], table, [(int(idx[n - 2]), detail) for n, detail in invalid]


def _records(header: bytes, lines: list[bytes], idx: np.ndarray, names: list[str],
             delimiter: str) -> tuple[np.ndarray, pa.Table, list[tuple[int, str]]]:
    """The lines ``idx`` read one by one with Python's csv module (strict quoting), as
    :func:`_parse` returns them; an empty field is null."""
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
    return np.array(ok, dtype=np.int64), _table(columns, names), invalid
