"""Web servers' access logs in the common or combined log format (Apache, Nginx): one request
per line, its fields ``host``, ``ident``, ``user``, ``time``, ``method``, ``path``, ``protocol``,
``status``, ``bytes`` and, combined, ``referer`` and ``user_agent`` (``-`` for ``user``,
``referer`` and ``user_agent`` is null); a line in neither format is a bad line."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from twostream.core.records.blocks import BadLine, Chunk, bad_only, decode, line_raw, nonblank_blocks

PATTERN = (
    r'^(?P<host>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<method>[A-Z]+) (?P<path>\S+)(?: (?P<protocol>[^"]*))?" (?P<status>\d{3}|-) (?P<bytes>\d+|-)'
    r'(?: "(?P<referer>[^"]*)" "(?P<user_agent>[^"]*)")?.*$'
)
FIELDS = ["host", "ident", "user", "time", "method", "path", "protocol", "status", "bytes", "referer", "user_agent"]


def read_clf(source: str | bytes, block_bytes: int, max_line_bytes: int | None = None) -> Iterator[Chunk]:
    """The requests of an access log a block at a time, every field as text."""
    for lines, numbers, invalid_utf8, long in nonblank_blocks(source, block_bytes, max_line_bytes):
        if not lines:
            yield bad_only(long, invalid_utf8)
            continue
        text = pc.utf8_normalize(pa.array([ln.rstrip(b"\r") for ln in lines], pa.binary()).cast(pa.string()), "NFC")
        parsed = pc.extract_regex(text, PATTERN)
        ok = np.asarray(pc.is_valid(parsed))
        good = np.flatnonzero(ok)
        bad = long + [BadLine(int(numbers[k]), "unparseable line", "not in common/combined log format",
                              decode(lines[k])) for k in np.flatnonzero(~ok)]
        parsed = pc.take(parsed, pa.array(good, pa.int64()))
        table = pa.table({n: pc.struct_field(parsed, n) for n in FIELDS})
        for n in ("user", "user_agent", "referer"):
            table = table.set_column(table.column_names.index(n), n,
                                     pc.if_else(pc.is_in(table.column(n), pa.array(["-", ""])), None,
                                                table.column(n)))
        yield Chunk(table, numbers[good], line_raw(lines, good), bad, invalid_utf8)
