"""The one range of timestamps the product accepts, its parsers (scalar and Arrow) and its formatter.

**The range**: from the Unix epoch, 1970-01-01T00:00:00Z (0 s), up to the last second of year
9999, 9999-12-31T23:59:59Z (253,402,300,799 s; fractions of that second included): ``FIRST <= t
< END``. Every timestamp of a manifest row, a sidecar and an audited log line is read to float
seconds since the epoch (UTC) and checked against it; anything else is that input's error (an
error row, a refusal naming the manifest row, a bad line), never an exception that escapes.

**What is read**: a number (int or float, not a bool) or numeric text (ASCII digits, an optional
sign, fraction and exponent; ``1.7e9``) as seconds (the audit's ``timestamp_unit`` scales numbers
first); else ISO-8601 text (``2023-11-14T22:13:20``, ``Z``/``z`` or an offset; no zone = UTC);
else the common log format (``14/Nov/2023:22:13:20 +0000``, in brackets or not). Text is trimmed
of blanks and quotes (:data:`TRIM`) first. NaN and infinities are refused as "not a finite number"; a
number outside the range whose division by 1,000, 1,000,000 or 1,000,000,000 lands inside it is
said to look like milli-, micro- or nanoseconds, with the time it would then be.

:func:`parse_timestamp` is the scalar parser (manifests, sidecars); :func:`seconds_array` is the
vectorised one (the audit; CSV manifests too) over the same grammar (:data:`NUMERIC`,
:func:`text_seconds`), and :func:`problem` words what is wrong with any value either refused.
:func:`format_utc` formats any stored float for reports without raising.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from datetime import datetime, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FIRST = 0  # 1970-01-01T00:00:00Z: the first accepted second
LAST = 253_402_300_799  # 9999-12-31T23:59:59Z: the last accepted second
END = LAST + 1  # the first refused second after the range
RANGE_TEXT = "1970-01-01T00:00:00Z .. 9999-12-31T23:59:59Z"
NUMERIC = r"^[-+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$"  # after TRIM; RE2 and re alike
TRIM = " \t\r\n\""  # blanks and quotes around any timestamp text
_BRACKETED = r"^\[(.*)\]$"  # ... and brackets around a CLF time only
CLF_FORMAT = "%d/%b/%Y:%H:%M:%S %z"
UNIT_SCALE = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "ns": 1e-9}
_UNIT_WORDS = {"s": ("seconds", "1"), "ms": ("milliseconds", "1,000"), "us": ("microseconds", "1,000,000"),
               "ns": ("nanoseconds", "1,000,000,000")}
_NUMERIC_RE = re.compile(NUMERIC)
_EPOCH = datetime(1970, 1, 1)
_MAX_TEXT = 64  # longer text is no ISO-8601 or CLF time (numbers of any length are read)
_NOT_FINITE = ("inf", "infinity", "nan")  # text Python's float() reads, refused by name
_SHOWN = 80  # characters of a refused value quoted in a message


class TimestampError(ValueError):
    """A timestamp that is not read, or lies outside the accepted range; the message says which."""


def show(value: object) -> str:
    """``repr(value)``, cut to about 80 characters (a refused value is quoted, not dumped)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**60:
        return f"{str(value)[:20]}... ({len(str(abs(value)))} digits)"
    text = repr(value)
    return text if len(text) <= _SHOWN else f"{text[:_SHOWN]}... ({len(text):,} characters)"


def in_range(seconds: float) -> bool:
    """Whether ``seconds`` lies in the accepted range (False for NaN)."""
    return FIRST <= seconds < END


def iso(seconds: float) -> str:
    """An accepted time as ISO-8601 UTC (``2023-11-14T22:13:20Z``, microseconds when not whole)."""
    stamp = _EPOCH + timedelta(seconds=float(seconds))
    return stamp.isoformat(timespec="seconds" if stamp.microsecond == 0 else "microseconds") + "Z"


def format_utc(seconds: object) -> str:
    """Any stored value -> ``YYYY-MM-DD HH:MM:SS UTC`` for reports; never raises. None/NaN -> "";
    a finite value outside years 1-9999 -> the number itself (``1e+300 s``); other junk -> its repr."""
    if seconds is None:
        return ""
    try:
        value = float(seconds)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return show(seconds)
    if math.isnan(value):
        return ""
    try:
        stamp = _EPOCH + timedelta(seconds=value)
    except (OverflowError, ValueError):
        return f"{value:g} s (not a date)"
    return f"{stamp.year:04d}-{stamp:%m-%d %H:%M:%S} UTC"


def iso_seconds(text: str) -> float | None:
    """ISO-8601 (``Z``/offset; no zone = UTC) or common-log-format text -> seconds since the epoch,
    computed without leaving years 1-9999 (an offset at their edges is fine); None if neither."""
    text = text.strip(TRIM)
    if not text or len(text) > _MAX_TEXT:
        return None
    try:
        stamp = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1] in "Zz" else text)
    except ValueError:
        try:
            stamp = datetime.strptime(text[1:-1] if text[0] == "[" and text[-1] == "]" else text, CLF_FORMAT)
        except ValueError:
            return None
    offset = stamp.utcoffset() or timedelta(0)
    return (stamp.replace(tzinfo=None) - _EPOCH - offset).total_seconds()


def text_seconds(text: str) -> float | None:
    """Text -> seconds: numeric text (:data:`NUMERIC`, after :data:`TRIM`) as a float (perhaps
    infinite), else :func:`iso_seconds`; None when it is neither."""
    trimmed = text.strip(TRIM)
    if _NUMERIC_RE.match(trimmed):
        return float(trimmed)
    return iso_seconds(trimmed)


def _looks_like(raw: float, unit: str) -> tuple[str, str]:
    """(``; it looks like milliseconds ...``, that unit) when ``raw`` (a number in ``unit``) read in
    a finer unit lands in the range; ("", "") otherwise."""
    units = list(UNIT_SCALE)
    for finer in units[units.index(unit) + 1:]:
        seconds = raw * UNIT_SCALE[finer]
        if in_range(seconds):
            words, factor = _UNIT_WORDS[finer]
            return f"; it looks like {words} since the epoch: {iso(seconds)} if divided by {factor}", finer
    return "", ""


def problem(value: object, seconds: float | None, unit: str = "s",
            advice: Callable[[str], str] | None = None) -> str:
    """Why ``value`` (read as ``seconds``, None when unread) is refused; ``advice(unit)`` is added
    after a likely finer epoch unit (the audit names its ``--map timestamp_unit=`` option)."""
    shown = show(value)
    if isinstance(value, bool):
        return f"timestamp {shown} is a boolean, not seconds or ISO-8601"
    if isinstance(value, (list, tuple)):
        return f"timestamp {shown} is a list, not seconds or ISO-8601"
    if isinstance(value, dict):
        return f"timestamp {shown} is an object, not seconds or ISO-8601"
    if seconds is None:
        if isinstance(value, str) and value.strip(TRIM).lower().lstrip("+-") in _NOT_FINITE:
            return f"timestamp {shown} is not a finite number"
        return f"timestamp {shown} is neither seconds nor ISO-8601"
    digits = isinstance(value, int) or (isinstance(value, str) and bool(_NUMERIC_RE.match(value.strip(TRIM))))
    if math.isnan(seconds) or (math.isinf(seconds) and not digits):  # digits beyond a float: out of range
        return f"timestamp {shown} is not a finite number"
    side = "before" if seconds < FIRST else "after"
    text = f"timestamp {shown} is {side} the accepted range {RANGE_TEXT}"
    if (digits or isinstance(value, float)) and END <= seconds < math.inf:
        hint, finer = _looks_like(seconds / UNIT_SCALE[unit], unit)
        if hint:
            text += hint + (advice(finer) if advice else "")
    return text


def parse_timestamp(value: object) -> float:
    """One timestamp (a JSON or Python value) -> float seconds in the accepted range; raises
    :class:`TimestampError` saying what is wrong (see the module docstring). None is not a time:
    callers treat a missing value themselves."""
    seconds: float | None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TimestampError(problem(value, None))
    if isinstance(value, int):
        if FIRST <= value < END:
            return float(value)
        seconds = float(value) if abs(value) < 10**300 else (1e300 if value > 0 else -1e300)  # no OverflowError
    elif isinstance(value, float):
        seconds = value
    else:
        seconds = text_seconds(value)
    if seconds is None or not in_range(seconds):
        raise TimestampError(problem(value, seconds))
    return seconds


# ---------------------------------------------------------------------------------------------
# Arrow
# ---------------------------------------------------------------------------------------------
def as_text(column: pa.Array) -> pa.Array:
    """Any Arrow column as strings, never raising: nested values as JSON, others by Arrow's cast,
    else by Python's ``str``."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column.cast(pa.string())
    if not pa.types.is_nested(column.type):
        try:
            return pc.cast(column, pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            pass
    try:
        values = column.to_pylist()
    except (ValueError, OverflowError, pa.ArrowException):  # e.g. a timestamp beyond Python's years
        return pa.array([None if not s.is_valid else _scalar_text(s) for s in column], pa.string())
    return pa.array([None if v is None else v if isinstance(v, str)
                     else json.dumps(v, default=str, ensure_ascii=False) if isinstance(v, (dict, list))
                     else str(v) for v in values], pa.string())


def _scalar_text(scalar: pa.Scalar) -> str:
    """One Arrow value as text, never raising (a date or time Python cannot hold: its number)."""
    try:
        return str(scalar)
    except (ValueError, OverflowError, pa.ArrowException):
        try:
            return f"{scalar.cast(pa.int64()).as_py()} ({scalar.type})"
        except (ValueError, OverflowError, pa.ArrowException):
            return f"<{scalar.type} value>"


def _floats(column: pa.Array) -> pa.Array:
    """Numbers as float64, rounding integers beyond 2**53 (Arrow's safe cast refuses them)."""
    return pc.cast(column, pa.float64(), safe=False)


def seconds_array(column: pa.Array | pa.ChunkedArray, unit: str = "s") -> pa.Array:
    """Any timestamp column -> float64 seconds since the epoch, null where unread (range not
    checked: see :func:`accepted`). Arrow timestamps (naive = UTC) and dates; numbers in ``unit``;
    text as :func:`text_seconds` reads it (numbers vectorised, CLF by Arrow's strptime, the rest
    each distinct text once); bools and nested values are unread."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    if pa.types.is_dictionary(column.type):
        column = column.dictionary_decode()
    kind = column.type
    if pa.types.is_timestamp(kind):
        return pc.multiply(_floats(column.cast(pa.int64())), UNIT_SCALE[kind.unit])
    if pa.types.is_date32(kind):
        return pc.multiply(_floats(column.cast(pa.int32())), 86400.0)
    if pa.types.is_date64(kind):
        return pc.multiply(_floats(column.cast(pa.int64())), 1e-3)
    if pa.types.is_boolean(kind) or pa.types.is_nested(kind) or pa.types.is_null(kind) \
            or pa.types.is_duration(kind) or pa.types.is_time(kind):  # no point in time
        return pa.nulls(len(column), pa.float64())
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        try:
            return pc.multiply(_floats(column), UNIT_SCALE[unit])
        except pa.ArrowException:
            column = as_text(column)
    text = pc.utf8_trim(as_text(column), TRIM)
    numeric = pc.fill_null(pc.match_substring_regex(text, NUMERIC), False)
    numbers = pc.multiply(pc.cast(pc.if_else(numeric, text, None), pa.float64()), UNIT_SCALE[unit])
    unbracketed = pc.replace_substring_regex(text, _BRACKETED, r"\1")
    clf = pc.cast(pc.cast(pc.strptime(unbracketed, format=CLF_FORMAT, unit="s", error_is_null=True), pa.int64()),
                  pa.float64())
    out = pc.coalesce(numbers, clf)
    rest = np.flatnonzero(np.asarray(pc.fill_null(pc.and_(pc.is_null(out), pc.is_valid(text)), False)))
    if len(rest) == 0:
        return out
    values = out.to_numpy(zero_copy_only=False).astype(np.float64)
    valid = ~np.asarray(pc.is_null(out))
    pending = pc.take(text, pa.array(rest)).to_pylist()
    parsed = {s: iso_seconds(s) for s in set(pending)}
    for k, s in zip(rest, pending):
        if parsed[s] is not None:
            values[k], valid[k] = parsed[s], True
    return pa.array(values, pa.float64(), mask=~valid)


def accepted(seconds: np.ndarray) -> np.ndarray:
    """Which of ``seconds`` (float64, NaN for unread) lie in the accepted range."""
    with np.errstate(invalid="ignore"):
        return (seconds >= FIRST) & (seconds < END)


def value_at(column: pa.Array | pa.ChunkedArray, k: int) -> object:
    """Row ``k`` of a column as a Python value (for :func:`problem`, or a bad line's text): text
    when Python cannot hold it; never raises."""
    try:
        value = column[k].as_py()
    except (ValueError, OverflowError, pa.ArrowException):
        return _scalar_text(column[k])
    if isinstance(value, (str, int, float, bool, list, dict)) or value is None:
        return value
    return str(value)
