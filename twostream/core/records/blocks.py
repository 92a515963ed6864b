"""A text file of records a block of lines at a time, and what every format's reader yields.

:func:`line_blocks` reads any text file (compressed or not, local or ``s3://``, or bytes already
in memory) a block at a time with memory bounded by about two blocks whatever its lines: a line
longer than the limit is skipped while streaming and comes back as a placeholder with its length;
invalid UTF-8 is replaced (U+FFFD), and only the lines that have it are touched. Each format's
reader turns blocks into :class:`Chunk` s: the records it read, as Arrow columns named as the file
names them, and the lines it could not read as :class:`BadLine` s, never dropped silently.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from twostream.core.records.formats import open_stream

TRUNC = 300  # characters of a line kept as its text
_HEAD = 4 * TRUNC  # bytes kept of a too-long line (its text is the first TRUNC characters)


@dataclass
class BadLine:
    """A record that could not be read or used, with its place and why."""

    line: int  # 1-based physical line (CSV/JSONL/CLF) or 1-based row (Parquet)
    reason: str  # a short category, e.g. "unparseable timestamp"
    detail: str  # the offending value or parser message
    text: str  # the raw line (truncated)


@dataclass
class Chunk:
    """One block of a file's records as read (no field mapped, no value checked)."""

    table: pa.Table | None  # the records read, columns as the file names them; None: none in this block
    line: np.ndarray  # int64: each record's 1-based line (row for Parquet)
    raw: Callable[[int], str]  # record k -> its text (truncated), for a bad line
    bad: list[BadLine] = field(default_factory=list)  # lines not read (too long, unparseable)
    invalid_utf8: int = 0  # lines of this block whose invalid UTF-8 was replaced


def bad_only(bad: list[BadLine], invalid_utf8: int = 0) -> Chunk:
    """A chunk with no records, only bad lines (a block that held nothing but too-long lines)."""
    return Chunk(None, np.zeros(0, np.int64), lambda k: "", bad, invalid_utf8)


def decode(raw: bytes) -> str:
    """A line's bytes as its (truncated) text for a bad line."""
    return raw.decode("utf-8", "replace").rstrip("\r")[:TRUNC]


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


def utf8_error(data: bytes) -> tuple[int, str] | None:
    """(1-based line, why) of the first invalid UTF-8 in ``data``; None when it is valid."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return data.count(b"\n", 0, exc.start) + 1, f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
    return None


def size_text(n: int) -> str:
    """``8388608`` -> ``"8 MiB"``, ``1024`` -> ``"1 KiB"``, else ``"1,000 bytes"``."""
    for shift, unit in ((30, "GiB"), (20, "MiB"), (10, "KiB")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:,} bytes"


@dataclass
class Block:
    """Lines of a text file: ``lines[k]`` is line ``first + k``; a line longer than the limit is
    an empty placeholder and listed in ``long`` as (index, length in bytes, its first bytes)."""

    first: int
    lines: list[bytes]
    invalid_utf8: int
    long: list[tuple[int, int, bytes]] = field(default_factory=list)

    def long_lines(self, limit: int) -> list[BadLine]:
        """The too-long lines as bad lines (``line 3: 314,572,800 bytes, longer than the 8 MiB limit``)."""
        return [BadLine(self.first + k, "line too long", f"{length:,} bytes, longer than the {size_text(limit)} limit",
                        decode(head)) for k, length, head in self.long]

    def numbers(self) -> np.ndarray:
        """Each line's 1-based number (int64)."""
        return np.arange(self.first, self.first + len(self.lines), dtype=np.int64)


def line_blocks(source: str | bytes, block_bytes: int, max_line_bytes: int | None = None) -> Iterator[Block]:
    """The lines of ``source`` (a URI, decompressed by its suffix, or bytes) a block at a time,
    valid UTF-8 (invalid bytes replaced).

    Memory stays within about two blocks whatever the lines: a line longer than ``max_line_bytes``
    (default: the block size) is not kept but skipped while streaming (through decompression
    too: the stream is read ``block_bytes`` decompressed bytes at a time), and comes back as a
    placeholder with its length and first bytes (:class:`Block`); the lines after it read normally.
    """
    limit = max_line_bytes or block_bytes
    lineno = 1
    carry = b""
    skipping: list | None = None  # [length so far, first bytes] of the too-long line being skipped
    with open_stream(source) as stream:
        while True:
            data = stream.read(block_bytes)
            if not data:
                break
            if skipping is not None:
                cut = data.find(b"\n")
                if cut < 0:
                    skipping[0] += len(data)
                    continue
                yield Block(lineno, [b""], 0, [(0, skipping[0] + cut, skipping[1])])
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
                yield Block(lineno, lines, invalid, long)
                lineno += len(lines)
            if len(carry) > limit:
                skipping, carry = [len(carry), carry[:_HEAD]], b""
    if skipping is not None:
        yield Block(lineno, [b""], 0, [(0, skipping[0], skipping[1])])
    elif carry:
        lines = [carry]
        yield Block(lineno, lines, len(repair_utf8(lines)))


def _is_utf8(data: bytes, end: int) -> bool:
    """Whether ``data[:end]`` is valid UTF-8 (the whole block at C speed, no per-line work)."""
    if data.isascii():
        return True
    try:
        data[:end].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def nonblank_blocks(source: str | bytes, block_bytes: int,
                    max_line_bytes: int | None = None) -> Iterator[tuple[list[bytes], np.ndarray, int, list[BadLine]]]:
    """(non-blank lines, their 1-based line numbers, lines with invalid UTF-8, the too-long
    lines as bad lines) per block."""
    limit = max_line_bytes or block_bytes
    for block in line_blocks(source, block_bytes, max_line_bytes):
        lines = block.lines
        keep = [k for k, ln in enumerate(lines) if ln.strip(b" \t\r")]
        if keep or block.long:
            yield [lines[k] for k in keep], block.numbers()[keep], block.invalid_utf8, block.long_lines(limit)


def line_raw(lines: list[bytes], good: np.ndarray) -> Callable[[int], str]:
    """Record k -> the text of its line, for a chunk holding the lines ``good`` of ``lines``."""

    def raw(k: int) -> str:
        return decode(lines[good[k]])

    return raw
